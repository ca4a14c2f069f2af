"""Benchmark: fine-tuning throughput and peak memory, QLoRA vs LoRA, packing on vs off.

    .venv/bin/python bench/finetune.py                       # CPU: gemma-3-270m, 4 configs, a few minutes
    .venv/bin/python bench/finetune.py --steps 6 --max-length 256 --configs qlora-packed,lora-packed
    .venv/bin/python bench/finetune.py --gpu                 # CUDA: a random-weight 1.3B Llama

Each config runs `pipeline.stages.finetune.run_finetune` (the stage itself, outputs in a temporary
project) in its own subprocess, so the peak memory is that config's: peak RSS on CPU (the
model load included), `torch.cuda.max_memory_allocated` on CUDA. Tokens/s counts real
(non-padding) tokens, as the median of the per-step rates after the first step (warm-up).

Configs: `qlora` = NF4 + double quant base, `lora` = unquantized base in the compute dtype
(bf16 where supported, else fp32; `lora-fp32` forces fp32); `-packed` packs the short
synthetic exercises into max_length rows, `-unpacked` pads each to the batch's longest.

`--gpu` builds deepseek-coder-1.3b-base's architecture (Llama: hidden 2048, intermediate
5504, 24 layers, 16 heads, rope theta 100000) with random weights, no network needed. Its
vocabulary is SmolLM2's tokenizer's (49152, not 32256: no DeepSeek tokenizer offline), about
35M more embedding parameters. Reference point: QLoRA of a 1.1B model on one A100-80GB, batch
4: about 15,000 tokens/s with 9.1 GB allocated.

The last line of stdout is one JSON object: per config tokens/s, peak memory, losses.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

CONFIGS = {
    "qlora-packed": {"quantization": "nf4", "packing": True},
    "qlora-unpacked": {"quantization": "nf4", "packing": False},
    "lora-packed": {"quantization": "none", "packing": True},
    "lora-unpacked": {"quantization": "none", "packing": False},
    "lora-fp32-packed": {"quantization": "none", "packing": True, "compute_dtype": "float32"},
}
DEFAULT_CONFIGS = "qlora-packed,qlora-unpacked,lora-packed,lora-unpacked"
# deepseek-ai/deepseek-coder-1.3b-base's config.json, the vocabulary aside (see the docstring).
DEEPSEEK_1_3B = {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "num_key_value_heads": 16, "rope_theta": 100000.0,
                 "max_position_embeddings": 16384, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
TOPICS = ["sum", "product", "maximum", "minimum", "count", "reverse", "sort", "filter", "merge", "search"]


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Short exercise records of varied length (about 25-70 tokens), so that packing matters."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        prompt = f'def {topic}_{i}(xs):\n    """The {topic} of xs."""'
        body = "".join(f"    y{j} = xs[{j}] * {rng.randint(2, 99)}\n" for j in range(rng.randint(0, 4)))
        completion = body + f"    return {topic}(xs) + {rng.randint(0, 999)}\n"
        rows.append({"id": f"bench-{i:05d}", "kind": "exercise", "text": prompt + "\n" + completion,
                     "prompt": prompt, "completion": completion, "tests": "", "topic": topic, "subtopic": "",
                     "audience": "", "difficulty": "", "model": "synthetic"})
    return rows


def build_random_model(folder: Path) -> Path:
    """The 1.3B Llama with random weights (bf16) and SmolLM2's tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.core.config import REPO_ROOT, load_preset
    from pipeline.engines.student import load_tokenizer, model_source

    tok = load_tokenizer(model_source(load_preset("smollm2-135m-instruct", REPO_ROOT / "configs")))
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **DEEPSEEK_1_3B)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the workers' peak memory must not include this process's
    return folder


def worker(spec: dict) -> dict:
    """One config in this process: a temporary project, the stage, its metrics."""
    from pipeline.core.config import load_config
    from pipeline.core.records import write_jsonl
    from pipeline.stages.finetune import run_finetune

    root = Path(spec["root"])
    shutil.copytree(REPO / "configs", root / "configs", dirs_exist_ok=True)
    student = spec["student"]
    if spec.get("hf_folder"):
        student = "bench-random-1.3b"
        (root / "configs" / "models" / f"{student}.yaml").write_text(json.dumps(
            {"engine": "vllm", "model": student, "api": "completions", "hf_id": spec["hf_folder"]}))
    write_jsonl(root / "data" / "train.jsonl", synthetic_rows(spec["rows"], seed=0))
    params = {"profile": "ci", "seed": 0, "finetune": {
        "student": student, "dataset_dir": str(root / "data"), "output_dir": str(root / "out"),
        "max_steps": spec["steps"], "save_steps": spec["steps"], "max_length": spec["max_length"],
        "batch_size": spec["batch"], "eval_fraction": 0.0, "export_gguf": False, "warmup_ratio": 0.0,
        **CONFIGS[spec["config"]]}}
    (root / "params.yaml").write_text(json.dumps(params))
    cfg = load_config(root / "params.yaml")
    metrics = run_finetune(cfg, root / "params.yaml", progress=False)
    rates_file = root / "out" / "dvclive" / "plots" / "metrics" / "train" / "tokens_per_s.tsv"
    rates = [float(line.split("\t")[1]) for line in rates_file.read_text().splitlines()[1:]]
    steady = rates[1:] or rates  # the first step pays for kernel selection and allocator warm-up
    return {"config": spec["config"], "tokens_per_s": round(statistics.median(steady), 1),
            "tokens_per_s_incl_first_step": metrics["tokens_per_s"],
            "peak_memory_mb": metrics["peak_memory_mb"],
            "peak_memory_kind": metrics["peak_memory_kind"], "compute_dtype": metrics["compute_dtype"],
            "train_tokens": metrics["train_tokens"], "steps": metrics["steps"], "train_s": metrics["train_s"],
            "wall_s": metrics["wall_s"], "train_loss": round(metrics["train_loss"], 4),
            "sequences": metrics["examples"]["train_sequences"],
            "sequence_fill": metrics["examples"]["sequence_fill"]}


def run_config(spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"config": spec["config"], "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true",
                   help="CUDA, a random-weight 1.3B Llama (deepseek-coder-1.3b shape).")
    p.add_argument("--student", default="gemma-3-270m", help="CPU mode: the student preset.")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"Comma-separated, from {', '.join(CONFIGS)}.")
    p.add_argument("--steps", type=int, help="Optimizer steps per config (default 4 CPU, 10 GPU).")
    p.add_argument("--max-length", type=int, help="Tokens per row (default 128 CPU, 2048 GPU).")
    p.add_argument("--batch", type=int, help="Rows per step (default 4).")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    steps = args.steps or (10 if args.gpu else 4)
    max_length = args.max_length or (2048 if args.gpu else 128)
    batch = args.batch or 4
    # Enough synthetic rows that no config runs out of data (rows are ~45 tokens; packed ~max_length).
    rows = max(64, steps * batch * max(1, max_length // 25) + 16)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    results = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        hf_folder = str(build_random_model(Path(tmp) / "random-1.3b")) if args.gpu else None
        for name in names:
            spec = {"config": name, "root": str(Path(tmp) / name), "student": args.student,
                    "hf_folder": hf_folder,
                    "steps": steps, "max_length": max_length, "batch": batch, "rows": rows}
            res = run_config(spec)
            print(f"{name}: {res}", file=sys.stderr, flush=True)
            results.append(res)
    summary = {"device": "cuda" if args.gpu else "cpu",
               "model": "random-1.3b-llama (deepseek-coder-1.3b shape)" if args.gpu else args.student,
               "steps": steps, "max_length": max_length, "batch": batch, "cpu_threads": os.cpu_count(),
               "wall_s": round(time.monotonic() - t0, 1), "results": results}
    print(json.dumps(summary))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
