"""The corpus stage's stats.json (``{corpus.output_dir}/stats.json``), read back and summarised for the two
documents that describe a run: the dataset card (decontaminate) and the report. Both show the same rows,
each in its own format; like :func:`pipeline.core.stats.funnel_row`, the content lives here once.

    python -c "from pipeline.core.config import load_config; from pipeline.core.corpus_stats import *; \
print(corpus_summary(read_corpus_stats(load_config()), load_config()))"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.config import RunConfig
from pipeline.core.stats import read_stats_file

EXCERPT_LINES = 8  # a top / bottom example is shown as its first lines...
EXCERPT_CHARS = 480  # ...and at most this many characters


def corpus_stats_path(cfg: RunConfig) -> Path:
    return Path(cfg.corpus.output_dir) / "stats.json"


def read_corpus_stats(cfg: RunConfig) -> dict | None:
    """The select step's stats, None when it has not run; a corrupt file is an error."""
    return read_stats_file(corpus_stats_path(cfg))


def excerpt(text: str, max_lines: int = EXCERPT_LINES, max_chars: int = EXCERPT_CHARS) -> str:
    """The first lines of a snippet, cut at a line end where it can be; `# ...` marks a cut."""
    lines = text.strip("\n").splitlines()
    out = "\n".join(lines[:max_lines])
    if len(out) > max_chars:
        out = out[:max_chars].rsplit("\n", 1)[0] if "\n" in out[:max_chars] else out[:max_chars]
    return out + ("\n# ..." if out != "\n".join(lines) else "")


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _f(value: Any, digits: int = 3) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{100 * value:.1f}%"


def corpus_status(stats: Mapping | None, cfg: RunConfig) -> str | None:
    """One line when the corpus did not run for this run (None when it did)."""
    if stats is None:
        return (f"Not run: no `{corpus_stats_path(cfg)}` (dvc.yaml's corpus_extract, dedupe_corpus, "
                "decontaminate_corpus and corpus stages).")
    if stats.get("enabled") is False:
        return "Not built in this run (`corpus.enabled: false`): no natural code was collected, rated or kept."
    if not isinstance(stats.get("counts"), Mapping):
        return f"Not readable: `{corpus_stats_path(cfg)}` has no counts."
    return None


def _sources(src: Mapping | None) -> str:
    src = src or {}
    parts = [f"`{spec}` ({', '.join(f'`{p}`' for p in paths) or 'nothing found'})"
             for spec, paths in (src.get("roots") or {}).items()]
    parts += [f"`{f}`" for f in src.get("files") or []]
    if src.get("hf_dataset"):
        parts.append(f"Hugging Face dataset `{src['hf_dataset']}` (streamed)")
    if src.get("max_files"):
        parts.append(f"at most {_n(src['max_files'])} files")
    return "; ".join(parts) or "-"


def _used(stats: Mapping, cfg: RunConfig) -> str:
    output = str((stats.get("selection") or {}).get("output") or Path(cfg.corpus.output_dir) / "kept.jsonl")
    if output not in cfg.pretrain.extra_corpus:
        return f"`pretrain.extra_corpus` does not list `{output}`: no phase trained on it."
    if not cfg.pretrain.enabled:
        return "Phase 1 (`pretrain.enabled: false`) did not run: no phase trained on it."
    return "Phase 1 (pretrain) trained on it beside the textbook sections (`pretrain.extra_corpus`)."


def corpus_summary(stats: Mapping, cfg: RunConfig) -> dict[str, Any]:
    """What the card and the report say about a corpus that ran: a summary sentence, tables as
    (header, rows) of strings, and the highest- and lowest-scored snippets as short excerpts."""
    counts = stats.get("counts") or {}
    ann = stats.get("annotation") or {}
    agree = stats.get("self_agreement") or {}
    clf = stats.get("classifier") or {}
    sel = stats.get("selection") or {}
    units = stats.get("snippets_by_unit") or {}
    teacher = (ann.get("teacher") or {}).get("preset")
    rule = (f"every snippet scored >= {sel.get('threshold')}" if sel.get("rule") == "threshold"
            else f"the top {_pct(sel.get('keep_fraction'))} by score")
    summary = (f"Natural Python code, phi-1's filtered half: sources {_sources(stats.get('sources'))}. Split into "
               "snippets (documented functions and classes with their imports, whole small files), deduplicated and "
               f"decontaminated by this pipeline's own stages; the teacher `{teacher or '-'}` rated a seeded sample "
               "for educational value to a student learning basic coding concepts (1-5); a random forest on "
               f"`{clf.get('embedding_model', '-')}` embeddings learned rating >= {ann.get('positive_score_used', '-')} "
               f"and scored every snippet; {rule} was kept: **{_n(counts.get('kept'))} of {_n(counts.get('scored'))}** "
               f"({_pct(sel.get('kept_fraction'))}, {_n(sel.get('kept_chars'))} characters) in "
               f"`{sel.get('output', '-')}`. {_used(stats, cfg)}")
    by_unit = ", ".join(f"{u} {_n(n)}" for u, n in units.items()) if isinstance(units, Mapping) else ""
    count_rows = [["files read", _n(counts.get("files_read"))],
                  ["snippets extracted" + (f" ({by_unit})" if by_unit else ""), _n(counts.get("snippets"))],
                  ["after dedupe", _n(counts.get("after_dedupe"))],
                  ["after decontamination", _n(counts.get("after_decontaminate"))],
                  ["rated by the teacher", _n(counts.get("annotated"))],
                  ["scored by the classifier", _n(counts.get("scored"))],
                  ["kept", f"{_n(counts.get('kept'))} ({_pct(sel.get('kept_fraction'))})"]]
    hist = ann.get("histogram") or {}
    teacher_rows = [["ratings read / asked", f"{_n(ann.get('rated'))} / {_n(ann.get('requested'))} (unparsed "
                     f"{_n(ann.get('unparsed'))}, failed {_n(ann.get('failed'))})"],
                    ["ratings 1-5", ", ".join(f"{k}: {_n(v)}" for k, v in hist.items()) or "-"],
                    ["mean rating", _f(ann.get("mean_score"), 2)],
                    [f"share rated >= {ann.get('positive_score_used', ann.get('positive_score', '-'))} (educational)",
                     _pct(ann.get("positive_rate"))]]
    if agree.get("pairs"):
        teacher_rows += [["self-agreement: snippets rated twice", _n(agree["pairs"])],
                         ["same rating / within one point", f"{_pct(agree.get('exact'))} / {_pct(agree.get('within_one'))}"],
                         ["same label (educational or not)", _pct(agree.get("same_label"))],
                         ["quadratic-weighted kappa", _f(agree.get("kappa_quadratic"))]]
    else:
        teacher_rows.append(["self-agreement", "not measured (`corpus.agreement_repeats: 0`)"])
    clf_rows = [["trained on / held out", f"{_n(clf.get('train'))} / {_n(clf.get('heldout'))} ratings "
                 f"({_n(clf.get('heldout_positive'))} held-out positives, base rate {_f(clf.get('heldout_base_rate'))})"],
                ["precision", _f(clf.get("precision"))], ["recall", _f(clf.get("recall"))], ["F1", _f(clf.get("f1"))],
                ["accuracy", _f(clf.get("accuracy"))], ["ROC AUC", _f(clf.get("roc_auc"))],
                ["lowest kept score", _f(sel.get("lowest_kept_score"), 4)]]
    if clf.get("heldout_positive") == 0 or clf.get("heldout_positive") == clf.get("heldout"):
        clf_rows.append(["note", "the held-out ratings are all of one label: precision, recall, F1 and ROC AUC "
                         "measure nothing here (a larger `corpus.annotate`)"])
    examples = stats.get("examples") or {}
    shown = [(which, ex) for which in ("top", "bottom") for ex in examples.get(which) or []]
    example_rows = [{"which": "highest" if which == "top" else "lowest", "score": _f(ex.get("score"), 4),
                     "where": f"`{ex.get('path') or ex.get('id')}`" + (f" ({ex['unit']})" if ex.get("unit") else ""),
                     "excerpt": excerpt(str(ex.get("text") or ""))} for which, ex in shown]
    return {"summary": summary, "counts": (["step", "snippets"], count_rows),
            "teacher": (["teacher's ratings", "value"], teacher_rows),
            "classifier": ([f"classifier ({clf.get('model', '-')}, {_n(clf.get('trees'))} trees), held out", "value"],
                           clf_rows),
            "examples": example_rows}


def code_fence(text: str) -> str:
    """A Markdown fence longer than any run of backticks in `text`."""
    return "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
