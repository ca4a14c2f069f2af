"""The GPU check: the project's own QLoRA path against plain LoRA in bf16 on one GPU, and
in-process generation, on a random-weight student built from deepseek-coder-1.3b-base's config (the
a100 profile's student; no download). One JSON object is the last line of stdout.

    bash bench/gpu_check.sh                       # on a one-GPU machine: about 3 minutes
    .venv/bin/python bench/gpu_check.py --smoke   # anywhere, on the CPU: a tiny model, the same code path

For each mode (`nf4`: QLoRA, 4-bit NF4 base with double quantization and bf16 compute; `bf16`: plain
LoRA on the bf16 base) it loads the saved random model through `pipeline.engines.student.load_student`
(the finetune stage's loader: bitsandbytes' check and quantization config), puts the finetune stage's
LoRA on it (`pipeline.engines.training.add_lora`: rank 16 on every projection, k-bit preparation for
nf4), and times `--steps` optimizer steps (AdamW, batch x sequence random tokens, loss on every token,
gradient checkpointing as the finetune stage uses) after `--warmup` steps: tokens/s and the peak GPU
memory. Each arm's model is freed (and the CUDA cache emptied) before the next loads, so one arm's peak
never includes the other's weights. Generation: the evaluate stage's in-process engine
(`pipeline.engines.student.InProcessModel`: bf16 on the GPU, greedy requests batched) on `--gen-batch`
prompts of `--new-tokens` tokens at most, tokens/s. Ratios compare QLoRA with plain LoRA in the same run.

Whatever fails (an arm, generation, the set-up), the last line of stdout is one JSON object: a failed
part is an {"error": ...} field, and the exit code is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

# deepseek-ai/deepseek-coder-1.3b-base's config.json (LlamaForCausalLM), as published.
DEEPSEEK_CODER_1_3B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=16, vocab_size=32256, max_position_embeddings=16384,
                           rms_norm_eps=1e-6, rope_theta=100000.0, bos_token_id=32013, eos_token_id=32014,
                           tie_word_embeddings=False)
SMOKE = dict(DEEPSEEK_CODER_1_3B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=512, bos_token_id=1, eos_token_id=2)


def build_model(folder: Path, config: dict, dtype: torch.dtype) -> int:
    """A random-weight Llama of `config` saved as a Hugging Face folder (with a byte-level tokenizer); its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
    model.save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def train_steps(folder: Path, quantization: str, device: str, dtype: torch.dtype, args: argparse.Namespace,
                vocab: int) -> dict:
    from pipeline.core.config import FinetuneConfig, ModelPreset
    from pipeline.engines.student import load_student
    from pipeline.engines.training import add_lora

    preset = ModelPreset(name="gpu-check", engine="vllm", model="gpu-check", hf_id=str(folder),
                         lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"])
    ft = FinetuneConfig(quantization=quantization, lora_r=16, lora_alpha=32, lora_dropout=0.0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    model, _ = load_student(preset, quantization=quantization, compute_dtype=dtype, device=device)
    model = add_lora(model, ft, preset, quantized=quantization == "nf4", seed=0)
    # transformers 5.23 renamed it activation_checkpointing_enable (the old name warns); the GPU pin is older.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    load_s = time.monotonic() - t0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    losses, timed = [], 0.0
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.monotonic()
        with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            timed += time.monotonic() - t
        losses.append(round(float(loss), 4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"load_s": round(load_s, 2), "steps": args.steps, "tokens_per_s": round(args.steps * args.batch * args.seq / timed, 1),
           "step_s": round(timed / args.steps, 3), "trainable_params": trainable, "first_loss": losses[0],
           "last_loss": losses[-1], "finite": all(x == x and abs(x) != float("inf") for x in losses)}
    if device == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def free_memory(device: str) -> None:
    """Give the last arm's memory back before the next loads (models hold reference cycles)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def generation(folder: Path, device: str, args: argparse.Namespace) -> dict:
    from pipeline.engines.llm import LLMRequest
    from pipeline.engines.student import InProcessModel

    text = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    params = {"max_tokens": args.new_tokens, "temperature": 0.0, "top_p": 1.0, "stop": None, "seed": 0}
    requests = [LLMRequest(f"r{i}", prompt=text * (1 + i % 3), params=params) for i in range(args.gen_batch)]
    with InProcessModel(str(folder), batch_size=args.gen_batch, device=device) as model:
        model.complete_many(requests[:2])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.monotonic()
        done = model.complete_many(requests)
        if device == "cuda":
            torch.cuda.synchronize()
        took = time.monotonic() - t
        dtype = str(model.dtype).removeprefix("torch.")
    tokens = sum(usage["completion_tokens"] for _, usage in done)
    return {"engine": "pipeline.engines.student.InProcessModel", "dtype": dtype, "batch": args.gen_batch,
            "max_new_tokens": args.new_tokens, "completion_tokens": tokens, "tokens_per_s": round(tokens / took, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: the code path, not the figures")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--modes", default="nf4,bf16")
    args = ap.parse_args()
    report: dict = {}
    try:
        run(args, report)
    except BaseException as exc:  # noqa: BLE001 -- a crash still ends in one JSON line (KeyboardInterrupt too)
        report["error"] = f"{type(exc).__name__}: {exc}"[:500]
    failed = "error" in report or any(isinstance(v, dict) and "error" in v for v in report.values())
    print(json.dumps(report, sort_keys=True), flush=True)
    return 1 if failed else 0


def run(args: argparse.Namespace, report: dict) -> None:
    if args.smoke:
        args.steps, args.warmup, args.batch, args.seq, args.gen_batch, args.new_tokens = 2, 1, 2, 32, 2, 4
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = SMOKE if args.smoke else DEEPSEEK_CODER_1_3B
    report.update({"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                   "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                   "model": "deepseek-coder-1.3b-base config, random weights" if not args.smoke else "smoke",
                   "batch": args.batch, "seq": args.seq})
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except Exception as exc:
        report["transformers"] = f"unavailable: {exc}"
    try:
        import bitsandbytes

        report["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # reported, and the nf4 mode then fails with the loader's own message
        report["bitsandbytes"] = f"unavailable: {exc}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "student"
        report["params"] = build_model(folder, config, dtype)
        for mode in args.modes.split(","):
            quantization = "nf4" if mode == "nf4" else "none"
            try:
                report[mode] = train_steps(folder, quantization, device, dtype, args, config["vocab_size"])
            except Exception as exc:
                report[mode] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            free_memory(device)
        try:
            report["generation"] = generation(folder, device, args)
        except Exception as exc:
            report["generation"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        free_memory(device)
    q, b = report.get("nf4", {}), report.get("bf16", {})
    if "tokens_per_s" in q and "tokens_per_s" in b:
        report["qlora_over_lora_tokens_per_s"] = round(q["tokens_per_s"] / b["tokens_per_s"], 3)
    if "peak_gpu_mb" in q and "peak_gpu_mb" in b:
        report["qlora_over_lora_peak_memory"] = round(q["peak_gpu_mb"] / b["peak_gpu_mb"], 3)


if __name__ == "__main__":
    raise SystemExit(main())
