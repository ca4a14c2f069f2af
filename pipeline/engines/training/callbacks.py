"""Trainer pieces: the packing-aware Trainer, the divergence guard, dvclive curves and sample completions.

The Trainer subclass and the callbacks are built lazily (:func:`_trainer_classes`) so importing the package does
not import transformers. A NaN loss, or one above `loss_spike_factor` x the running minimum, stops the run with
TrainingDiverged. The curves and the run's tokens/s are rebuilt from the Trainer's log history, which every
checkpoint saves, so a resumed run writes the same dvclive folder as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import FinetuneConfig
from pipeline.core.records import dumps

os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # dvclive must not phone home from a training run

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or spiked; the message says at which step and what to try."""


def forward_inputs(batch: dict, packed: bool) -> dict:
    """What the model gets. Packed: no 2D mask and no KV cache, the two conditions under which
    transformers derives block-diagonal attention from the restarting position ids."""
    if not packed:
        return batch
    return {**{k: v for k, v in batch.items() if k != "attention_mask"}, "use_cache": False}


def _trainer_classes() -> tuple[type, type]:
    """Built lazily so importing this module does not import transformers."""
    from transformers import Trainer, TrainerCallback

    class PackingTrainer(Trainer):
        def __init__(self, *args: Any, packed: bool, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.packed = packed

        def compute_loss(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
            return super().compute_loss(model, forward_inputs(inputs, self.packed), *args, **kwargs)

    return PackingTrainer, TrainerCallback


def make_callbacks(ft: FinetuneConfig, live_dir: Path, section: str = "finetune") -> list:
    _, TrainerCallback = _trainer_classes()

    class LossGuard(TrainerCallback):
        """Stop at a NaN/inf loss or one above loss_spike_factor x the running minimum."""

        def __init__(self) -> None:
            self.best = math.inf

        def on_train_begin(self, args, state, control, **kwargs):
            for entry in state.log_history:  # a resumed run keeps the minimum it had reached
                if "loss" in entry:
                    self.best = min(self.best, entry["loss"])

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            hint = f"lower {section}.learning_rate (or finetune.max_grad_norm), or check the data"
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss} at step {state.global_step}; {hint}")
            if self.best < math.inf and loss > ft.loss_spike_factor * self.best:
                raise TrainingDiverged(
                    f"loss {loss:.4g} at step {state.global_step} exceeds {section}.loss_spike_factor="
                    f"{ft.loss_spike_factor} x the running minimum {self.best:.4g}; {hint}"
                )
            self.best = min(self.best, loss)

    class LiveLogger(TrainerCallback):
        """Per-step metrics as dvclive plots, stepped by the optimizer step.

        tokens/s counts real (non-padding) tokens over the time spent inside optimizer steps
        (forward, backward, update), not the evaluations and checkpoint saves between them. The
        running totals go into the Trainer's log history, which every checkpoint saves: a resumed
        or restored run rebuilds its curves and its tokens/s from there, since DVC deletes the
        dvclive folder before it re-runs the stage."""

        def __init__(self) -> None:
            self.live: Any = None
            self.step_start = 0.0
            self.busy_before = self.busy = self.busy_logged = 0.0
            self.tokens_logged = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # one writer of the curves: the main process
                return
            last = run_totals(state.log_history)
            self.busy_before = last.get("busy_s", 0.0)
            self.tokens_logged = state.num_input_tokens_seen
            self.live = write_live(live_dir, state.log_history)

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            self.busy += time.monotonic() - self.step_start

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.live is None:  # not training (a finished run's final evaluation)
                return
            logs = logs or {}
            entry = state.log_history[-1]  # the Trainer appends this log's entry before calling us
            if "loss" in logs and self.busy > self.busy_logged:
                entry["tokens_per_s"] = (state.num_input_tokens_seen - self.tokens_logged) / (self.busy - self.busy_logged)
                entry["busy_s"] = self.busy_before + self.busy
                self.tokens_logged, self.busy_logged = state.num_input_tokens_seen, self.busy
            log_entry(self.live, entry)
            self.live.make_summary()

        def on_train_end(self, args, state, control, **kwargs):
            if self.live is not None:
                self.live.end()

    return [LossGuard(), LiveLogger()]


LIVE_NAMES = {"loss": "train/loss", "grad_norm": "train/grad_norm", "learning_rate": "train/learning_rate",
              "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss"}


def log_entry(live: Any, entry: dict) -> None:
    live.step = entry["step"]
    for key, name in LIVE_NAMES.items():
        if key in entry:
            live.log_metric(name, float(entry[key]))


def write_live(live_dir: Path, log_history: list[dict]) -> Any:
    """A fresh dvclive folder holding the curves of `log_history` (a resumed run's steps so far)."""
    from dvclive import Live

    # dvcyaml=None: the stage's dvc.yaml declares the plots; no DVC experiment per run.
    live = Live(str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
    for entry in log_history:
        log_entry(live, entry)
    if log_history:
        live.make_summary()
    return live


def run_totals(log_history: list[dict]) -> dict:
    """The last log entry with the run's running totals (busy seconds, and the Trainer's
    num_input_tokens_seen), or {}."""
    return next((e for e in reversed(log_history) if "busy_s" in e), {})


def run_tokens_per_s(log_history: list[dict]) -> float:
    """The whole run's training tokens/s, across resumes."""
    last = run_totals(log_history)
    return last["num_input_tokens_seen"] / last["busy_s"] if last.get("busy_s") else 0.0


@dataclass
class Sampler:
    """Fixed prompts completed greedily every `every` steps (0 = only at the end), appended to a
    JSONL file: a user watches the model learn (phase 1's samples.jsonl)."""

    prompts: list[str]
    every: int
    max_new_tokens: int
    path: Path


def sample_completions(model: Any, tok: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions, one prompt at a time (no padding to get wrong), in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = torch.tensor([tok(prompt)["input_ids"]], device=model.device)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
                out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def _sampler_callback(sampler: Sampler, tok: Any) -> Any:
    _, TrainerCallback = _trainer_classes()

    class SampleLogger(TrainerCallback):
        def _write(self, state, model) -> None:
            # Every process generates (the same greedy text: DDP replicas hold the same weights; FSDP adds no
            # sampler, see _run_trainer), the main one writes.
            texts = sample_completions(model, tok, sampler.prompts, sampler.max_new_tokens)
            if not state.is_world_process_zero:
                return
            with sampler.path.open("a", encoding="utf-8") as fh:
                for prompt, text in zip(sampler.prompts, texts, strict=True):
                    fh.write(dumps({"step": state.global_step, "prompt": prompt, "completion": text}) + "\n")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if sampler.every and state.global_step % sampler.every == 0 and state.global_step < state.max_steps:
                self._write(state, model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self._write(state, model)

    return SampleLogger()


def sample_callbacks(sampler: Sampler, tok: Any, main: bool, section: str) -> list:
    """The sampler's callback, or none under FSDP: FSDP reshards the root's parameters after each forward and
    generate() steps the model outside the Trainer's forward, and gathering the whole model on every GPU would
    defeat sharding a student too large for one. Then samples.jsonl stays empty and the log says why."""
    from pipeline.engines.student import fsdp_launched

    if not fsdp_launched():
        return [_sampler_callback(sampler, tok)]
    log.warning("%s: no sample completions under FSDP (each process holds a shard of the weights); %s stays "
                "empty: run without FSDP (one process, or ddp.yaml) to watch the samples", section, sampler.path)
    if main:
        sampler.path.parent.mkdir(parents=True, exist_ok=True)
        sampler.path.touch()
    return []
