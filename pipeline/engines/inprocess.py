"""In-process generation: transformers in this process, no server (pipeline.engines.student.InProcessModel:
bf16 and batched on a GPU, fp32 one request at a time on the CPU), behind the same request cache as the
served engines. For a model no server loads (a model phase 1 trained whole) and for
`evaluate.engine=transformers`.

    textbook evaluate --set evaluate.engine=transformers --set evaluate.problems=2
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from pipeline.core.config import ModelPreset
from pipeline.engines.llm import LLMRequest, LLMResult, RequestCache, request_key


def InProcessModel(source: str, adapter: Path | None, batch_size: int = 1):  # a class's name: tests replace it
    """transformers in this process (pipeline.engines.student.InProcessModel: bf16 and batched on a GPU)."""
    from pipeline.engines.student import InProcessModel as Model  # torch: imported only on this path

    return Model(source, adapter, batch_size)


def generate_in_process(preset: ModelPreset, identity: str, adapter: Path | None, requests: list[LLMRequest],
                        cache: RequestCache, progress: bool, desc: str, batch_size: int = 1
                        ) -> tuple[dict[str, LLMResult], float, float]:
    """Every request's result by id, cached ones first; the model loads only if one is not cached.
    `identity` is the cache identity of the model (and adapter). Returns (results, seconds loading
    the model, seconds generating)."""
    api = preset.api
    keys = {r.id: request_key(identity, api, r.messages, r.prompt, r.params) for r in requests}
    results: dict[str, LLMResult] = {}
    load_s = generation_s = 0.0
    pending = []
    for r in requests:
        hit = cache.get(keys[r.id])
        if hit is None:
            pending.append(r)
        else:
            results[r.id] = LLMResult(r.id, keys[r.id], choices=hit["choices"], usage=hit["usage"], cached=True)
    if pending:
        ts = time.monotonic()
        from pipeline.engines.student import (
            device_type,
            model_source,  # a GGUF preset: its dequantized HF folder, as fine-tuning uses
        )

        # Batched on a GPU (evaluate.client.concurrency requests at a time); one at a time on the CPU.
        model = InProcessModel(model_source(preset), adapter, batch_size if device_type() == "cuda" else 1)
        load_s = time.monotonic() - ts
        t0 = time.monotonic()
        with tqdm(total=len(pending), desc=desc, unit="req", disable=not progress, mininterval=0.5) as bar:
            def done(i: int, result: tuple[list[dict], dict]) -> None:
                r, (choices, usage) = pending[i], result
                cache.put(keys[r.id], identity, {"choices": choices, "usage": usage, "cost_usd": 0.0})
                results[r.id] = LLMResult(r.id, keys[r.id], choices=choices, usage=usage, attempts=1)
                bar.update(1)

            try:
                model.complete_many(pending, on_result=done)
            finally:  # its GPU memory goes back before any server (or the likelihood scorer) starts
                model.close()
        generation_s = time.monotonic() - t0
    return results, load_s, generation_s
