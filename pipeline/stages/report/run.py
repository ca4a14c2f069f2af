"""The report's sections on the rest of the run: the data funnel, the cost ledger, the training curves and
finetune's metrics, and the limitations computed from the run (with what a re-run reproduces).

    python -c "from pipeline.core.config import load_config; from pipeline.stages.report.inputs import read_inputs; \
from pipeline.stages.report.run import funnel_section; print(funnel_section(read_inputs(load_config()))[1])"
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError, RunConfig, configs_dir, load_preset
from pipeline.core.stats import STAGE_ORDER, funnel_row
from pipeline.stages.report.blocks import Block, _plt, _png, bullets, heading, image, para, table
from pipeline.stages.report.common import MODEL_LABELS, NA, humaneval, na, pct
from pipeline.stages.report.inputs import Inputs
from pipeline.stages.report.references import OurRun, format_params, format_tokens

FINETUNE_ROWS = 30  # finetune metrics shown in the training section


def plot_curves(curves: Mapping[str, list[tuple[float, float]]]) -> bytes | None:
    plt = _plt()
    if plt is None or not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name in sorted(curves):
        if curves[name]:
            xs, ys = zip(*curves[name], strict=True)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_funnel(rows: list[tuple[str, int]]) -> bytes | None:
    plt = _plt()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.0))
    names, values = zip(*rows, strict=True)
    ax.bar(range(len(rows)), values, color="#1f77b4")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,}", ha="center", va="bottom")
    ax.set_xticks(range(len(rows)), names, rotation=15)
    ax.set_ylabel("records")
    ax.set_title("Records after each stage")
    return _png(fig)


def funnel_section(inputs: Inputs) -> tuple[list[Block], list[tuple[str, int]]]:
    blocks: list[Block] = [heading(2, "Data funnel")]
    rows, bars = [], []
    for stage in STAGE_ORDER:
        row = funnel_row(stage, inputs.stages.get(stage))
        if row["status"] == "not run":
            rows.append([stage, NA, "-", "-", "-"])
            continue
        reasons = "; ".join(f"{k}: {v:,}" for k, v in row["reasons"].items()) or "-"
        rows.append([stage, row["in"], row["kept"], row["removed"], reasons])
        if stage == "generate" and row["in"] is not None:
            bars.append(("prompts", row["in"]))
        if row["kept"] is not None:
            bars.append((f"{stage} kept", row["kept"]))
    png = plot_funnel(bars)
    if png:
        blocks.append(image("funnel.png", "records after each stage", png))
    blocks.append(table(["stage", "in", "kept", "removed", "removed by reason / signal"], rows))
    return blocks, bars


def cost_section(inputs: Inputs) -> list[Block]:
    blocks: list[Block] = [heading(2, "Cost ledger")]
    gen = inputs.stages.get("generate")
    rows: list[list[Any]] = []
    if gen is not None:
        ledger = gen.ledger_this_run
        reused = f"{ledger.cache_hits} of {gen.completed} responses" if ledger.sent_anything else NA
        rows.append([f"teacher generation (`{gen.teacher}`)", gen.tokens.prompt, gen.tokens.completion,
                     gen.cost_usd, gen.timing.wall_s, reused])
    else:
        rows.append(["teacher generation", NA, NA, NA, NA, NA])
    ft = inputs.finetune
    if ft is not None:
        reused = f"checkpoint at step {ft.resumed_from_step} of {ft.steps}" if ft.resumed_from_step else "-"
        rows.append(["fine-tuning", "-", "-", "-", ft.wall_s, reused])
    else:
        rows.append(["fine-tuning", "-", "-", NA, NA, NA])
    he = humaneval(inputs.metrics)
    for m, r in (he.scores() if he else {}).items():
        sent, hits = r.requests_sent or 0, r.cache_hits or 0
        rows.append([f"evaluation: {MODEL_LABELS[m]}", "-", r.completion_tokens, "-",
                     round((r.generation_s or 0) + (r.execution_s or 0), 1), f"{hits} of {sent + hits} completions"])
    blocks.append(table(["item", "prompt tokens", "completion tokens", "USD", "wall s", "reused from an earlier run"],
                        rows))
    blocks.append(para("USD from each preset's price table (0 for local models); the local runs cost machine time "
                       "only. Evaluation wall time is generation plus execution, server start excluded. Wall times "
                       "are this run's: work reused from the request caches or a finished checkpoint took none, "
                       "so a fully cached re-run shows near-zero times."))
    return blocks


def training_section(inputs: Inputs) -> list[Block]:
    blocks: list[Block] = [heading(2, "Training")]
    png = plot_curves(inputs.curves)
    if png:
        blocks.append(image("loss.png", "training loss", png))
    else:
        blocks.append(na("training curves (dvclive tsv)"))
    rows = inputs.finetune.metric_rows() if inputs.finetune is not None else []
    if rows:
        blocks.append(table(["finetune metric", "value"], [[f"`{k}`", v] for k, v in rows[:FINETUNE_ROWS]]))
    else:
        blocks.append(na("finetune metrics.json"))
    return blocks


def reproducibility_note(cfg: RunConfig, config_path: Path) -> str:
    """What a re-run reproduces: everything from warm caches; from cold ones it depends on the teacher's server."""
    try:
        teacher = load_preset(cfg.generate.teacher, configs_dir(config_path))
        batched = teacher.engine != "llamacpp" or (teacher.server.program == "llama-server"
                                                   and teacher.server.n_parallel > 1)
    except ConfigError:
        batched = True
    cold = ("from cold caches the teacher's answers are not: it decoded several requests in one batch, and a "
            "completion depends on the rest of the batch, so a cold re-run curates another dataset of the same kind"
            if batched else "from cold caches too, as each teacher request was decoded alone")
    return ("Reproducibility: a re-run of this config reproduces every output byte for byte (the request caches hold "
            f"every answer; every later stage is seeded); {cold}.")


def limitations_section(cfg: RunConfig, inputs: Inputs, ours: OurRun, reproducibility: str = "") -> list[Block]:
    he = humaneval(inputs.metrics)
    items = [reproducibility] if reproducibility else []
    n = he.problems if he else 0
    if he and n < he.problems_total:
        items.append(f"Only the {he.subset} HumanEval problems were evaluated: the earliest problems are not "
                     "a random sample, and no published number is on this subset.")
    for m, r in (he.scores() if he else {}).items():
        lo, hi = r.pass_at_1_ci95_low, r.pass_at_1_ci95_high
        if lo is not None and hi is not None:
            items.append(f"{MODEL_LABELS[m]}: pass@1 {pct(r.pass_at_1)}% with a 95% interval of "
                         f"{pct(lo)}-{pct(hi)}% on {n} problems.")
    d = he.delta if he else None
    if d is not None:
        items.append(f"The fine-tuning delta ({pct(d.pass_at_1, True)} points) is "
                     + ("within noise: this run cannot tell the fine-tuned model from the base."
                        if d.within_noise else "outside noise at the 5% level on these problems."))
    if ours.params is not None and ours.params < 1e9:
        items.append(f"The student has {format_params(ours.params)} parameters, against phi-1's 1.3B pre-trained on "
                     "7B tokens of code textbooks: the recipe, not the result, is reproduced at this scale.")
    if ours.train_examples is not None:
        items.append(f"The adapter was trained on {ours.train_examples:,} exercises"
                     + (f" (~{format_tokens(ours.train_tokens)} tokens)" if ours.train_tokens else "")
                     + (f", {ours.eval_examples:,} more held out for the eval loss" if ours.eval_examples else "")
                     + ", against phi-1's CodeExercises of about 180M tokens.")
    if he and he.samples_per_problem == 1:
        items.append("One greedy sample per problem: pass@k for k > 1 is not estimated.")
    models = inputs.per_problem.models if inputs.per_problem else {}
    if any((desc := models.get(m)) is not None and desc.engine == "llamacpp" for m in ("base", "finetuned")):
        items.append("llama.cpp evaluates the quantized GGUF (with the adapter applied on it): scores can differ "
                     "from the bf16 model's.")
    flags = he.sanity.flags if he else []
    if flags:
        items.append(f"{len(flags)} sanity flag(s) were raised (see above).")
    items.append("HumanEval's problems may be in the base model's pre-training data; our decontamination covers "
                 "only the synthetic training set.")
    if inputs.missing:
        items.append("Not available for this report: " + "; ".join(f"`{m}`" for m in inputs.missing) + ".")
    return [heading(2, "Limitations"), bullets(items)]
