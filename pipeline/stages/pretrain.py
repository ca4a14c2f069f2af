"""Pretrain stage, phi-1's phase 1: next-token training on the textbook sections before the exercises.

phi-1 is trained twice: on CodeTextbook (phi-1-base) and then on CodeExercises (phi-1). This
stage is the first phase; `textbook finetune` is the second and starts from what this one
writes. Input: the records of `pretrain.kinds` in `{finetune.dataset_dir}/train.jsonl`
(textbook sections by default) plus any documents in `pretrain.extra_corpus`; every token is a
target. Modes (`pretrain.mode`):

- `lora`: continued pretraining of the student through a LoRA adapter (QLoRA on the CPU as
  finetune does; rank, targets, quantization and batch are `finetune.*`, because phase 2
  continues this very adapter). llama.cpp serves it (`adapter.gguf`), so evaluate scores it.
- `full`: every weight of the student, unquantized (a small student on the CPU, any on a GPU).
- `scratch`: a new model, `pretrain.scratch`'s shape in the llama, phi or gpt-neox family
  (a few million parameters up to phi-1-small's 350M), with the student preset's tokenizer, from
  random weights: the nanoGPT-style path. Loss, learning rate and tokens/s curves go to dvclive.

Fixed prompts (`pretrain.sample_prompts`) are completed greedily every `pretrain.sample_steps`
steps and at the end, into `samples.jsonl`, so you can watch the model learn. `pretrain.enabled:
false` (the dataclass default) writes only a marker and finetune starts from the base.

Outputs (in `pretrain.output_dir`): weights/ (adapter/ + adapter.gguf, or model/, or the
DISABLED marker), metrics.json, samples.jsonl, dvclive/, resolved_config.yaml, checkpoints/.
A killed run resumes from its last checkpoint, as finetune does. Under `accelerate launch` (DDP or
FSDP) every process trains its share of each global batch and the main process alone writes.

    textbook pretrain --set pretrain.enabled=true --set pretrain.max_steps=4
    textbook pretrain --set pretrain.enabled=true --set pretrain.mode=scratch --set pretrain.scratch.layers=2
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import PretrainMetrics
from pipeline.core.config import (
    ConfigError,
    FinetuneConfig,
    RunConfig,
    ScratchModelConfig,
    configs_dir,
    load_preset,
)
from pipeline.core.records import RecordError, read_jsonl, write_json
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.engines.training import (
    Sampler,
    TrainingDiverged,
    load_records,
    process_state,
    replica_stdout,
    train_adapter,
    train_model,
)

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".py", ".md")


def load_corpus(paths: list[str]) -> list[dict]:
    """`pretrain.extra_corpus` as records of kind textbook (every token a target)."""
    records = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"pretrain.extra_corpus: {path} does not exist")
        if path.suffix == ".jsonl":
            try:
                rows = read_jsonl(path, required=("text",))
            except RecordError as exc:
                raise ConfigError(f"pretrain.extra_corpus: {exc}") from None
            for i, row in enumerate(rows, 1):
                if not isinstance(row["text"], str) or not row["text"].strip():
                    raise ConfigError(f"pretrain.extra_corpus: {path} line {i}: `text` is empty or not a string")
                records.append({"id": f"corpus/{path.name}/{row.get('id', i)}", "kind": "textbook", "text": row["text"]})
        elif path.suffix in TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                raise ConfigError(f"pretrain.extra_corpus: {path} is empty")
            records.append({"id": f"corpus/{path.name}", "kind": "textbook", "text": text})
        else:
            raise ConfigError(f"pretrain.extra_corpus: {path}: expected .jsonl (a `text` field per line) or one of "
                              f"{TEXT_SUFFIXES}")
    return records


def phase_config(cfg: RunConfig) -> FinetuneConfig:
    """The training keys of this phase: pretrain's schedule on finetune's LoRA shape and batch, loss on
    every token (a textbook has no prompt to leave out)."""
    pt = cfg.pretrain
    return dataclasses.replace(cfg.finetune, learning_rate=pt.learning_rate, epochs=pt.epochs, max_steps=pt.max_steps,
                               max_length=pt.max_length, completion_only_loss=False, merge=False,
                               split_long_textbooks=True,
                               kinds=list(pt.kinds), output_dir=pt.output_dir)


def build_scratch_model(sc: ScratchModelConfig, tok: Any, seed: int) -> Any:
    """A randomly initialised causal LM of the configured family, sized for the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    shape = {"vocab_size": len(tok), "hidden_size": sc.hidden_size, "num_hidden_layers": sc.layers,
             "num_attention_heads": sc.heads, "intermediate_size": sc.intermediate_size,
             "max_position_embeddings": sc.context, "tie_word_embeddings": sc.tie_embeddings,
             "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = AutoConfig.for_model(sc.family, **shape)
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def disabled(out_dir: Path, weights: Path) -> dict:
    """Phase 1 off: every declared output exists (DVC needs them), holding nothing."""
    for folder in (weights, out_dir / "dvclive", out_dir / "checkpoints"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    (weights / "DISABLED").write_text("pretrain.enabled is false: finetune starts from the student base\n")
    write_json(out_dir / "dvclive" / "metrics.json", {})
    (out_dir / "samples.jsonl").write_text("")
    return {"enabled": False}


def run_pretrain(cfg: RunConfig, config_path: Path, progress: bool = True, callbacks: list | None = None) -> dict:
    """The stage's core: trains phase 1, writes the outputs, returns the metrics (also in metrics.json)."""
    t0 = time.monotonic()
    pt = cfg.pretrain
    root = configs_dir(config_path)
    out_dir = Path(pt.output_dir)
    main = process_state().is_main_process  # under `accelerate launch`, only the main process writes
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, root, "pretrain", out_dir)
    if not pt.enabled:
        if not main:
            return {"enabled": False}
        return write_metrics(out_dir, disabled(out_dir, pt.weights_dir))
    preset = load_preset(cfg.finetune.student, root)
    records = [r for r in load_records(Path(cfg.finetune.dataset_dir), "pretrain") if r["kind"] in pt.kinds]
    corpus = load_corpus(pt.extra_corpus)
    counts = {"dataset": len(records), "extra_corpus": len(corpus)}
    records += corpus
    if not records:
        raise ConfigError(f"pretrain.kinds={pt.kinds}: {cfg.finetune.dataset_dir}/train.jsonl holds none of these and "
                          "pretrain.extra_corpus is empty: nothing to pretrain on")
    ft = phase_config(cfg)
    weights = pt.weights_dir
    if main:
        (weights / "DISABLED").unlink(missing_ok=True)
    sampler = Sampler(list(pt.sample_prompts), pt.sample_steps, pt.sample_tokens, out_dir / "samples.jsonl")
    if pt.mode == "lora":
        if main:
            shutil.rmtree(weights / "model", ignore_errors=True)
        metrics = train_adapter(ft, preset, records, out_dir, cfg.seed, section="pretrain", weights_dir=weights,
                                sampler=sampler, progress=progress, callbacks=callbacks)
    else:
        import torch

        from pipeline.engines.student import load_student, load_tokenizer, model_source

        for stale in ("adapter", "adapter.gguf") if main else ():
            target = weights / stale
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        if pt.mode == "full":
            model, tok = load_student(preset, "none", compute_dtype=torch.float32)
            origin = {"full": dataclasses.asdict(preset)}
        else:
            tok = load_tokenizer(model_source(preset))
            model = build_scratch_model(pt.scratch, tok, cfg.seed)
            origin = {"scratch": dataclasses.asdict(pt.scratch), "tokenizer": dataclasses.asdict(preset)}
        ft = dataclasses.replace(ft, quantization="none", export_gguf=False)
        log.info("pretrain %s: %s, %d parameters", pt.mode, model.config.model_type,
                 sum(p.numel() for p in model.parameters()))
        metrics = train_model(ft, model, tok, records, out_dir, weights, cfg.seed, origin, section="pretrain",
                              sampler=sampler, progress=progress, callbacks=callbacks)
        metrics["student"] = preset.name
        metrics["architecture"] = model.config.model_type
    metrics = {"enabled": True, "mode": pt.mode, "kinds": list(pt.kinds),
               "records": counts,
               **metrics, "wall_s": round(time.monotonic() - t0, 2)}
    return write_metrics(out_dir, metrics) if main else metrics


def write_metrics(out_dir: Path, metrics: dict) -> dict:
    """metrics.json through its model (a key the model does not know fails here, not in a reader); what it wrote."""
    model = PretrainMetrics.parse(metrics, out_dir / "metrics.json")
    model.write(out_dir / "metrics.json")
    return model.dump()


def main(args) -> int:
    # A diverged run is a clear message and exit status 3, not a traceback; the checkpoints stay.
    with replica_stdout():
        return stage_cli(run_pretrain, args, lambda m: {k: m.get(k) for k in ("enabled", "mode", "steps", "train_loss", "eval_loss", "tokens_per_s")},
                         {TrainingDiverged: ("training diverged", 3)})
