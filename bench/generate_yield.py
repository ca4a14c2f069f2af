"""Benchmark: curated exercises per hour of teacher time, today's settings against the improved ones.

Both arms send the same exercise prompts (same teacher GGUF, same run seed, same templates) from
cold request caches, then run the filter stage; what counts is what the filter keeps.

- baseline: the earlier recipe: llama-cpp-python, 2 server processes (one request at a
  time each), temperature 0.8, every assert must pass;
- improved: the repo's recipe as params.yaml and the cpu-offline profile set it (greedy decoding,
  salvaged loops, the `observed` assert policy, repair rounds as configured) on llama.cpp's C++
  server with `--slots` slots decoded in one batch (continuous batching).

curated_per_hour = kept exercises / (generate + filter wall time) x 3600. Correctness of what is
kept (`agreement`): for a fixed sample of each arm's kept exercises (the first `--sample` by
sha256 of the id), the teacher writes a second, independent set of asserts from the signature and
docstring alone (greedy, one request each); `agreement` is the share of those asserts that the kept
solution passes, `agreement_all` the share of sampled exercises that pass all of them.
Determinism: the first `--det` prompts sent at once to the batched server against the same
prompts sent one at a time to it: the share of byte-identical completions.

    .venv/bin/python bench/generate_yield.py                     # ~20 min on 2 cores; last line: JSON
    .venv/bin/python bench/generate_yield.py --exercises 8 --sample 4 --det 2   # a smoke run

Writes the same JSON object to bench/results/generate_yield.json (with --out).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.config import ClientConfig, load_config, load_preset  # noqa: E402
from pipeline.core.records import read_jsonl  # noqa: E402
from pipeline.core.schema import code_blocks, exercise_program  # noqa: E402
from pipeline.engines.llm import LLMClient, LLMRequest  # noqa: E402
from pipeline.engines.servers import serve  # noqa: E402
from pipeline.sandbox import Sandbox, SandboxConfig  # noqa: E402
from pipeline.sandbox.asserts import run_asserts  # noqa: E402
from pipeline.stages.filter import run_filter  # noqa: E402
from pipeline.stages.generate import run_generate  # noqa: E402

TEACHER = "qwen2.5-coder-0.5b-instruct"
INDEPENDENT_TESTS = (
    "Here is the signature and docstring of a Python function:\n\n```python\n{prompt}\n```\n\n"
    "Write five `assert` statements that call this function on different inputs and check its exact results, "
    "worked out by hand from the docstring. Answer with one fenced Python code block of asserts and nothing else."
)


def make_project(root: Path, slots: int) -> Path:
    for name in ("prompts", "configs"):
        shutil.copytree(REPO / name, root / name)
    base = yaml.safe_load((REPO / "configs/models" / f"{TEACHER}.yaml").read_text())
    arms = {  # the baseline's server as it was before; the improved one is the preset's, with `slots` slots
        "teacher-baseline": {"program": "llama-cpp-python", "n_parallel": 2, "reuse_prompt_prefix": False},
        "teacher-batched": {"program": "llama-server", "n_parallel": slots},
    }
    for name, server in arms.items():
        preset = {**base, "server": {**base.get("server", {}), **server}}
        (root / "configs/models" / f"{name}.yaml").write_text(yaml.safe_dump(preset))
    (root / "params.yaml").write_text(yaml.safe_dump(yaml.safe_load((REPO / "params.yaml").read_text())))
    return root


def run_arm(root: Path, arm: str, n: int, slots: int) -> dict:
    improved = arm == "improved"
    overrides = [
        f"generate.n_exercises={n}", "generate.n_textbooks=0",
        f"generate.cache_path={arm}/cache.sqlite", f"generate.output_dir={arm}/generate",
        f"filter.input_dir={arm}/generate", f"filter.output_dir={arm}/filter",
    ]
    if improved:  # the repo's recipe (params.yaml + profile) on the batched server
        overrides += ["generate.teacher=teacher-batched", f"generate.client.concurrency={slots}"]
    else:  # the earlier recipe
        overrides += ["generate.teacher=teacher-baseline", "generate.client.concurrency=2",
                      "generate.sampling.temperature=0.8", "generate.repair_rounds=0", "filter.assert_policy=all",
                      "generate.salvage_truncated=false"]
    cfg = load_config(root / "params.yaml", overrides)
    g = run_generate(cfg, root / "params.yaml", progress=False)
    f = run_filter(cfg, root / "params.yaml", progress=False)
    wall = g["timing"]["wall_s"] + f["timing"]["wall_s"]
    decode_s = g["timing"]["wall_s"] - g["timing"]["server_start_s"]
    kept = f["exercise"]["kept"]
    return {
        "kept": kept, "parsed": g["kept"]["exercise"], "prompts": n,
        "requests": n + g["repair"]["requests"], "repaired": g["repair"]["exercises_repaired"],
        "kept_with_dropped_asserts": f["exercise"]["kept_with_dropped_asserts"],
        "kept_with_rewritten_asserts": f["exercise"]["kept_with_rewritten_asserts"],
        "salvaged_from_length": g["salvaged_from_length"],
        "dropped_by_reason": f["exercise"]["dropped_by_reason"],
        "completion_tokens": g["tokens"]["completion"],
        "tokens_per_s": round(g["tokens"]["completion"] / max(decode_s, 1e-9), 2),
        "generate_s": g["timing"]["wall_s"], "filter_s": f["timing"]["wall_s"],
        "curated_per_hour": round(kept / wall * 3600, 1),
        "kept_ids": [r["id"] for r in read_jsonl(root / arm / "filter/exercises.jsonl")],
    }


async def _send(preset, urls: list[str], requests: list[LLMRequest], concurrency: int) -> dict[str, str]:
    client = LLMClient(preset, urls, ClientConfig(concurrency=concurrency, max_retries=2), cache=None, rng_seed=0)
    async with client:
        results = await asyncio.gather(*(client.generate(r) for r in requests))
    return {r.id: (res.choices[0]["text"] if res.ok else "") for r, res in zip(requests, results, strict=True)}


def independent_asserts(text: str) -> str:
    blocks = code_blocks(text)
    lines = [ln for b in blocks for ln in b.splitlines() if ln.startswith("assert ")]
    return "\n".join(lines) + "\n" if lines else ""


def agreement(root: Path, arms: dict, sample: int, slots: int, det_requests: list[LLMRequest]) -> dict:
    preset = load_preset("teacher-batched", root / "configs")
    picked = {}
    for arm in arms:
        recs = {r["id"]: r for r in read_jsonl(root / arm / "filter/exercises.jsonl")}
        ids = sorted(recs, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:sample]
        picked[arm] = [recs[i] for i in ids]
    reqs = {}
    for arm, recs in picked.items():
        for r in recs:
            reqs[(arm, r["id"])] = LLMRequest(
                f"{arm}/{r['id']}", messages=[{"role": "user", "content": INDEPENDENT_TESTS.format(prompt=r["parsed"]["prompt"])}],
                params={"temperature": 0.0, "max_tokens": 384, "seed": 0})
    os.chdir(root)
    with serve(preset, root / "logs") as urls:
        answers = asyncio.run(_send(preset, urls, list(reqs.values()), slots))
        t0 = time.monotonic()
        together = asyncio.run(_send(preset, urls, det_requests, slots))
        one_by_one = asyncio.run(_send(preset, urls, det_requests, 1))
        det_s = time.monotonic() - t0
    out = {}
    with Sandbox(SandboxConfig(timeout_s=3.0)) as sandbox:
        for arm, recs in picked.items():
            items = [(exercise_program(r["parsed"]), independent_asserts(answers[f"{arm}/{r['id']}"])) for r in recs]
            usable = [(it, r) for it, r in zip(items, recs, strict=True) if it[1]]
            runs = run_asserts(sandbox, [it for it, _ in usable])
            passed = total = full = 0
            for run in runs:
                n = len([u for u in run.units if u.is_assert]) or 1
                ok = sum(1 for o in run.outcomes or [] if o.status == "passed")
                passed, total, full = passed + ok, total + n, full + (ok == n)
            out[arm] = {"sampled": len(recs), "with_independent_tests": len(runs),
                        "agreement": round(passed / max(total, 1), 3),
                        "agreement_all": round(full / max(len(runs), 1), 3)}
    same = sum(1 for r in det_requests if together[r.id] == one_by_one[r.id])
    out["determinism"] = {"requests": len(det_requests), "identical_batched_vs_one_at_a_time": same,
                          "wall_s": round(det_s, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exercises", type=int, default=40, help="Exercise prompts per arm.")
    ap.add_argument("--slots", type=int, default=8, help="llama-server slots (and client concurrency) when improved.")
    ap.add_argument("--sample", type=int, default=16, help="Kept exercises per arm given independent tests.")
    ap.add_argument("--det", type=int, default=8, help="Prompts for the determinism check.")
    ap.add_argument("--out", default=str(REPO / "bench/results/generate_yield.json"), help="Where to write the JSON.")
    args = ap.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    with tempfile.TemporaryDirectory(prefix="yield-") as tmp:
        root = make_project(Path(tmp), args.slots)
        cwd = os.getcwd()
        os.chdir(root)
        try:
            arms = {arm: run_arm(root, arm, args.exercises, args.slots) for arm in ("baseline", "improved")}
            gen_cfg = load_config(root / "params.yaml", ["generate.teacher=teacher-batched",
                                                         f"generate.n_exercises={args.det}", "generate.n_textbooks=0"])
            from pipeline.stages.generate import build_requests, load_prompt_space, sample_specs

            space = load_prompt_space(root / "prompts")
            specs = sample_specs(space, args.det, 0, gen_cfg.seed)
            det_requests = build_requests(specs, gen_cfg.generate, load_preset("teacher-batched", root / "configs"),
                                          gen_cfg.seed, root / "prompts")
            agree = agreement(root, arms, args.sample, args.slots, det_requests)
        finally:
            os.chdir(cwd)
    base, new = arms["baseline"], arms["improved"]
    result = {
        "bench": "generate_yield", "teacher": TEACHER, "exercises_per_arm": args.exercises, "slots": args.slots,
        "curated_per_hour": new["curated_per_hour"], "baseline_curated_per_hour": base["curated_per_hour"],
        "ratio": round(new["curated_per_hour"] / max(base["curated_per_hour"], 1e-9), 2),
        "tokens_per_s": new["tokens_per_s"], "baseline_tokens_per_s": base["tokens_per_s"],
        "agreement": agree["improved"]["agreement"], "baseline_agreement": agree["baseline"]["agreement"],
        "agreement_all": agree["improved"]["agreement_all"], "baseline_agreement_all": agree["baseline"]["agreement_all"],
        "determinism": agree["determinism"],
        "arms": {k: {kk: vv for kk, vv in v.items() if kk != "kept_ids"} | {"agreement_sample": agree[k]}
                 for k, v in arms.items()},
        "cpu_count": os.cpu_count(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
