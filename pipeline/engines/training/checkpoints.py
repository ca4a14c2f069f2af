"""Checkpoints and outputs: the run's fingerprint, resuming, and the atomic save of the trained adapter or model.

Checkpoints every `save_steps` (adapter or model, optimizer, scheduler, RNG states) in `{output_dir}/checkpoints`,
which carries a fingerprint of what decides the result (:func:`run_fingerprint` for an adapter,
:func:`model_fingerprint` for a whole model): a rerun with the same config and data resumes from the last complete
checkpoint and ends with the same weights as an uninterrupted run; a changed config or dataset starts over. The
trained result is written beside its place and swapped in (:func:`save_output`), by the main process only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.core.config import CORPUS_SOURCES, ConfigError, FinetuneConfig, ModelPreset
from pipeline.core.records import atomic_folder, dumps, sha256_text, sha256_tree

log = logging.getLogger(__name__)

# Config keys that do not change the trained adapter: changing them keeps the checkpoints. quant_storage is
# only the container dtype of the same 4-bit values.
NOT_TRAINING_KEYS = ("output_dir", "merge", "export_gguf", "num_threads", "logging_steps", "eval_steps",
                     "quant_storage")
# Where the corpus arms' data is: no other arm reads it (its records are in the fingerprint anyway), so moving the
# corpus keeps the other arms' checkpoints, and runs trained before these keys existed resume.
CORPUS_KEYS = ("corpus_dir", "corpus_kept")
# Checkpoints kept: the previous one survives a kill during the newest one's save.
SAVE_TOTAL_LIMIT = 2


# ---------------------------------------------------------------------------------------
# Fingerprint: what decides the result, shared by both phases
# ---------------------------------------------------------------------------------------


def training_keys(ft: FinetuneConfig) -> dict:
    """The config keys that decide the trained weights (all but NOT_TRAINING_KEYS, and the corpus arms'
    folders outside those arms)."""
    skip = NOT_TRAINING_KEYS if getattr(ft, "source", None) in CORPUS_SOURCES else NOT_TRAINING_KEYS + CORPUS_KEYS
    return {k: v for k, v in asdict(ft).items() if k not in skip}


def dataset_sha(records: list[dict]) -> str:
    """The training records' hash, whatever their order."""
    return sha256_text(dumps(sorted(records, key=lambda r: r["id"])))


def start_sha(init_adapter: Path | None, preset: ModelPreset) -> str | None:
    """What training starts from beyond the preset: an earlier phase's adapter, or its model folder."""
    local_base = Path(preset.hf_id) if preset.hf_id and Path(preset.hf_id).is_dir() else None
    starts = [sha256_tree(p) for p in (init_adapter, local_base) if p and p.is_dir()]
    return sha256_text(":".join(starts)) if starts else None


def _fingerprint(keys_name: str, ft: FinetuneConfig, seed: int, dataset: str, **origin: Any) -> str:
    # keys_name differs between the phases ("finetune", "train") as it always did: existing checkpoints carry it.
    return sha256_text(dumps({keys_name: training_keys(ft), "seed": seed, "dataset": dataset, **origin}))


def run_fingerprint(ft: FinetuneConfig, seed: int, preset: ModelPreset, dataset_sha: str, init: str | None = None) -> str:
    """What decides the trained adapter: the training keys, the seed, the student, the data and the
    adapter it starts from."""
    return _fingerprint("finetune", ft, seed, dataset_sha, student=asdict(preset), **({"init": init} if init else {}))


def model_fingerprint(ft: FinetuneConfig, seed: int, origin: dict, dataset_sha: str) -> str:
    """What decides a trained whole model: the training keys, the seed, the model's origin and the data."""
    return _fingerprint("train", ft, seed, dataset_sha, origin=origin)


# ---------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------


def _trainer_state(checkpoint: Path) -> dict | None:
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut
    short by a kill during its save."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None


def finished(checkpoint: Path) -> bool:
    """Whether the checkpoint is the run's last step (same fingerprint, so the same max_steps)."""
    state = _trainer_state(checkpoint) or {}
    return state.get("global_step", 0) >= state.get("max_steps", math.inf)


def resume_point(ckpt_dir: Path, fingerprint: str, clean: bool = True) -> Path | None:
    """The last complete checkpoint of this very run, or None; stale or partial ones are removed. With
    `clean=False` (the other processes of a launch, after the main one cleaned) nothing is written."""
    marker = ckpt_dir / "fingerprint.txt"
    stale = ckpt_dir.is_dir() and (not marker.is_file() or marker.read_text().strip() != fingerprint)
    if not clean:
        return None if stale or not ckpt_dir.is_dir() else _last_complete(ckpt_dir)
    if stale:
        log.warning("checkpoints in %s are from another config or dataset: starting over", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    for checkpoint in _checkpoints(ckpt_dir):
        if _trainer_state(checkpoint) is not None:
            return checkpoint
        log.warning("removing %s: incomplete (the run was killed while saving it)", checkpoint)
        shutil.rmtree(checkpoint)
    return None


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    return sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()),
                  key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def _last_complete(ckpt_dir: Path) -> Path | None:
    return next((p for p in _checkpoints(ckpt_dir) if _trainer_state(p) is not None), None)


def sharded_checkpoint(checkpoint: Path) -> bool:
    """Whether the Trainer wrote this checkpoint's model under FSDP with a sharded state dict (fsdp_qlora.yaml's
    SHARDED_STATE_DICT): each rank's part in a `pytorch_model_fsdp_<n>` folder, and no adapter or model file."""
    return any(p.is_dir() and p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir())


def _restore_sharded(trainer: Any, resume: Path) -> None:
    """Load a sharded FSDP checkpoint into the model the way Trainer.train does when it resumes: every process
    wraps the model (the LoRA layers wrapped on their own for a peft model, as the Trainer sets it up), then reads
    its own part with the Trainer's loader. The model stays wrapped, as after training, so the final save gathers
    the full adapter from it."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        raise ConfigError(f"{resume} was saved under FSDP (a sharded state dict, one part per process): finish the run "
                          "under the same `accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml` "
                          f"command, or delete {resume.parent} to train again without FSDP")
    from transformers.distributed.fsdp import update_fsdp_plugin_peft

    if hasattr(trainer.model, "peft_config"):
        update_fsdp_plugin_peft(trainer.model, trainer.accelerator)
    model = trainer.accelerator.prepare(trainer.model)
    trainer.model = trainer.model_wrapped = model
    trainer._load_from_checkpoint(str(resume), model)


def train_or_restore(trainer: Any, resume: Path | None) -> None:
    """Train (from `resume` if given); a checkpoint at the run's last step is only loaded, since the
    Trainer, resumed there, would run one step past max_steps."""
    if resume is None or not finished(resume):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    log.info("%s is this run's last step: nothing left to train", resume)
    if sharded_checkpoint(resume):
        _restore_sharded(trainer, resume)
    elif (resume / "adapter_model.safetensors").is_file():
        set_peft_model_state_dict(trainer.model, load_file(str(resume / "adapter_model.safetensors")))
    else:  # a whole model (pretrain full or scratch); tied weights are saved once
        missing, unexpected = trainer.model.load_state_dict(load_file(str(resume / "model.safetensors")), strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"{resume}: the checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]})")
    trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))


# ---------------------------------------------------------------------------------------
# Outputs: the trained adapter or model, swapped in whole
# ---------------------------------------------------------------------------------------


def _save_trained(trainer: Any, tmp: Path) -> bool:
    """Save the trained model (an adapter, or a whole model) into `tmp`; whether this process wrote it.
    Under FSDP each process holds a shard: every process takes part in gathering the full state dict
    and the Trainer writes it from the main process; otherwise only the main process saves."""
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(tmp))
        if trainer.accelerator.is_main_process:
            (tmp / "training_args.bin").unlink(missing_ok=True)  # the same files as an unsharded save
        return trainer.accelerator.is_main_process
    if not trainer.accelerator.is_main_process:
        return False
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(str(tmp), safe_serialization=True)
    return True


@contextlib.contextmanager
def _swap_in(target: Path, main: bool) -> Iterator[Path]:
    """atomic_folder(target) in the main process, under one temp name for every process: under FSDP they all pass
    it to the Trainer, which writes from the main one."""
    tmp_name = f".{target.name}.tmp"
    if not main:  # the path only: atomic_folder here would empty the main process's temp and rename it again
        yield target.with_name(tmp_name)
        return
    with atomic_folder(target, tmp_name) as tmp:
        yield tmp


def save_output(trainer: Any, target: Path, finish: Callable[[Path], None] | None = None) -> Path | None:
    """The trained adapter or model written beside `target`, completed by `finish(folder)`, then swapped in: a
    killed save never leaves half of it. Written by the main process only (None in the others)."""
    with _swap_in(target, trainer.accelerator.is_main_process) as tmp:
        if not _save_trained(trainer, tmp):
            return None
        if finish is not None:
            finish(tmp)
    return target


def sort_target_modules(adapter_dir: Path) -> None:
    """adapter_config.json with its target_modules sorted: an adapter's `finish` (save_output)."""
    # PEFT writes target_modules from a set, in an order that changes from process to process:
    # sorted, the same adapter is the same bytes (and DVC sees no change).
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

