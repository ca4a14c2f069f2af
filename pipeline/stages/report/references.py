"""Published HumanEval (and MBPP) pass@1 numbers the report sets beside ours, with their sources.

Every number is as printed in its source (percent, pass@1, greedy or as the source reports);
`differences()` says in words how each reference differs from our run, so nobody reads a
270M-parameter LoRA on a few hundred exercises as a replication of phi-1.

    python -c "from pipeline.stages.report.references import REFERENCES; print([(r.name, r.humaneval) for r in REFERENCES])"
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PHI1 = "Gunasekar et al. 2023, Textbooks Are All You Need (arXiv:2306.11644)"
PHI1_URL = "https://arxiv.org/abs/2306.11644"
PHI15 = "Li et al. 2023, Textbooks Are All You Need II: phi-1.5 technical report (arXiv:2309.05463)"
PHI15_URL = "https://arxiv.org/abs/2309.05463"
JINA = "jina-ai/textbook (README) and the jinaai/starcoder-1b-textbook model card"
JINA_URL = "https://github.com/jina-ai/textbook"


@dataclass(frozen=True)
class Reference:
    name: str
    params: float | None  # parameters; None = not disclosed
    humaneval: float  # pass@1, percent
    mbpp: float | None  # pass@1, percent; None = not given beside it in the source
    training: str  # what it was trained on, in words
    training_tokens: float | None  # dataset / training tokens as the source gives them; None = not disclosed
    source: str
    url: str
    where: str  # table or section of the source

    @property
    def size(self) -> str:
        return format_params(self.params)


REFERENCES: tuple[Reference, ...] = (
    Reference("phi-1", 1.3e9, 50.6, 55.5, "CodeTextbook (6B filtered web + 1B synthetic GPT-3.5 tokens), then "
              "CodeExercises (< 180M tokens of GPT-3.5 exercises)", 7e9, PHI1, PHI1_URL, "Table 1"),
    Reference("phi-1-small", 350e6, 45.0, None, "the phi-1 pipeline at 350M parameters", 7e9, PHI1, PHI1_URL,
              "abstract"),
    Reference("phi-1-base", 1.3e9, 29.0, None, "CodeTextbook only (phi-1 before fine-tuning on CodeExercises)", 7e9,
              PHI1, PHI1_URL, "text"),
    Reference("phi-1.5-web", 1.3e9, 41.4, None, "phi-1's data + synthetic textbooks + filtered web data", None, PHI15,
              PHI15_URL, "coding benchmarks table"),
    Reference("StarCoder", 15.5e9, 33.6, None, "The Stack (permissive code), 1T tokens", 1e12, PHI1, PHI1_URL,
              "Table 1"),
    Reference("WizardCoder", 16e9, 57.3, None, "StarCoder + Evol-Instruct fine-tuning", 1e12, PHI1, PHI1_URL,
              "Table 1"),
    Reference("Replit", 2.7e9, 21.9, None, "code, 525B tokens", 525e9, PHI1, PHI1_URL, "Table 1"),
    Reference("SantaCoder", 1.1e9, 14.0, None, "The Stack (Python, Java, JavaScript), 236B tokens", 236e9, PHI1,
              PHI1_URL, "Table 1"),
    Reference("CodeGen-Mono-350M", 350e6, 12.8, None, "natural language + code, 577B tokens", 577e9, PHI1, PHI1_URL,
              "Table 1"),
    Reference("GPT-3.5", None, 47.0, None, "not disclosed", None, PHI1, PHI1_URL, "Table 1"),
    Reference("GPT-4", None, 67.0, None, "not disclosed", None, PHI1, PHI1_URL, "Table 1"),
    Reference("StarCoderBase-1B", 1e9, 15.2, None, "The Stack, 1T tokens (jina-ai's baseline before fine-tuning)", 1e12, JINA,
              JINA_URL, "README / model card"),
    Reference("StarCoderBase-1B + textbook exercises", 1e9, 27.0, None, "full fine-tuning on about 120k GPT-3.5 "
              "exercises (about 120M tokens)", 120e6, JINA, JINA_URL, "README / model card"),
)


def format_params(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M"


def format_tokens(n: float | None) -> str:
    if n is None:
        return "n/a"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def params_from_name(*names: str | None) -> float | None:
    """Parameter count from a model name such as gemma-3-270m or qwen2.5-coder-0.5b; None if absent."""
    for name in names:
        m = re.search(r"(?<![\w.])(\d+(?:\.\d+)?)([mb])(?![a-z])", (name or "").lower())
        if m:
            return float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9)
    return None


@dataclass(frozen=True)
class OurRun:
    """What the differences are measured against."""

    params: float | None
    train_examples: int | None
    train_tokens: int | None
    problems: int
    problems_total: int = 164
    eval_examples: int | None = None  # held out of training for the eval loss (finetune's examples.eval)


def differences(ref: Reference, ours: OurRun) -> str:
    parts = []
    if ref.params is None or ours.params is None:
        parts.append(f"size {ref.size} vs ours {format_params(ours.params)}")
    else:
        ratio = ref.params / ours.params
        parts.append(f"{ratio:.1f}x our parameters ({ref.size} vs {format_params(ours.params)})" if ratio >= 1
                     else f"{1 / ratio:.1f}x fewer parameters than ours")
    data = f"{ours.train_examples:,} exercises" if ours.train_examples is not None else "a dataset of unknown size"
    if ours.train_tokens:
        data += f", ~{format_tokens(ours.train_tokens)} tokens"
    theirs = (f"{format_tokens(ref.training_tokens)} training tokens" if ref.training_tokens
              else "training data size not disclosed")
    parts.append(f"{theirs} vs our LoRA on {data}")
    if ours.problems < ours.problems_total:
        parts.append(f"all {ours.problems_total} problems vs our first {ours.problems}")
    return "; ".join(parts)
