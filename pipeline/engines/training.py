"""Training a student: records -> token ids and labels -> (packed) sequences -> a LoRA adapter.

The machinery both training stages share (`textbook pretrain` in `lora` mode, `textbook finetune`):
:func:`train_adapter` trains one LoRA (QLoRA on an NF4 base, or plain LoRA) on a list of records,
optionally continuing an adapter an earlier phase wrote, and writes the adapter, its GGUF export,
dvclive curves and metrics.

Data: exercises train on the solution only (the signature and docstring tokens get label -100),
in the format the student is evaluated in: a base student sees the prompt exactly as evaluate
sends it (tokenized on its own, so the boundary token agrees); an instruct student (preset
`api: chat`) sees its chat template around the same request evaluate sends, and learns the answer
and the end-of-turn. Textbook sections train on every token, as plain text. Each example ends
with EOS (a chat answer with the template's end of turn).

Data decisions, all made and counted before any training step (metrics.json `examples`):
examples longer than `max_length` are truncated (or dropped with `drop_long`); an exercise
left with no solution tokens is dropped; an empty dataset, a record whose text does not
start with its prompt, or LoRA targets that match no layer are errors. The held-out split
is a seeded shuffle of records (never of packed sequences, so no example is in both).

Packing: short examples are packed first-come into sequences of up to `max_length` tokens.
Each example's position ids restart at 0 and neither an attention mask nor a KV cache is
passed, which makes transformers build a block-diagonal causal mask
(masking_utils.find_packed_sequence_indices): attention does NOT cross example boundaries
(tested with sdpa; eager and flash-attention read the same position ids). No example's
first token is a target (nothing may learn "what follows EOS"), so a packed row's loss is
exactly its examples' own. Padding at the end of a row forms its own block with label -100.
Without packing, rows are right-padded with an attention mask.

Why not TRL's SFTTrainer: its packing and completion-only loss tokenize prompt and completion
together (or through the chat template) and find the boundary afterwards, while the evaluator
sends the prompt tokenized on its own; a base student must be trained on exactly those prompt
tokens, so the boundary is built here, where a test pins it (`tests/test_finetune.py`). The
loop itself is transformers' Trainer, as SFTTrainer's is.

Training is transformers' Trainer: NF4 + double quantization base (bitsandbytes), LoRA
adapters in fp32, bf16 autocast where the device supports bf16 (else fp32), gradient
checkpointing, paged AdamW on CUDA (plain AdamW on CPU), checkpoints every `save_steps`
(adapter, optimizer, scheduler, RNG states) in `{output_dir}/checkpoints`. A rerun with the
same config and data resumes from the last checkpoint and ends with the same adapter as an
uninterrupted run; a changed config or dataset starts over (the checkpoints carry a
fingerprint). A NaN loss, or one above `loss_spike_factor` x the running minimum, stops the
run with TrainingDiverged.

Several processes (`accelerate launch`, DDP or FSDP; tests/test_distributed.py): the same code runs
in every process, each loading the student and preparing the same data (the split and the packing
are seeded, the Trainer's sampler is accelerate's seedable one, shuffled alike in every process and
sharded between them). The global batch of an optimizer step is `batch_size x grad_accum`
sequences whatever the number of processes (:func:`per_process_batch`), and the loss is the mean
over the target tokens of that whole batch (the Trainer counts them across processes), so N
processes follow the curve of one. Only the main process writes: checkpoints' model and state (the
Trainer), dvclive curves, samples, the adapter or model, its GGUF export, the merge, and (in the
stages) metrics.json and resolved_config.yaml; the other processes log warnings only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import RECORD_KINDS, ConfigError, FinetuneConfig, ModelPreset
from pipeline.core.records import RecordError, dumps, read_jsonl, sha256_text, sha256_tree
from pipeline.core.schema import chat_answer, chat_messages

os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # dvclive must not phone home from a training run

log = logging.getLogger(__name__)

IGNORE = -100
# Config keys that do not change the trained adapter: changing them keeps the checkpoints. quant_storage is
# only the container dtype of the same 4-bit values.
NOT_TRAINING_KEYS = ("output_dir", "merge", "export_gguf", "num_threads", "logging_steps", "eval_steps",
                     "quant_storage")
# Checkpoints kept: the previous one survives a kill during the newest one's save.
SAVE_TOTAL_LIMIT = 2


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or spiked; the message says at which step and what to try."""


# ---------------------------------------------------------------------------------------
# Processes: one, or N under `accelerate launch`
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Data: records -> token ids + labels -> (packed) sequences
# ---------------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class PrepStats:
    records: int = 0
    exercises: int = 0
    textbooks: int = 0
    truncated: int = 0
    split: int = 0  # extra pieces of long textbook sections (split_long_textbooks)
    dropped_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def add(self, other: PrepStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def load_records(dataset_dir: Path, section: str = "finetune") -> list[dict]:
    """The dataset's records (train.jsonl); a missing, empty or malformed dataset is a ConfigError
    naming `{section}.dataset_dir`, the file and the record."""
    path = dataset_dir / "train.jsonl"
    if not path.is_file():
        raise ConfigError(f"{section}: {path} not found (run the stages before {section})")
    try:
        records = read_jsonl(path, required=("id", "kind", "text"))
    except RecordError as exc:
        raise ConfigError(f"{section}: bad dataset: {exc}") from None
    if not records:
        raise ConfigError(f"{section}: {path} holds no records; nothing to train on")
    for rec in records:
        if rec["kind"] not in RECORD_KINDS:
            raise ConfigError(f"{section}: {path}: record {rec['id']} has kind {rec['kind']!r}; "
                              f"allowed: {RECORD_KINDS}")
        if not rec["text"].strip():
            raise ConfigError(f"{section}: {path}: record {rec['id']} has an empty text")
    return records


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then the first `eval_fraction` of the records are held out."""
    order = sorted(records, key=lambda r: r["id"])  # input order must not matter
    random.Random(seed).shuffle(order)
    n_eval = round(len(order) * eval_fraction)
    if eval_fraction > 0 and len(order) >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, len(order) - 1)  # keep at least one training record
    return order[n_eval:], order[:n_eval]


def split_exercise(rec: dict) -> tuple[str, str]:
    """(context, target) of an exercise: its prompt up to and including the newline that ends the
    docstring, as the evaluator sends a HumanEval prompt, and the solution that follows."""
    text, prompt = rec["text"], rec.get("prompt") or ""
    if not prompt or not text.startswith(prompt):
        raise ConfigError(
            f"finetune: exercise {rec['id']}: its text does not start with its prompt, so the solution "
            "cannot be located for the completion-only loss (fix the dataset or set "
            "finetune.completion_only_loss=false)"
        )
    boundary = len(prompt) + (1 if text[len(prompt):].startswith("\n") else 0)
    return text[:boundary], text[boundary:]


def tokenize_record(rec: dict, tok: Any, completion_only: bool, chat: bool = False) -> Example:
    """Token ids and labels of one record, in the format the student is evaluated in.

    Context and target are tokenized on their own and concatenated, so the context's tokens are
    exactly those of the evaluator's request (no token merges across the boundary). A completion
    student's exercise is `prompt | solution + EOS`; a chat student's is its chat template around
    the same request the evaluator sends (:func:`pipeline.core.schema.chat_messages`) and the whole
    program as the answer, ending with the template's end-of-turn tokens. Textbook sections are
    plain text for both, every token a target. With `completion_only`, context tokens get IGNORE.
    """
    from pipeline.engines.student import encode_chat_example, encode_context

    if rec["kind"] == "exercise" and (completion_only or chat):
        context, target = split_exercise(rec)
        if chat:
            ctx_ids, tgt_ids = encode_chat_example(tok, chat_messages(context), chat_answer(rec["text"]))
        else:
            ctx_ids = encode_context(tok, prompt=context)
            tgt_ids = list(tok(target, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    else:
        ctx_ids, tgt_ids = [], encode_context(tok, prompt=rec["text"]) + [tok.eos_token_id]
    ids = ctx_ids + tgt_ids
    # Nothing predicts an example's first token: packed after another example, it must not be
    # learned as "what follows EOS", so packed and unpacked training see the same targets.
    labels = [IGNORE] + ids[1:]
    if completion_only and rec["kind"] == "exercise":
        labels[: len(ctx_ids)] = [IGNORE] * len(ctx_ids)
    return Example(ids, labels)


def prepare_examples(records: list[dict], tok: Any, ft: FinetuneConfig,
                     chat: bool = False) -> tuple[list[Example], PrepStats]:
    """Tokenize, then truncate or drop what is too long; everything counted."""
    stats = PrepStats(records=len(records))
    out = []
    for rec in records:
        stats.exercises += rec["kind"] == "exercise"
        stats.textbooks += rec["kind"] == "textbook"
        ex = tokenize_record(rec, tok, ft.completion_only_loss, chat)
        if len(ex.input_ids) > ft.max_length and ft.split_long_textbooks and rec["kind"] == "textbook":
            # A document, every token a target: max_length windows, each starting without a target
            # (as every example does), instead of losing its tail.
            pieces = [ex.input_ids[i: i + ft.max_length] for i in range(0, len(ex.input_ids), ft.max_length)]
            pieces = [ids for ids in pieces if len(ids) > 1]
            stats.split += len(pieces) - 1
            for ids in pieces:
                stats.tokens += len(ids)
                stats.target_tokens += len(ids) - 1
                out.append(Example(ids, [IGNORE] + ids[1:]))
            continue
        if len(ex.input_ids) > ft.max_length:
            if ft.drop_long:
                stats.dropped_long += 1
                continue
            stats.truncated += 1
            ex = Example(ex.input_ids[: ft.max_length], ex.labels[: ft.max_length])
        targets = sum(label != IGNORE for label in ex.labels)
        if targets == 0:
            stats.dropped_no_target += 1
            continue
        stats.tokens += len(ex.input_ids)
        stats.target_tokens += targets
        out.append(ex)
    return out, stats


def pack_examples(examples: list[Example], max_length: int) -> list[dict]:
    """Next-fit packing into rows of at most max_length tokens; position ids restart per example."""
    rows: list[dict] = []
    cur: dict = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex.input_ids) > max_length:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ex.input_ids
        cur["labels"] += ex.labels
        cur["position_ids"] += list(range(len(ex.input_ids)))
    if cur["input_ids"]:
        rows.append(cur)
    return rows


def to_rows(examples: list[Example], ft: FinetuneConfig) -> list[dict]:
    if ft.packing:
        return pack_examples(examples, ft.max_length)
    return [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


@dataclass
class Collator:
    """Right-pads a batch. attention_mask marks real tokens (the Trainer counts them for
    tokens/s); in packed mode it is removed before the forward pass (see PackingTrainer)."""

    pad_id: int
    packed: bool

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, list] = {"input_ids": [], "labels": [], "attention_mask": []}
        if self.packed:
            batch["position_ids"] = []
        for r in rows:
            n, pad = len(r["input_ids"]), width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad_id] * pad)
            batch["labels"].append(r["labels"] + [IGNORE] * pad)
            batch["attention_mask"].append([1] * n + [0] * pad)
            if self.packed:  # padding restarts at 0: its own block, invisible to real tokens
                batch["position_ids"].append(r["position_ids"] + list(range(pad)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------
# Model: LoRA targets, adapters
# ---------------------------------------------------------------------------------------


def linear_module_names(model: Any) -> set[str]:
    """Leaf names of the linear layers LoRA can adapt (bnb's Linear4bit is an nn.Linear)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head":
            names.add(name.rsplit(".", 1)[-1])
    return names


def resolve_targets(model: Any, ft: FinetuneConfig, preset: ModelPreset) -> list[str] | str:
    """finetune.target_modules, else the preset's, else all linear layers; unknown names fail now."""
    wanted = ft.target_modules or preset.lora_target_modules
    if not wanted:
        return "all-linear"
    available = linear_module_names(model)
    missing = [name for name in wanted if name not in available]
    if missing:
        key = ("finetune.target_modules" if ft.target_modules
               else f"preset '{preset.name}' lora_target_modules")
        raise ConfigError(f"{key}: {missing} match no linear layer of {preset.name}; "
                          f"its linear layers are {sorted(available)}")
    return list(wanted)


def keep_4bit_layers_differentiable(model: Any) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for its AVX512-BF16 CPU kernel on the
    first no-grad eval-mode forward and keeps them repacked; that kernel (gemv_4bit) has no
    autograd, so every training step after the first evaluation would backpropagate wrong
    input gradients through it. Never repack during a training run."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_quantized(model: Any) -> Any:
    """A 4-bit base made ready for LoRA: fp32 norms/embeddings, frozen base (checkpointing is enabled by
    the Trainer). Not under FSDP: FSDP flattens each block into one parameter of one dtype (the 4-bit
    weights are stored in the compute dtype for that), which fp32 norms would break; TRL's SFTTrainer
    skips this preparation for sharded QLoRA for the same reason."""
    from peft import prepare_model_for_kbit_training

    from pipeline.engines.student import fsdp_launched

    if not fsdp_launched():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_4bit_layers_differentiable(model)
    return model


def peft_kwargs(quantized: bool) -> dict:
    """Sharded QLoRA keeps the adapters in the base's dtype (peft would upcast them to fp32), as TRL does."""
    from pipeline.engines.student import fsdp_launched

    return {"autocast_adapter_dtype": False} if quantized and fsdp_launched() else {}


def add_lora(model: Any, ft: FinetuneConfig, preset: ModelPreset, quantized: bool, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    targets = resolve_targets(model, ft, preset)
    if quantized:
        model = prepare_quantized(model)
    model.config.use_cache = False  # the KV cache is useless in training and breaks checkpointing
    set_seed(seed)  # LoRA A's initialisation draws from the global RNG
    lora = LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora, **peft_kwargs(quantized))


# ---------------------------------------------------------------------------------------
# Trainer pieces: packing-aware loss, divergence guard, dvclive logging
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Checkpoints: fingerprint, resume
# ---------------------------------------------------------------------------------------


def run_fingerprint(ft: FinetuneConfig, seed: int, preset: ModelPreset, dataset_sha: str, init: str | None = None) -> str:
    """What decides the trained adapter: the training keys, the seed, the student, the data and the
    adapter it starts from."""
    keys = {k: v for k, v in asdict(ft).items() if k not in NOT_TRAINING_KEYS}
    return sha256_text(dumps({"finetune": keys, "seed": seed, "student": asdict(preset), "dataset": dataset_sha,
                              **({"init": init} if init else {})}))


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


# ---------------------------------------------------------------------------------------
# Outputs
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


def save_adapter(trainer: Any, out_dir: Path) -> Path | None:
    """adapter/ written beside, then swapped in: a killed save never leaves half an adapter. Written by the
    main process only (None in the others)."""
    final = out_dir / "adapter"
    # One name for every process: under FSDP they all pass it to the Trainer, which writes from the main one.
    tmp = out_dir / ".adapter.tmp"
    if trainer.accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if not _save_trained(trainer, tmp):
        return None
    # PEFT writes target_modules from a set, in an order that changes from process to process:
    # sorted, the same adapter is the same bytes (and DVC sees no change).
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def merge_adapter(preset: ModelPreset, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge into a bf16 copy of the base (never the 4-bit one: rounding the sum would lose the delta)."""
    from peft import PeftModel

    from pipeline.engines.student import load_student

    base, tok = load_student(preset, "none", compute_dtype=torch.bfloat16, device="cpu")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target = out_dir / "merged"
    shutil.rmtree(target, ignore_errors=True)
    merged.save_pretrained(str(target), safe_serialization=True)
    tok.save_pretrained(str(target))
    return target


def peak_memory_bytes(device: str) -> tuple[int, str]:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"  # ru_maxrss is KiB on Linux


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


@dataclass
class Prepared:
    train: list[dict]
    eval: list[dict]
    stats: PrepStats
    train_examples: int
    eval_examples: int
    extra: dict = field(default_factory=dict)


def prepare_data(records: list[dict], tok: Any, ft: FinetuneConfig, seed: int, chat: bool = False) -> Prepared:
    train_recs, eval_recs = split_records(records, ft.eval_fraction, seed)
    train_ex, stats = prepare_examples(train_recs, tok, ft, chat)
    eval_ex, eval_stats = prepare_examples(eval_recs, tok, ft, chat)
    stats.add(eval_stats)
    if not train_ex:
        raise ConfigError(
            f"finetune: no training example left after dropping long/empty ones ({asdict(stats)}); "
            "raise finetune.max_length or set finetune.drop_long=false"
        )
    train_rows, eval_rows = to_rows(train_ex, ft), to_rows(eval_ex, ft)
    filled = sum(len(r["input_ids"]) for r in train_rows) / (len(train_rows) * ft.max_length)
    log.info("examples: %d train, %d eval; %d truncated, %d dropped as too long, %d without a target; "
             "%d training sequences (%.0f%% full)", len(train_ex), len(eval_ex), stats.truncated,
             stats.dropped_long, stats.dropped_no_target, len(train_rows), 100 * filled)
    return Prepared(train_rows, eval_rows, stats, len(train_ex), len(eval_ex),
                    {"train_sequences": len(train_rows), "eval_sequences": len(eval_rows),
                     "sequence_fill": round(filled, 4)})


def final_eval_loss(trainer: Any) -> float:
    """The eval loss of the final weights: the periodic evaluation's if it ran at the last step."""
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        return evals[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


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


def load_trainable_adapter(model: Any, adapter_dir: Path, quantized: bool) -> Any:
    """The student with an earlier phase's adapter, trainable: phase 2 continues phase 1's LoRA
    (its rank and targets), so one adapter carries both phases, as one model carries phi-1's."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"the adapter to continue, {adapter_dir}/, does not exist (adapter_config.json): run the "
                          "phase that writes it first, or switch that phase off")
    if quantized:
        model = prepare_quantized(model)
    model.config.use_cache = False
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True, **peft_kwargs(quantized))


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


def train_adapter(ft: FinetuneConfig, preset: ModelPreset, records: list[dict], out_dir: Path, seed: int, *,
                  section: str = "finetune", init_adapter: Path | None = None, weights_dir: Path | None = None,
                  sampler: Sampler | None = None, progress: bool = True, callbacks: list | None = None) -> dict:
    """Train one LoRA adapter on `records` (or continue `init_adapter`): adapter/ and adapter.gguf in
    `weights_dir` (default `out_dir`), dvclive/ and checkpoints/ in `out_dir`; returns the metrics
    (the caller writes them). `section` names the config section in error messages. `callbacks` are
    extra transformers TrainerCallbacks (tests use one to simulate a crash)."""
    from pipeline.engines.gguf_lora import check_supported, export_lora_gguf
    from pipeline.engines.student import (
        check_packed_attention,
        device_type,
        load_student,
        resolve_compute_dtype,
    )

    t0 = time.monotonic()
    weights_dir = weights_dir or out_dir
    if ft.num_threads > 0:
        torch.set_num_threads(ft.num_threads)
    dataset_sha = sha256_text(dumps(sorted(records, key=lambda r: r["id"])))
    # What training starts from beyond the preset: an earlier phase's adapter, or its model folder.
    local_base = Path(preset.hf_id) if preset.hf_id and Path(preset.hf_id).is_dir() else None
    starts = [sha256_tree(p) for p in (init_adapter, local_base) if p and p.is_dir()]
    init_sha = sha256_text(":".join(starts)) if starts else None
    device = device_type()
    dtype = resolve_compute_dtype(ft.compute_dtype, device)
    quantized = ft.quantization == "nf4"
    model, tok = load_student(preset, ft.quantization, ft.double_quant, dtype, device, ft.quant_storage)
    base_config = model.config.to_dict()
    if ft.export_gguf:
        check_supported(base_config["model_type"])
    if ft.packing:
        check_packed_attention()
    # An instruct (chat) student trains in its chat template: the format evaluate sends it.
    data = prepare_data(records, tok, ft, seed, chat=preset.api == "chat")
    if init_adapter is not None:
        model = load_trainable_adapter(model, init_adapter, quantized)
    else:
        model = add_lora(model, ft, preset, quantized, seed)
    log.info("%s: student %s on %s, %s, compute %s%s", section, preset.name, device, ft.quantization, dtype,
             f", continuing {init_adapter}" if init_adapter else "")
    trainer, metrics = _run_trainer(ft, model, tok, data, out_dir, seed,
                                    run_fingerprint(ft, seed, preset, dataset_sha, init_sha), section=section,
                                    device=device, dtype=dtype, progress=progress, callbacks=callbacks, sampler=sampler)
    adapter_dir = save_adapter(trainer, weights_dir)
    metrics = {"student": preset.name, "device": device, "quantization": ft.quantization,
               "compute_dtype": str(dtype).removeprefix("torch."),
               "init_adapter": str(init_adapter) if init_adapter else None, **metrics}
    del trainer, model  # free the training model before merging
    if adapter_dir is None:  # not the main process: the main one exports, merges and writes
        return metrics
    if ft.export_gguf:
        metrics["gguf_adapter"] = export_lora_gguf(adapter_dir, base_config, weights_dir / "adapter.gguf")["path"]
    if ft.merge:
        metrics["merged_dir"] = str(merge_adapter(preset, adapter_dir, weights_dir))
    peak, kind = peak_memory_bytes(device)
    metrics.update({"peak_memory_mb": round(peak / 2**20, 1), "peak_memory_kind": kind,
                    "wall_s": round(time.monotonic() - t0, 2)})
    return metrics


def train_model(ft: FinetuneConfig, model: Any, tok: Any, records: list[dict], out_dir: Path, weights_dir: Path,
                seed: int, fingerprint: dict, *, section: str, sampler: Sampler | None = None, progress: bool = True,
                callbacks: list | None = None) -> dict:
    """Train every weight of `model` (an unquantized student, or one built from scratch) on `records`;
    the result is saved with its tokenizer to `weights_dir/model` (a folder `from_pretrained` loads).
    `fingerprint` is what, beyond the data and `ft`, decides the result (the model's origin)."""
    from pipeline.engines.student import check_packed_attention, device_type

    t0 = time.monotonic()
    if ft.num_threads > 0:
        torch.set_num_threads(ft.num_threads)
    device = device_type()
    dtype = next(model.parameters()).dtype
    if ft.packing:
        check_packed_attention()
    data = prepare_data(records, tok, ft, seed)
    model.config.use_cache = False
    model.train()
    keys = {k: v for k, v in asdict(ft).items() if k not in NOT_TRAINING_KEYS}
    digest = sha256_text(dumps({"train": keys, "seed": seed, "origin": fingerprint,
                                "dataset": sha256_text(dumps(sorted(records, key=lambda r: r["id"])))}))
    trainer, metrics = _run_trainer(ft, model, tok, data, out_dir, seed, digest, section=section, device=device,
                                    dtype=dtype, progress=progress, callbacks=callbacks, sampler=sampler)
    target = weights_dir / "model"
    tmp = weights_dir / ".model.tmp"  # one name for every process (see save_adapter)
    if trainer.accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    if _save_trained(trainer, tmp):
        tok.save_pretrained(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    peak, kind = peak_memory_bytes(device)
    return {"device": device, "compute_dtype": str(dtype).removeprefix("torch."), **metrics, "model_dir": str(target),
            "peak_memory_mb": round(peak / 2**20, 1), "peak_memory_kind": kind, "wall_s": round(time.monotonic() - t0, 2)}
