"""Load the student model for fine-tuning: GGUF -> Hugging Face folder cache, quantization.

Offline presets ship a GGUF (see `pipeline.engines.models`). transformers can read a GGUF and
dequantize it, but that takes about a minute (gemma-3-270m), so it is done once: the
dequantized fp32 weights and the GGUF's tokenizer are saved as a Hugging Face folder in
the model cache, keyed by the GGUF's sha256, and every later load reads that folder
(seconds). Presets without a GGUF load from `hf_id` (a hub id, already downloaded, or a
local folder).

QLoRA loads the base in 4-bit NF4 (bitsandbytes) with a bf16 compute dtype where the
device supports bf16 (CUDA: `torch.cuda.is_bf16_supported()`; CPU: oneDNN's bf16 check,
true on AVX512-BF16/AMX parts), fp32 elsewhere. Whether bitsandbytes can run 4-bit here is
probed with one tiny layer before the real model loads, so a bad request fails in seconds.

Under `accelerate launch` every process loads its own copy: on its own GPU under DDP
(LOCAL_RANK), or, under FSDP, where FSDP puts it (with `fsdp_cpu_ram_efficient_loading`
transformers reads the weights on rank 0 only and FSDP broadcasts them). FSDP flattens each
wrapped block into one parameter of one dtype, so FSDP-QLoRA stores the packed 4-bit weights in
the compute dtype (`finetune.quant_storage`, bnb_4bit_quant_storage) instead of uint8.

    python -m pipeline.engines.student smollm2-135m-instruct     # build (once) and print the cached folder
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import REPO_ROOT, ConfigError, GGUFSpec, ModelPreset, load_preset
from pipeline.core.records import atomic_folder
from pipeline.engines.models import cache_root, ensure_gguf

log = logging.getLogger(__name__)

# Bump when the folder's content changes (e.g. a different saved dtype), so old caches are ignored.
HF_CACHE_VERSION = "1"
COMPLETE_MARKER = ".complete"


def device_type() -> str:
    # `accelerate launch --cpu` (ACCELERATE_USE_CPU) makes the Trainer train on the CPU even beside a GPU: the
    # model must load there too.
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def fsdp_launched() -> bool:
    """Whether this process was started by `accelerate launch` with an FSDP config (it exports
    ACCELERATE_USE_FSDP to every process it starts)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def load_device_map(device: str) -> dict | None:
    """Where from_pretrained puts the weights: this process's own GPU under a multi-GPU launch (every
    process would otherwise load onto cuda:0), nowhere under FSDP (FSDP moves and shards the blocks,
    and bitsandbytes then quantizes on the current device, which accelerate set to this rank's)."""
    if fsdp_launched():
        return None
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return {"": f"cuda:{int(os.environ['LOCAL_RANK'])}"}
    return {"": device}


# ---------------------------------------------------------------------------------------
# GGUF -> HF folder, once
# ---------------------------------------------------------------------------------------


def hf_folder(spec: GGUFSpec) -> Path:
    return cache_root() / "hf" / f"{spec.sha256[:16]}-v{HF_CACHE_VERSION}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise the one-time conversion between processes (two tests, two stages)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(folder: Path, sha256: str) -> bool:
    marker = folder / COMPLETE_MARKER
    return marker.is_file() and marker.read_text().strip() == sha256


def _strip_gguf_quantizer(model: Any) -> None:
    """A GGUF-loaded model still claims to be quantized and refuses to save: it is not (dequantized)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf(spec: GGUFSpec, folder: Path) -> None:
    """Dequantize the GGUF into `folder` (fp32 safetensors + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = ensure_gguf(spec)
    log.info("dequantizing %s into %s (once per GGUF)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _strip_gguf_quantizer(model)
    with atomic_folder(folder) as tmp:
        # fp32 keeps the dequantized values exact, so transformers and llama.cpp see the same weights.
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(spec.sha256)


def model_source(preset: ModelPreset) -> str:
    """What `from_pretrained` loads: the cached HF folder of the GGUF, else `hf_id`."""
    if preset.gguf is not None:
        folder = hf_folder(preset.gguf)
        if not _is_complete(folder, preset.gguf.sha256):
            with _file_lock(folder.with_name(folder.name + ".lock")):
                if not _is_complete(folder, preset.gguf.sha256):
                    convert_gguf(preset.gguf, folder)
        return str(folder)
    if not preset.hf_id:
        raise ConfigError(f"finetune.student: preset '{preset.name}' has neither a gguf section nor an hf_id")
    return preset.hf_id


# ---------------------------------------------------------------------------------------
# Dtypes and quantization
# ---------------------------------------------------------------------------------------


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    # oneDNN runs bf16 natively only on AVX512-BF16/AMX CPUs; elsewhere it is emulated (slow).
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def resolve_compute_dtype(name: str, device: str) -> torch.dtype:
    """auto -> bf16 where the device supports it, else fp32; an explicit name is honoured."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def check_4bit_supported(device: str, compute_dtype: torch.dtype) -> None:
    """Run one tiny NF4 layer; any failure becomes a clear error before the model loads."""
    hint = "use --set finetune.quantization=none for plain LoRA on an unquantized base"
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library raising at import
        raise ConfigError(
            f"finetune.quantization=nf4: bitsandbytes cannot be imported ({exc}); {hint}") from None
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute_dtype, quant_type="nf4")
        layer = layer.to(device)
        with torch.no_grad():
            out = layer(torch.ones(2, 64, device=device, dtype=compute_dtype))
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output from a 4-bit layer")
    except Exception as exc:
        raise ConfigError(
            f"finetune.quantization=nf4: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit "
            f"layers on {device} ({type(exc).__name__}: {exc}); {hint}"
        ) from None


def resolve_quant_storage(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    """finetune.quant_storage: auto -> the compute dtype under FSDP, else uint8 (bitsandbytes' own default)."""
    if name == "auto":
        return compute_dtype if fsdp_launched() else torch.uint8
    storage = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float32": torch.float32}[name]
    if fsdp_launched() and storage != compute_dtype:
        raise ConfigError(f"finetune.quant_storage={name}: under FSDP the 4-bit weights must be stored in the compute "
                          f"dtype ({str(compute_dtype).removeprefix('torch.')}), since FSDP flattens a block's weights "
                          "into one tensor of one dtype; set it to auto")
    return storage


def quantization_config(quantization: str, double_quant: bool, compute_dtype: torch.dtype,
                        quant_storage: str = "auto") -> Any:
    """The BitsAndBytesConfig of QLoRA (NF4, optional double quantization), or None."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=resolve_quant_storage(quant_storage, compute_dtype),
    )


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token_id is None:  # padding positions carry label -100, any id would do
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _chat_context(tok: Any, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_context(tok: Any, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of what a student sees before it answers, the same in training and in evaluation:
    a completion prompt as is (with the tokenizer's own special tokens, BOS where it has one), or
    chat messages through the tokenizer's chat template with the generation prompt (the template
    writes its own special tokens)."""
    if messages is None:
        return list(tok(prompt, add_special_tokens=True)["input_ids"])
    return list(tok(_chat_context(tok, messages), add_special_tokens=False)["input_ids"])


def encode_chat_example(tok: Any, messages: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(context ids, answer ids) of a chat exchange: the context as :func:`encode_context` gives it,
    then the assistant's turn (the answer and the template's end-of-turn tokens) tokenized on its
    own, exactly as a generation after that context would produce it."""
    context = _chat_context(tok, messages)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(context):
        raise ConfigError("the student's chat template does not render a conversation as its prompt plus the "
                          "answer, so an instruct student cannot be trained in its evaluation format")
    return (list(tok(context, add_special_tokens=False)["input_ids"]),
            list(tok(full[len(context):], add_special_tokens=False)["input_ids"]))


def packed_logits_agree(**packed_inputs: Any) -> bool:
    """Whether two examples packed into one row (position ids restarting at 0, no 2D mask, no KV
    cache) give the second example the logits it has alone: a tiny random llama with sdpa, about
    0.1 s. `packed_inputs` go to the packed forward only (a full attention_mask makes them attend
    across, which the probe must catch)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        first, second = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions, use_cache=False,
                       **packed_inputs).logits[0, 5:]
        alone = model(input_ids=second, use_cache=False).logits[0]
    return torch.allclose(packed, alone, atol=1e-4)


@functools.cache
def check_packed_attention() -> None:
    """Refuse a torch/transformers pair under which packed sequences attend across examples.

    Packing relies on transformers deriving a block-diagonal causal mask from position ids that
    restart at 0; older transformers silently attend across the packed examples, so this runs the
    real thing (:func:`packed_logits_agree`) once per process.
    """
    if not packed_logits_agree():
        import transformers

        raise ConfigError(
            f"finetune.packing: under torch {torch.__version__} and transformers {transformers.__version__} "
            "packed sequences attend across examples; install the versions pinned in constraints.txt "
            "or set finetune.packing=false"
        )


def load_student(
    preset: ModelPreset,
    quantization: str = "none",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    device: str | None = None,
    quant_storage: str = "auto",
) -> tuple[Any, Any]:
    """(model, tokenizer) of the preset's base model, 4-bit NF4 or in `compute_dtype`.

    With quantization="none" the weights are in `compute_dtype`; with "nf4" the linear
    layers are 4-bit and the rest stays in `compute_dtype` (peft's kbit preparation then
    upcasts it to fp32 for stable training).
    """
    from transformers import AutoModelForCausalLM

    device = device or device_type()
    if quantization == "nf4":
        check_4bit_supported(device, compute_dtype)
    source = model_source(preset)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=compute_dtype,
        quantization_config=quantization_config(quantization, double_quant, compute_dtype, quant_storage),
        device_map=load_device_map(device),
    )
    log.info("loaded %s from %s (%s, %s) on %s", preset.name, source, quantization, compute_dtype, device)
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# Generation in process
# ---------------------------------------------------------------------------------------


def generation_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU that has it (half the memory and several times the speed of fp32); fp32 elsewhere, which
    on the CPU keeps a GGUF student's dequantized weights exact, as llama.cpp serves them."""
    return torch.bfloat16 if device == "cuda" and bf16_supported(device) else torch.float32


class InProcessModel:
    """A student (and its peft adapter) generating in this process with transformers: evaluate's engine for a
    model no server loads (a model phase 1 trained whole) and for `evaluate.engine=transformers`.

    On a GPU the model is in bf16 and greedy requests are decoded together, up to `batch_size` at a time
    (left-padded, position ids from the mask, longest prompts first); as in vLLM, a batched completion can
    then differ in the last bits with what it is batched with. Sampled requests are decoded one at a
    time, each with its own seed. On the CPU the default is fp32, one request at a time: a completion is a
    function of its request alone. :meth:`close` (or leaving the `with` block) frees the model, and its GPU
    memory, before a vLLM server or the likelihood scorer needs it.
    """

    def __init__(self, source: str, adapter: Path | str | None = None, batch_size: int = 1,
                 device: str | None = None):
        from transformers import AutoModelForCausalLM

        self.device = device or device_type()
        self.dtype = generation_dtype(self.device)
        self.batch_size = max(1, batch_size)
        self.tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=self.dtype)
        if self.device != "cpu":
            model = model.to(self.device)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        self.model = model.eval()
        # Every id that ends a sequence: the tokenizer's, and the generation config's (chat models list several).
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        log.info("in-process generation: %s%s on %s, %s, batches of up to %d", source,
                 f" + {adapter}" if adapter else "", self.device, str(self.dtype).removeprefix("torch."),
                 self.batch_size)

    def __enter__(self) -> InProcessModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Drop the model and give its GPU memory back to the driver (a server started next needs it)."""
        import gc

        self.model = None
        gc.collect()  # transformers models hold reference cycles: without this the weights outlive `del`
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _kwargs(self, params: dict) -> dict:
        tok = self.tokenizer
        kwargs: dict[str, Any] = {"max_new_tokens": params["max_tokens"], "do_sample": params["temperature"] > 0,
                                  "pad_token_id": tok.pad_token_id}
        if kwargs["do_sample"]:
            kwargs.update(temperature=params["temperature"], top_p=params["top_p"])
        else:  # the model's generation_config may carry sampling defaults that greedy decoding would warn about
            kwargs.update(temperature=None, top_p=None, top_k=None)
        stop = [s for s in params.get("stop") or [] if s]
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=tok)
        return kwargs

    def _result(self, new: list[int], prompt_tokens: int, params: dict, batched: bool) -> tuple[list[dict], dict]:
        """One row's choices and usage. A finished row of a batch is padded after its EOS or the token that
        completed a stop string; it is cut there, so a row reads as if decoded alone."""
        tok, stop = self.tokenizer, [s for s in params.get("stop") or [] if s]
        n = len(new)
        if batched:
            n = next((i + 1 for i, t in enumerate(new) if t in self.eos_ids), n)
        text = tok.decode(new[:n], skip_special_tokens=True)
        if batched and stop and any(s in text for s in stop):  # the first token completing a stop string
            lo, hi = 1, n
            while lo < hi:
                mid = (lo + hi) // 2
                if any(s in tok.decode(new[:mid], skip_special_tokens=True) for s in stop):
                    hi = mid
                else:
                    lo = mid + 1
            n = lo
            text = tok.decode(new[:n], skip_special_tokens=True)
        hit_cap = n >= params["max_tokens"] and not any(s in text for s in stop)
        return ([{"text": text, "finish_reason": "length" if hit_cap else "stop"}],
                {"prompt_tokens": prompt_tokens, "completion_tokens": n})

    def _generate(self, rows: list[list[int]], params: dict) -> list[list[int]]:
        """Left-padded batch -> each row's new tokens (padding after a finished row included)."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, **self._kwargs(params))
        return out[:, width:].tolist()

    def complete_many(self, requests: list[Any], on_result: Any = None) -> list[tuple[list[dict], dict]]:
        """(choices, usage) of each request (LLMRequest: prompt or messages, and its params), in order.
        `on_result(i, result)` is called as request i is done (the caller caches it: a killed run keeps it)."""
        tok = self.tokenizer
        ids = [encode_context(tok, prompt=r.prompt, messages=r.messages) for r in requests]
        results: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            p = r.params
            if p["temperature"] > 0 or self.batch_size == 1:
                groups.setdefault(("alone", i), []).append(i)
            else:  # greedy requests with the same cap and stop strings can share a batch
                groups.setdefault(("greedy", p["max_tokens"], tuple(p.get("stop") or ())), []).append(i)
        for members in groups.values():
            members.sort(key=lambda i: (-len(ids[i]), i))  # similar lengths together: less padding
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                params = requests[batch[0]].params
                if len(batch) == 1:  # seeded as the request asks (sampled requests always come alone)
                    torch.manual_seed(int(params.get("seed") or 0))
                for i, new in zip(batch, self._generate([ids[i] for i in batch], params), strict=True):
                    results[i] = self._result(new, len(ids[i]), requests[i].params, len(batch) > 1)
                    if on_result is not None:
                        on_result(i, results[i])
        return results

    def complete(self, req: Any) -> tuple[list[dict], dict]:
        return self.complete_many([req])[0]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in sys.argv[1:] if argv is None else argv:
        print(f"{name}: {model_source(load_preset(name, REPO_ROOT / 'configs'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
