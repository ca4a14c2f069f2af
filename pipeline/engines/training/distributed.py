"""Processes: one, or N under `accelerate launch` (DDP or FSDP; tests/test_distributed.py).

The same code runs in every process, each loading the student and preparing the same data (the split and the
packing are seeded, the Trainer's sampler is accelerate's seedable one, shuffled alike in every process and
sharded between them). The global batch of an optimizer step is `batch_size x grad_accum` sequences whatever the
number of processes (:func:`per_process_batch`), and the loss is the mean over the target tokens of that whole
batch (the Trainer counts them across processes), so N processes follow the curve of one. Only the main process
writes: checkpoints' model and state (the Trainer), dvclive curves, samples, the adapter or model, its GGUF
export, the merge, and (in the stages) metrics.json and resolved_config.yaml; the other processes log warnings
only. Kept apart so the stages can set up the processes before anything is trained.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from pipeline.core.config import ConfigError, FinetuneConfig


def process_state() -> Any:
    """This process's place among those `accelerate launch` started (one process when started plainly):
    accelerate's PartialState, set up as TrainingArguments sets it up (on the CPU where training runs on
    the CPU: without `cpu=True`, processes started by torchrun on a machine with no GPU would each train
    alone). The process group exists from here on, so the stages can let the main process write alone
    before a Trainer exists. The other processes log warnings and errors only: one log per run."""
    from accelerate import PartialState

    from pipeline.engines.student import device_type

    state = PartialState(cpu=device_type() == "cpu")
    if not state.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    return state


@contextlib.contextmanager
def replica_stdout() -> Iterator[None]:
    """Stdout of a process other than the main one of an `accelerate launch` (RANK > 0, as the launcher
    numbers them) goes nowhere: a stage's summary line is printed once."""
    if not int(os.environ.get("RANK", "0")):
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def per_process_batch(ft: FinetuneConfig, processes: int) -> tuple[int, int]:
    """(micro-batch, gradient accumulation steps) of each of `processes` processes.

    The config's batch is the global batch of an optimizer step, `batch_size x grad_accum` sequences, on
    one process or N, so one config trains the same way (the same steps, learning-rate schedule and loss
    curve) however it is launched. N processes split it: each takes micro-batches of the largest size up to
    batch_size (the memory one device was sized for) that divides its share, and accumulates the rest.
    batch_size 16 x grad_accum 8 on 8 GPUs: 16 x 1 each; batch_size 2 x grad_accum 2 on 2 processes: 2 x 1.
    """
    total = ft.batch_size * ft.grad_accum
    if total % processes:
        raise ConfigError(f"finetune.batch_size x finetune.grad_accum = {total} sequences per optimizer step cannot "
                          f"be split evenly between {processes} processes: make it a multiple of {processes}")
    share = total // processes
    micro = max(d for d in range(1, min(ft.batch_size, share) + 1) if share % d == 0)
    return micro, share // micro
