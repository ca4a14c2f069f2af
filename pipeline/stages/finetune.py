"""Finetune stage, phi-1's phase 2: QLoRA (or plain LoRA) of the student on the curated exercises.

Input: `{finetune.dataset_dir}/train.jsonl`, the records of the kinds in `finetune.kinds` (phi-1
fine-tunes on exercises only: `[exercise]`; the dataclass default keeps textbooks too). Where it
starts (`pretrain.enabled`, `pretrain.mode`):

- pretrain off: a new LoRA on the student base;
- pretrain `lora`: phase 1's adapter (`{pretrain.output_dir}/weights/adapter`), trained further, so
  one adapter carries both phases and llama.cpp serves it as before;
- pretrain `full` or `scratch`: a new LoRA on phase 1's model (`{pretrain.output_dir}/weights/model`).

`finetune.enabled: false` passes phase 1's adapter through (pretrain `lora` only), so the
ablation "textbooks only" is `dvc exp run -S finetune.enabled=false -S pretrain.enabled=true`.
How the student is trained (the format, packing, checkpoints that resume, the divergence guard):
:mod:`pipeline.engines.training`.

Outputs (in `finetune.output_dir`): adapter/ (PEFT safetensors), adapter.gguf (llama.cpp
LoRA), merged/ (optional bf16 merged model), metrics.json, dvclive/ (per-step plots: loss,
eval loss, learning rate, grad norm, tokens/s), resolved_config.yaml, checkpoints/.

    textbook finetune --set finetune.student=smollm2-135m-instruct --set finetune.max_steps=4
    accelerate launch --config_file configs/accelerate/ddp.yaml -m pipeline finetune   # N processes

Under `accelerate launch` every process runs this stage and trains its share of each global batch;
the main process alone writes the outputs and prints the summary.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from pipeline.core.config import ConfigError, ModelPreset, RunConfig, configs_dir, load_preset
from pipeline.core.records import write_json
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.engines.training import (
    TrainingDiverged,
    load_records,
    process_state,
    replica_stdout,
    train_adapter,
)


def phase_one_output(cfg: RunConfig, preset: ModelPreset) -> tuple[ModelPreset, Path | None]:
    """(the student to train, the adapter to continue) after phase 1, as `pretrain.*` says."""
    pt = cfg.pretrain
    model = pt.trained_model(preset)
    if model is not None:
        return model, None
    return preset, (pt.weights_dir / "adapter" if pt.enabled else None)


def sample_records(records: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of n records (all when n is 0 or more than there are), sorted by id; samples of one
    seed are nested, so a pass@1-against-examples curve adds data rather than drawing new data."""
    if not n or n >= len(records):
        return records
    order = sorted(records, key=lambda r: r["id"])
    random.Random(seed).shuffle(order)
    return sorted(order[:n], key=lambda r: r["id"])


def pass_through(cfg: RunConfig, out_dir: Path) -> dict:
    """finetune.enabled=false: phase 1's adapter is the final one."""
    if not cfg.pretrain.enabled or cfg.pretrain.mode != "lora":
        raise ConfigError("finetune.enabled=false passes phase 1's adapter through, which needs pretrain.enabled=true "
                          f"and pretrain.mode=lora (got enabled={cfg.pretrain.enabled}, mode={cfg.pretrain.mode}); "
                          "with full or scratch, evaluate 'pretrained' instead")
    weights = cfg.pretrain.weights_dir
    if not (weights / "adapter" / "adapter_config.json").is_file():
        raise ConfigError(f"finetune.enabled=false: phase 1's adapter {weights / 'adapter'}/ does not exist: "
                          "run `textbook pretrain` first")
    shutil.rmtree(out_dir / "adapter", ignore_errors=True)
    shutil.copytree(weights / "adapter", out_dir / "adapter")
    if (weights / "adapter.gguf").is_file():
        shutil.copyfile(weights / "adapter.gguf", out_dir / "adapter.gguf")
    return {"enabled": False, "passed_through": str(weights / "adapter"), "steps": 0}


def run_finetune(cfg: RunConfig, config_path: Path, progress: bool = True, callbacks: list | None = None) -> dict:
    """The stage's core: trains, writes the outputs, returns the metrics (also in metrics.json).

    `callbacks` are extra transformers TrainerCallbacks (tests use one to simulate a crash).
    """
    t0 = time.monotonic()
    ft = cfg.finetune
    root = configs_dir(config_path)
    preset = load_preset(ft.student, root)
    records = load_records(Path(ft.dataset_dir), "finetune")  # bad input fails before a model loads
    main = process_state().is_main_process  # under `accelerate launch`, only the main process writes
    out_dir = Path(ft.output_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, root, "finetune", out_dir)
    if not ft.enabled:
        done = pass_through(cfg, out_dir) if main else {"enabled": False}
        metrics = {"student": preset.name, **done, "wall_s": round(time.monotonic() - t0, 2)}
        if main:
            write_json(out_dir / "metrics.json", metrics)
        return metrics
    chosen = [r for r in records if r["kind"] in ft.kinds]
    if not chosen:
        raise ConfigError(f"finetune.kinds={ft.kinds}: {ft.dataset_dir}/train.jsonl holds none of these "
                          f"({len(records)} records of other kinds)")
    chosen = sample_records(chosen, ft.max_records, cfg.seed)
    student, init = phase_one_output(cfg, preset)
    metrics = train_adapter(ft, student, chosen, out_dir, cfg.seed, section="finetune", init_adapter=init,
                            progress=progress, callbacks=callbacks)
    metrics = {"student": preset.name, "enabled": True, "kinds": list(ft.kinds), "records_used": len(chosen),
               "phase_one": f"pretrain-{cfg.pretrain.mode}" if cfg.pretrain.enabled else None,
               **{k: v for k, v in metrics.items() if k != "student"},
               "wall_s": round(time.monotonic() - t0, 2)}
    if main:
        write_json(out_dir / "metrics.json", metrics)
    return metrics


def main(args) -> int:
    # A diverged run is a clear message and exit status 3, not a traceback; the checkpoints stay.
    with replica_stdout():
        return stage_cli(run_finetune, args, lambda m: {k: m.get(k) for k in ("steps", "train_loss", "eval_loss", "tokens_per_s", "peak_memory_mb")},
                         {TrainingDiverged: ("training diverged", 3)})
