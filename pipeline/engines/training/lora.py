"""The model side of an adapter: LoRA targets, 4-bit (QLoRA) preparation, a new or a continued adapter, and the
merge into a bf16 base.

NF4 + double quantization base (bitsandbytes, loaded by engines/student.py), LoRA adapters in fp32 (in the base's
dtype under FSDP). Phase 2 continues phase 1's adapter (:func:`load_trainable_adapter`), so one adapter carries
both phases.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config import ConfigError, FinetuneConfig, ModelPreset


def linear_module_names(model: Any) -> set[str]:
    """Leaf names of the linear layers LoRA can adapt (bnb's Linear4bit is an nn.Linear)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head":
            names.add(name.rsplit(".", 1)[-1])
    return names


def resolve_targets(model: Any, ft: FinetuneConfig, preset: ModelPreset) -> list[str] | str:
    """finetune.target_modules, else the preset's, else all linear layers; unknown names fail now."""
    wanted = ft.target_modules or preset.lora_target_modules
    if not wanted:
        return "all-linear"
    available = linear_module_names(model)
    missing = [name for name in wanted if name not in available]
    if missing:
        key = ("finetune.target_modules" if ft.target_modules
               else f"preset '{preset.name}' lora_target_modules")
        raise ConfigError(f"{key}: {missing} match no linear layer of {preset.name}; "
                          f"its linear layers are {sorted(available)}")
    return list(wanted)


def keep_4bit_layers_differentiable(model: Any) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for its AVX512-BF16 CPU kernel on the
    first no-grad eval-mode forward and keeps them repacked; that kernel (gemv_4bit) has no
    autograd, so every training step after the first evaluation would backpropagate wrong
    input gradients through it. Never repack during a training run."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_quantized(model: Any) -> Any:
    """A 4-bit base made ready for LoRA: fp32 norms/embeddings, frozen base (checkpointing is enabled by
    the Trainer). Not under FSDP: FSDP flattens each block into one parameter of one dtype (the 4-bit
    weights are stored in the compute dtype for that), which fp32 norms would break; TRL's SFTTrainer
    skips this preparation for sharded QLoRA for the same reason."""
    from peft import prepare_model_for_kbit_training

    from pipeline.engines.student import fsdp_launched

    if not fsdp_launched():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    keep_4bit_layers_differentiable(model)
    return model


def peft_kwargs(quantized: bool) -> dict:
    """Sharded QLoRA keeps the adapters in the base's dtype (peft would upcast them to fp32), as TRL does."""
    from pipeline.engines.student import fsdp_launched

    return {"autocast_adapter_dtype": False} if quantized and fsdp_launched() else {}


def add_lora(model: Any, ft: FinetuneConfig, preset: ModelPreset, quantized: bool, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    targets = resolve_targets(model, ft, preset)
    if quantized:
        model = prepare_quantized(model)
    model.config.use_cache = False  # the KV cache is useless in training and breaks checkpointing
    set_seed(seed)  # LoRA A's initialisation draws from the global RNG
    lora = LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora, **peft_kwargs(quantized))


def load_trainable_adapter(model: Any, adapter_dir: Path, quantized: bool) -> Any:
    """The student with an earlier phase's adapter, trainable: phase 2 continues phase 1's LoRA
    (its rank and targets), so one adapter carries both phases, as one model carries phi-1's."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"the adapter to continue, {adapter_dir}/, does not exist (adapter_config.json): run the "
                          "phase that writes it first, or switch that phase off")
    if quantized:
        model = prepare_quantized(model)
    model.config.use_cache = False
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True, **peft_kwargs(quantized))


def merge_adapter(preset: ModelPreset, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge into a bf16 copy of the base (never the 4-bit one: rounding the sum would lose the delta)."""
    from peft import PeftModel

    from pipeline.engines.student import load_student

    base, tok = load_student(preset, "none", compute_dtype=torch.bfloat16, device="cpu")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    target = out_dir / "merged"
    shutil.rmtree(target, ignore_errors=True)
    merged.save_pretrained(str(target), safe_serialization=True)
    tok.save_pretrained(str(target))
    return target
