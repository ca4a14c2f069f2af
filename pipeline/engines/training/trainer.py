"""The driver: one phase's training run, for an adapter (:func:`train_adapter`) or a whole model
(:func:`train_model`), on one path both share (:func:`_train_and_save`).

Training is transformers' Trainer: NF4 + double quantization base (bitsandbytes), LoRA adapters in fp32, bf16
autocast where the device supports bf16 (else fp32), gradient checkpointing, paged AdamW on CUDA (plain AdamW on
CPU), resumable checkpoints (checkpoints.py). Both phases start the same way (threads, the checks, the data, all
before the first step), train through the same Trainer with checkpoints fingerprinted alike, swap the result in
the same way and report the same measurements; they differ only in the model they train and what they write
beside it (the adapter's GGUF export and merge, the model's tokenizer).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import FinetuneConfig, ModelPreset

from .callbacks import (
    Sampler,
    _trainer_classes,
    make_callbacks,
    run_tokens_per_s,
    sample_callbacks,
    write_live,
)
from .checkpoints import (
    SAVE_TOTAL_LIMIT,
    dataset_sha,
    model_fingerprint,
    resume_point,
    run_fingerprint,
    save_output,
    sort_target_modules,
    start_sha,
    train_or_restore,
)
from .data import Collator, ListDataset, Prepared, prepare_data
from .distributed import per_process_batch, process_state
from .lora import add_lora, load_trainable_adapter, merge_adapter

log = logging.getLogger(__name__)


def checkpointing_arguments(enabled: bool) -> dict:
    """TrainingArguments' activation checkpointing fields under this transformers: 5.23 renamed
    `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)` (the old names stay as deprecated
    aliases until v6), and the GPU install's transformers is older (vLLM 0.34 caps it below 5.23: see
    constraints-gpu.txt), so the field is looked up rather than assumed. Non-reentrant checkpointing either way:
    the reentrant kind needs inputs that require grad, which a frozen base's embeddings do not give."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(ft: FinetuneConfig, ckpt_dir: Path, seed: int, device: str, dtype: torch.dtype,
                       has_eval: bool, progress: bool, processes: int = 1) -> Any:
    from transformers import TrainingArguments

    periodic_eval = has_eval and ft.eval_steps > 0
    micro, accum = per_process_batch(ft, processes)
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        learning_rate=ft.learning_rate,
        lr_scheduler_type=ft.lr_scheduler,
        warmup_steps=ft.warmup_ratio,  # transformers 5: a float < 1 is a fraction of the steps
        num_train_epochs=ft.epochs,
        max_steps=ft.max_steps,
        max_grad_norm=ft.max_grad_norm,
        logging_steps=ft.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach the divergence guard, not be hidden
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=ft.eval_steps if periodic_eval else None,
        save_strategy="steps",
        save_steps=ft.save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        seed=seed,
        data_seed=seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **checkpointing_arguments(ft.gradient_checkpointing),
        # Paged optimizers move state to host memory under pressure: CUDA only.
        optim="paged_adamw_32bit" if device == "cuda" else "adamw_torch",
        use_cpu=device == "cpu",
        # Every trainable weight (LoRA, or the whole model) gets a gradient every step: DDP need not search
        # the graph for unused ones (the Trainer would, for a PEFT model).
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=not progress,
    )


def final_eval_loss(trainer: Any) -> float:
    """The eval loss of the final weights: the periodic evaluation's if it ran at the last step."""
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        return evals[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def peak_memory_bytes(device: str) -> tuple[int, str]:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"  # ru_maxrss is KiB on Linux


def _run_trainer(ft: FinetuneConfig, model: Any, tok: Any, data: Prepared, out_dir: Path, seed: int, fingerprint: str,
                 *, section: str, device: str, dtype: torch.dtype, progress: bool, callbacks: list | None,
                 sampler: Sampler | None = None) -> tuple[Any, dict]:
    """Train `model` (an adapter or a whole model) with resumable checkpoints; (trainer, metrics)."""
    ckpt_dir = out_dir / "checkpoints"
    processes = process_state()
    main = processes.is_main_process
    with processes.main_process_first():  # the main process removes stale checkpoints before the others look
        resume = resume_point(ckpt_dir, fingerprint, clean=main)
    if resume is not None:
        log.info("resuming from %s", resume)
    own = make_callbacks(ft, out_dir / "dvclive", section)
    if sampler is not None:
        if resume is None and main:
            sampler.path.unlink(missing_ok=True)
        own += sample_callbacks(sampler, tok, main, section)
    PackingTrainer, _ = _trainer_classes()
    args = training_arguments(ft, ckpt_dir, seed, device, dtype, bool(data.eval), progress, processes.num_processes)
    trainer = PackingTrainer(
        model=model,
        args=args,
        train_dataset=ListDataset(data.train),
        eval_dataset=ListDataset(data.eval) if data.eval else None,
        data_collator=Collator(tok.pad_token_id, ft.packing),
        callbacks=own + list(callbacks or []),
        packed=ft.packing,
    )
    if not progress:  # -q: no per-step log dicts on stdout either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    t_train = time.monotonic()
    train_or_restore(trainer, resume)
    train_s = time.monotonic() - t_train
    eval_loss = final_eval_loss(trainer) if data.eval else None
    # The curves from the whole log history, the final evaluation included: the same folder
    # whether this run trained, resumed, or only restored a finished checkpoint.
    if main:
        write_live(out_dir / "dvclive", trainer.state.log_history).end()
    train_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    trainable, total = model.get_nb_trainable_parameters() if hasattr(model, "get_nb_trainable_parameters") else (
        sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    return trainer, {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "resumed_from_step": int(resume.name.rsplit("-", 1)[-1]) if resume else None,
        "train_loss": train_losses[-1] if train_losses else None,
        "train_loss_mean": sum(train_losses) / len(train_losses) if train_losses else None,
        "eval_loss": eval_loss,
        "train_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_s": round(run_tokens_per_s(trainer.state.log_history), 2),  # the whole run, across resumes
        "train_s": round(train_s, 2),
        "processes": args.world_size,
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "per_device_batch": args.per_device_train_batch_size,
        "grad_accum_per_process": args.gradient_accumulation_steps,
        "trainable_params": trainable,
        "total_params": total,
        "examples": {**asdict(data.stats), "train": data.train_examples, "eval": data.eval_examples, **data.extra},
    }


# ---------------------------------------------------------------------------------------
# The path both phases share
# ---------------------------------------------------------------------------------------


def _start(ft: FinetuneConfig) -> float:
    """A phase's clock (wall_s) and CPU threads."""
    t0 = time.monotonic()
    if ft.num_threads > 0:
        torch.set_num_threads(ft.num_threads)
    return t0


def _checked_data(records: list[dict], tok: Any, ft: FinetuneConfig, seed: int, chat: bool = False) -> Prepared:
    """The data, after the checks that must fail before anything is trained."""
    from pipeline.engines.student import check_packed_attention

    if ft.packing:
        check_packed_attention()
    return prepare_data(records, tok, ft, seed, chat=chat)


def _train_and_save(ft: FinetuneConfig, model: Any, tok: Any, data: Prepared, out_dir: Path, seed: int,
                    fingerprint: str, target: Path, finish: Callable[[Path], None] | None, *, section: str,
                    device: str, dtype: torch.dtype, progress: bool, callbacks: list | None,
                    sampler: Sampler | None) -> tuple[Path | None, dict]:
    """Train (resuming this very run's checkpoints), then swap the result in at `target` (adapter/ or model/),
    completed by `finish`; (target, or None in processes other than the main one; the metrics)."""
    trainer, metrics = _run_trainer(ft, model, tok, data, out_dir, seed, fingerprint, section=section, device=device,
                                    dtype=dtype, progress=progress, callbacks=callbacks, sampler=sampler)
    model.config.use_cache = True  # a saved model generates with its KV cache (an adapter's files do not hold it)
    return save_output(trainer, target, finish), metrics


def _measured(device: str, t0: float) -> dict:
    peak, kind = peak_memory_bytes(device)
    return {"peak_memory_mb": round(peak / 2**20, 1), "peak_memory_kind": kind,
            "wall_s": round(time.monotonic() - t0, 2)}


# ---------------------------------------------------------------------------------------
# The two phases
# ---------------------------------------------------------------------------------------


def train_adapter(ft: FinetuneConfig, preset: ModelPreset, records: list[dict], out_dir: Path, seed: int, *,
                  section: str = "finetune", init_adapter: Path | None = None, weights_dir: Path | None = None,
                  sampler: Sampler | None = None, progress: bool = True, callbacks: list | None = None) -> dict:
    """Train one LoRA adapter on `records` (or continue `init_adapter`): adapter/ and adapter.gguf in
    `weights_dir` (default `out_dir`), dvclive/ and checkpoints/ in `out_dir`; returns the metrics
    (the caller writes them). `section` names the config section in error messages. `callbacks` are
    extra transformers TrainerCallbacks (tests use one to simulate a crash)."""
    from pipeline.engines.gguf_lora import check_supported, export_lora_gguf
    from pipeline.engines.student import device_type, load_student, resolve_compute_dtype

    t0 = _start(ft)
    weights_dir = weights_dir or out_dir
    fingerprint = run_fingerprint(ft, seed, preset, dataset_sha(records), start_sha(init_adapter, preset))
    device = device_type()
    dtype = resolve_compute_dtype(ft.compute_dtype, device)
    quantized = ft.quantization == "nf4"
    model, tok = load_student(preset, ft.quantization, ft.double_quant, dtype, device, ft.quant_storage)
    base_config = model.config.to_dict()
    if ft.export_gguf:
        check_supported(base_config["model_type"])
    # An instruct (chat) student trains in its chat template: the format evaluate sends it.
    data = _checked_data(records, tok, ft, seed, chat=preset.api == "chat")
    if init_adapter is not None:
        model = load_trainable_adapter(model, init_adapter, quantized)
    else:
        model = add_lora(model, ft, preset, quantized, seed)
    log.info("%s: student %s on %s, %s, compute %s%s", section, preset.name, device, ft.quantization, dtype,
             f", continuing {init_adapter}" if init_adapter else "")
    adapter_dir, metrics = _train_and_save(ft, model, tok, data, out_dir, seed, fingerprint, weights_dir / "adapter",
                                           sort_target_modules, section=section, device=device, dtype=dtype,
                                           progress=progress, callbacks=callbacks, sampler=sampler)
    metrics = {"student": preset.name, "device": device, "quantization": ft.quantization,
               "compute_dtype": str(dtype).removeprefix("torch."),
               "init_adapter": str(init_adapter) if init_adapter else None, **metrics}
    del model  # free the training model before merging
    if adapter_dir is None:  # not the main process: the main one exports, merges and writes
        return metrics
    if ft.export_gguf:
        metrics["gguf_adapter"] = export_lora_gguf(adapter_dir, base_config, weights_dir / "adapter.gguf")["path"]
    if ft.merge:
        metrics["merged_dir"] = str(merge_adapter(preset, adapter_dir, weights_dir))
    metrics.update(_measured(device, t0))
    return metrics


def train_model(ft: FinetuneConfig, model: Any, tok: Any, records: list[dict], out_dir: Path, weights_dir: Path,
                seed: int, fingerprint: dict, *, section: str, sampler: Sampler | None = None, progress: bool = True,
                callbacks: list | None = None) -> dict:
    """Train every weight of `model` (an unquantized student, or one built from scratch) on `records`;
    the result is saved with its tokenizer to `weights_dir/model` (a folder `from_pretrained` loads).
    `fingerprint` is what, beyond the data and `ft`, decides the result (the model's origin)."""
    from pipeline.engines.student import device_type

    t0 = _start(ft)
    device = device_type()
    dtype = next(model.parameters()).dtype
    data = _checked_data(records, tok, ft, seed)
    model.config.use_cache = False
    model.train()
    target = weights_dir / "model"
    _, metrics = _train_and_save(ft, model, tok, data, out_dir, seed,
                                 model_fingerprint(ft, seed, fingerprint, dataset_sha(records)), target,
                                 lambda folder: tok.save_pretrained(str(folder)), section=section, device=device,
                                 dtype=dtype, progress=progress, callbacks=callbacks, sampler=sampler)
    return {"device": device, "compute_dtype": str(dtype).removeprefix("torch."), **metrics, "model_dir": str(target),
            **_measured(device, t0)}
