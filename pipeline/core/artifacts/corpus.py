"""The corpus stage's stats.json: the extract step's (`{corpus.pool_dir}/stats.json`) and the select step's
(`{corpus.output_dir}/stats.json`); each is `{"enabled": false}` alone when the corpus is off.

    python -c "from pipeline.core.artifacts import CorpusSelectStats as S; print(S.read('tests/data/corpus_stats.json').counts)"
"""

from __future__ import annotations

from typing import ClassVar

from pipeline.core.artifacts.base import F, Num, PerKind, Section, Toggled
from pipeline.core.artifacts.curation import Ledger


class Sources(Section):
    roots: dict[str, list[str]] = F("Each corpus.roots spec and the folders it resolved to.")
    files: list[str] = F("corpus.files.")
    hf_dataset: str | None = F("corpus.hf_dataset (streamed), or None.")
    max_files: int = F("corpus.max_files (0 = all).")


class FilesRead(Section):
    read: int = F("Files read.")
    with_snippets: int = F("Files that gave a snippet.")
    unparsable_or_generated: int = F("Files that did not parse or were generated.")
    skipped: dict[str, int] = F("Files skipped before reading, by reason.")


class ExtractSettings(Section):
    units: list[str] = F("corpus.units.")
    min_body_lines: int = F("corpus.min_body_lines.")
    max_lines: int = F("corpus.max_lines.")
    file_max_lines: int = F("corpus.file_max_lines.")
    version: int = F("The extractor's version (its shards' fingerprint).")


class ExtractTiming(Section):
    wall_s: Num = F("Seconds the step took.")
    shards_reused: int = F("Shards a killed run had finished.")


class CorpusPoolStats(Toggled):
    """`{corpus.pool_dir}/stats.json`: the extract step (sources -> snippets)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("sources", "files", "snippets", "records", "snippet_chars", "settings",
                                           "timing", "snippets_total")
    sources: Sources | None = F("Where the snippets came from.", None)
    files: FilesRead | None = F("Files read.", None)
    snippets: dict[str, int] | None = F("Snippets by unit (function, class, file).", None)
    records: PerKind | None = F("Records written, by kind (functions are exercises).", None)
    snippet_chars: int | None = F("Characters of every snippet.", None)
    settings: ExtractSettings | None = F("The extraction settings.", None)
    timing: ExtractTiming | None = F("Timings.", None)
    snippets_total: int | None = F("Snippets of every unit.", None)


class Counts(Section):
    files_read: int | None = F("Files the extract step read (None: its stats are missing).")
    snippets: int | None = F("Snippets extracted.")
    after_dedupe: int | None = F("Snippets into decontamination (after dedupe).")
    after_decontaminate: int = F("Snippets after decontamination: the step's input.")
    annotated: int = F("Snippets the teacher rated.")
    scored: int = F("Snippets the classifier scored.")
    kept: int = F("Snippets kept.")


class TeacherRef(Section):
    preset: str = F("The teacher preset.")
    identity: str = F("Its cache identity.")


class Sampling(Section):
    temperature: Num = F("corpus.sampling.temperature.")
    max_tokens: int = F("corpus.sampling.max_tokens.")


class Annotation(Section):
    teacher: TeacherRef = F("Who rated.")
    template: str = F("corpus.template.")
    template_sha256: str = F("sha256 of the template's text.")
    scale: list[int] = F("The rating scale's ends.")
    positive_score: int = F("corpus.positive_score.")
    positive_score_used: int = F("The cut used (moved when every rating is on one side).")
    sampling: Sampling = F("The teacher's sampling.")
    requested: int = F("Snippets in the sample.")
    requests: int = F("Requests (the sample and its repeats).")
    rated: int = F("Ratings read.")
    unparsed: int = F("Answers without a rating.")
    failed: int = F("Requests that failed.")
    not_attempted: int = F("Requests not sent (budget).")
    histogram: dict[str, int] = F("Ratings 1-5.")
    positive_rate: Num | None = F("Share rated at or above positive_score.")
    mean_score: Num | None = F("Mean rating.")
    ledger: Ledger = F("The teacher's usage ledger.")
    server_start_s: Num = F("Seconds starting the teacher's server.")
    wall_s: Num = F("Seconds rating.")


class SelfAgreement(Section):
    pairs: int = F("Snippets rated twice (0: not measured).")
    exact: Num | None = F("Share rated the same twice.", None)
    within_one: Num | None = F("Share rated within one point.", None)
    same_label: Num | None = F("Share on the same side of the cut.", None)
    kappa_quadratic: Num | None = F("Quadratic-weighted Cohen's kappa of the ratings.", None)
    kappa_label: Num | None = F("Cohen's kappa of the label (educational or not).", None)
    positive_once: int | None = F("Pairs rated educational at least once.", None)
    positive_twice: int | None = F("Pairs rated educational both times.", None)


class Classifier(Section):
    model: str = F("The classifier.")
    trees: int = F("corpus.trees.")
    class_weight: str = F("Its class weights.")
    train: int = F("Ratings trained on.")
    heldout: int = F("Ratings held out.")
    train_positive: int = F("Positive training ratings.")
    heldout_positive: int = F("Positive held-out ratings.")
    precision: Num = F("Held-out precision at P >= 0.5.")
    recall: Num = F("Held-out recall at P >= 0.5.")
    f1: Num = F("Held-out F1 at P >= 0.5.")
    accuracy: Num = F("Held-out accuracy at P >= 0.5.")
    roc_auc: Num | None = F("Held-out ROC AUC (None: one label held out).")
    heldout_base_rate: Num | None = F("Share of positives held out.")
    heldout_kept: int | None = F("Held-out ratings the selection rule keeps (the top keep_fraction of their "
                                 "scores, or those over the threshold).", None)
    precision_at_keep: Num | None = F("Share of those rated educational.", None)
    recall_at_keep: Num | None = F("Share of the held-out educational ratings kept.", None)
    lift_at_keep: Num | None = F("precision_at_keep over the base rate: 1.0 is a random selection's.", None)
    scored_out_of_bag: int | None = F("Training ratings whose corpus score is out-of-bag (from the trees that did "
                                      "not see them), not the forest's own fit.", None)
    embedding_model: str = F("corpus.embedding_model.")
    positive_score: int = F("The rating cut learned.")


class Selection(Section):
    rule: str = F("threshold or keep_fraction.")
    keep_fraction: Num = F("corpus.keep_fraction.")
    threshold: Num = F("corpus.threshold.")
    lowest_kept_score: Num | None = F("The lowest score kept.")
    kept: int = F("Snippets kept.")
    kept_fraction: Num = F("Share kept.")
    kept_by_unit: dict[str, int] = F("Kept snippets by unit.")
    kept_chars: int = F("Characters kept.")
    mean_score: Num | None = F("Mean score of every snippet.")
    output: str = F("kept.jsonl's path.")


class Example(Section):
    id: str = F("The snippet's id.")
    score: Num = F("Its score.")
    path: str | None = F("Its source file.")
    unit: str | None = F("function, class or file.")
    text: str = F("Its text, cut at 1,200 characters.")


class Examples(Section):
    top: list[Example] = F("The highest-scored snippets.")
    bottom: list[Example] = F("The lowest-scored, lowest first.")


class SelectTiming(Section):
    wall_s: Num = F("Seconds the step took.")
    annotate_s: Num = F("Seconds rating.")
    embedder_load_s: Num = F("Seconds loading the embedder.")
    embed_s: Num = F("Seconds embedding.")
    embed_per_s: Num = F("Snippets embedded per second.")
    score_s: Num = F("Seconds scoring.")
    score_per_s: Num = F("Snippets scored per second.")
    shards_reused: int = F("Embedding shards a killed run had finished.")


class CorpusSelectStats(Toggled):
    """`{corpus.output_dir}/stats.json`: the select step (rated, scored, kept): the card and report read it."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("sources", "counts", "snippets_by_unit", "annotation", "self_agreement",
                                           "classifier", "selection", "examples", "timing")
    sources: Sources | None = F("The extract step's sources (None: its stats are missing).", None)
    counts: Counts | None = F("Snippets at each step.", None)
    snippets_by_unit: dict[str, int] | None = F("Snippets extracted by unit.", None)
    annotation: Annotation | None = F("The teacher's ratings.", None)
    self_agreement: SelfAgreement | None = F("The teacher's agreement with itself.", None)
    classifier: Classifier | None = F("The classifier's held-out metrics.", None)
    selection: Selection | None = F("What was kept.", None)
    examples: Examples | None = F("The highest- and lowest-scored snippets.", None)
    timing: SelectTiming | None = F("Timings.", None)
