"""Sections of the training stages: phase 1 (pretrain: textbooks, LoRA, full or from scratch) and
phase 2 (finetune: exercises, QLoRA)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from pipeline.core.config.presets import ModelPreset
from pipeline.core.config.validation import require, section
from pipeline.core.fields import ConfigError
from pipeline.core.records import sha256_tree

RECORD_KINDS = ("exercise", "textbook")
# What phase 2 can train on (finetune.source): the curated dataset or a control arm. The corpus arms read the
# corpus stage's output (finetune.corpus_dir, corpus_kept); no other arm does.
FinetuneSource = Literal["curated", "rejected", "natural", "corpus", "corpus_filtered"]
FINETUNE_SOURCES: tuple[str, ...] = get_args(FinetuneSource)
CORPUS_SOURCES = ("corpus", "corpus_filtered")


@section("pretrain.scratch")
class ScratchModelConfig:
    family: Literal["llama", "phi", "gpt_neox"] = Field(
        "llama", description="transformers architecture of the model built from scratch (LlamaConfig, "
        "PhiConfig, GPTNeoXConfig).")
    hidden_size: StrictInt = Field(256, ge=1, description="Width (phi-1-small: 1024).")
    layers: StrictInt = Field(4, ge=1, description="Transformer blocks (phi-1-small: 20).")
    heads: StrictInt = Field(4, ge=1, description="Attention heads; must divide hidden_size.")
    intermediate_size: StrictInt = Field(1024, ge=1, description="MLP width.")
    context: StrictInt = Field(512, ge=1, description="Longest sequence (max_position_embeddings).")
    tie_embeddings: StrictBool = Field(
        True, description="Share input and output embeddings (the student tokenizer's vocabulary makes them "
        "most of a small model's parameters).")

    @model_validator(mode="after")
    def _cross_checks(self) -> ScratchModelConfig:
        require(self.hidden_size % self.heads == 0, "heads",
                f"must divide hidden_size ({self.hidden_size}), got {self.heads}")
        return self


DEFAULT_SAMPLE_PROMPTS = [
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n',
    'def running_sum(values: list[int]) -> list[int]:\n    """Return the running totals of values."""\n',
    "# A list comprehension builds a new list from an old one.\n",
]


@section("pretrain")
class PretrainConfig:
    enabled: StrictBool = Field(
        False, description="Phase 1, phi-1's CodeTextbook pretraining: next-token training on the textbook "
        "sections (all tokens) before the exercise fine-tuning; off = finetune starts from the student "
        "base.")
    mode: Literal["lora", "full", "scratch"] = Field(
        "lora", description="lora: continued pretraining of the student through a LoRA adapter that finetune "
        "then continues (LoRA shape, quantization and batch from finetune.*); full: every weight of the "
        "student (no quantization); scratch: a new model of pretrain.scratch's shape with the student's "
        "tokenizer, trained from random weights.")
    kinds: list[StrictStr] = Field(
        default_factory=lambda: ["textbook"], description="Which records of the dataset it trains on "
        "(textbook, exercise).")
    extra_corpus: list[StrictStr] = Field(
        default_factory=list, description="More text: .jsonl files with a `text` field, or .txt/.py/.md "
        "files (one document each); paths relative to the repo.")
    output_dir: StrictStr = Field(
        "data/pretrain", description="adapter/ + adapter.gguf (lora) or model/ (full, scratch), checkpoints, "
        "dvclive curves, samples.jsonl, metrics.json.")
    learning_rate: StrictFloat = Field(2e-4, gt=0, description="Peak learning rate (scratch: try 1e-3).")
    epochs: StrictFloat = Field(1.0, description="Epochs over the corpus (ignored when max_steps > 0).")
    max_steps: StrictInt = Field(-1, description="Optimizer steps; > 0 overrides epochs.")
    max_length: StrictInt = Field(512, ge=16, description="Tokens per sequence (documents are packed).")
    sample_prompts: list[StrictStr] = Field(
        default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS), description="Fixed prompts completed greedily "
        "during training, so you can watch the model learn (samples.jsonl).")
    sample_steps: StrictInt = Field(
        0, ge=0, description="Complete the sample prompts every N steps; 0 = at the end only.")
    sample_tokens: StrictInt = Field(48, description="Tokens per sample completion.")
    scratch: ScratchModelConfig = Field(
        default_factory=ScratchModelConfig, description="The model built in scratch mode.")

    @property
    def weights_dir(self) -> Path:
        """What phase 2 and evaluate read: adapter/ + adapter.gguf (lora) or model/ (full, scratch)."""
        return Path(self.output_dir) / "weights"

    def trained_model(self, student: ModelPreset) -> ModelPreset | None:
        """The whole model phase 1 wrote (full, scratch) as a preset of the Hugging Face folder, for phase 2 to
        train on and evaluate to serve in process; its model name carries the folder's sha256, so a retrained
        model never hits old cached completions. None when phase 1 is off or trained an adapter."""
        if not self.enabled or self.mode == "lora":
            return None
        folder = self.weights_dir / "model"
        if not (folder / "config.json").is_file():
            raise ConfigError(f"pretrain.mode={self.mode}: phase 1's model {folder}/ does not exist (config.json): "
                              "run `textbook pretrain` first, or set pretrain.enabled=false")
        return dataclasses.replace(student, name=f"{student.name}+pretrain-{self.mode}", gguf=None, hf_id=str(folder),
                                   model=f"{student.model}-pretrain-{self.mode}-{sha256_tree(folder)[:12]}")

    @model_validator(mode="after")
    def _cross_checks(self) -> PretrainConfig:
        require(bool(self.kinds) and set(self.kinds) <= set(RECORD_KINDS), "kinds",
                f"must be a non-empty subset of {list(RECORD_KINDS)}, got {self.kinds}")
        require(self.epochs > 0 or self.max_steps > 0, "epochs", "need epochs > 0 or max_steps > 0")
        return self


@section("finetune")
class FinetuneConfig:
    student: StrictStr = Field(
        "gemma-3-270m", description="Student base model preset (configs/models/<name>.yaml).")
    enabled: StrictBool = Field(
        True, description="Phase 2, phi-1's CodeExercises fine-tuning; off = the model after pretrain is the "
        "final one (the stage passes pretrain's adapter through, so evaluate's 'finetuned' is the last "
        "phase that ran).")
    kinds: list[StrictStr] = Field(
        default_factory=lambda: ["exercise", "textbook"], description="Which records of the dataset it "
        "trains on (exercise, textbook); phi-1's phase 2 is exercises only.")
    dataset_dir: StrictStr = Field("data/dataset", description="The curated dataset folder (train.jsonl).")
    max_records: StrictInt = Field(
        0, ge=0, description="Train on a seeded sample of this many of the chosen records; 0 = all. Samples "
        "of one seed are nested (the first N of one shuffle): the data-volume axis of a "
        "pass@1-against-examples curve.")
    output_dir: StrictStr = Field("data/finetune", description="Adapter, GGUF adapter, checkpoints, metrics.")
    source: FinetuneSource = Field(
        "curated", description="What phase 2 trains on: curated (the dataset), or a control arm at the same "
        "number of target tokens (match_tokens): rejected (the teacher's exercises the filter rejected, "
        "deduped and decontaminated: isolates curation), natural (functions with docstrings from the "
        "Python standard library, formatted as exercises, deduped and decontaminated; a committed file), "
        "corpus (the corpus stage's natural code, unfiltered: the exercise-kind records of corpus_dir, "
        "documented functions as exercises) or corpus_filtered (the same records, only those the "
        "educational-value classifier kept: corpus_kept). The corpus arms need the corpus built: "
        "`dvc repro corpus` with corpus.enabled=true.")
    rejected_dir: StrictStr = Field(
        "data/controls/rejected/dataset", description="The rejected arm's dataset folder (train.jsonl).")
    natural_dir: StrictStr = Field(
        "data/controls/natural", description="The natural arm's dataset folder (train.jsonl, committed).")
    corpus_dir: StrictStr = Field(
        "data/corpus/unfiltered", description="The corpus and corpus_filtered arms' dataset folder "
        "(train.jsonl: the corpus's curated snippets, dvc.yaml's decontaminate_corpus); the arms take its "
        "exercise-kind records.")
    corpus_kept: StrictStr = Field(
        "data/corpus/select/kept.jsonl", description="The corpus_filtered arm: the corpus stage's kept "
        "snippets (dvc.yaml's corpus stage); the arm is the records of corpus_dir whose ids it lists.")
    match_tokens: StrictBool = Field(
        True, description="A control arm is a seeded sample of its records with as many target tokens as the "
        "curated records trained on (the comparison is at equal training tokens).")
    heldout_fraction: StrictFloat = Field(
        0.0, ge=0, lt=1, description="A seeded share of the curated exercises that no training step sees "
        "(heldout.jsonl): evaluate scores every target on them (phi-1's in-distribution check). Drawn with "
        "the run seed, the same for every arm and finetune.seed.")
    seed: StrictInt = Field(
        0, description="Training seed offset (added to the run seed): LoRA initialisation and data order. "
        "The held-out split and record samples keep the run seed, so seeds vary only the training.")
    quantization: Literal["nf4", "none"] = Field(
        "nf4", description="nf4: QLoRA (4-bit NF4 base); none: plain LoRA on a bf16/fp32 base.")
    double_quant: StrictBool = Field(
        True, description="QLoRA double quantization of the quantization constants.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto = bf16 where supported, else fp32.")
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto", description="QLoRA: the dtype the packed 4-bit weights are stored in "
        "(bnb_4bit_quant_storage). FSDP shards a flat parameter of one dtype, so FSDP-QLoRA stores them in "
        "the compute dtype; auto = the compute dtype under an FSDP `accelerate launch`, bitsandbytes' uint8 "
        "otherwise.")
    lora_r: StrictInt = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: StrictInt = Field(32, description="LoRA alpha.")
    lora_dropout: StrictFloat = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[StrictStr] = Field(
        default_factory=list, description="Override the preset's LoRA targets; [] = the preset's (or all "
        "linear layers).")
    learning_rate: StrictFloat = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="LR schedule.")
    warmup_ratio: StrictFloat = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming up.")
    epochs: StrictFloat = Field(
        1.0, description="Epochs over the training split (ignored when max_steps > 0).")
    max_steps: StrictInt = Field(-1, description="Optimizer steps; > 0 overrides epochs.")
    batch_size: StrictInt = Field(
        4, ge=1, description="Sequences per forward pass on one device; batch_size x grad_accum is the "
        "global batch of an optimizer step, the same on one process or N (`accelerate launch`): N processes "
        "split it, each a micro-batch of at most batch_size.")
    grad_accum: StrictInt = Field(
        1, ge=1, description="Gradient accumulation steps on one process (global batch = batch_size x "
        "grad_accum; under N processes each accumulates its share of it).")
    max_length: StrictInt = Field(
        512, ge=16, description="Tokens per sequence; longer examples are truncated or dropped (counted).")
    drop_long: StrictBool = Field(
        False, description="Drop examples longer than max_length instead of truncating them.")
    split_long_textbooks: StrictBool = Field(
        False, description="Split a textbook section longer than max_length into max_length pieces instead "
        "of truncating it (pretrain always does: a corpus is read whole).")
    packing: StrictBool = Field(True, description="Pack short examples into full max_length sequences.")
    completion_only_loss: StrictBool = Field(
        True, description="Loss on the solution only, not on the signature and docstring.")
    eval_fraction: StrictFloat = Field(0.1, ge=0, lt=1, description="Held-out fraction for eval loss.")
    eval_steps: StrictInt = Field(0, description="Evaluate every N steps; 0 = at the end only.")
    save_steps: StrictInt = Field(
        20, ge=1, description="Checkpoint every N steps (a killed run resumes from the last one).")
    logging_steps: StrictInt = Field(1, description="Log every N steps.")
    gradient_checkpointing: StrictBool = Field(True, description="Trade compute for memory.")
    max_grad_norm: StrictFloat = Field(1.0, description="Gradient clipping.")
    loss_spike_factor: StrictFloat = Field(
        10.0, description="Stop if the loss exceeds this multiple of its running minimum (or is NaN).")
    merge: StrictBool = Field(
        False, description="Also save a merged bf16 model (merged into the bf16 base, never the 4-bit one).")
    export_gguf: StrictBool = Field(
        True, description="Export the adapter as a GGUF LoRA adapter for llama.cpp.")
    num_threads: StrictInt = Field(0, description="CPU threads for torch; 0 = all cores.")

    @model_validator(mode="after")
    def _cross_checks(self) -> FinetuneConfig:
        require(bool(self.kinds) and set(self.kinds) <= set(RECORD_KINDS), "kinds",
                f"must be a non-empty subset of {list(RECORD_KINDS)}, got {self.kinds}")
        require(self.epochs > 0 or self.max_steps > 0, "epochs", "need epochs > 0 or max_steps > 0")
        return self

    @property
    def heldout_path(self) -> Path:
        """The held-out curated exercises finetune writes and evaluate scores."""
        return Path(self.output_dir) / "heldout.jsonl"
