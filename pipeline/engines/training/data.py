"""Data: records -> token ids + labels -> (packed) sequences, everything decided before the first step.

Exercises train on the solution only (the signature and docstring tokens get label -100), in the format the
student is evaluated in: a base student sees the prompt exactly as evaluate sends it (tokenized on its own, so
the boundary token agrees); an instruct student (preset `api: chat`) sees its chat template around the same
request evaluate sends, and learns the answer and the end-of-turn. Textbook sections train on every token, as
plain text. Each example ends with EOS (a chat answer with the template's end of turn).

Data decisions, all made and counted before any training step (metrics.json `examples`): examples longer than
`max_length` are truncated (or dropped with `drop_long`); an exercise left with no solution tokens is dropped;
an empty dataset, a record whose text does not start with its prompt, or LoRA targets that match no layer are
errors. The held-out split is a seeded shuffle of records (never of packed sequences, so no example is in both).

Packing: short examples are packed first-come into sequences of up to `max_length` tokens. Each example's
position ids restart at 0 and neither an attention mask nor a KV cache is passed, which makes transformers build
a block-diagonal causal mask (masking_utils.find_packed_sequence_indices): attention does NOT cross example
boundaries (tested with sdpa; eager and flash-attention read the same position ids). No example's first token is
a target (nothing may learn "what follows EOS"), so a packed row's loss is exactly its examples' own. Padding at
the end of a row forms its own block with label -100. Without packing, rows are right-padded with an attention
mask.

Why not TRL's SFTTrainer: its packing and completion-only loss tokenize prompt and completion together (or
through the chat template) and find the boundary afterwards, while the evaluator sends the prompt tokenized on
its own; a base student must be trained on exactly those prompt tokens, so the boundary is built here, where a
test pins it (`tests/test_finetune.py`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import RECORD_KINDS, ConfigError, FinetuneConfig
from pipeline.core.records import RecordError, read_jsonl
from pipeline.core.schema import chat_answer, chat_messages

log = logging.getLogger(__name__)

IGNORE = -100


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
