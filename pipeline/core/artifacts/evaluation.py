"""The evaluate stage's metrics.json and per_problem.json (`{evaluate.output_dir}/`), and the ablation's
(tools/ablation.py: `eval/ablation/metrics.json`, `per_problem.json`).

    python -c "from pipeline.core.artifacts import EvalMetrics as M; print(M.read('eval/metrics.json').humaneval.scores())"
"""

from __future__ import annotations

from typing import Literal

from pydantic import RootModel

from pipeline.core.artifacts.base import Artifact, ArtifactIO, F, Num, PatternSection, Section

MODEL_NAMES = ("base", "pretrained", "finetuned", "teacher")  # evaluate.models, in the reports' order
ModelName = Literal["base", "pretrained", "finetuned", "teacher"]


class ModelScore(PatternSection):
    """One model on one benchmark; pass@k for every other k in evaluate.ks (and its bootstrap interval) beside."""

    pass_at_1: Num | None = F("Mean pass@1 over the problems.", alias="pass@1")
    pass_at_1_ci95_low: Num | None = F("95% interval of pass@1: low (Wilson; a bootstrap with samples).",
                                       alias="pass@1_ci95_low")
    pass_at_1_ci95_high: Num | None = F("95% interval of pass@1: high.", alias="pass@1_ci95_high")
    interval: str | None = F("How the pass@k intervals were computed (several samples per problem).", None)
    passed_samples: int = F("Samples that passed.")
    problems_solved: int = F("Problems with a passing sample.")
    empty_completions: int = F("Completions empty after post-processing.")
    cut_at_max_tokens: int = F("Completions cut at max_tokens.")
    generation_s: Num = F("Seconds generating uncached requests.")
    server_start_s: Num = F("Seconds starting its server.")
    requests_sent: int = F("Requests sent.")
    cache_hits: int = F("Requests answered from the cache.")
    completion_tokens: int = F("Completion tokens, cached ones included.")
    tokens_per_s: Num | None = F("Completion tokens per second sent (None: nothing sent).")
    problems_per_min: Num | None = F("Problems per minute sent (None: nothing sent).")
    execution_s: Num = F("Seconds running the programs.")



class Delta(PatternSection):
    """One model against another on the same problems (paired); pass@k deltas for the other k beside."""

    pass_at_1: Num | None = F("pass@1 difference.", None, alias="pass@1")
    pass_at_1_ci95_low: Num = F("95% interval of the difference: low.", alias="pass@1_ci95_low")
    pass_at_1_ci95_high: Num = F("95% interval of the difference: high.", alias="pass@1_ci95_high")
    p_value: Num = F("The paired test's p-value.")
    test: str = F("mcnemar_exact, a paired z-test, or none.")
    within_noise: bool = F("p >= 0.05.")
    improved_problems: int = F("Problems the later model solves and the earlier does not.")
    regressed_problems: int = F("The other way round.")


class NllSummary(Section):
    items: int = F("Items scored.")
    nll_per_token: Num = F("Mean per-item NLL (nats/token).")
    ci95: list[Num] = F("Its bootstrap 95% interval.")
    nll_per_token_pooled: Num = F("NLL over every token.")
    bits_per_byte: Num = F("Bits per byte over every solution byte.")
    interval: str = F("How ci95 was computed.")


class NllComparison(Section):
    n: int = F("Items both scored.")
    delta: Num = F("Mean per-item difference (later - earlier; negative: the later is better).")
    ci95: list[Num] = F("Its bootstrap 95% interval.")
    p_value: Num = F("Sign-flip permutation p-value (primary).")
    test: str = F("The primary test.")
    wilcoxon_p: Num | None = F("Wilcoxon's p-value.")
    lower: int = F("Items lower under the later model.")
    higher: int = F("Items higher.")


class LikelihoodSet(Section):
    """One item set's NLL figures per model, and each phase against the one before."""

    base: NllSummary | None = F("The base student.", None)
    pretrained: NllSummary | None = F("After phase 1.", None)
    finetuned: NllSummary | None = F("After phase 2.", None)
    comparisons: dict[str, NllComparison] = F("'<later>_vs_<earlier>' -> later - earlier.")

    def models(self) -> dict[str, NllSummary]:
        return {m: s for m in MODEL_NAMES if (s := getattr(self, m, None)) is not None}


class BenchSource(Section):
    file: str = F("The benchmark's data file.")
    sha256: str = F("Its sha256.")


class BenchmarkMetrics(Section):
    """One benchmark of the run: the protocol, each model's scores, the deltas."""

    benchmark: str = F("The benchmark's label.")
    harness: str = F("evaluate.harness (and whether chat answers were prefilled).")
    problems: int = F("Problems evaluated.")
    problems_total: int = F("Problems of the benchmark.")
    subset: str = F("Which problems, in words.")
    samples_per_problem: int = F("evaluate.n_samples.")
    temperature: Num = F("evaluate.temperature.")
    top_p: Num = F("evaluate.top_p.")
    max_tokens: int = F("evaluate.max_tokens.")
    source: BenchSource | None = F("The data file a benchmark was read from.", None)
    base: ModelScore | None = F("The base student.", None)
    pretrained: ModelScore | None = F("After phase 1.", None)
    finetuned: ModelScore | None = F("After phase 2 (the last phase).", None)
    teacher: ModelScore | None = F("The teacher.", None)
    delta: Delta | None = F("finetuned - base (both evaluated).", None)
    phases: dict[Literal["pretrain", "finetune"], Delta] | None = F("Each phase against the model before it.", None)

    def scores(self) -> dict[str, ModelScore]:
        """The evaluated models' scores, in the reports' order."""
        return {m: s for m in MODEL_NAMES if (s := getattr(self, m)) is not None}

    def ks(self) -> list[str]:
        """Every pass@k any model has, in k order."""
        keys = {k for s in self.scores().values() for k in s.pass_at_k()}
        return sorted(keys, key=lambda k: int(k.split("@")[1]))


class Presets(Section):
    student: str = F("finetune.student.")
    teacher: str = F("generate.teacher.")


class Sanity(Section):
    canonical_pass_rate: Num = F("Share of canonical solutions that pass the execution path.")
    failed_requests: int = F("Requests that failed (the stage fails on any).")
    harness_errors: int = F("Executions that ended in 'error'.")
    isolation: str = F("The sandbox's isolation.")
    flags: list[str] = F("Sanity flags raised.")


class EvalTiming(Section):
    self_check_s: Num = F("Seconds on the canonical solutions.")
    generation_s: Num = F("Seconds generating.")
    execution_s: Num = F("Seconds executing.")
    likelihood_s: Num | None = F("Seconds on the likelihood endpoint.", None)
    wall_s: Num = F("Seconds the stage took.")


class HumanEvalMetrics(BenchmarkMetrics):
    """HumanEval's section also holds the run's: presets, benchmarks, likelihood, sanity, timing."""

    presets: Presets = F("The presets evaluated.")
    benchmarks: list[str] = F("evaluate.benchmarks.")
    likelihood: dict[str, LikelihoodSet] | None = F("NLL of the canonical solutions, by item set.", None)
    sanity: Sanity = F("The run's sanity checks.")
    timing: EvalTiming = F("Timings.")


class EvalMetrics(Artifact):
    """`{evaluate.output_dir}/metrics.json`: one section per benchmark."""

    humaneval: HumanEvalMetrics = F("HumanEval, and the run's own keys.")
    humaneval_plus: BenchmarkMetrics | None = F("HumanEval+.", None, alias="humaneval+")
    mbpp: BenchmarkMetrics | None = F("MBPP.", None)
    mbpp_plus: BenchmarkMetrics | None = F("MBPP+.", None, alias="mbpp+")
    heldout: BenchmarkMetrics | None = F("The exercises finetune held out.", None)

    def benchmark(self, name: str) -> BenchmarkMetrics | None:
        """A benchmark's section by its key in the file (humaneval, humaneval+, mbpp, mbpp+, heldout)."""
        field = {"humaneval+": "humaneval_plus", "mbpp+": "mbpp_plus"}.get(name, name)
        return getattr(self, field, None)


class ModelDescription(Section):
    preset: str = F("The preset requests were sent as.")
    engine: str = F("llamacpp, vllm, transformers or remote.")
    model: str = F("The model name requested.")
    api: str = F("completion or chat.")
    identity: str = F("Its cache identity.")
    adapter: str | None = F("The adapter it loaded.")
    adapter_sha256: str | None = F("The adapter's sha256.")


class ItemNll(Section):
    nll: Num = F("NLL of the target (nats).")
    tokens: int = F("Target tokens.")
    bytes: int = F("Target bytes.")
    nll_per_token: Num = F("nll / tokens.")


class ProblemScore(Section):
    n: int = F("Samples.")
    c: int = F("Samples that passed.")
    pass_at_1: Num = F("c / n.", alias="pass@1")
    likelihood: ItemNll | None = F("NLL of the canonical solution (the likelihood endpoint on).", None)


class ProblemResult(Section):
    task_id: str = F("The problem.")
    base: ProblemScore | None = F("The base student.", None)
    pretrained: ProblemScore | None = F("After phase 1.", None)
    finetuned: ProblemScore | None = F("After phase 2.", None)
    teacher: ProblemScore | None = F("The teacher.", None)

    def model(self, name: str) -> ProblemScore | None:
        return getattr(self, name, None)


class BenchmarkResults(Section):
    benchmark: str = F("The benchmark's label.")
    subset: str = F("Which problems.")
    problems: int = F("Problems evaluated.")
    results: list[ProblemResult] = F("Per problem.")


class ItemResult(Section):
    id: str = F("The item.")
    base: ItemNll | None = F("The base student.", None)
    pretrained: ItemNll | None = F("After phase 1.", None)
    finetuned: ItemNll | None = F("After phase 2.", None)


class LikelihoodItems(Section):
    items: int = F("Items scored.")
    results: list[ItemResult] = F("Per item.")


class PerProblem(Artifact):
    """`{evaluate.output_dir}/per_problem.json`: HumanEval per problem; other benchmarks and NLL items below."""

    benchmark: str = F("HumanEval's label.")
    subset: str = F("Which problems.")
    problems: int = F("Problems evaluated.")
    samples_per_problem: int = F("evaluate.n_samples.")
    models: dict[ModelName, ModelDescription] = F("Each evaluated model, as requested.")
    results: list[ProblemResult] = F("HumanEval per problem.")
    benchmarks: dict[str, BenchmarkResults] | None = F("Every other benchmark (and heldout), per problem.", None)
    likelihood: dict[str, LikelihoodItems] | None = F("NLL per item, by item set.", None)

    def by_task(self) -> dict[str, ProblemResult]:
        return {r.task_id: r for r in self.results}


# ---------------------------------------------------------------------------------------
# The ablation (tools/ablation.py)
# ---------------------------------------------------------------------------------------


class NllDelta(Section):
    """first - second of a comparison '<first>_vs_<second>' on the same items (negative: the first is better);
    curated is the first of every comparison but corpus_filtered_vs_corpus."""

    delta_nll: Num = F("Mean per-item difference (nats/token).")
    ci95: list[Num] = F("Its bootstrap 95% interval.")
    p_value: Num = F("Sign-flip permutation p-value.")
    wilcoxon_p: Num | None = F("Wilcoxon's p-value.")
    n: int = F("Items.")
    problems_lower: int = F("Items lower under the first arm (curated).")
    problems_higher: int = F("Items higher.")
    test: str = F("The test.")


class ArmComparison(NllDelta):
    heldout: NllDelta | None = F("The same on the held-out exercises.", None)
    table3: dict[str, dict[Literal["similar", "non_similar"], NllDelta]] = F(
        "The same on problems similar / non-similar at each tau level (groups of 3 or more).")


class SeedRun(Section):
    humaneval_nll: Num = F("Mean HumanEval NLL.")
    heldout_nll: Num | None = F("Mean held-out NLL.", None)
    records: int | None = F("Records trained on.")
    steps: int | None = F("Optimizer steps.")
    train_loss: Num | None = F("Last training loss.")
    eval_loss: Num | None = F("Eval loss.")
    target_tokens: int | None = F("Target tokens trained on.")


class PassAt1Heldout(Section):
    problems: int = F("Held-out exercises.")
    base: Num = F("Base pass@1.")
    finetuned: Num = F("Fine-tuned pass@1.")


class NotComputed(Section):
    """`{}`: a section the producer left empty."""


class ArmPassAt1(Section):
    base: Num = F("Base pass@1.")
    finetuned: Num = F("Fine-tuned pass@1 (seed 0).")
    subset: str = F("Which problems.")
    delta: Delta | NotComputed = F("finetuned - base ({} when not computed).")
    heldout: PassAt1Heldout | None = F("On the held-out exercises.", None)


class Arm(Section):
    humaneval_nll: Num = F("Mean HumanEval NLL over seeds.")
    heldout_nll: Num | None = F("Mean held-out NLL.", None)
    humaneval_nll_sd_over_seeds: Num | None = F("Its sd over seeds.", None)
    per_seed: dict[str, SeedRun] | None = F("Each seed's run.", None)
    pass_at_1: ArmPassAt1 | None = F("Greedy pass@1 of seed 0.", None)


class Primary(Section):
    comparison: str = F("The primary comparison.")
    test: str = F("Its test.")
    alpha: Num = F("Its level.")


class Trend(Section):
    slope: Num = F("OLS slope of NLL on log(1 + n).")
    p_value: Num = F("Permutation p-value.")
    points: int = F("Points.")
    test: str = F("The test.")


class DosePoint(Section):
    exercises: int = F("Curated exercises trained on (examples.train; files before the field was read from it: "
                       "the records given, max_records).")
    humaneval_nll: Num = F("Mean HumanEval NLL.")


class DoseResponse(Section):
    seed: int | None = F("The seed.", None)
    points: list[DosePoint] | None = F("NLL against exercises.", None)
    trend_on_log1p_n: Trend | None = F("The trend test.", None)


class PhaseOne(Section):
    seed: int = F("The seed.")
    with_phase1_nll: Num = F("NLL with phase 1.")
    without_phase1_nll: Num = F("NLL without.")
    with_vs_without: NllDelta = F("with - without.")


class AblationMetrics(Artifact):
    """`eval/ablation/metrics.json`."""

    endpoint: str = F("The primary endpoint.")
    primary: Primary = F("The primary comparison and test.")
    seeds: list[int] = F("Training seeds.")
    curated_exercises: int | None = F("Exercises the curated arm trained on (finetune's examples.train; files "
                                      "written before curated_records: its records_used).")
    curated_records: int | None = F("Records given to the curated arm's training (finetune's records_used: the "
                                    "trained and the eval-loss examples).", None)
    arms: dict[str, Arm] = F("Each arm, and the base.")
    steps: str | None = F("The optimizer steps every arm took.")
    comparisons: dict[str, ArmComparison] = F("'<first>_vs_<second>': curated against each other arm, and "
                                              "corpus_filtered against corpus (filtered against unfiltered).")
    dose_response: DoseResponse = F("NLL against curated exercises ({} when not run).")
    phase1: PhaseOne | None = F("Phase 1 on / off (None when not run).")
    overrides: list[str] = F("Config overrides of every run.")
    data: str = F("The run's data folder.")
    wall_s: Num = F("Seconds the ablation took.")


class AblationPerProblem(ArtifactIO, RootModel[dict[str, dict[str, dict[str, Num]]]]):
    """`eval/ablation/per_problem.json`: arm -> item set -> item -> NLL (mean over seeds)."""
