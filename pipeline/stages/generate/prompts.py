"""The generate stage's prompts: the prompt space (topic x subtopic pairs, audiences, difficulties,
name constraints) read from `generate.prompts_dir`, its seeded sampling, the Jinja2 templates and
the first request of every prompt.

    python -c "from pathlib import Path; from pipeline.stages.generate.prompts import load_prompt_space; print(load_prompt_space(Path('prompts')).size())"
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from pipeline.core.config import ConfigError, GenerateConfig, ModelPreset
from pipeline.core.records import dumps, sha256_text
from pipeline.engines.llm import LLMRequest


@dataclass
class PromptSpace:
    topics: dict[str, list[str]]
    audiences: list[str]
    difficulties: list[str]
    name_constraints: list[str]
    letters: list[str]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(t, s) for t, subs in self.topics.items() for s in subs]

    def size(self) -> int:
        """Distinct exercise prompts the space can produce."""
        return (len(self.pairs) * (len(self.topics) - 1) * len(self.audiences) * len(self.difficulties)
                * len(self.name_constraints) * len(self.letters))


def _nonempty_list(data: dict, key: str, path: Path) -> list:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{path}: '{key}' must be a non-empty list of strings")
    return value


def load_prompt_space(prompts_dir: Path, topics_file: str = "topics.yaml") -> PromptSpace:
    def read(name: str, key: str = "generate.prompts_dir") -> tuple[dict, Path]:
        path = prompts_dir / name
        if not path.is_file():
            raise ConfigError(f"{key}: missing {path}")
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}, path

    topics_data, tpath = read(topics_file, "generate.topics_file")
    topics = topics_data.get("topics")
    if not isinstance(topics, dict) or not topics:
        raise ConfigError(f"{tpath}: 'topics' must be a non-empty mapping of topic -> subtopics")
    for topic, subs in topics.items():
        if not isinstance(subs, list) or not subs:
            raise ConfigError(f"{tpath}: topic '{topic}' has no subtopics")
    if len(topics) < 2:
        raise ConfigError(f"{tpath}: need at least two topics to form topic pairs")
    aud, apath = read("audiences.yaml")
    names, npath = read("names.yaml")
    return PromptSpace(
        topics={str(k): [str(s) for s in v] for k, v in topics.items()},
        audiences=_nonempty_list(aud, "audiences", apath),
        difficulties=_nonempty_list(aud, "difficulties", apath),
        name_constraints=_nonempty_list(names, "name_constraints", npath),
        letters=_nonempty_list(names, "letters", npath),
    )


def sample_specs(space: PromptSpace, n_exercises: int, n_textbooks: int, seed: int) -> list[dict]:
    """Seeded sampling of prompt attributes; a combination already drawn is redrawn (bounded)."""
    rng = random.Random(seed)
    pairs = space.pairs
    specs, seen = [], set()
    for kind, count, prefix in (("exercise", n_exercises, "ex"), ("textbook", n_textbooks, "tb")):
        for i in range(count):
            for _ in range(20):
                topic, subtopic = rng.choice(pairs)
                attrs = {"topic": topic, "subtopic": subtopic, "audience": rng.choice(space.audiences)}
                if kind == "exercise":
                    attrs["second_topic"] = rng.choice([t for t in space.topics if t != topic])
                    attrs["difficulty"] = rng.choice(space.difficulties)
                    attrs["name_constraint"] = rng.choice(space.name_constraints).format(letter=rng.choice(space.letters))
                combo = (kind, dumps(attrs))
                if combo not in seen:
                    break
            seen.add(combo)
            specs.append({"id": f"{prefix}-{i:06d}", "kind": kind, "attributes": attrs})
    return specs


def template_env(prompts_dir: Path) -> jinja2.Environment:
    # StrictUndefined: a template naming a variable we do not provide fails loudly, not as "".
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(prompts_dir)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=False)


def render(env: jinja2.Environment, name: str, variables: dict) -> str:
    try:
        return env.get_template(name).render(**variables).strip()
    except jinja2.TemplateNotFound:
        raise ConfigError(f"template not found: {Path(env.loader.searchpath[0]) / name}") from None
    except jinja2.UndefinedError as exc:
        raise ConfigError(f"template {name}: {exc.message} (available variables: {sorted(variables)})") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"template {name}, line {exc.lineno}: {exc.message}") from None


def record_seed(run_seed: int, record_id: str) -> int:
    return int(sha256_text(f"{run_seed}:{record_id}")[:8], 16) % (2**31)


def build_requests(specs: list[dict], gen: GenerateConfig, preset: ModelPreset, run_seed: int,
                   prompts_dir: Path) -> list[LLMRequest]:
    env = template_env(prompts_dir)
    system = render(env, gen.system_prompt, {})
    s = gen.sampling
    out = []
    for spec in specs:
        template = gen.exercise_template if spec["kind"] == "exercise" else gen.textbook_template
        user = render(env, template, spec["attributes"])
        cap = gen.textbook_max_tokens if spec["kind"] == "textbook" and gen.textbook_max_tokens else s.max_tokens
        params = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": cap,
                  "stop": list(s.stop), "n": s.n, "seed": record_seed(run_seed, spec["id"]) if s.seed else None}
        if preset.api == "chat":
            out.append(LLMRequest(spec["id"], messages=[{"role": "system", "content": system},
                                                        {"role": "user", "content": user}], params=params))
        else:
            out.append(LLMRequest(spec["id"], prompt=f"{system}\n\n{user}\n\n", params=params))
    return out
