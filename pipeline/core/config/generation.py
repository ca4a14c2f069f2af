"""Sections of the teacher's stages: growing the topic tree, generating textbooks and exercises."""

from __future__ import annotations

from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator

from pipeline.core.config.shared import ClientConfig, SamplingConfig, SandboxConfig
from pipeline.core.config.validation import require, section


@section("generate")
class GenerateConfig:
    teacher: StrictStr = Field(
        "qwen2.5-coder-0.5b-instruct", description="Teacher model preset (configs/models/<name>.yaml).")
    n_exercises: StrictInt = Field(24, ge=0, description="How many exercise prompts to send.")
    n_textbooks: StrictInt = Field(4, ge=0, description="How many textbook-section prompts to send.")
    prompts_dir: StrictStr = Field(
        "prompts", description="Folder with the topic/audience lists and Jinja2 templates.")
    exercise_template: StrictStr = Field(
        "exercise.j2", description="Template for exercise prompts (in prompts_dir).")
    textbook_template: StrictStr = Field(
        "textbook.j2", description="Template for textbook prompts (in prompts_dir).")
    system_prompt: StrictStr = Field(
        "system.j2", description="Template for the system message (chat teachers).")
    output_dir: StrictStr = Field(
        "data/generate", description="Where the stage writes its records and stats.")
    cache_path: StrictStr = Field(
        "data/cache/requests.sqlite", description="Content-addressed request cache (kept across runs).")
    textbook_max_tokens: StrictInt = Field(
        0, ge=0, description="Completion token cap of textbook sections (longer than exercises); 0 = "
        "sampling.max_tokens.")
    topics_file: StrictStr = Field(
        "topics.yaml", description="The topic tree prompts sample from (in prompts_dir): the seed tree, or "
        "one grown by `textbook topics` (a versioned file).")
    repair_rounds: StrictInt = Field(
        0, ge=0, description="Execution-feedback repair: an exercise whose asserts fail in the sandbox goes "
        "back to the teacher with each failing assert and the values it saw, up to this many times; 0 = "
        "off. Needs sampling.n = 1.")
    salvage_truncated: StrictBool = Field(
        False, description="An exercise cut at max_tokens inside its tests (a greedy teacher repeating one "
        "assert until the cap) keeps the function and the asserts before the cut (marked `salvaged`); off = "
        "every cut answer is rejected.")
    repair_template: StrictStr = Field(
        "repair.j2", description="Template of the repair request (in prompts_dir).")
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig, description="Limits for running the teacher's tests in repair rounds.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling parameters.")
    client: ClientConfig = Field(
        default_factory=ClientConfig, description="Concurrency, rate limits, retries, budget.")

    @model_validator(mode="after")
    def _cross_checks(self) -> GenerateConfig:
        require(self.repair_rounds == 0 or self.sampling.n == 1, "repair_rounds",
                f"needs generate.sampling.n = 1 (a repair continues one answer), got n = {self.sampling.n}")
        require(self.n_exercises + self.n_textbooks > 0, None, "n_exercises + n_textbooks must be > 0")
        return self


@section("topics")
class TopicsConfig:
    teacher: StrictStr = Field(
        "qwen2.5-coder-0.5b-instruct", description="Model preset that grows the topic tree.")
    seed_file: StrictStr = Field(
        "prompts/topics.yaml", description="The seed tree: `topics: {topic: [subtopic, ...]}`.")
    output: StrictStr = Field(
        "prompts/expanded/topics.yaml", description="The grown tree (same format, plus its version and "
        "provenance; resolved_config.yaml beside it); point generate.topics_file at it "
        "(expanded/topics.yaml).")
    children: StrictInt = Field(8, ge=1, description="New subtopics asked of the teacher per seed subtopic.")
    target_size: StrictInt = Field(
        0, ge=0, description="Stop once the tree has this many subtopics in all; 0 = expand every seed "
        "subtopic.")
    template: StrictStr = Field(
        "expand_topics.j2", description="Template of the expansion request (in generate.prompts_dir).")
    cache_path: StrictStr = Field(
        "data/cache/requests.sqlite", description="Request cache (shared with generate).")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, max_tokens=256), description="Sampling "
        "parameters.")
    client: ClientConfig = Field(
        default_factory=ClientConfig, description="Concurrency, rate limits, retries, budget.")
