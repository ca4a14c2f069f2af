"""The curation stages' stats.json (generate, filter, dedupe, decontaminate, controls), the LLM usage ledger
they embed, and decontaminate's humaneval_similarity.json. Each stats model gives its funnel row
(`funnel()`: in / kept / removed and why) from its own keys: the card and the report show the same row.

    python -c "from pipeline.core.artifacts import DedupeStats; print(DedupeStats.read('data/dedupe/stats.json').funnel())"
"""

from __future__ import annotations

from typing import Literal

from pipeline.core.artifacts.base import Artifact, F, Num, PerKind, Section


def _sorted(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items()))


def funnel(n_in: int | None, kept: int | None, removed: int | None, reasons: dict[str, int],
           kept_by_kind: dict[str, int]) -> dict:
    """A stage's funnel row (pipeline.core.stats.funnel_row adds the stage's name and status)."""
    return {"in": n_in, "kept": kept, "removed": removed, "reasons": _sorted(reasons), "kept_by_kind": kept_by_kind}


# ---------------------------------------------------------------------------------------
# The LLM usage ledger (pipeline.engines.llm.Ledger.as_dict), embedded in the stats of the stages that ask a teacher
# ---------------------------------------------------------------------------------------


class EndpointCounts(Section):
    sent: int = F("Requests sent to this endpoint.")
    failed: int = F("Requests to this endpoint that failed.")


class Ledger(Section):
    """One run's usage. `{}` (every key unset) when the run sent nothing: LLMSession.ledger_dict."""

    requests_sent: int = F("Requests sent (not answered from the cache).", 0)
    cache_hits: int = F("Requests answered from the request cache.", 0)
    failed: int = F("Attempts that failed.", 0)
    retries: int = F("Attempts sent again.", 0)
    prompt_tokens: int = F("Prompt tokens of every paid attempt.", 0)
    completion_tokens: int = F("Completion tokens of every paid attempt.", 0)
    cost_usd_total: Num = F("USD of every record, cached ones included.", 0.0)
    cost_usd_this_run: Num = F("USD this run paid.", 0.0)
    length_retries: int = F("Answers cut at max_tokens, paid, then asked again.", 0)
    failovers: int = F("Retries sent at once to another endpoint.", 0)
    backoff_s: Num = F("Seconds requests waited to be retried.", 0.0)
    batches_submitted: int = F("Batch API batches this run created.", 0)
    batches_resumed: int = F("Batch API batches an earlier run submitted, polled.", 0)
    errors: dict[str, int] = F("Failed attempts by error class.", default_factory=dict)
    by_endpoint: list[EndpointCounts] = F("Sent and failed per endpoint, in preset order.", default_factory=list)

    @property
    def sent_anything(self) -> bool:
        """False for the `{}` of a run that sent nothing."""
        return bool(self.model_fields_set)


# ---------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------


class Repair(Section):
    rounds: int = F("generate.repair_rounds.")
    requests: int = F("Repair requests sent or read from the cache.")
    by_outcome: dict[str, int] = F("Repair requests by outcome.")
    exercises_repaired: int = F("Exercises a repair made pass.")


class TeacherTokens(Section):
    prompt: int = F("Prompt tokens of every request.")
    completion: int = F("Completion tokens of every request.")


class Coverage(Section):
    prompts: int = F("Prompts built.")
    duplicate_prompt_rate: Num = F("Share of prompts that repeat another.")
    distinct_topics: int = F("Topics used.")
    distinct_topic_subtopic_pairs: int = F("Topic x subtopic pairs used.")
    topic_subtopic_pairs_available: int = F("Topic x subtopic pairs in the topic tree.")
    distinct_topic_pairs: int = F("Topic pairs of two-topic prompts.")
    distinct_audiences: int = F("Audiences used.")
    distinct_function_names: int = F("Distinct function names of the kept exercises.")
    function_name_duplicate_rate: Num = F("Share of kept exercises whose function name repeats another's.")


class GenerateTiming(Section):
    wall_s: Num = F("Seconds the stage took.")
    server_start_s: Num = F("Seconds starting the teacher's server.")


class GenerateStats(Artifact):
    """`{generate.output_dir}/stats.json`."""

    teacher: str = F("The teacher preset.")
    requested: int = F("Prompts to send.")
    completed: int = F("Prompts with an answer (sent or cached).")
    not_attempted: int = F("Prompts not sent: the budget ran out.")
    stopped_by_budget: bool = F("Whether the budget cap stopped the run.")
    lost: int = F("Prompts lost to failed requests, accepted by client.max_failed_fraction.")
    failed_requests: int = F("Requests that failed for a transport reason.")
    failed_by_error: dict[str, int] = F("Failed requests by error class.")
    kept: PerKind = F("Records kept, by kind.")
    rejected: int = F("Answers rejected (rejected.jsonl).")
    rejected_by_reason: dict[str, int] = F("Rejections by reason.")
    salvaged_from_length: int = F("Exercises kept from an answer cut at max_tokens.")
    repair: Repair = F("The repair rounds.")
    tokens: TeacherTokens = F("The teacher's tokens.")
    cost_usd: Num = F("USD of every answer the records came from.")
    ledger_this_run: Ledger = F("This run's usage ledger ({} when nothing was sent).")
    coverage: Coverage = F("Diversity of the prompts (coverage.json less its space).")
    timing: GenerateTiming = F("Timings.")

    def funnel(self) -> dict:
        reasons = dict(self.rejected_by_reason)
        if self.not_attempted:
            reasons["not_attempted (budget)"] = self.not_attempted
        if self.lost:
            reasons["lost (request failed, accepted by client.max_failed_fraction)"] = self.lost
        return funnel(self.requested, self.kept.total, self.rejected, reasons, dict(self.kept.items()))


# ---------------------------------------------------------------------------------------
# filter
# ---------------------------------------------------------------------------------------


class FilterKind(Section):
    """One kind's counts; the assert keys are the exercises' only."""

    in_: int = F("Records in.", alias="in")
    kept: int = F("Records kept.")
    dropped: int = F("Records dropped (rejected.jsonl).")
    dropped_by_reason: dict[str, int] = F("Dropped records by reason.")
    assert_policy: str | None = F("filter.assert_policy (exercises).", None)
    kept_with_dropped_asserts: int | None = F("Exercises kept with failing asserts dropped.", None)
    asserts_dropped: int | None = F("Asserts dropped.", None)
    kept_with_rewritten_asserts: int | None = F("Exercises kept with expected values rewritten.", None)
    asserts_rewritten: int | None = F("Expected values rewritten.", None)


class FilterTiming(Section):
    wall_s: Num = F("Seconds the stage took.")
    records_per_s: Num = F("Records decided per second.")


class FilterStats(Artifact):
    """`{filter.output_dir}/stats.json`."""

    exercise: FilterKind = F("Exercises.")
    textbook: FilterKind = F("Textbook sections.")
    isolation: str = F("The sandbox's isolation.")
    timing: FilterTiming = F("Timings.")

    def funnel(self) -> dict:
        kinds = {"exercise": self.exercise, "textbook": self.textbook}
        reasons: dict[str, int] = {}
        for sec in kinds.values():
            for reason, n in sec.dropped_by_reason.items():
                reasons[reason] = reasons.get(reason, 0) + n
        return funnel(sum(s.in_ for s in kinds.values()), sum(s.kept for s in kinds.values()),
                      sum(s.dropped for s in kinds.values()), reasons, {k: s.kept for k, s in kinds.items()})


# ---------------------------------------------------------------------------------------
# dedupe
# ---------------------------------------------------------------------------------------


class DedupeKind(Section):
    in_: int = F("Records in.", alias="in")
    kept: int = F("Records kept.")
    removed_exact: int = F("Removed as exact duplicates.")
    removed_near: int = F("Removed as near duplicates.")
    clusters: int = F("Clusters of duplicates.")
    largest_cluster: int = F("Members of the largest cluster.")
    ast_checked: int = F("Exact-key groups checked by AST.")
    unparsable_code: int = F("Records whose code did not parse.")
    candidate_pairs: int = F("LSH candidate pairs.")
    confirmed_pairs: int = F("Pairs confirmed at the Jaccard threshold.")
    crowded_rows: int = F("Rows of crowded LSH buckets.")
    without_shingles: int = F("Records too short for a shingle.")
    duplicate_rate_per_1000: list[Num] = F("Share removed in each block of 1,000 records, in id order.")


class Lsh(Section):
    num_perm: int = F("dedupe.num_perm.")
    permutations_used: int = F("bands x rows.")
    bands: int = F("LSH bands.")
    rows: int = F("Rows per band.")
    threshold: Num = F("dedupe.threshold (Jaccard).")
    candidate_recall: Num = F("dedupe.candidate_recall.")
    p_candidate_at_threshold: Num = F("Probability a pair at the threshold is a candidate.")
    shingle_size: int = F("dedupe.shingle_size.")
    exact: bool = F("dedupe.exact.")
    near: bool = F("dedupe.near.")


class Resumed(Section):
    blocks: int = F("Index blocks.")
    blocks_reused: int = F("Blocks a killed run had finished.")
    confirm_steps_reused: int = F("Confirmation steps a killed run had finished.")


class DedupeTiming(Section):
    wall_s: Num = F("Seconds the stage took.")
    index_s: Num = F("Seconds indexing.")
    decide_s: Num = F("Seconds deciding.")
    write_s: Num = F("Seconds writing.")
    docs_per_s: Num = F("Records per second.")
    workers: int = F("Worker processes.")
    resumed: dict[Literal["exercise", "textbook"], Resumed] = F("What a killed run's shards saved, by kind.")


class DedupeStats(Artifact):
    """`{dedupe.output_dir}/stats.json` (also the corpus's and the control arms' dedupe)."""

    exercise: DedupeKind = F("Exercises.")
    textbook: DedupeKind = F("Textbook sections.")
    kept: PerKind = F("Records kept, by kind.")
    removed: PerKind = F("Records removed, by kind.")
    lsh: Lsh = F("The LSH parameters.")
    timing: DedupeTiming = F("Timings.")

    def funnel(self) -> dict:
        kinds = (self.exercise, self.textbook)
        reasons = {"exact": sum(k.removed_exact for k in kinds), "near": sum(k.removed_near for k in kinds)}
        return funnel(sum(k.in_ for k in kinds), self.kept.total, self.removed.total, reasons, dict(self.kept.items()))


# ---------------------------------------------------------------------------------------
# decontaminate
# ---------------------------------------------------------------------------------------

Signal = Literal["ngram", "difflib", "ast", "embedding", "functional"]


class Thresholds(Section):
    ngram_size: int = F("decontaminate.ngram_size.")
    candidate_ngram_size: int = F("decontaminate.candidate_ngram_size.")
    difflib: Num = F("decontaminate.difflib_threshold.")
    ast: Num = F("decontaminate.ast_threshold.")
    embedding: Num | None = F("decontaminate.embedding_threshold (the embedding signal on).", None)
    functional_candidates: int | None = F("decontaminate.functional_candidates (the functional signal on).", None)


class FunctionalRuns(Section):
    jobs: int = F("Sandbox jobs run.")
    timeouts: int = F("Jobs that timed out.")


class HumanEvalSummary(Section):
    problems: int = F("HumanEval problems compared.")
    max_ast_tau: Num = F("Highest AST match score of a kept record.")
    similar_at_tau: dict[str, int] = F("Problems similar to a kept record at each tau level.")


class ReleasedTokens(Section):
    completion_tokens: int = F("Teacher completion tokens of the kept records.")
    text_words: int = F("Whitespace words of the dataset's `text`.")


class DatasetInfo(Section):
    rows: int = F("Rows of the released dataset.")
    columns: list[str] = F("Its columns.")
    jsonl: str = F("The JSONL file, in the dataset folder.")
    parquet: str = F("The parquet shard, in the dataset folder.")


class DecontaminateTiming(Section):
    index_s: Num = F("Seconds indexing HumanEval.")
    ngram_difflib_s: Num = F("Seconds on the n-gram and difflib signals.")
    ast_s: Num = F("Seconds on the AST signal.")
    embedding_s: Num | None = F("Seconds on the embedding signal.", None)
    functional_s: Num | None = F("Seconds on the functional signal.", None)
    dataset_s: Num = F("Seconds writing the dataset.")
    wall_s: Num = F("Seconds the stage took.")


class DecontaminateStats(Artifact):
    """`{decontaminate.output_dir}/stats.json` (timing is added last: the card is given the stats without it)."""

    in_: PerKind = F("Records in, by kind.", alias="in")
    kept: PerKind = F("Records kept, by kind.")
    removed: PerKind = F("Records removed, by kind.")
    removed_by_signal: dict[Signal, int] = F("Records each signal removed (a record can fire several).")
    kept_by_behaviour: int = F("Flagged by a text signal, kept: their function fails the problem's tests.")
    removed_task_ids: list[str] = F("The HumanEval problems the removed records matched.")
    signals: list[Signal] = F("The signals on.")
    thresholds: Thresholds = F("The signals' thresholds.")
    functional: FunctionalRuns | None = F("The functional signal's sandbox runs (when on).", None)
    humaneval: HumanEvalSummary = F("Similarity of the kept records to HumanEval.")
    tokens: ReleasedTokens = F("Size of the released records.")
    dataset: DatasetInfo = F("The released dataset.")
    timing: DecontaminateTiming | None = F("Timings.", None)

    def funnel(self) -> dict:
        return funnel(self.in_.total, self.kept.total, self.removed.total, dict(self.removed_by_signal),
                      dict(self.kept.items()))


class ProblemSimilarity(Section):
    task_id: str = F("The HumanEval problem.")
    ast_tokens: int = F("Length of its normalised AST.")
    ast_tau: Num = F("AST match score of the closest kept record.")
    ast_tau_record: str | None = F("That record's id (None when 0).")
    ngram_shared: int = F("Largest count of shared n-grams with a kept record.")
    ngram_shared_record: str | None = F("That record's id.")
    candidate_ngram_shared: int = F("Largest count of shared candidate n-grams.")
    candidate_ngram_shared_record: str | None = F("That record's id.")
    embedding_cosine: Num | None = F("Highest embedding cosine (the embedding signal on).", None)
    embedding_cosine_record: str | None = F("That record's id.", None)
    kept_by_behaviour: list[str] = F("Kept look-alikes a text signal flagged.")


class TauLevel(Section):
    similar: list[str] = F("Problems similar at this level.")
    non_similar: list[str] = F("The others.")
    n_similar: int = F("How many are similar.")
    n_non_similar: int = F("How many are not.")


class HumanEvalSimilarity(Artifact):
    """`{decontaminate.output_dir}/humaneval_similarity.json`: each problem's closest kept record."""

    kept_records: int = F("Kept records compared.")
    ngram_size: int = F("decontaminate.ngram_size.")
    candidate_ngram_size: int = F("decontaminate.candidate_ngram_size.")
    metric: str = F("What ast_tau measures.")
    problems: list[ProblemSimilarity] = F("Every problem, in task order.")
    tau_levels: dict[str, TauLevel] = F("The similar / non-similar split at each tau level.")


# ---------------------------------------------------------------------------------------
# controls
# ---------------------------------------------------------------------------------------


class ControlsStats(Artifact):
    """`{controls.output_dir}/{arm}/pool/stats.json`: a control arm's pool."""

    arm: Literal["rejected", "natural"] = F("The arm.")
    records: int = F("Records in the pool.")
    by_filter_reason: dict[str, int] | None = F("rejected: the pool by the filter's reason.", None)
    roots: list[str] | None = F("natural: the source trees read.", None)
    files: int | None = F("natural: Python files read.", None)
    skipped_files: dict[str, int] | None = F("natural: files skipped, by reason.", None)
    functions_found: int | None = F("natural: documented top-level functions found.", None)
    sampled: int | None = F("natural: functions kept (controls.natural_max).", None)
    wall_s: Num = F("Seconds the stage took.")
