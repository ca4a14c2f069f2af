"""What the evaluate stage evaluates: the benchmarks (their evaluated subset and conventions), the
models (targets) and the engine each runs on, and the requests sent to them.

    python -c "from pipeline.stages.evaluate.targets import sample_seed; print(sample_seed(0, 0, 'HumanEval/0', 0))"
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import (
    ConfigError,
    EvaluateConfig,
    ModelPreset,
    RunConfig,
    load_preset,
)
from pipeline.core.humaneval import subset_label
from pipeline.core.records import sha256_file, sha256_text, sha256_tree
from pipeline.core.schema import chat_messages
from pipeline.engines.llm import LLMRequest
from pipeline.engines.servers import vllm_unavailable_reason
from pipeline.engines.versions import engine_version
from pipeline.stages.evaluate.benchmarks import INFO, load_benchmark
from pipeline.stages.evaluate.harness import EVALPLUS_CHAT_STOP, Convention, prefill_messages

ADAPTER_GGUF = "adapter.gguf"
ADAPTER_PEFT = "adapter"


class EvaluationError(RuntimeError):
    """The evaluation cannot be trusted (broken harness, failed requests): the stage fails."""


def sample_seed(run_seed: int, eval_seed: int, task_id: str, sample: int) -> int:
    """The same seed for every model: base and fine-tuned see the same sampling noise."""
    return int(sha256_text(f"{run_seed}:{eval_seed}:{task_id}:{sample}")[:8], 16) % (2**31)


@dataclass
class Target:
    """One evaluated model: `preset` is what requests are sent as (its model name and identity)."""

    name: str  # base | finetuned | teacher
    preset: ModelPreset
    engine: str  # llamacpp | vllm | remote | transformers
    adapter: Path | None = None
    adapter_sha256: str | None = None
    lora_rank: int | None = None

    @property
    def identity(self) -> str:
        """Cache identity. A fine-tuned target's model name carries the adapter's sha256, so a new
        adapter never hits the old adapter's (or the base's) cached completions."""
        if self.engine == "transformers":
            weights = self.preset.gguf.sha256 if self.preset.gguf else self.preset.hf_id
            return f"transformers:{weights}:{self.preset.model}|{engine_version('transformers')}"
        return self.preset.identity()

    def describe(self) -> dict:
        return {"preset": self.preset.name, "engine": self.engine, "model": self.preset.model, "api": self.preset.api,
                "identity": self.identity, "adapter": str(self.adapter) if self.adapter else None,
                "adapter_sha256": self.adapter_sha256}


def vllm_available() -> bool:
    """vLLM is installed in this Python and torch sees a CUDA GPU (a student is served on one)."""
    return vllm_unavailable_reason() is None


def resolve_engine(requested: str, preset: ModelPreset) -> str:
    """The engine for the student: auto follows the preset. A vLLM student where vLLM cannot start is an
    error, never a silent fall back to in-process generation (hours on a CPU): that is evaluate.engine=transformers."""
    if requested == "auto":
        if preset.engine == "vllm" and not vllm_available():
            raise ConfigError(f"evaluate.engine=auto: student preset '{preset.name}' is served by vLLM, which cannot "
                              f"start here ({vllm_unavailable_reason(preset) or 'vLLM or a CUDA GPU is missing'}); "
                              "set evaluate.engine=transformers to generate in process instead (on the CPU: slow)")
        return preset.engine
    if requested == "llamacpp" and preset.gguf is None:
        raise ConfigError(f"evaluate.engine: llamacpp needs a GGUF, and preset '{preset.name}' has none")
    if requested == "vllm" and not preset.hf_id:
        raise ConfigError(f"evaluate.engine: vllm needs hf_id, and preset '{preset.name}' has none")
    if requested == "transformers" and not (preset.hf_id or preset.gguf):
        raise ConfigError(f"evaluate.engine: transformers needs hf_id or a GGUF, and preset '{preset.name}' has none")
    return requested


def _adapter(folder: Path, engine: str, name: str = "finetuned", stage: str = "finetune") -> tuple[Path, str, int | None]:
    """(path, sha256, LoRA rank) of the adapter the engine loads; a missing adapter is a config error."""
    if engine == "llamacpp":
        path = folder / ADAPTER_GGUF
        if not path.is_file():
            raise ConfigError(f"evaluate.models includes '{name}' but the GGUF LoRA adapter {path} does not exist: "
                              f"run `textbook {stage}` (with finetune.export_gguf) or drop '{name}'")
        return path, sha256_file(path), None
    path = folder / ADAPTER_PEFT
    config = path / "adapter_config.json"
    if not config.is_file():
        raise ConfigError(f"evaluate.models includes '{name}' but the peft adapter {path}/ (adapter_config.json) "
                          f"does not exist: run `textbook {stage}` or drop '{name}'")
    rank = json.loads(config.read_text(encoding="utf-8")).get("r")
    return path, sha256_tree(path), int(rank) if rank else None


def evaluated_models(cfg: RunConfig) -> list[str]:
    """evaluate.models, less 'pretrained' when phase 1 is off (so one list serves every ablation)."""
    return [m for m in cfg.evaluate.models if m != "pretrained" or cfg.pretrain.enabled]


def resolve_targets(cfg: RunConfig, root: Path) -> list[Target]:
    """The evaluated models, in the order of evaluate.models."""
    ev = cfg.evaluate
    student = load_preset(cfg.finetune.student, root)
    engine = resolve_engine(ev.engine, student)
    if engine == "remote" and {"pretrained", "finetuned"} & set(ev.models):
        raise ConfigError(f"student preset '{student.name}' is remote: the adapter cannot be loaded there; "
                          "use a llamacpp or vllm student preset")
    if engine == "vllm" and student.engine != "vllm":
        from pipeline.engines.student import model_source  # torch: imported only on this path

        # Serve the weights the adapter was trained on: a GGUF preset's dequantized HF folder.
        student = dataclasses.replace(student, engine="vllm", hf_id=model_source(student), gguf=None)
    # A model phase 1 trained whole has no GGUF: the in-process engine serves it and its adapter.
    phase_one = cfg.pretrain.trained_model(student)
    targets = []
    for name in evaluated_models(cfg):
        if name == "base":
            targets.append(Target("base", student, engine))
        elif name == "pretrained" and phase_one is not None:
            targets.append(Target("pretrained", phase_one, "transformers"))
        elif name == "pretrained":
            path, sha, rank = _adapter(cfg.pretrain.weights_dir, engine, "pretrained", "pretrain")
            preset = dataclasses.replace(student, name=f"{student.name}+pretrain-lora",
                                         model=f"{student.model}-pretrain-lora-{sha[:12]}")
            targets.append(Target("pretrained", preset, engine, path, sha, rank))
        elif name == "finetuned":
            on = phase_one or student
            path, sha, rank = _adapter(Path(cfg.finetune.output_dir), "transformers" if phase_one else engine)
            preset = dataclasses.replace(on, name=f"{on.name}+lora", model=f"{on.model}-lora-{sha[:12]}")
            targets.append(Target("finetuned", preset, "transformers" if phase_one else engine, path, sha, rank))
        else:
            teacher = load_preset(cfg.generate.teacher, root)
            targets.append(Target("teacher", teacher, teacher.engine))
    return targets


@dataclass
class Bench:
    """One benchmark of the run: its problems (the evaluated subset), convention and reference timings."""

    name: str
    problems: list[dict]
    total: int
    conv: Convention
    reference_s: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    every_problem: list[dict] = field(default_factory=list)  # the whole benchmark, for the likelihood endpoint

    @property
    def by_id(self) -> dict[str, dict]:
        return {p["task_id"]: p for p in self.problems}

    @property
    def subset(self) -> str:
        return subset_label(len(self.problems), self.total)

    def request_id(self, task_id: str, sample: int) -> str:
        # HumanEval keeps its plain ids (and its cache keys); the others are prefixed.
        return f"{task_id}#{sample}" if self.name == "humaneval" else f"{self.name}|{task_id}#{sample}"


def load_benches(ev: EvaluateConfig) -> list[Bench]:
    paths = {"evaluate.humaneval_plus_path": ev.humaneval_plus_path, "evaluate.mbpp_plus_path": ev.mbpp_plus_path}
    benches = []
    for name in ev.benchmarks:
        problems = load_benchmark(name, paths)
        info = INFO[name]
        source = {}
        if problems and problems[0].get("source_file"):
            source = {"file": problems[0]["source_file"], "sha256": sha256_file(Path(problems[0]["source_file"]))}
        benches.append(Bench(name, problems[:ev.problems] if ev.problems else problems, len(problems),
                             Convention(ev.harness, info.family), source=source, every_problem=problems))
    return benches


def continues_assistant_messages(target: Target) -> bool:
    """Whether the target's server continues a final assistant message (a prefill): llama-server does by
    default, vLLM when asked (the client asks); llama-cpp-python, in-process transformers and remote
    APIs are not known to."""
    preset = target.preset
    return target.engine == "vllm" or (target.engine == "llamacpp" and preset.server.program == "llama-server")


def build_requests(target: Target, bench: Bench, ev: EvaluateConfig, run_seed: int) -> list[LLMRequest]:
    """One request per (problem, sample), each with its own seed: n=1 works on every engine."""
    chat = target.preset.api == "chat"
    prefill = chat and ev.chat_prefill
    if prefill and not continues_assistant_messages(target):
        raise ConfigError(f"evaluate.chat_prefill: the {target.name} model ({target.preset.name}, engine "
                          f"{target.engine}) is not served by llama-server or vLLM, which continue a begun answer")
    conv = bench.conv
    out = []
    for p in bench.problems:
        for i in range(ev.n_samples):
            params = {"temperature": ev.temperature, "top_p": ev.top_p, "max_tokens": ev.max_tokens,
                      # Stop sequences would cut a chat answer inside its code block ("\ndef"), unless the
                      # answer is begun inside the block (prefill): then it stops at the block's end.
                      "stop": EVALPLUS_CHAT_STOP if prefill else None if chat else conv.stop(ev.stop), "n": 1,
                      "seed": sample_seed(run_seed, ev.seed, p["task_id"], i)}
            rid = bench.request_id(p["task_id"], i)
            if prefill:
                out.append(LLMRequest(rid, messages=prefill_messages(p["prompt"]), params=params))
            elif chat:
                out.append(LLMRequest(rid, messages=chat_messages(p["prompt"]), params=params))
            else:
                out.append(LLMRequest(rid, prompt=conv.base_prompt(p["prompt"]), params=params))
    return out


def unique_requests(requests: list[LLMRequest]) -> tuple[list[LLMRequest], dict[str, str]]:
    """The distinct requests (HumanEval+ asks what HumanEval asks), and each id's representative id."""
    first: dict[str, str] = {}
    alias, out = {}, []
    for r in requests:
        key = json.dumps([r.prompt, r.messages, r.params], sort_keys=True)
        if key not in first:
            first[key] = r.id
            out.append(r)
        alias[r.id] = first[key]
    return out, alias
