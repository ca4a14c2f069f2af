"""What the report's sections share: the labels of the evaluated models, "not available", percentages.

    python -c "from pipeline.stages.report.common import pct; print(pct(0.125), pct(-0.05, signed=True))"
"""

from __future__ import annotations

from pipeline.core.artifacts import EvalMetrics, HumanEvalMetrics
from pipeline.stages.report.blocks import Block, para

NA = "not available"
MODEL_LABELS = {"base": "base", "pretrained": "after pretrain (phase 1)", "finetuned": "fine-tuned (last phase)",
                "teacher": "teacher"}
MODELS = tuple(MODEL_LABELS)  # the report's order: base, then each phase, then the teacher
PHASE_LABELS = {"pretrain": "pretrain step (after pretrain - base)", "finetune": "finetune step (fine-tuned - after pretrain)"}


def pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return NA
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def na(what: str) -> Block:
    return para(f"{what}: {NA}.")


def humaneval(metrics: EvalMetrics | None) -> HumanEvalMetrics | None:
    """HumanEval's section of the run's metrics, None when evaluate has not run."""
    return metrics.humaneval if metrics is not None else None
