"""Benchmark: how many requests/s the generate stage sustains, and llama.cpp with N processes vs 1.

1. The client (cache, retries, rate limiting, accounting) against a zero-latency local
   OpenAI-compatible endpoint (tests.fakeserver in its own process), and the whole
   generate stage (prompt sampling, rendering, client, parsing, writing) against it.
   Goal: >= 500 requests/s, so the client is never the bottleneck.
2. The llama.cpp server (a GGUF from a PyPI package) with `n_parallel` server processes
   sharing the cores against one process using all of them: completion tokens/s.

    .venv/bin/python bench/generate_client.py            # last line: one JSON object
    .venv/bin/python bench/generate_client.py --requests 2000 --llama-model qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.config import ClientConfig, ModelPreset, load_config, load_preset  # noqa: E402
from pipeline.engines.llm import LLMClient, LLMRequest, RequestCache  # noqa: E402
from pipeline.engines.servers import free_port, serve  # noqa: E402
from pipeline.stages.generate import run_generate  # noqa: E402


def start_fake_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakeserver", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    httpx.get(f"{url}/models", timeout=10).raise_for_status()
    return proc, url


def bench_client(url: str, n: int, concurrency: int, tmp: Path) -> dict:
    preset = ModelPreset(name="fake", engine="remote", model="fake", base_url=url)
    cfg = ClientConfig(concurrency=concurrency)
    reqs = [LLMRequest(f"r{i}", messages=[{"role": "user", "content": f"exercise {i}"}],
                       params={"temperature": 0.7, "max_tokens": 256, "seed": i}) for i in range(n)]

    async def go() -> float:
        cache = RequestCache(tmp / "client.sqlite")
        client = LLMClient(preset, [url], cfg, cache=cache)
        sem = asyncio.Semaphore(concurrency * 2)

        async def one(r: LLMRequest) -> None:
            async with sem:
                await client.generate(r)

        t0 = time.perf_counter()
        async with client:
            await asyncio.gather(*(one(r) for r in reqs))
        dt = time.perf_counter() - t0
        cache.close()
        assert client.ledger.requests_sent == n and client.ledger.failed == 0
        return dt

    dt = asyncio.run(go())
    return {"requests": n, "concurrency": concurrency, "wall_s": round(dt, 3), "requests_per_s": round(n / dt, 1)}


def bench_stage(url: str, n: int, concurrency: int, tmp: Path) -> dict:
    project = tmp / "project"
    for name in ("prompts", "configs"):
        shutil.copytree(REPO / name, project / name)
    (project / "configs/models/fake.yaml").write_text(f"engine: remote\nmodel: fake\nbase_url: {url}\n")
    (project / "params.yaml").write_text("profile: ci\n")
    cwd = os.getcwd()
    os.chdir(project)
    try:
        cfg = load_config(project / "params.yaml", [
            "generate.teacher=fake", f"generate.n_exercises={n}", "generate.n_textbooks=0",
            f"generate.client.concurrency={concurrency}"])
        t0 = time.perf_counter()
        stats = run_generate(cfg, project / "params.yaml", progress=False)
        dt = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
    assert stats["kept"]["exercise"] == n, stats
    return {"requests": n, "concurrency": concurrency, "wall_s": round(dt, 3), "requests_per_s": round(n / dt, 1)}


def bench_llamacpp(preset: ModelPreset, replicas: int, threads: int, n: int, max_tokens: int, tmp: Path) -> dict:
    preset = dataclasses.replace(preset, server=dataclasses.replace(preset.server, n_parallel=replicas,
                                                                    n_threads=threads))
    cfg = ClientConfig(concurrency=max(2, replicas * 2))
    reqs = [LLMRequest(f"r{i}", messages=[{"role": "user", "content": f"Write a Python function number {i} "
                                                                       "that reverses a list, with a docstring."}],
                       params={"temperature": 0.0, "max_tokens": max_tokens, "seed": i}) for i in range(n)]

    async def go(urls: list[str]) -> tuple[float, int]:
        client = LLMClient(preset, urls, cfg)
        t0 = time.perf_counter()
        async with client:
            res = await asyncio.gather(*(client.generate(r) for r in reqs))
        assert all(r.ok for r in res)
        return time.perf_counter() - t0, client.ledger.completion_tokens

    with serve(preset, tmp / "logs") as urls:
        dt, tokens = asyncio.run(go(urls))
    return {"processes": replicas, "threads_each": max(1, threads // replicas), "requests": n,
            "completion_tokens": tokens, "wall_s": round(dt, 2), "tokens_per_s": round(tokens / dt, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--llama-model", default="smollm2-135m-instruct", help="Preset for the llama.cpp part.")
    ap.add_argument("--llama-requests", type=int, default=12)
    ap.add_argument("--llama-max-tokens", type=int, default=96)
    ap.add_argument("--skip-llama", action="store_true")
    args = ap.parse_args()
    out: dict = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proc, url = start_fake_server()
        try:
            out["client"] = bench_client(url, args.requests, args.concurrency, tmp)
            print("client:", out["client"], flush=True)
            out["stage"] = bench_stage(url, args.requests, args.concurrency, tmp)
            print("stage:", out["stage"], flush=True)
        finally:
            proc.terminate()
            proc.wait()
        out["goal_requests_per_s"] = 500
        out["goal_met"] = min(out["client"]["requests_per_s"], out["stage"]["requests_per_s"]) >= 500
        if not args.skip_llama:
            preset = load_preset(args.llama_model, REPO / "configs")
            cores = os.cpu_count() or 1
            one = bench_llamacpp(preset, 1, cores, args.llama_requests, args.llama_max_tokens, tmp)
            print("llama.cpp 1 process:", one, flush=True)
            many = bench_llamacpp(preset, cores, cores, args.llama_requests, args.llama_max_tokens, tmp)
            print(f"llama.cpp {cores} processes:", many, flush=True)
            out["llamacpp"] = {"model": args.llama_model, "one_process": one, "parallel": many,
                               "speedup": round(many["tokens_per_s"] / one["tokens_per_s"], 2)}
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
