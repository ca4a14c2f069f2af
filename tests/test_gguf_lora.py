"""GGUF LoRA export: the layout llama.cpp expects, and llama.cpp + the exported adapter computing
what transformers + the PEFT adapter computes on the dequantized base."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.config import ConfigError, load_preset
from pipeline.engines.gguf_lora import export_lora_gguf, permute_rows
from pipeline.engines.models import ensure_gguf
from pipeline.engines.student import load_tokenizer, model_source

from .conftest import REPO

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def random_lora(model, folder: Path, scale: float, r: int = 8, alpha: int = 16, seed: int = 0):
    """A PEFT LoRA on all linear layers whose B is random (PEFT starts it at zero), saved to folder:
    large enough that the adapter visibly changes the model, small enough to stay coherent."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0)
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for module in peft.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, scale / r**0.5)
    peft.save_pretrained(str(folder))
    return peft.eval()


def gguf_fields(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def test_export_layout_matches_llama_cpp_conventions(tmp_path, tiny_dir):  # noqa: F811
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    random_lora(model, tmp_path / "adapter", scale=1.0, r=4, alpha=8)
    summary = export_lora_gguf(tmp_path / "adapter", model.config, tmp_path / "adapter.gguf")
    assert summary == {"arch": "llama", "alpha": 8.0, "r": 4, "modules": 14,
                       "path": str(tmp_path / "adapter.gguf")}
    fields, tensors = gguf_fields(tmp_path / "adapter.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert set(tensors) == {f"blk.{b}.{t}.weight.lora_{ab}" for b in range(2) for t in LINEAR for ab in "ab"}
    # ggml order (ne): lora_a is [n_in, r], lora_b is [r, n_out]; q: 64 -> 64, k: 64 -> 32 (2 kv heads).
    assert tensors["blk.0.attn_k.weight.lora_a"].shape.tolist() == [64, 4]
    assert tensors["blk.0.attn_k.weight.lora_b"].shape.tolist() == [4, 32]
    assert tensors["blk.1.ffn_down.weight.lora_a"].shape.tolist() == [128, 4]
    peft = load_file(tmp_path / "adapter" / "adapter_model.safetensors")

    def hf(module: str, ab: str) -> np.ndarray:
        return peft[f"base_model.model.model.layers.0.{module}.lora_{ab}.weight"].numpy()

    def got(name: str) -> np.ndarray:
        return np.asarray(tensors[f"blk.0.{name}"].data)

    # llama's q/k rows are permuted for llama.cpp's rope layout: on B (outputs) only.
    q_b, k_b = hf("self_attn.q_proj", "B"), hf("self_attn.k_proj", "B")
    np.testing.assert_array_equal(got("attn_q.weight.lora_b"), permute_rows(q_b, 4, 4))
    np.testing.assert_array_equal(got("attn_k.weight.lora_b"), permute_rows(k_b, 4, 2))
    assert not np.array_equal(got("attn_q.weight.lora_b"), hf("self_attn.q_proj", "B"))
    np.testing.assert_array_equal(got("attn_q.weight.lora_a"), hf("self_attn.q_proj", "A"))
    np.testing.assert_array_equal(got("attn_v.weight.lora_b"), hf("self_attn.v_proj", "B"))
    with pytest.raises(ConfigError, match="no GGUF LoRA export for model_type 'phi'.*export_gguf=false"):
        phi = {**model.config.to_dict(), "model_type": "phi"}
        export_lora_gguf(tmp_path / "adapter", phi, tmp_path / "x.gguf")


PROMPTS = ["def fibonacci(n):\n", "# Sort a list of numbers\ndef sort_numbers(xs):\n",
           "import math\n\ndef area(r):\n"]
NEW_TOKENS = 6


def hf_greedy(model, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits that chose them."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), torch.stack(out.logits)[:, 0].float().numpy()


def cpp_run(gguf: Path, lora: Path | None, prompts: list[list[int]], forced: list[list[int]]):
    """llama.cpp greedy tokens per prompt, and its logits with `forced` tokens fed after the prompt.

    Both engines get the same token ids; that their tokenizers agree is checked too."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=2,
                          seed=0, logits_all=True, verbose=False)
    assert [llm.tokenize(p.encode("utf-8")) for p in PROMPTS] == prompts  # the GGUF's own tokenizer
    out = []
    for ids, follow in zip(prompts, forced, strict=True):
        greedy = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            greedy.append(token)
            if len(greedy) == NEW_TOKENS:
                break
        llm.reset()
        llm.eval(ids + follow)
        out.append((greedy, np.array(llm.scores[len(ids) - 1: len(ids) - 1 + NEW_TOKENS])))
    llm.close()
    return out


# Each student's LoRA scale: large enough to change its greedy output, small enough that the
# llama.cpp base's own quantization noise (Q4 weights, Q8 activations) does not dominate.
@pytest.mark.slow
@pytest.mark.parametrize(("preset_name", "scale"), [("smollm2-135m-instruct", 0.5), ("gemma-3-270m", 0.1)])
def test_llama_cpp_with_the_exported_adapter_matches_transformers_peft(tmp_path, preset_name, scale):
    from transformers import AutoModelForCausalLM

    preset = load_preset(preset_name, REPO / "configs")
    folder, gguf = model_source(preset), ensure_gguf(preset.gguf)
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    peft = random_lora(model, tmp_path / "adapter", scale)
    export_lora_gguf(tmp_path / "adapter", model.config, tmp_path / "adapter.gguf")
    with peft.disable_adapter():
        hf_base = [hf_greedy(peft, ids) for ids in prompts]
    hf_lora = [hf_greedy(peft, ids) for ids in prompts]
    cpp_base = cpp_run(gguf, None, prompts, [t for t, _ in hf_base])
    cpp_lora = cpp_run(gguf, tmp_path / "adapter.gguf", prompts, [t for t, _ in hf_lora])

    # The adapter matters: it changes the greedy continuation, in both engines.
    assert sum(h[0] != b[0] for h, b in zip(hf_lora, hf_base, strict=True)) >= 2
    assert sum(c[0] != b[0] for c, b in zip(cpp_lora, cpp_base, strict=True)) >= 2
    same = 0
    for (h_tok, h_logits), (c_tok, c_logits), (_, hb_logits), (_, cb_logits) in zip(
            hf_lora, cpp_lora, hf_base, cpp_base, strict=True):
        same += h_tok == c_tok
        # Fed the same tokens, llama.cpp picks transformers' token wherever that choice is not a
        # near-tie: its quantized base moves logits by up to ~1-2 against the fp32 dequantized one.
        top2 = np.sort(h_logits, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 0.5
        assert (c_logits.argmax(-1) == np.array(h_tok))[clear].all(), (h_tok, c_tok)
        # The adapter's effect on the logits is the same function in both engines (orientation,
        # q/k permutation and alpha/r scale all right): correlated, of the same size.
        d_hf, d_cpp = h_logits[0] - hb_logits[0], c_logits[0] - cb_logits[0]
        assert np.corrcoef(d_hf, d_cpp)[0, 1] > 0.97
        assert 0.8 < np.linalg.norm(d_cpp) / np.linalg.norm(d_hf) < 1.25
    # Identical free-running greedy text for most prompts (the rest part at a near-tie).
    assert same >= 2, f"{same}/{len(PROMPTS)} prompts identical"
