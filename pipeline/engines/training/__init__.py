"""Training a student: records -> token ids and labels -> (packed) sequences -> a LoRA adapter or a whole model.

The machinery both training stages share (`textbook pretrain`, `textbook finetune`): :func:`train_adapter` trains
one LoRA (QLoRA on an NF4 base, or plain LoRA) on a list of records, optionally continuing an adapter an earlier
phase wrote, and writes the adapter, its GGUF export, dvclive curves and metrics; :func:`train_model` trains every
weight of a model (pretrain's `full` and `scratch` modes). Both run on one path (trainer.py).

The package, by seam (each module's docstring says why it is so):
  data.py         records -> examples -> packed rows; the data decisions, made before any step
  lora.py         LoRA targets, 4-bit preparation, a new or a continued adapter, the bf16 merge
  callbacks.py    the packing-aware Trainer, the divergence guard, dvclive curves, sample completions
  checkpoints.py  the run's fingerprint, resume, the atomic save of the result
  distributed.py  one process or N under `accelerate launch`: the batch split, who writes
  trainer.py      the driver: TrainingArguments, the Trainer run, train_adapter and train_model

Every name is re-exported here: `from pipeline.engines.training import X` is the way in.
"""

from __future__ import annotations

from .callbacks import (
    LIVE_NAMES,
    Sampler,
    TrainingDiverged,
    forward_inputs,
    log_entry,
    make_callbacks,
    run_tokens_per_s,
    run_totals,
    sample_callbacks,
    sample_completions,
    write_live,
)
from .checkpoints import (
    NOT_TRAINING_KEYS,
    SAVE_TOTAL_LIMIT,
    dataset_sha,
    finished,
    model_fingerprint,
    resume_point,
    run_fingerprint,
    save_output,
    sharded_checkpoint,
    sort_target_modules,
    start_sha,
    train_or_restore,
    training_keys,
)
from .data import (
    IGNORE,
    Collator,
    Example,
    ListDataset,
    Prepared,
    PrepStats,
    load_records,
    pack_examples,
    prepare_data,
    prepare_examples,
    split_exercise,
    split_records,
    to_rows,
    tokenize_record,
)
from .distributed import per_process_batch, process_state, replica_stdout
from .lora import (
    add_lora,
    keep_4bit_layers_differentiable,
    linear_module_names,
    load_trainable_adapter,
    merge_adapter,
    peft_kwargs,
    prepare_quantized,
    resolve_targets,
)
from .trainer import (
    checkpointing_arguments,
    final_eval_loss,
    peak_memory_bytes,
    train_adapter,
    train_model,
    training_arguments,
)

__all__ = [
    "IGNORE", "LIVE_NAMES", "NOT_TRAINING_KEYS", "SAVE_TOTAL_LIMIT", "Collator", "Example", "ListDataset",
    "PrepStats", "Prepared", "Sampler", "TrainingDiverged", "add_lora", "checkpointing_arguments",
    "dataset_sha", "final_eval_loss", "finished", "forward_inputs", "keep_4bit_layers_differentiable",
    "linear_module_names", "load_records", "load_trainable_adapter", "log_entry", "make_callbacks",
    "merge_adapter", "model_fingerprint", "pack_examples", "peak_memory_bytes", "peft_kwargs",
    "per_process_batch", "prepare_data", "prepare_examples", "prepare_quantized", "process_state",
    "replica_stdout", "resolve_targets", "resume_point", "run_fingerprint", "run_tokens_per_s", "run_totals",
    "sample_callbacks", "sample_completions", "save_output", "sharded_checkpoint", "sort_target_modules",
    "split_exercise", "split_records", "start_sha", "to_rows", "tokenize_record", "train_adapter",
    "train_model", "train_or_restore", "training_arguments", "training_keys", "write_live",
]
