"""The teacher's ratings: a seeded sample of the curated snippets, each rated for educational value
on a fixed 1-5 scale (template `corpus.template`, phi-1's intent in it), a repeated subset rated again
with another seed for the teacher's agreement with itself.

Every request goes through the one LLM session (request cache and ledger), so a re-run sends
nothing and a killed run re-sends only what was not answered.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from pathlib import Path

import jinja2

from pipeline.core.config import ConfigError, CorpusConfig, ModelPreset
from pipeline.core.records import sha256_text
from pipeline.engines.llm import LLMRequest

SCALE = (1, 5)
_SCORE = re.compile(r"score\W{0,6}([0-9]+)", re.IGNORECASE)
_DIGIT = re.compile(r"(?<![\w.])([0-9])(?!\w|\.\d)")


def parse_score(text: str) -> int | None:
    """The rating in an answer: `Score: N`, else the first lone digit; None if absent or off the scale."""
    m = _SCORE.search(text) or _DIGIT.search(text)
    if not m:
        return None
    value = int(m.group(1))
    return value if SCALE[0] <= value <= SCALE[1] else None


def sample_key(seed: int, rid: str) -> str:
    return sha256_text(f"annotate:{seed}:{rid}")


def take_sample(items, k: int, seed: int) -> list[tuple[str, str]]:
    """The `k` (id, text) pairs of smallest seeded hash, in that order: one pass, k in memory, the same
    sample whatever the input's order or size."""
    heap: list[tuple[str, str, str]] = []  # max-heap by key, via negated comparison on a complement
    for rid, text in items:
        key = sample_key(seed, rid)
        entry = (_complement(key), rid, text)
        if len(heap) < k:
            heapq.heappush(heap, entry)
        elif entry[0] > heap[0][0]:
            heapq.heapreplace(heap, entry)
    return [(rid, text) for _, rid, text in sorted(heap, key=lambda e: e[0], reverse=True)]


def _complement(hexkey: str) -> str:
    """A string that sorts in the reverse order of `hexkey` (heapq is a min-heap)."""
    return hexkey.translate(str.maketrans("0123456789abcdef", "fedcba9876543210"))


def load_template(prompts_dir: Path, name: str) -> jinja2.Template:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(prompts_dir)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=False)
    try:
        return env.get_template(name)
    except jinja2.TemplateNotFound:
        raise ConfigError(f"corpus.template: not found: {prompts_dir / name}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"corpus.template {name}, line {exc.lineno}: {exc.message}") from None


def build_requests(sample: list[tuple[str, str]], cc: CorpusConfig, preset: ModelPreset, template: jinja2.Template,
                   run_seed: int) -> list[LLMRequest]:
    """One request per sampled snippet (`an-<id>`), then the repeats (`an-<id>-again`, another seed)."""
    s = cc.sampling
    out = []
    for i, (rid, text) in enumerate(sample):
        snippet = text if len(text) <= cc.annotate_max_chars else text[:cc.annotate_max_chars] + "\n# ... (cut)"
        try:
            user = template.render(snippet=snippet).strip()
        except jinja2.UndefinedError as exc:
            raise ConfigError(f"corpus.template {cc.template}: {exc.message} (available: ['snippet'])") from None
        for req_id in [f"an-{rid}"] + ([f"an-{rid}-again"] if i < cc.agreement_repeats else []):
            seed = int(sha256_text(f"{run_seed}:{req_id}")[:8], 16) % (2**31)
            params = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens,
                      "stop": list(s.stop), "n": 1, "seed": seed if s.seed else None}
            if preset.api == "chat":
                out.append(LLMRequest(req_id, messages=[{"role": "user", "content": user}], params=params))
            else:
                out.append(LLMRequest(req_id, prompt=f"{user}\n\nScore:", params=params))
    return out


def agreement(pairs: list[tuple[int, int]], positive: int) -> dict:
    """How often the teacher gave the same rating twice: exact, within one point, on the same side of
    `positive`, Cohen's quadratic-weighted kappa of the ratings and Cohen's kappa of the label (both
    chance-corrected: a teacher that says 1 to nearly everything agrees with itself on the label by chance
    alone), and of the pairs rated educational at least once, how many were rated so twice."""
    if not pairs:
        return {"pairs": 0}
    a, b = zip(*pairs, strict=True)
    n = len(pairs)
    la, lb = [int(x >= positive) for x in a], [int(y >= positive) for y in b]
    return {"pairs": n, "exact": round(sum(x == y for x, y in pairs) / n, 4),
            "within_one": round(sum(abs(x - y) <= 1 for x, y in pairs) / n, 4),
            "same_label": round(sum(x == y for x, y in zip(la, lb, strict=True)) / n, 4),
            "kappa_quadratic": _kappa(a, b, list(range(SCALE[0], SCALE[1] + 1)), "quadratic"),
            "kappa_label": _kappa(la, lb, [0, 1], None),
            "positive_once": sum(x or y for x, y in zip(la, lb, strict=True)),
            "positive_twice": sum(x and y for x, y in zip(la, lb, strict=True))}


def _kappa(a, b, labels: list[int], weights: str | None) -> float:
    """Cohen's kappa; 1.0 when both raters gave one same value throughout (kappa is 0/0 there)."""
    from sklearn.metrics import cohen_kappa_score

    if all(x == a[0] for x in (*a, *b)):
        return 1.0
    return round(float(cohen_kappa_score(a, b, labels=labels, weights=weights)), 4)


def split_score(scores: list[int], wanted: int) -> int | None:
    """The rating at or above which a snippet is `educational`: `wanted` when the ratings fall on both sides
    of it, else the cut that splits them most evenly (a small teacher may never give a 4); None when every
    rating is the same."""
    def share(cut: int) -> float:
        return sum(s >= cut for s in scores) / len(scores)

    if 0 < share(wanted) < 1:
        return wanted
    cuts = [c for c in range(SCALE[0] + 1, SCALE[1] + 1) if 0 < share(c) < 1]
    return min(cuts, key=lambda c: (abs(share(c) - 0.5), c)) if cuts else None


def histogram(scores) -> dict[str, int]:
    counts = Counter(scores)
    return {str(v): counts.get(v, 0) for v in range(SCALE[0], SCALE[1] + 1)}
