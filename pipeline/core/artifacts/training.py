"""The training phases' metrics.json: finetune's (`{finetune.output_dir}/metrics.json`, also each ablation run's
under data/ablation/) and pretrain's (`{pretrain.output_dir}/metrics.json`). How many examples trained and how
many were held out for the eval loss is `examples.train` / `examples.eval`; `heldout_records` are the exercises
set aside before training for the held-out benchmark.

    python -c "from pipeline.core.artifacts import FinetuneMetrics as M; print(M.read('data/finetune/metrics.json').examples)"
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel

from pipeline.core.artifacts.base import F, Num, Section, Toggled
from pipeline.core.config.training import FinetuneSource


class Examples(Section):
    """What training made of the records (pipeline.engines.training: PrepStats and the split)."""

    records: int = F("Records given to training (train and eval split).")
    exercises: int = F("Of which exercises.")
    textbooks: int = F("Of which textbook sections.")
    truncated: int = F("Examples cut at max_length.")
    split: int = F("Extra pieces of long textbook sections.")
    dropped_long: int = F("Examples dropped as too long.")
    dropped_no_target: int = F("Examples dropped without a target token.")
    tokens: int = F("Tokens of every example (one epoch).")
    target_tokens: int = F("Tokens the loss is on (one epoch).")
    train: int = F("Examples trained on.")
    eval: int = F("Examples held out for the eval loss.")
    train_sequences: int = F("Training sequences (packed or one per example).")
    eval_sequences: int = F("Eval sequences.")
    sequence_fill: Num = F("Share of max_length the training sequences fill.")


class TrainingMetrics(Toggled):
    """The keys of a trained phase (pipeline.engines.training: train_adapter / train_model)."""

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "student", "device", "compute_dtype", "steps", "epochs", "resumed_from_step", "train_loss", "train_loss_mean",
        "eval_loss", "train_tokens", "tokens_per_s", "train_s", "processes", "global_batch", "per_device_batch",
        "grad_accum_per_process", "trainable_params", "total_params", "examples", "peak_memory_mb",
        "peak_memory_kind", "wall_s")
    student: str | None = F("The student preset.", None)
    device: str | None = F("cpu or cuda.", None)
    quantization: str | None = F("nf4 or none (an adapter).", None)
    compute_dtype: str | None = F("The compute dtype.", None)
    init_adapter: str | None = F("The adapter training continued (an adapter), or None.", None)
    steps: int | None = F("Optimizer steps.", None)
    epochs: Num | None = F("Epochs trained.", None)
    resumed_from_step: int | None = F("The checkpoint this run resumed from, or None.", None)
    train_loss: Num | None = F("Last logged training loss.", None)
    train_loss_mean: Num | None = F("Mean of the logged training losses.", None)
    eval_loss: Num | None = F("Eval loss of the final weights (None: no eval split).", None)
    train_tokens: int | None = F("Input tokens the trainer saw (every epoch).", None)
    tokens_per_s: Num | None = F("Training tokens per second over the run.", None)
    train_s: Num | None = F("Seconds training (this run).", None)
    processes: int | None = F("Training processes.", None)
    global_batch: int | None = F("Sequences per optimizer step.", None)
    per_device_batch: int | None = F("Sequences per process per micro-batch.", None)
    grad_accum_per_process: int | None = F("Gradient accumulation steps.", None)
    trainable_params: int | None = F("Trainable parameters.", None)
    total_params: int | None = F("Parameters.", None)
    examples: Examples | None = F("What training made of the records.", None)
    gguf_adapter: str | None = F("The exported llama.cpp adapter (an adapter, export_gguf).", None)
    merged_dir: str | None = F("The merged bf16 model (finetune.merge).", None)
    peak_memory_mb: Num | None = F("Peak memory in MiB.", None)
    peak_memory_kind: str | None = F("What peak_memory_mb measures.", None)
    wall_s: Num | None = F("Seconds the stage took.", None)

    def metric_rows(self) -> list[tuple[str, Num]]:
        """Every numeric key (dotted below a section), sorted by key: bools, strings and None left out."""
        return _numeric(self)


def _numeric(obj, prefix: str = "") -> list[tuple[str, Num]]:
    if isinstance(obj, BaseModel):
        obj = {type(obj).model_fields[name].alias or name: getattr(obj, name) for name in obj.model_fields_set}
    out: list[tuple[str, Num]] = []
    for key in sorted(obj):
        value = obj[key]
        if isinstance(value, (BaseModel, dict)):
            out += _numeric(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", value))
    return out


class FinetuneMetrics(TrainingMetrics):
    """`{finetune.output_dir}/metrics.json` (phase 2); finetune.enabled=false: the pass-through's keys."""

    REQUIRED: ClassVar[tuple[str, ...]] = (*TrainingMetrics.REQUIRED, "kinds", "records_used", "heldout_records",
                                           "training_seed", "source", "phase_one")
    kinds: list[str] | None = F("finetune.kinds.", None)
    records_used: int | None = F("Records given to training (before its eval split).", None)
    heldout_records: int | None = F("Records held out before training (the held-out benchmark).", None)
    training_seed: int | None = F("seed + finetune.seed.", None)
    source: FinetuneSource | None = F("finetune.source.", None)
    source_dir: str | None = F("A control arm's folder.", None)
    source_kept: str | None = F("corpus_filtered: the corpus stage's kept.jsonl the arm is restricted to.", None)
    source_records: int | None = F("Records of the control arm.", None)
    matched_target_tokens: dict[str, int] | None = F("Target tokens of the curated records and of the arm.", None)
    phase_one: str | None = F("pretrain-<mode> when phase 1 ran, else None.", None)
    passed_through: str | None = F("finetune.enabled=false: phase 1's adapter, passed through.", None)


class PretrainRecords(Section):
    dataset: int = F("Records of pretrain.kinds from the dataset.")
    extra_corpus: int = F("Documents of pretrain.extra_corpus.")


class PretrainMetrics(TrainingMetrics):
    """`{pretrain.output_dir}/metrics.json` (phase 1); pretrain.enabled=false: `{"enabled": false}`."""

    REQUIRED: ClassVar[tuple[str, ...]] = (*TrainingMetrics.REQUIRED, "mode", "kinds", "records")
    mode: Literal["lora", "full", "scratch"] | None = F("pretrain.mode.", None)
    kinds: list[str] | None = F("pretrain.kinds.", None)
    records: PretrainRecords | None = F("Documents trained on.", None)
    model_dir: str | None = F("The trained model (full, scratch).", None)
    architecture: str | None = F("Its model type (full, scratch).", None)
