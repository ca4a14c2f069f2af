"""The report's "against published numbers" section: our models beside the published ones
(references.py), with what our run trained on, from finetune's metrics: the examples trained on
(`examples.train`) and those held out for the eval loss (`examples.eval`), never the dataset's size.

    python -c "from pipeline.core.config import load_config; from pathlib import Path; \
from pipeline.stages.report.inputs import read_inputs; from pipeline.stages.report.published import our_run; \
print(our_run(load_config(), Path('params.yaml'), read_inputs(load_config())))"
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import ConfigError, RunConfig, configs_dir, load_preset
from pipeline.stages.report.blocks import Block, _plt, _png, heading, image, para, table
from pipeline.stages.report.common import MODEL_LABELS, NA, humaneval, pct
from pipeline.stages.report.inputs import Inputs
from pipeline.stages.report.references import REFERENCES, OurRun, differences, format_params, params_from_name


def our_run(cfg: RunConfig, config_path: Path, inputs: Inputs) -> OurRun:
    try:
        student = load_preset(cfg.finetune.student, configs_dir(config_path))
        names: tuple[str | None, ...] = (student.name, student.hf_id, student.model)
    except ConfigError:  # the report must not fail on a preset it only names
        names = (cfg.finetune.student,)
    ft = inputs.finetune
    examples = ft.examples if ft is not None else None
    he = humaneval(inputs.metrics)
    return OurRun(params_from_name(*names), examples.train if examples else None,
                  (ft.train_tokens or None) if ft is not None else None, (he.problems if he else 0) or 164,
                  he.problems_total if he else 164, examples.eval if examples else None)


def lora_wording(ours: OurRun) -> str:
    """What the fine-tuned model trained on: "LoRA on 30 examples (3 held out for the eval loss)"."""
    if ours.train_examples is None:
        return f"LoRA on {NA} examples"
    held = f" ({ours.eval_examples:,} held out for the eval loss)" if ours.eval_examples else ""
    return f"LoRA on {ours.train_examples:,} examples{held}"


def plot_pass_at_1(ours: list[tuple[str, float, float, float]], refs: list[tuple[str, float]]) -> bytes | None:
    """Horizontal bars: our models (with 95% intervals) above the published references."""
    plt = _plt()
    if plt is None:
        return None
    names = [n for n, *_ in ours] + [n for n, _ in refs]
    values = [100 * v for _, v, _, _ in ours] + [v for _, v in refs]
    colors = ["#d62728"] * len(ours) + ["#7f7f7f"] * len(refs)
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.0))
    y = list(range(len(names)))[::-1]
    ax.barh(y, values, color=colors)
    for yi, (_, v, lo, hi) in zip(y, ours, strict=False):
        ax.errorbar(100 * v, yi, xerr=[[100 * (v - lo)], [100 * (hi - v)]], color="black", capsize=3)
    ends = [100 * hi for *_, hi in ours] + values[len(ours):]  # labels right of the interval, not on it
    for yi, v, end in zip(y, values, ends, strict=True):
        ax.text(max(v, end) + 0.8, yi, f"{v:.1f}", va="center")
    ax.set_yticks(y, names)
    ax.set_xlabel("HumanEval pass@1 (%)")
    ax.set_xlim(0, 105)
    ax.set_title("Ours (red, 95% Wilson interval) vs published (grey)")
    return _png(fig)


def references_section(cfg: RunConfig, inputs: Inputs, ours: OurRun) -> tuple[list[Block], list[list]]:
    he = humaneval(inputs.metrics)
    mbpp = inputs.metrics.mbpp if inputs.metrics else None
    blocks: list[Block] = [heading(2, "Against published numbers")]
    rows, csv_rows, bars = [], [], []
    subset = he.subset if he else NA
    for m, r in (he.scores() if he else {}).items():
        label = f"ours: {MODEL_LABELS[m]}"
        trained = ("base model, no fine-tuning" if m == "base" else "the teacher preset" if m == "teacher"
                   else f"phase 1 ({cfg.pretrain.mode}) on textbook sections" if m == "pretrained"
                   else lora_wording(ours) + (" after phase 1" if he.pretrained is not None else ""))
        on_mbpp = mbpp.scores().get(m) if mbpp else None
        rows.append([f"**{label}**", format_params(ours.params) if m != "teacher" else NA, pct(r.pass_at_1),
                     pct(on_mbpp.pass_at_1) if on_mbpp and on_mbpp.pass_at_1 is not None else "not run", trained,
                     f"HumanEval {subset}", "this run"])
        if r.pass_at_1 is not None:
            bars.append((label, r.pass_at_1, r.pass_at_1_ci95_low or r.pass_at_1, r.pass_at_1_ci95_high or r.pass_at_1))
            csv_rows.append([label, round(100 * r.pass_at_1, 2), "ours"])
    for ref in REFERENCES:
        rows.append([ref.name, ref.size, f"{ref.humaneval:.1f}", f"{ref.mbpp:.1f}" if ref.mbpp else "-",
                     ref.training, differences(ref, ours), f"[{ref.source}]({ref.url}), {ref.where}"])
        csv_rows.append([ref.name, ref.humaneval, "published"])
    png = plot_pass_at_1(bars, [(r.name, r.humaneval) for r in REFERENCES])
    if png:
        blocks.append(image("pass_at_1.png", "HumanEval pass@1: ours against published models", png))
    blocks.append(table(["model", "parameters", "HumanEval pass@1 (%)", "MBPP pass@1 (%)", "trained on",
                         "how it differs from our run", "source"], rows))
    blocks.append(para("Published numbers are pass@1 on all 164 problems as their sources report them; ours are "
                       f"on {subset} problems, from a quantized student where the engine is llama.cpp."))
    return blocks, csv_rows
