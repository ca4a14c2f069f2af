"""Topics step (`textbook topics`): the teacher grows the seed topic tree into a larger one.

phi-1's diversity comes from the topic x subtopic pairs the prompts sample from. This step
asks the teacher, for each (topic, subtopic) of the seed tree (`topics.seed_file`), for
`topics.children` narrower sub-subtopics (template `topics.template` in
`generate.prompts_dir`), one request per pair in a seeded order, until the tree would
reach `topics.target_size` subtopics (0 = every pair). Each answer is parsed as a markdown
list; empty, overlong (> 80 characters) and duplicate items (after lowercasing, collapsing
spaces and dropping punctuation, against every subtopic already in the tree, seeds
included) are dropped and counted. A kept child becomes a subtopic of the same topic,
named "<subtopic>: <child>", so its parent stays visible in the prompts.

Requests go through the one LLM client and the shared request cache: a re-run sends
nothing, a killed run resumes without repeating an answered request, and a local server is
started only when something is not cached (or, with `topics.client.batch`, the requests go
through the OpenAI Batch API). A request that fails for a transport reason after its retries
stops the step: every answer is cached, nothing is written, and one line says what failed
("run again: only the N failed requests are sent"), unless `topics.client.max_failed_fraction`
accepts the loss; then the failed pairs are listed in the output's stats.

Output (`topics.output`): YAML with `version` (sha256 of the tree, 12 hex digits),
`source` (seed file and its sha256, teacher preset and identity, settings, seed), `stats`
and `topics` in the seed file's format (topics in seed order; in each, the seed subtopics
in seed order, then the added ones sorted), so `generate.topics_file` can point at it.
`resolved_config.yaml` is written beside it. Not a DVC stage: run it on demand.

    textbook topics --set topics.children=4 --set topics.target_size=300
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from pathlib import Path

import jinja2
import yaml

from pipeline.core.config import (
    ConfigError,
    ModelPreset,
    RunConfig,
    TopicsConfig,
    configs_dir,
    load_preset,
    to_dict,
)
from pipeline.core.records import atomic_write_text, dumps, sha256_text
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.engines.llm import LLMError, LLMRequest, LLMResult, LLMSession, RequestCache, resolve_api_key
from pipeline.engines.servers import serve

log = logging.getLogger(__name__)

MAX_CHILD_CHARS = 80
_BULLET = re.compile(r"^(?:[-*+\u2022]|\d+[.)])(?:\s+|$)")


# ---------------------------------------------------------------------------------------
# The seed tree
# ---------------------------------------------------------------------------------------


def load_seed_tree(path: Path) -> dict[str, list[str]]:
    """The seed tree `topics: {topic: [subtopic, ...]}`; anything else is a ConfigError naming the file."""
    where = f"topics.seed_file: {path}"
    if not path.is_file():
        raise ConfigError(f"{where} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    topics = data.get("topics") if isinstance(data, dict) else None
    if not isinstance(topics, dict) or not topics:
        raise ConfigError(f"{where}: 'topics' must be a non-empty mapping of topic -> [subtopic, ...]")
    tree: dict[str, list[str]] = {}
    for topic, subs in topics.items():
        if not isinstance(subs, list) or not subs or not all(isinstance(s, str) and s.strip() for s in subs):
            raise ConfigError(f"{where}: topic '{topic}' must have a non-empty list of subtopic strings")
        tree[str(topic)] = [s.strip() for s in subs]
    return tree


# ---------------------------------------------------------------------------------------
# Parsing an answer
# ---------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Dedupe key: lowercase, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.casefold()).split())


def parse_items(text: str) -> list[str]:
    """The items of a markdown list (bullets or numbering stripped; a preamble dropped), or, when
    the answer has no list markers at all, its non-empty lines. Items are cleaned of surrounding
    markup and trailing punctuation; an item may come back empty (the caller counts it invalid)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    marked = [ln for ln in lines if _BULLET.match(ln)]
    items = []
    for ln in marked or lines:
        item, before = _BULLET.sub("", ln, count=1), None
        while item != before:  # e.g. "**word**." or "`word`;"
            before, item = item, item.strip("*_`\"' \t").rstrip(".,;:!?")
        items.append(item)
    return items


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------


def request_seed(run_seed: int, request_id: str) -> int:
    return int(sha256_text(f"{run_seed}:{request_id}")[:8], 16) % (2**31)


def seeded_pairs(tree: dict[str, list[str]], seed: int) -> list[tuple[str, str, str]]:
    """(request id, topic, subtopic) for every seed pair, in an order derived from the run seed."""
    pairs = [(f"tp-{t}-{s}", t, s) for t, subs in tree.items() for s in subs]
    return sorted(pairs, key=lambda p: (sha256_text(f"{seed}:{p[0]}"), p[0]))


def pairs_to_expand(n_pairs: int, n_seed: int, tp: TopicsConfig) -> int:
    """How many pairs to ask about so the tree would reach target_size (0 = all)."""
    if not tp.target_size:
        return n_pairs
    return max(0, min(n_pairs, math.ceil((tp.target_size - n_seed) / tp.children)))


def build_requests(pairs: list[tuple[str, str, str]], tp: TopicsConfig, preset: ModelPreset, run_seed: int,
                   prompts_dir: Path) -> list[LLMRequest]:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(prompts_dir)), undefined=jinja2.StrictUndefined)
    try:
        template = env.get_template(tp.template)
    except jinja2.TemplateNotFound:
        raise ConfigError(f"topics.template: not found: {prompts_dir / tp.template}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"topics.template {tp.template}, line {exc.lineno}: {exc.message}") from None
    s = tp.sampling
    out = []
    for rid, topic, subtopic in pairs:
        variables = {"topic": topic, "subtopic": subtopic, "children": tp.children}
        try:
            user = template.render(**variables).strip()
        except jinja2.UndefinedError as exc:
            raise ConfigError(f"topics.template {tp.template}: {exc.message} (available: {sorted(variables)})") from None
        params = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "stop": list(s.stop),
                  "n": 1, "seed": request_seed(run_seed, rid) if s.seed else None}
        if preset.api == "chat":
            out.append(LLMRequest(rid, messages=[{"role": "user", "content": user}], params=params))
        else:
            out.append(LLMRequest(rid, prompt=f"{user}\n\n", params=params))
    return out


# ---------------------------------------------------------------------------------------
# Growing the tree
# ---------------------------------------------------------------------------------------


def grow(tree: dict[str, list[str]], pairs: list[tuple[str, str, str]], results: dict[str, LLMResult],
         tp: TopicsConfig) -> tuple[dict[str, list[str]], dict]:
    """The grown tree and its counts; answers are taken in the seeded order of `pairs`, so which
    of two duplicate children is kept does not depend on which answer came back first."""
    n_seed = sum(len(subs) for subs in tree.values())
    seen = {normalise(s) for subs in tree.values() for s in subs}
    added: dict[str, list[str]] = {t: [] for t in tree}
    counts = {"dropped_duplicates": 0, "dropped_invalid": 0, "dropped_over_limit": 0}
    failed, not_attempted = [], 0
    total = n_seed
    for rid, topic, subtopic in pairs:
        result = results.get(rid)
        if result is None:
            not_attempted += 1
            continue
        if not result.ok:
            failed.append({"id": rid, "topic": topic, "subtopic": subtopic, "error": result.error,
                           "message": (result.error_message or "")[:200]})
            continue
        choice = result.choices[0]
        items = parse_items(choice["text"])
        if choice["finish_reason"] != "stop" and items:
            items.pop()  # cut at max_tokens: the last item may be cut too
            counts["dropped_invalid"] += 1
        kept = 0
        for item in items:
            name = f"{subtopic}: {item}"
            if not normalise(item) or len(item) > MAX_CHILD_CHARS:  # nothing but punctuation, or a sentence
                counts["dropped_invalid"] += 1
            elif normalise(item) in seen or normalise(name) in seen:
                counts["dropped_duplicates"] += 1
            elif kept >= tp.children or (tp.target_size and total >= tp.target_size):
                counts["dropped_over_limit"] += 1
            else:
                seen.add(normalise(name))
                added[topic].append(name)
                kept += 1
                total += 1
    grown = {t: list(subs) + sorted(added[t], key=lambda s: (s.casefold(), s)) for t, subs in tree.items()}
    stats = {"seed_subtopics": n_seed, "added": total - n_seed, "subtopics": total, **counts,
             "requests": len(pairs), "not_attempted": not_attempted,
             "failed_requests": len(failed), "failed": failed}
    return grown, stats


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


def run_topics(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The step's core: grows the tree, writes `topics.output`, returns its stats."""
    tp = cfg.topics
    root = configs_dir(config_path)
    base = config_path.resolve().parent
    preset = load_preset(tp.teacher, root)
    seed_path = _resolve(tp.seed_file, base)
    tree = load_seed_tree(seed_path)
    prompts_dir = _resolve(cfg.generate.prompts_dir, base)
    n_seed = sum(len(subs) for subs in tree.values())
    ordered = seeded_pairs(tree, cfg.seed)
    pairs = ordered[:pairs_to_expand(len(ordered), n_seed, tp)]
    requests = build_requests(pairs, tp, preset, cfg.seed, prompts_dir)
    resolve_api_key(preset)  # a missing key fails here, before any work
    out_path = _resolve(tp.output, base)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    cache = RequestCache(tp.cache_path)
    try:  # a fully cached run starts no server and sends nothing
        with LLMSession(preset, tp.client, cache, serve=lambda: serve(preset, Path("logs")), progress=progress,
                        desc="topics", seed=cfg.seed) as session:
            outcome = session.complete(requests)
    finally:
        cache.close()
    # Transport failures: nothing is written and the step fails with one line, unless the loss is accepted.
    session.raise_if_failed(lost=len(outcome.failed), total=len(requests))
    results: dict[str, LLMResult] = {**outcome.results, **outcome.failed}
    ledger, budget_hit = session.ledger_dict(), outcome.budget_hit

    grown, stats = grow(tree, pairs, results, tp)
    stats["stopped_by_budget"] = budget_hit
    stats["failed_by_error"] = session.failure_stats()["failed_by_error"]
    template_path = prompts_dir / tp.template
    doc = {
        "version": sha256_text(dumps(grown))[:12],
        "source": {
            "seed_file": tp.seed_file,
            "seed_sha256": hashlib.sha256(seed_path.read_bytes()).hexdigest(),
            "template": tp.template,
            "template_sha256": hashlib.sha256(template_path.read_bytes()).hexdigest(),
            "teacher": {"preset": preset.name, "identity": preset.identity()},
            "sampling": {**to_dict(tp.sampling), "n": 1},  # one answer per pair is asked for
            "children": tp.children,
            "target_size": tp.target_size,
            "seed": cfg.seed,
        },
        "stats": stats,
        "topics": grown,
    }
    header = ("# Grown by `textbook topics` from the seed tree named under source; do not edit by hand.\n"
              "# Point generate.topics_file at this file to sample prompts from it.\n")
    atomic_write_text(out_path, header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000))
    write_resolved_config(cfg, root, "topics", out_path.parent)
    if stats["failed_requests"]:
        log.warning("%s; accepted by topics.client.max_failed_fraction=%s", session.failure_line(),
                    tp.client.max_failed_fraction)
    if budget_hit:
        log.warning("budget of $%s reached: %d request(s) not sent", tp.client.budget_usd, stats["not_attempted"])
    return {"output": str(out_path), "version": doc["version"], **stats, "ledger_this_run": ledger,
            "wall_s": round(time.monotonic() - t0, 2)}


def main(args) -> int:
    # Transport failures past max_failed_fraction, or an answer no retry can fix: one line, exit status 1.
    return stage_cli(run_topics, args, lambda stats: {k: stats[k] for k in (
        "output", "version", "subtopics", "added", "dropped_duplicates", "dropped_invalid", "failed_requests",
        "not_attempted")}, {LLMError: ("topics failed", 1)})
