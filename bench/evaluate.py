"""Benchmark: HumanEval generation throughput through llama.cpp, parallel slots vs one slot, and the
evaluate stage's own time split (generation vs execution).

    .venv/bin/python bench/evaluate.py                        # gemma-3-270m, first 16 problems, greedy, 128 tokens
    .venv/bin/python bench/evaluate.py --problems 4 --max-tokens 32 --preset smollm2-135m-instruct

1. Throughput: the same greedy requests (raw HumanEval prompts, the standard stop sequences)
   sent through the one client to llama.cpp started as `n_parallel` server processes sharing
   the cores: 2 processes x 1 thread each against 1 process x 2 threads. Server start-up is
   timed apart; problems per minute and completion tokens/s are over the generation alone.
   The same again with `reuse_prompt_prefix: true` (the stock server, which re-evaluates only
   what follows the previous request's common prefix) prices the default's reproducibility:
   every request evaluated from an empty context.
2. The evaluate stage end to end (`run_evaluate`, base model only, a fresh request cache in a
   temporary project): self-check, generation and sandboxed execution times from its metrics.

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.core.config import (  # noqa: E402
    REPO_ROOT,
    ClientConfig,
    EvaluateConfig,
    ModelPreset,
    load_config,
    load_preset,
)
from pipeline.engines.servers import serve  # noqa: E402
from pipeline.stages.evaluate import (  # noqa: E402
    Bench,
    Convention,
    Target,
    _send,
    build_requests,
    load_problems,
    run_evaluate,
    truncate_at_stop,
)


def throughput(preset: ModelPreset, problems: list[dict], ev: EvaluateConfig, processes: int, threads: int,
               log_dir: Path, reuse_prefix: bool = False) -> dict:
    """Generation rates with `processes` llama.cpp servers of `threads // processes` threads each."""
    p = dataclasses.replace(preset, server=dataclasses.replace(preset.server, n_parallel=processes, n_threads=threads,
                                                               reuse_prompt_prefix=reuse_prefix))
    conv = Convention(ev.harness, "humaneval")
    requests = build_requests(Target("base", p, "llamacpp"), Bench("humaneval", problems, 164, conv), ev, run_seed=0)
    t0 = time.monotonic()
    with serve(p, log_dir) as urls:
        started = time.monotonic() - t0
        t1 = time.monotonic()
        client_cfg = ClientConfig(concurrency=ev.concurrency, length_retries=0)
        results = asyncio.run(_send(p, urls, client_cfg, None, requests, progress=False, desc="bench"))
        gen_s = time.monotonic() - t1
    failed = [r.id for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) failed: {failed[:3]}")
    tokens = sum(r.usage["completion_tokens"] for r in results)
    return {"processes": processes, "threads_per_process": max(1, threads // processes),
            "server_start_s": round(started, 2), "generation_s": round(gen_s, 2), "completion_tokens": tokens,
            "problems_per_min": round(60 * len(problems) / gen_s, 2), "tokens_per_s": round(tokens / gen_s, 2),
            "mean_completion_chars": round(sum(len(truncate_at_stop(r.choices[0]["text"], conv.stop(ev.stop)))
                                               for r in results) / len(results), 1)}


def stage_run(preset_name: str, n_problems: int, max_tokens: int) -> dict:
    """run_evaluate in a throwaway project (fresh cache): the stage's own timing split."""
    old_cwd = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        root = Path(tmp)
        for name in ("configs", "prompts"):
            shutil.copytree(REPO_ROOT / name, root / name)
        params = {"profile": "cpu-offline", "seed": 1234, "finetune": {"student": preset_name},
                  "evaluate": {"problems": n_problems, "max_tokens": max_tokens, "models": ["base"]}}
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        os.chdir(root)
        try:
            cfg = load_config(root / "params.yaml")
            t0 = time.monotonic()
            metrics = run_evaluate(cfg, root / "params.yaml", progress=False)
            wall = time.monotonic() - t0
        finally:
            os.chdir(old_cwd)
    he = metrics["humaneval"]
    base = he["base"]
    return {"subset": he["subset"], "pass@1": base["pass@1"], "wall_s": round(wall, 2),
            "self_check_s": he["timing"]["self_check_s"], "server_start_s": base["server_start_s"],
            "generation_s": base["generation_s"], "execution_s": base["execution_s"],
            "tokens_per_s": base["tokens_per_s"], "problems_per_min": base["problems_per_min"],
            "isolation": he["sanity"]["isolation"], "flags": he["sanity"]["flags"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gemma-3-270m")
    ap.add_argument("--api", choices=["preset", "completions"], default="completions",
                    help="Send raw prompts as plain completions (base-model protocol) even to a chat preset.")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="Cores shared by the server processes.")
    ap.add_argument("--skip-stage", action="store_true", help="Only the throughput comparison.")
    args = ap.parse_args(argv)

    preset = load_preset(args.preset, REPO_ROOT / "configs")
    if args.api == "completions":
        preset = dataclasses.replace(preset, api="completions")
    problems = load_problems(args.problems)
    ev = EvaluateConfig(problems=args.problems, max_tokens=args.max_tokens, concurrency=2)
    out: dict = {"preset": preset.name, "problems": len(problems), "max_tokens": args.max_tokens, "greedy": True,
                 "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-logs-") as logs:
        parallel = throughput(preset, problems, ev, 2, args.threads, Path(logs))
        print(f"2 processes x {parallel['threads_per_process']} thread(s): {parallel}", flush=True)
        single = throughput(preset, problems, ev, 1, args.threads, Path(logs))
        print(f"1 process x {single['threads_per_process']} thread(s): {single}", flush=True)
        reuse = throughput(preset, problems, ev, 2, args.threads, Path(logs), reuse_prefix=True)
        print(f"2 processes, prompt prefix reuse: {reuse}", flush=True)
    out.update(parallel_2x1=parallel, single_1x2=single, prefix_reuse_2x1=reuse,
               speedup_parallel=round(single["generation_s"] / parallel["generation_s"], 3),
               # tokens/s, since the two modes may not produce the same completions
               fresh_context_vs_prefix_reuse=round(parallel["tokens_per_s"] / reuse["tokens_per_s"], 3))
    if not args.skip_stage:
        with contextlib.redirect_stdout(sys.stderr):
            out["stage"] = stage_run(args.preset, args.problems, args.max_tokens)
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
