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

from pipeline.core.artifacts import CorpusSelectStats
from pipeline.core.artifacts.corpus import Sources
from pipeline.core.config import RunConfig

EXCERPT_LINES = 8  # a top / bottom example is shown as its first lines...
EXCERPT_CHARS = 480  # ...and at most this many characters
# Below these, the card and report say the filter is close to a random selection: a quadratic kappa under 0.2 is
# "slight" agreement (Landis and Koch), and a ROC AUC under 0.6 ranks little better than a coin.
WEAK_KAPPA = 0.2
WEAK_AUC = 0.6


def corpus_stats_path(cfg: RunConfig) -> Path:
    return Path(cfg.corpus.output_dir) / "stats.json"


def read_corpus_stats(cfg: RunConfig) -> CorpusSelectStats | None:
    """The select step's stats, None when it has not run; a corrupt file is an ArtifactError naming it."""
    return CorpusSelectStats.read_optional(corpus_stats_path(cfg))


def as_corpus_stats(stats: CorpusSelectStats | Mapping | None) -> CorpusSelectStats | None:
    """The select step's stats as its model (a dict is parsed: a key the model does not know is an error)."""
    if stats is None or isinstance(stats, CorpusSelectStats):
        return stats
    return CorpusSelectStats.parse(stats, "corpus stats")


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


def corpus_status(stats: CorpusSelectStats | None, cfg: RunConfig) -> str | None:
    """One line when the corpus did not run for this run (None when it did)."""
    if stats is None:
        return (f"Not run: no `{corpus_stats_path(cfg)}` (dvc.yaml's corpus_extract, dedupe_corpus, "
                "decontaminate_corpus and corpus stages).")
    if not stats.enabled:
        return "Not built in this run (`corpus.enabled: false`): no natural code was collected, rated or kept."
    return None


def _sources(src: Sources | None) -> str:
    if src is None:
        return "-"
    parts = [f"`{spec}` ({', '.join(f'`{p}`' for p in paths) or 'nothing found'})" for spec, paths in src.roots.items()]
    parts += [f"`{f}`" for f in src.files]
    if src.hf_dataset:
        parts.append(f"Hugging Face dataset `{src.hf_dataset}` (streamed)")
    if src.max_files:
        parts.append(f"at most {_n(src.max_files)} files")
    return "; ".join(parts) or "-"


def _used(stats: CorpusSelectStats, cfg: RunConfig) -> str:
    output = stats.selection.output if stats.selection else str(Path(cfg.corpus.output_dir) / "kept.jsonl")
    if output not in cfg.pretrain.extra_corpus:
        return f"`pretrain.extra_corpus` does not list `{output}`: no phase trained on it."
    if not cfg.pretrain.enabled:
        return "Phase 1 (`pretrain.enabled: false`) did not run: no phase trained on it."
    return "Phase 1 (pretrain) trained on it beside the textbook sections (`pretrain.extra_corpus`)."


def corpus_summary(stats: CorpusSelectStats, cfg: RunConfig) -> dict[str, Any]:
    """What the card and the report say about a corpus that ran (`corpus_status` is None): a summary sentence,
    tables as (header, rows) of strings, and the highest- and lowest-scored snippets as short excerpts."""
    counts, ann, agree = stats.counts, stats.annotation, stats.self_agreement
    clf, sel, units = stats.classifier, stats.selection, stats.snippets_by_unit or {}
    assert counts and ann and agree and clf and sel and stats.examples  # every key of a corpus that ran (its model)
    rule = (f"every snippet scored >= {sel.threshold}" if sel.rule == "threshold"
            else f"the top {_pct(sel.keep_fraction)} by score")
    summary = (f"Natural Python code, phi-1's filtered half: sources {_sources(stats.sources)}. Split into "
               "snippets (documented functions and classes with their imports, whole small files), deduplicated and "
               f"decontaminated by this pipeline's own stages; the teacher `{ann.teacher.preset}` rated a seeded sample "
               "for educational value to a student learning basic coding concepts (1-5); a random forest on "
               f"`{clf.embedding_model}` embeddings learned rating >= {ann.positive_score_used} "
               f"and scored every snippet; {rule} was kept: **{_n(counts.kept)} of {_n(counts.scored)}** "
               f"({_pct(sel.kept_fraction)}, {_n(sel.kept_chars)} characters) in "
               f"`{sel.output}`. {_used(stats, cfg)}")
    by_unit = ", ".join(f"{u} {_n(n)}" for u, n in units.items())
    count_rows = [["files read", _n(counts.files_read)],
                  ["snippets extracted" + (f" ({by_unit})" if by_unit else ""), _n(counts.snippets)],
                  ["after dedupe", _n(counts.after_dedupe)],
                  ["after decontamination", _n(counts.after_decontaminate)],
                  ["rated by the teacher", _n(counts.annotated)],
                  ["scored by the classifier", _n(counts.scored)],
                  ["kept", f"{_n(counts.kept)} ({_pct(sel.kept_fraction)})"]]
    teacher_rows = [["ratings read / asked", f"{_n(ann.rated)} / {_n(ann.requested)} (unparsed "
                     f"{_n(ann.unparsed)}, failed {_n(ann.failed)})"],
                    ["ratings 1-5", ", ".join(f"{k}: {_n(v)}" for k, v in ann.histogram.items()) or "-"],
                    ["mean rating", _f(ann.mean_score, 2)],
                    [f"share rated >= {ann.positive_score_used} (educational)", _pct(ann.positive_rate)]]
    if agree.pairs:
        teacher_rows += [["self-agreement: snippets rated twice", _n(agree.pairs)],
                         ["same rating / within one point", f"{_pct(agree.exact)} / {_pct(agree.within_one)}"],
                         ["same label (educational or not)", _pct(agree.same_label)],
                         ["quadratic-weighted kappa", _f(agree.kappa_quadratic)]]
        if agree.kappa_label is not None:
            teacher_rows += [["kappa of the label", _f(agree.kappa_label)],
                             ["rated educational once / both times", f"{_n(agree.positive_once)} / "
                              f"{_n(agree.positive_twice)}"]]
    else:
        teacher_rows.append(["self-agreement", "not measured (`corpus.agreement_repeats: 0`)"])
    clf_rows = [["trained on / held out", f"{_n(clf.train)} / {_n(clf.heldout)} ratings "
                 f"({_n(clf.heldout_positive)} held-out positives, base rate {_f(clf.heldout_base_rate)})"],
                ["ROC AUC", _f(clf.roc_auc)]]
    if clf.precision_at_keep is not None or clf.recall_at_keep is not None:
        clf_rows.append([f"the selection rule ({rule}) on the held-out ratings: kept, precision, recall, lift "
                         "(1.0: a random selection)", f"{_n(clf.heldout_kept)}, {_f(clf.precision_at_keep)}, "
                         f"{_f(clf.recall_at_keep)}, {_f(clf.lift_at_keep, 2)}"])
    clf_rows += [["precision, recall, F1, accuracy at P >= 0.5",
                  f"{_f(clf.precision)}, {_f(clf.recall)}, {_f(clf.f1)}, {_f(clf.accuracy)}"],
                 ["lowest kept score", _f(sel.lowest_kept_score, 4)]]
    if clf.scored_out_of_bag:
        clf_rows.append(["training ratings scored out-of-bag", _n(clf.scored_out_of_bag)])
    weak_teacher = agree.kappa_quadratic is not None and agree.kappa_quadratic < WEAK_KAPPA
    weak_classifier = clf.roc_auc is not None and clf.roc_auc < WEAK_AUC
    if weak_teacher or weak_classifier:
        why = []
        if weak_teacher:
            why.append(f"the teacher barely agrees with itself (quadratic kappa {_f(agree.kappa_quadratic)})")
        if weak_classifier:
            why.append(f"the classifier ranks held-out snippets little better than chance (ROC AUC {_f(clf.roc_auc)})")
        remedy = ("a stronger teacher (`corpus.teacher`)" if weak_teacher
                  else "more ratings (`corpus.annotate`) or another `corpus.embedding_model`")
        clf_rows.append(["note", "; ".join(why) + f": the kept share is close to a random one; {remedy} is the "
                         "remedy"])
    if clf.heldout_positive == 0 or clf.heldout_positive == clf.heldout:
        clf_rows.append(["note", "the held-out ratings are all of one label: precision, recall, F1 and ROC AUC "
                         "measure nothing here (a larger `corpus.annotate`)"])
    shown = [(which, ex) for which in ("top", "bottom") for ex in getattr(stats.examples, which)]
    example_rows = [{"which": "highest" if which == "top" else "lowest", "score": _f(ex.score, 4),
                     "where": f"`{ex.path or ex.id}`" + (f" ({ex.unit})" if ex.unit else ""),
                     "excerpt": excerpt(ex.text)} for which, ex in shown]
    return {"summary": summary, "counts": (["step", "snippets"], count_rows),
            "teacher": (["teacher's ratings", "value"], teacher_rows),
            "classifier": ([f"classifier ({clf.model}, {_n(clf.trees)} trees), held out", "value"], clf_rows),
            "examples": example_rows}


def code_fence(text: str) -> str:
    """A Markdown fence longer than any run of backticks in `text`."""
    return "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
