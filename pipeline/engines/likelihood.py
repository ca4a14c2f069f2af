"""Negative log-likelihood of reference answers under a student, in process with transformers.

The continuous endpoint beside pass@1: how many nats per token the student needs to write a
problem's canonical solution after exactly the context it is evaluated with. Greedy pass@1 on
164 problems moves in steps of 0.6 points and cannot see a small effect; the NLL of the same
problems moves with every token (DataDecide, arXiv 2504.11393, judges data ablations this way).

Each item is tokenized by the training code (:func:`pipeline.engines.training.tokenize_record`,
completion-only labels): the context is the evaluator's prompt tokenized alone, the target the
solution tokens and EOS, so the token boundary is the one training uses and the context ids are
the ids evaluate sends. The model is the one llama.cpp serves: the dequantized base folder (or a
phase-1 model folder) plus the trained peft adapter, merged. Logits are computed at the target
positions only (``logits_to_keep``): Gemma 3's 262k-token head would otherwise dominate the cost.
Rows are batched with left padding (position ids from the mask), longest first.

    python -m pipeline.engines.likelihood gemma-3-270m      # NLL of 8 HumanEval solutions under the base
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.engines.training import IGNORE, split_exercise, tokenize_record

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One scored text: `context` then `target` (as an exercise record: prompt, prompt + solution)."""

    id: str
    context: str
    target: str

    def record(self) -> dict:
        return {"id": self.id, "kind": "exercise", "prompt": self.context, "text": self.context + self.target}


@dataclass
class Scored:
    id: str
    nll: float  # nats, summed over the target tokens
    tokens: int  # target tokens (EOS included)
    bytes: int  # UTF-8 bytes of the target text
    context_tokens: int

    @property
    def per_token(self) -> float:
        return self.nll / self.tokens

    def as_dict(self) -> dict:
        return {"nll": round(self.nll, 6), "tokens": self.tokens, "bytes": self.bytes,
                "nll_per_token": round(self.per_token, 6)}


def encode_items(items: list[Item], tok: Any, chat: bool) -> list[tuple[list[int], int]]:
    """(token ids, index of the first target token) of each item, as training tokenizes it."""
    out = []
    for item in items:
        ex = tokenize_record(item.record(), tok, completion_only=True, chat=chat)
        first = next((i for i, label in enumerate(ex.labels) if label != IGNORE), None)
        if first is None or first == 0:
            raise ValueError(f"likelihood: item {item.id} has no target tokens after its context")
        out.append((ex.input_ids, first))
    return out


def target_bytes(item: Item) -> int:
    """Bytes of the solution text the target tokens spell (the same split as training's)."""
    return len(split_exercise(item.record())[1].encode("utf-8"))


class Scorer:
    """A student (base folder + optional peft adapter) that scores items; bf16 on a GPU, fp32 on the CPU."""

    def __init__(self, source: str, adapter: Path | None = None, chat: bool = False, device: str | None = None,
                 batch_size: int = 8):
        from transformers import AutoModelForCausalLM

        from pipeline.engines.student import bf16_supported, device_type, load_tokenizer

        self.device = device or device_type()
        dtype = torch.bfloat16 if self.device == "cuda" and bf16_supported("cuda") else torch.float32
        self.tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(self.device)
        if adapter is not None:
            from peft import PeftModel

            # Merged: the same function as base + LoRA, without the adapter's extra matmuls per layer.
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        self.model = model.eval()
        self.chat, self.batch_size = chat, batch_size
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def score(self, items: list[Item], progress: bool = False, desc: str = "nll") -> list[Scored]:
        encoded = encode_items(items, self.tokenizer, self.chat)
        order = sorted(range(len(items)), key=lambda i: -len(encoded[i][0]))
        results: dict[int, Scored] = {}
        with tqdm(total=len(items), desc=desc, unit="text", disable=not progress, mininterval=0.5) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, (nll, n) in zip(chunk, self._batch([encoded[i] for i in chunk]), strict=True):
                    results[i] = Scored(items[i].id, nll, n, target_bytes(items[i]), encoded[i][1])
                bar.update(len(chunk))
        return [results[i] for i in range(len(items))]

    @torch.no_grad()
    def _batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, int]]:
        width = max(len(ids) for ids, _ in rows)
        # Logits at positions first-1 .. len-2 predict the targets: the last `keep` positions cover them all.
        keep = max(len(ids) - first + 1 for ids, first in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, _) in enumerate(rows):  # left padding: every row ends at the last column
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            mask[r, width - len(ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), logits_to_keep=keep, use_cache=False).logits
        out = []
        for r, (ids, first) in enumerate(rows):
            n = len(ids) - first
            # Kept column keep-1-n+i predicts target i; only this row's n positions are normalised.
            row = logits[r, keep - 1 - n: keep - 1].float()
            targets = torch.tensor(ids[first:], device=row.device)
            picked = row.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(row, dim=-1)
            out.append((float(-picked.sum()), n))
        return out


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.config import REPO_ROOT, load_preset
    from pipeline.core.humaneval import load_problems
    from pipeline.engines.student import model_source

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    preset = load_preset(args[0] if args else "gemma-3-270m", REPO_ROOT / "configs")
    items = [Item(p["task_id"], p["prompt"], p["canonical_solution"]) for p in load_problems()[:8]]
    scorer = Scorer(model_source(preset), chat=preset.api == "chat")
    for s in scorer.score(items, progress=True):
        print(s.id, s.as_dict())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
