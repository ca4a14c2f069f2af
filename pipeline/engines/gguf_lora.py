"""Export a PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp loads (`--lora`).

Mirrors llama.cpp's `convert_lora_to_gguf.py`:

- metadata: `general.architecture` (the base model's llama.cpp arch), `general.type =
  "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`;
- tensors: `<base GGUF tensor name>.lora_a` and `.lora_b`, e.g. `blk.0.attn_q.weight.lora_a`,
  named with gguf's own HF -> GGUF tensor map for the arch;
- shapes: PEFT's `lora_A.weight` is (r, in) and `lora_B.weight` (out, r); written as they
  are, ggml reads them as ne = [in, r] and [r, out], which is what llama.cpp checks
  (`a->ne[0] == W->ne[0]`, `b->ne[1] == W->ne[1]`, `a->ne[1] == b->ne[0]`);
- llama's q/k projections are stored in the GGUF with their rows permuted for llama.cpp's
  rope layout (`LlamaModel.permute` in convert_hf_to_gguf.py). The permutation acts on the
  output dimension, so it applies to `lora_b` and not to `lora_a`. qwen2 and gemma3 store
  q/k unpermuted.

llama.cpp scales the adapter by `alpha / r` (times the user's scale), as PEFT does; an
rsLoRA adapter (alpha / sqrt(r)) is written with alpha * sqrt(r) so the product matches.
Tensors are written in f32 (adapters are small; it keeps llama.cpp's result close to PEFT's).

    python -m pipeline.engines.gguf_lora data/finetune/adapter out.gguf --base ~/.cache/textbook/hf/<sha>-v1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError
from pipeline.core.records import atomic_path

log = logging.getLogger(__name__)

# HF `model_type` -> gguf MODEL_ARCH member name. Only archs whose tensor layout was checked
# against llama.cpp (tests/test_gguf_lora.py) are listed.
SUPPORTED_ARCHES = {"llama": "LLAMA", "qwen2": "QWEN2", "gemma3": "GEMMA3", "gemma3_text": "GEMMA3"}
# Archs whose q/k rows convert_hf_to_gguf.py permutes (LlamaModel.permute).
ROPE_PERMUTED = {"llama"}
PEFT_PREFIX = "base_model.model."


def check_supported(model_type: str) -> None:
    """Raise before training when the adapter of this base could not be exported."""
    if model_type not in SUPPORTED_ARCHES:
        raise ConfigError(
            f"finetune.export_gguf: no GGUF LoRA export for model_type '{model_type}' "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHES))}); set finetune.export_gguf=false"
        )


def permute_rows(weight: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleaved -> split halves per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _effective_alpha(adapter_cfg: dict) -> float:
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter_cfg.get(key):
            raise ConfigError(f"GGUF LoRA export: per-module {key} is not supported (llama.cpp: one alpha)")
    if adapter_cfg.get("use_dora"):
        raise ConfigError("GGUF LoRA export: DoRA adapters are not supported by llama.cpp")
    if adapter_cfg.get("modules_to_save"):
        raise ConfigError("GGUF LoRA export: modules_to_save (fully trained layers) cannot go in a LoRA GGUF")
    alpha, r = float(adapter_cfg["lora_alpha"]), int(adapter_cfg["r"])
    return alpha * math.sqrt(r) if adapter_cfg.get("use_rslora") else alpha


def _lora_pairs(tensors: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{HF module path: (A, B)} from PEFT's saved state dict."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            raise ConfigError(f"GGUF LoRA export: unexpected tensor {key} (only LoRA A/B are supported)")
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ConfigError(f"GGUF LoRA export: {module} has {sorted(ab)}, needs both lora_A and lora_B")
        out[module] = (ab["lora_A"], ab["lora_B"])
    return out


def export_lora_gguf(adapter_dir: str | Path, base_config: Any, out_path: str | Path) -> dict:
    """Write `out_path` from a PEFT adapter folder; `base_config` is the base model's HF config.

    Returns a summary: arch, alpha, rank, number of adapted tensors.
    """
    import gguf
    from safetensors.numpy import load_file

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    cfg = base_config if isinstance(base_config, dict) else base_config.to_dict()
    model_type = cfg["model_type"]
    check_supported(model_type)
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    alpha = _effective_alpha(adapter_cfg)
    arch = getattr(gguf.MODEL_ARCH, SUPPORTED_ARCHES[model_type])
    tmap = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    pairs = _lora_pairs(load_file(str(adapter_dir / "adapter_model.safetensors")))
    if not pairs:
        raise ConfigError(f"GGUF LoRA export: {adapter_dir} holds no LoRA tensors")

    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for module, (lora_a, lora_b) in pairs.items():
            gguf_name = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
            if gguf_name is None:
                raise ConfigError(f"GGUF LoRA export: no {model_type} GGUF tensor for {module} (a tied lm_head?)")
            if model_type in ROPE_PERMUTED and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
                n_kv = cfg["num_key_value_heads"] if module.endswith("k_proj") else cfg["num_attention_heads"]
                lora_b = permute_rows(lora_b, cfg["num_attention_heads"], n_kv)
            writer.add_tensor(f"{gguf_name}.lora_a", np.ascontiguousarray(lora_a, dtype=np.float32))
            writer.add_tensor(f"{gguf_name}.lora_b", np.ascontiguousarray(lora_b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    summary = {"arch": gguf.MODEL_ARCH_NAMES[arch], "alpha": alpha, "r": int(adapter_cfg["r"]),
               "modules": len(pairs), "path": str(out_path)}
    log.info("wrote GGUF LoRA adapter %s (%s, %d modules)", out_path, summary["arch"], len(pairs))
    return summary


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="PEFT adapter folder (adapter_model.safetensors + config).")
    parser.add_argument("out", help="GGUF file to write.")
    parser.add_argument("--base", required=True, help="The base model's HF folder or id (for its config).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(export_lora_gguf(args.adapter_dir, AutoConfig.from_pretrained(args.base), args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
