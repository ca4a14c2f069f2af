"""Generate stage: textbook sections and exercises from a teacher LLM, phi-1 style.

Prompts are sampled combinatorially (seeded) over topic x subtopic pairs, audiences,
difficulty and a constraint on the function name, rendered from Jinja2 templates in
`prompts/`, and sent through the one LLM client (cache, retries, rate limits, budget).
Responses that do not parse, or that end for any reason but `stop`, go to
`rejected.jsonl` with their reason. A request that fails for a transport reason after its
retries is never a rejection: the stage caches every answer it got, writes nothing and exits
non-zero with one line (a re-run sends only the failed requests), unless
`generate.client.max_failed_fraction` accepts the loss (then counted in stats.json as `lost`).

Requests go out in waves, each through `LLMSession.complete` (online, or the Batch API with
`client.batch`): every prompt's first request, then each repair round's requests; between waves
the prompts' chains are rebuilt from the request cache alone, so the records never depend on
how or in which order the answers arrived.

Outputs (in `generate.output_dir`): exercises.jsonl, textbooks.jsonl, rejected.jsonl,
stats.json (DVC metrics), coverage.json, resolved_config.yaml.

Modules: prompts.py (the prompt space, its sampling, templates, first requests), chains.py (a
prompt's answer and its repair rounds), stage.py (records, coverage, run_generate, main). Parsing
lives in pipeline.core.schema (ParseError, parse_exercise, parse_textbook): the one schema.

    textbook generate --set generate.n_exercises=8 --set generate.n_textbooks=2
"""

from pipeline.core.schema import ParseError, parse_exercise, parse_textbook, parse_truncated_exercise
from pipeline.stages.generate.chains import Chain, Repairer
from pipeline.stages.generate.prompts import (
    PromptSpace,
    build_requests,
    load_prompt_space,
    record_seed,
    render,
    sample_specs,
    template_env,
)
from pipeline.stages.generate.stage import coverage, main, run_generate, to_records

__all__ = [
    "Chain", "ParseError", "PromptSpace", "Repairer", "build_requests", "coverage", "load_prompt_space", "main",
    "parse_exercise", "parse_textbook", "parse_truncated_exercise", "record_seed", "render", "run_generate",
    "sample_specs", "template_env", "to_records",
]
