"""Dedupe stage: exact and MinHash-LSH near-duplicate removal, exercises and textbooks apart.

Exact duplicates share a normal form: for an exercise, the AST dump of its code (prompt +
solution), blind to whitespace, comments, quoting and redundant parentheses but not to the
docstring's wording; for a textbook section, its text with whitespace collapsed.

Near duplicates are found with MinHash LSH over code-aware shingles: ``shingle_size``
consecutive tokens of a regex tokeniser that keeps identifiers, operators and literals
as they are (nothing lowercased, no punctuation stripped, no numbers zeroed: in code these
carry the meaning). Bands and rows are the fewest-false-positive choice that makes a pair at
the threshold a candidate with probability ``dedupe.candidate_recall`` (0.99); rows of
crowded buckets (boilerplate) are also paired by the signature values they share with few
others. Every candidate pair is confirmed by the true Jaccard of the two shingle sets; in id
order, a record confirmed against a lower kept record is removed as its duplicate, so every
removal is at or above the threshold with the record kept in its place.
Not datasketch: our numpy batches are 1.9x faster than MinHash.bulk, 23x than MinHashLSH (bench/dedupe.py --compare-datasketch).

Fast and lean at phi-1's scale (~1M exercises): blocks of the input are indexed in worker
processes (JSON, tokens, a cheap screen key, then MinHash and band hashes in numpy over
whole batches); only ids, byte offsets, 16-byte keys and band hashes stay in memory. Parsing
is most of the cost, so only exercises sharing a screen key (which AST-equal code always
shares) are parsed. Candidate buckets come from sorting band hashes, never from comparing
all pairs; candidates' shingle sets are recomputed from the input for confirmation,
CONFIRM_PAIRS pairs at a time so memory does not grow with the candidates, and kept records
are copied from it. What stays is ~170 bytes a record (128 of them the 16 band hashes; then
key, offset, id, length, shingle count), ~1.7 GB at 10M records. Workers are spawned: call `run_dedupe` from a script only
under ``if __name__ == "__main__":``.

Outputs (in ``dedupe.output_dir``): exercises.jsonl and textbooks.jsonl (kept, sorted by
id), removed.jsonl (each removed record with ``duplicate_of``, ``kind_of_duplicate``:
exact|near, and ``jaccard`` to the kept record), stats.json, resolved_config.yaml. The same
input and seed give byte-identical outputs, except stats.json's ``timing``.

    textbook dedupe --set dedupe.threshold=0.85
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import heapq
import inspect
import itertools
import json
import logging
import multiprocessing
import os
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import DedupeConfig, RunConfig, configs_dir
from pipeline.core.records import RecordError, atomic_writer, dumps, parse_record_line, write_json
from pipeline.core.schema import RECORD_FIELDS, require_parsed
from pipeline.core.stage import write_resolved_config

log = logging.getLogger(__name__)

KINDS = ("exercise", "textbook")
INPUT_FILES = {"exercise": "exercises.jsonl", "textbook": "textbooks.jsonl"}
REMOVED_FILE = "removed.jsonl"

BLOCK_BYTES = 4 << 20  # input bytes per worker task: big enough to amortise a task, small for memory
BATCH_DOCS = 256  # documents per numpy batch (token hashing, shingles, MinHash)
CONFIRM_PAIRS = 100_000  # candidate pairs confirmed per step: at most twice as many shingle sets held
MINHASH_ROWS = 4096  # shingles x permutations per MinHash step: ~2 MB of uint32, fits in L2
ALL_PAIRS_BUCKET = 16  # LSH buckets up to this size yield all pairs; bigger ones a star and a chain
SPANS_PER_TASK = 2048  # records per task of pass 2 (AST keys, shingle sets of candidates)

_U64 = np.uint64
_MIX1, _MIX2 = _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)  # splitmix64's finaliser
_BYTE_BASE = 0x100000001B3  # odd (FNV-1a's prime): invertible mod 2**64, so prefix sums give substring hashes
_SHINGLE_BASE = _U64(0x9E3779B97F4A7C15)  # odd: combines a shingle's token hashes
_LEN_SALT = _U64(0xD6E8FEB86659FD93)

# Python source: whitespace and comments match outside the one capture group, so findall yields ''
# for them (dropped later, in numpy); every other match is one token, kept verbatim.
_CODE_TOKEN = re.compile(
    r"""\s+|\#[^\n]*
    |(
      (?:[rRbBuUfF]{1,2}(?=["']))?(?:"{3}[\s\S]*?"{3}|'{3}[\s\S]*?'{3}|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
     |\d(?:[eE][-+]?\d|[\w.])*|\.\d(?:[eE][-+]?\d|[\w.])*
     |\w+
     |\*\*=?|//=?|>>=?|<<=?|->|:=|\.\.\.|[-+*/%@&|^=<>!]=
     |\S
    )""",
    re.VERBOSE,
)
# Textbook sections are prose with code: a '#' starts a markdown heading, an apostrophe is no
# string quote, so words and single punctuation marks, case kept.
_TEXT_TOKEN = re.compile(r"\w+|[^\w\s]")


# ---------------------------------------------------------------------------------------
# What is compared: the text of a record, its exact normal form, its tokens
# ---------------------------------------------------------------------------------------


def record_text(kind: str, parsed: dict) -> str:
    """The part of a record that duplicates are judged on: an exercise's code, a section's text."""
    if kind == "exercise":
        return parsed["prompt"] + "\n" + parsed["solution"]
    return parsed["text"]


def normal_form(kind: str, text: str) -> tuple[str, bool]:
    """(the exact-duplicate normal form, whether it is an AST dump).

    Code that does not parse falls back to its token stream, which is still blind to
    whitespace and comments."""
    if kind == "textbook":
        return " ".join(text.split()), True
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "tokens:" + "\x00".join(tokenize(kind, text)), False
    _clean_docstrings(tree)
    return ast.dump(tree), True


_DEFS = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _clean_docstrings(node: ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
    """Docstrings as inspect.cleandoc leaves them: their indentation is layout, not wording.

    Only definitions are visited (not every node): a full ast.walk would cost as much as the parse."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body[0].value.value = inspect.cleandoc(body[0].value.value)
    for child in body:
        if isinstance(child, _DEFS):
            _clean_docstrings(child)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def exact_key(kind: str, text: str) -> tuple[bytes, bool]:
    """(16-byte hash of the normal form, whether the code parsed)."""
    form, parsed = normal_form(kind, text)
    return _digest(form), parsed


# Tokens that AST-equal code may have or lack: parentheses, commas, colons, semicolons, continuations.
_LAYOUT = frozenset(["(", ")", ",", ";", ":", "\\"])
_STRING, _NUMBER = "\x01", "\x02"


def screen_key(kind: str, tokens: list[str], text: str) -> bytes:
    """A key that AST-equal code always shares, ~15x cheaper than the AST: exercises whose screen
    key is unique cannot have an exact duplicate, so only the others are parsed.

    From the tokens, drop layout tokens, turn every string literal (any quoting, prefix,
    implicit concatenation, docstring indentation) and number (0x10, 16, 1_6) into one mark,
    spell `elif` as `else if`, and NFKC-normalise identifiers as the parser does. Different
    code may share a screen key (the AST then tells); AST-equal code cannot differ in it."""
    if kind == "textbook":
        return exact_key(kind, text)[0]
    out: list[str] = []
    for t in tokens:
        if not t or t in _LAYOUT:
            continue
        head = t[0]
        if head in "\"'" or t[-1] in "\"'":  # a string literal (only they end with a quote)
            if out and out[-1] == _STRING:
                continue
            t = _STRING
        elif head.isdigit() or (head == "." and len(t) > 1):
            t = _NUMBER
        elif t == "elif":
            out.append("else")
            t = "if"
        out.append(t)
    skeleton = "\x00".join(out)
    if not skeleton.isascii():
        skeleton = unicodedata.normalize("NFKC", skeleton)
    return _digest("screen:" + skeleton)


def _raw_tokens(kind: str, text: str) -> list[str]:
    """Tokens, with '' for skipped whitespace and comments; NUL is the batch separator below."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return (_CODE_TOKEN if kind == "exercise" else _TEXT_TOKEN).findall(text)


def tokenize(kind: str, text: str) -> list[str]:
    """Code-aware tokens: identifiers, keywords, operators and literals verbatim."""
    return [t for t in _raw_tokens(kind, text) if t]


# ---------------------------------------------------------------------------------------
# Hashing in numpy: tokens -> shingles -> MinHash signatures -> LSH band hashes
# ---------------------------------------------------------------------------------------


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: every input bit reaches every output bit."""
    z ^= z >> _U64(30)
    z *= _MIX1
    z ^= z >> _U64(27)
    z *= _MIX2
    z ^= z >> _U64(31)
    return z


_powers: list[np.ndarray] = []


def _byte_powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**j and BASE**-j mod 2**64 for j < n (numpy's uint64 products wrap mod 2**64)."""
    if not _powers or len(_powers[0]) < n:
        size = 1 << max(16, (n - 1).bit_length())
        _powers[:] = [np.concatenate(([_U64(1)], np.cumprod(np.full(size - 1, base, _U64))))
                      for base in (_BYTE_BASE, pow(_BYTE_BASE, -1, 1 << 64))]
    return _powers[0], _powers[1]


def _token_hashes(tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(a stable 64-bit hash per token, not Python's salted hash(); token lengths), all at once.

    The tokens are joined with NUL; a polynomial hash of each token's UTF-8 bytes is the
    difference of two prefix sums, rescaled by an inverse power of the (odd) base."""
    if not tokens:
        return np.empty(0, _U64), np.empty(0, np.int64)
    buf = np.frombuffer(("\x00".join(tokens) + "\x00").encode("utf-8", "surrogatepass"), np.uint8)
    ends = np.flatnonzero(buf == 0)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    power, inverse = _byte_powers(len(buf))
    prefix = np.zeros(len(buf) + 1, _U64)
    np.cumsum(buf * power[: len(buf)], out=prefix[1:])
    lengths = ends - starts
    h = (prefix[ends] - prefix[starts]) * inverse[starts]
    h ^= lengths.astype(_U64) * _LEN_SALT
    return _mix64(h), lengths


def shingle_hashes(docs: list[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hashes of every k-token shingle of every document, in order; shingles per document).

    Tokens may include '' (skipped input), which is dropped here. A document with fewer
    than k tokens has one shingle of all its tokens; one with none has no shingles."""
    n = len(docs)
    th, lengths = _token_hashes(list(itertools.chain.from_iterable(docs)))
    owner = np.repeat(np.arange(n), [len(d) for d in docs])[lengths > 0]
    th = th[lengths > 0]
    counts = np.bincount(owner, minlength=n)
    total = len(th)
    if total == 0:
        return np.empty(0, _U64), np.zeros(n, np.int64)
    end = np.cumsum(counts)[owner]  # where each token's document ends
    pos = np.arange(total)
    acc = th.copy()
    for j in range(1, k):
        nxt = np.zeros(total, _U64)
        inside = pos[: total - j] + j < end[: total - j]
        nxt[: total - j] = np.where(inside, th[j:], _U64(0))
        acc *= _SHINGLE_BASE
        acc += nxt
    keep = (pos + k <= end) | (pos == end - counts[owner])  # full shingles, or a short document's only one
    return _mix64(acc[keep]), np.bincount(owner[keep], minlength=n)


def shingle_set(kind: str, text: str, k: int) -> np.ndarray:
    """The sorted set of a text's shingle hashes (what the true Jaccard is computed on)."""
    hashes, _ = shingle_hashes([_raw_tokens(kind, text)], k)
    return np.unique(hashes)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """True Jaccard similarity of two sorted sets of hashes."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _seeded_words(seed: int, label: str, n: int) -> np.ndarray:
    """n uint32 words from (seed, label): stable across numpy versions, unlike a Generator stream."""
    digest = b"".join(hashlib.blake2b(f"{seed}:{label}:{i}".encode(), digest_size=4).digest() for i in range(n))
    return np.frombuffer(digest, "<u4").astype(np.uint32)


class MinHasher:
    """num_perm hash permutations x -> a*x + b mod 2**32 (a odd: a bijection of 32-bit words),
    applied with numpy to all shingles of a batch of documents at once.

    Why not a*x+b mod a prime: native wrap-around is ~6x faster in numpy, and with inputs that
    are already well-mixed hashes the estimates match the binomial error of ideal MinHash."""

    def __init__(self, num_perm: int, seed: int) -> None:
        self.num_perm = num_perm
        self.a = _seeded_words(seed, "minhash-a", num_perm) | np.uint32(1)
        self.b = _seeded_words(seed, "minhash-b", num_perm)

    def signatures(self, hashes: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(documents, num_perm) uint32 minimums; a document without shingles gets all 2**32-1."""
        sig = np.full((len(counts), self.num_perm), np.iinfo(np.uint32).max, np.uint32)
        docs = np.flatnonzero(counts)
        if len(docs) == 0:
            return sig
        x = (hashes >> _U64(32)).astype(np.uint32)
        offsets = np.concatenate(([0], np.cumsum(counts[docs])))
        i = 0
        while i < len(docs):  # steps of whole documents, ~MINHASH_ROWS shingles each
            j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + MINHASH_ROWS, "right")) - 1)
            lo, hi = offsets[i], offsets[j]
            h = x[lo:hi, None] * self.a
            h += self.b
            sig[docs[i:j]] = np.minimum.reduceat(h, offsets[i:j] - lo, axis=0)
            i = j
        return sig


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


def optimal_bands(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
                  false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false positive and
    false negative areas of the S-curve 1-(1-s^r)^b, as datasketch's ``_optimal_param``
    (same search order, so ties resolve alike), integrated with composite Gauss-Legendre."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], float)
    b, r = pairs[:, :1], pairs[:, 1:]
    nodes, weights = np.polynomial.legendre.leggauss(8)

    def area(lo: float, hi: float) -> np.ndarray:
        """Integral of the probability of becoming candidates over [lo, hi], for every (b, r)."""
        if hi <= lo:
            return np.zeros(len(pairs))
        edges = np.linspace(lo, hi, 65)
        half = (edges[1:] - edges[:-1])[:, None] / 2
        s = ((edges[:-1] + edges[1:])[:, None] / 2 + half * nodes).ravel()
        w = (half * weights).ravel()
        return (1 - (1 - s**r) ** b) @ w

    fp = area(0.0, threshold)
    fn = (1.0 - threshold) - area(threshold, 1.0)
    best = int(np.argmin(fp * false_positive_weight + fn * false_negative_weight))
    return int(pairs[best, 0]), int(pairs[best, 1])


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """P(two records at Jaccard s share a bucket in at least one band): the LSH S-curve."""
    return 1.0 - (1.0 - s**rows) ** bands


def lsh_params(threshold: float, num_perm: int, candidate_recall: float) -> tuple[int, int]:
    """(bands, rows): with candidate_recall 0, datasketch's balanced choice (optimal_bands); else,
    among bands*rows <= num_perm whose S-curve at the threshold reaches candidate_recall, the one
    with the least false-positive area below the threshold (fewest candidates to confirm).

    Why: the balanced choice puts the S-curve's midpoint at the threshold, so a pair at exactly
    0.8 became a candidate 40% of the time (9 bands of 13 rows); every candidate is confirmed by
    true Jaccard, so a lower curve costs only confirmation time, never precision."""
    if candidate_recall <= 0:
        return optimal_bands(threshold, num_perm)
    best: tuple[float, int, int] | None = None
    s = np.linspace(0.0, threshold, 257)
    for rows in range(1, num_perm + 1):
        for bands in range(1, num_perm // rows + 1):
            if candidate_probability(threshold, bands, rows) >= candidate_recall:
                fp = float(np.trapezoid(1.0 - (1.0 - s**rows) ** bands, s))
                if best is None or fp < best[0]:
                    best = (fp, bands, rows)
                break  # more bands only add false positives
    if best is None:
        raise ValueError(f"dedupe.candidate_recall: no bands x rows <= {num_perm} (dedupe.num_perm) reaches "
                         f"P(candidate) {candidate_recall} at threshold {threshold}")
    return best[1], best[2]


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) uint64: one hash of each band's `rows` signature values."""
    s = sig[:, : bands * rows].reshape(len(sig), bands, rows).astype(_U64)
    acc = np.zeros((len(sig), bands), _U64)
    for j in range(rows):
        acc *= _SHINGLE_BASE
        acc += s[:, :, j]
    return _mix64(acc)


def lsh_candidates(bh: np.ndarray, all_pairs_bucket: int = ALL_PAIRS_BUCKET,
                   rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(unique (i, j), i < j, of rows sharing a bucket in at least one band; the rows that are in a
    crowded bucket, bigger than `all_pairs_bucket`, in some band), by sorting band hashes.
    With `rows`, only bh[rows] takes part (i and j then index `rows`), copied one band at a time.

    A bucket of up to `all_pairs_bucket` rows gives all its pairs; a bigger one (boilerplate)
    gives each row paired with the bucket's lowest row and with its neighbour, so a bucket
    costs O(size) and clusters still connect. Near pairs inside a crowded bucket that are not
    neighbours are found by `residual_pairs` on the crowded rows' signatures."""
    n = len(bh) if rows is None else len(rows)
    crowded = np.zeros(n, bool)
    if n < 2:
        return np.empty((0, 2), np.int64), crowded
    found = []
    pos = np.arange(n)
    for band in range(bh.shape[1]):
        column = bh[:, band] if rows is None else bh[rows, band]
        order = np.argsort(column, kind="stable")  # stable: rows ascend within a bucket
        values = column[order]
        del column
        new = np.ones(n, bool)
        new[1:] = values[1:] != values[:-1]
        starts = np.flatnonzero(new)
        run = np.cumsum(new) - 1
        first = starts[run]
        size = np.diff(np.append(starts, n))[run]
        if size.max() < 2:
            continue
        small = size <= all_pairs_bucket
        crowded[order[~small]] = True
        member = (size > 1) & (pos != first)
        found.append(np.stack([order[first[member]], order[member]], 1))  # the star
        end = first + size
        for d in range(1, min(all_pairs_bucket, int(size.max()))):  # pairs d apart in a bucket
            p = pos[: n - d]
            ok = member[: n - d] & (p + d < end[: n - d]) & (small[: n - d] | (d == 1))
            found.append(np.stack([order[p[ok]], order[p[ok] + d]], 1))
    return _unique_pairs(found, n), crowded


def candidate_pairs(bh: np.ndarray, all_pairs_bucket: int = ALL_PAIRS_BUCKET) -> np.ndarray:
    """Unique (i, j), i < j, of rows sharing a bucket in at least one band (lsh_candidates' pairs)."""
    return lsh_candidates(bh, all_pairs_bucket)[0]


def residual_pairs(sig: np.ndarray, all_pairs_bucket: int = ALL_PAIRS_BUCKET) -> np.ndarray:
    """Unique (i, j), i < j, of rows whose signatures share a value at some position that at most
    `all_pairs_bucket` rows share: LSH with one row per band, for the rows of crowded buckets.

    Why: members of a crowded bucket agree on the boilerplate's minima, so a band rarely tells
    two near copies apart from the rest (their bands fall into the crowded bucket), and the
    star and chain only pair neighbours. But where a signature value comes from a record's own
    code, few records share it: two near copies at Jaccard 0.8 share such a value at several of
    the positions, unrelated members almost never. Values shared by more rows are boilerplate
    (or common code) and give nothing here."""
    n, positions = sig.shape
    found = []
    for p in range(positions):
        order = np.argsort(sig[:, p], kind="stable")
        values = sig[order, p]
        new = np.ones(n, bool)
        new[1:] = values[1:] != values[:-1]
        starts = np.flatnonzero(new)
        run = np.cumsum(new) - 1
        size = np.diff(np.append(starts, n))[run]
        end = starts[run] + size
        keep = (size > 1) & (size <= all_pairs_bucket)
        idx = np.arange(n)
        for d in range(1, min(all_pairs_bucket, int(size[keep].max()) if keep.any() else 1)):
            i = idx[: n - d]
            ok = keep[: n - d] & (i + d < end[: n - d])
            found.append(np.stack([order[i[ok]], order[i[ok] + d]], 1))
    return _unique_pairs(found, n)


def _unique_pairs(found: list[np.ndarray], n: int) -> np.ndarray:
    """The pairs in `found` as unique (low, high) rows, sorted."""
    if not found:
        return np.empty((0, 2), np.int64)
    both = np.concatenate(found).astype(np.int64)
    codes = np.unique(np.minimum(both[:, 0], both[:, 1]) * n + np.maximum(both[:, 0], both[:, 1]))
    return np.stack([codes // n, codes % n], 1)


# ---------------------------------------------------------------------------------------
# Reading and indexing the input, in worker processes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    kind: str
    exact: bool
    near: bool
    shingle_size: int
    bands: int
    rows: int
    hasher: MinHasher


@dataclass
class _BlockTask:
    path: Path
    offset: int
    length: int
    lineno: int  # of the block's first line
    params: _Params


@dataclass
class _Index:
    """What pass 1 learned about one input file: one entry per record, in id order once merged."""

    ids: np.ndarray  # record ids, UTF-8 ("S"): ~10 bytes a record where a list of str costs ~70
    offsets: np.ndarray  # byte offset of the record's line
    lengths: np.ndarray  # line length, newline excluded
    keys: np.ndarray  # 16-byte screen keys ("S16"), exact keys once _decide has refined them
    counts: np.ndarray  # shingles (0: not part of near dedupe)
    bands: np.ndarray  # (records, bands) uint64 LSH band hashes
    canonical: np.ndarray  # the line is already dumps(record)

    def id(self, row: int) -> str:
        return self.ids[row].decode("utf-8", "surrogatepass")

    @classmethod
    def merge(cls, blocks: list[_Index], n_bands: int) -> _Index:
        """The blocks' entries concatenated and sorted by id (the order of outputs and survivors).

        UTF-8 bytes sort as their code points, so the byte order is str's order. Blocks are
        emptied as they are copied, and input already in id order (the usual case) is not
        permuted: the band matrix, the biggest column, is never held twice."""
        n = sum(len(b.ids) for b in blocks)
        width = max((b.ids.dtype.itemsize for b in blocks), default=1)
        out = cls(np.empty(n, f"S{width}"), np.empty(n, np.int64), np.empty(n, np.int32), np.empty(n, "S16"),
                  np.empty(n, np.int32), np.empty((n, n_bands), _U64), np.empty(n, bool))
        names = ("ids", "offsets", "lengths", "keys", "counts", "bands", "canonical")
        lo = 0
        while blocks:
            block = blocks.pop(0)
            for name in names:
                getattr(out, name)[lo: lo + len(block.ids)] = getattr(block, name)
            lo += len(block.ids)
        if n > 1 and not (out.ids[1:] >= out.ids[:-1]).all():
            order = np.argsort(out.ids, kind="stable")
            for name in names:
                column = getattr(out, name)
                if column.ndim == 1:
                    setattr(out, name, column[order])
                else:  # band by band: one column's copy at a time
                    for band in range(column.shape[1]):
                        column[:, band] = column[order, band]
        return out


def _parse_line(raw: bytes, path: Path, lineno: int, kind: str) -> tuple[dict, str]:
    """A record and its line as text; errors name the file, line and record id."""
    rec = parse_record_line(raw, path, lineno, RECORD_FIELDS)
    line = raw.decode("utf-8")
    rid = rec["id"]
    if not isinstance(rid, str):
        raise RecordError(f"{path}:{lineno}: record id must be a string, got {rid!r}")
    require_parsed(rec, f"{path}:{lineno}", kind)
    return rec, line


def _iter_lines(path: Path, offset: int, length: int) -> Iterator[tuple[int, bytes]]:
    """(absolute offset, line without newline) for every line of a block of a file."""
    with path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    lines = data.split(b"\n")
    if lines[-1] == b"":  # what follows the last newline
        lines.pop()
    pos = offset
    for raw in lines:
        yield pos, raw
        pos += len(raw) + 1


def _near_columns(tokens: list[list[str]], p: _Params) -> tuple[np.ndarray, np.ndarray]:
    """(shingle counts, band hashes) of tokenised documents, in numpy batches of BATCH_DOCS."""
    counts = np.zeros(len(tokens), np.int64)
    bands = np.zeros((len(tokens), p.bands), _U64)
    if not p.near:
        return counts, bands
    for lo in range(0, len(tokens), BATCH_DOCS):
        hashes, c = shingle_hashes(tokens[lo: lo + BATCH_DOCS], p.shingle_size)
        counts[lo: lo + len(c)] = c
        bands[lo: lo + len(c)] = band_hashes(p.hasher.signatures(hashes, c), p.bands, p.rows)
    return counts, bands


def _index_block(task: _BlockTask) -> _Index:
    """Pass 1 over one block: validate, screen key, shingle count and band hashes of each record."""
    p = task.params
    ids, offsets, lengths, keys, canonical, tokens = [], [], [], [], [], []
    for lineno, (offset, raw) in enumerate(_iter_lines(task.path, task.offset, task.length), task.lineno):
        if not raw.strip():
            continue
        rec, line = _parse_line(raw, task.path, lineno, p.kind)
        text = record_text(p.kind, rec["parsed"])
        toks = _raw_tokens(p.kind, text)
        if p.exact:
            keys.append(screen_key(p.kind, toks, text))
        ids.append(rec["id"])
        offsets.append(offset)
        lengths.append(len(raw))
        canonical.append(dumps(rec) == line)
        tokens.append(toks)
    counts, bands = _near_columns(tokens, p)
    key_col = np.frombuffer(b"".join(keys), "S16") if p.exact else np.zeros(len(ids), "S16")
    id_col = np.array([i.encode("utf-8", "surrogatepass") for i in ids], "S") if ids else np.empty(0, "S1")
    return _Index(id_col, np.array(offsets, np.int64), np.array(lengths, np.int64), key_col, counts, bands,
                  np.array(canonical, bool))


def _split_blocks(path: Path, size: int) -> Iterator[tuple[int, int, int]]:
    """(offset, length, first line number) of newline-aligned blocks of about `size` bytes."""
    offset, lineno, pending = 0, 1, b""
    with path.open("rb") as fh:
        while True:
            data = fh.read(size)
            buf = pending + data
            cut = len(buf) if not data else buf.rfind(b"\n") + 1
            if cut:
                yield offset, cut, lineno
                lineno += buf.count(b"\n", 0, cut)
                offset += cut
            pending = buf[cut:]
            if not data:
                return


def _recompute_task(task: tuple[str, str, Path, int, list[tuple[int, int]], MinHasher | None]) -> list:
    """For the records at (offset, length) spans, in order: their exact keys (what="exact", as
    (key, parsed) pairs), their sorted shingle sets (what="shingles") or their MinHash
    signatures (what="signatures", the hasher's, as in pass 1)."""
    what, kind, path, k, spans, hasher = task
    texts = []
    with path.open("rb") as fh:
        for offset, length in spans:
            fh.seek(offset)
            texts.append(record_text(kind, json.loads(fh.read(length))["parsed"]))
    if what == "exact":
        return [exact_key(kind, t) for t in texts]
    out = []
    for lo in range(0, len(texts), BATCH_DOCS):
        hashes, counts = shingle_hashes([_raw_tokens(kind, t) for t in texts[lo: lo + BATCH_DOCS]], k)
        if what == "signatures":
            out.extend(hasher.signatures(hashes, counts))
        else:
            out.extend(np.unique(h) for h in np.split(hashes, np.cumsum(counts)[:-1]))
    return out


class _Workers:
    """Maps tasks in order over a process pool, or in this process when there is one task or core."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: multiprocessing.pool.Pool | None = None

    def imap(self, fn: Callable, tasks: list) -> Iterator:
        if self.workers <= 1 or len(tasks) <= 1:
            return map(fn, tasks)
        if self._pool is None:
            # spawn: workers start clean (no inherited threads or locks), the same on every OS.
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self._pool.imap(fn, tasks)

    @property
    def used(self) -> int:
        """Processes that did the work: the pool's, or this one."""
        return self.workers if self._pool is not None else 1

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        if self._pool is None:
            return
        if exc_type is None:
            self._pool.close()
        else:  # a bad record: do not let the queued blocks run on
            self._pool.terminate()
        self._pool.join()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------
# Deciding: exact groups, LSH candidates, confirmation, survivors
# ---------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    survivor: np.ndarray  # row of the record each row's cluster keeps (itself if kept)
    exact: np.ndarray  # bool per row: removed as an exact duplicate of its survivor
    jaccard: dict[int, float]  # removed near-duplicate row -> true Jaccard with its survivor
    stats: dict


def _survivors(n: int, pairs: np.ndarray) -> np.ndarray:
    """Each row's survivor over the confirmed edges `pairs` (i < j): in id order, a row with a
    confirmed edge to a lower row that is kept is removed as that row's duplicate (the lowest
    such), else kept.

    Why not union-find's components: a chain A~B~C joins C to A although A and C may be under
    the threshold; here every removed row is at or above the threshold with the record kept in
    its place, so every removal is confirmed."""
    survivor = np.arange(n)
    if len(pairs) == 0:
        return survivor
    by_high = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]  # by j, then i: a row's lower rows are decided
    kept = survivor.tolist()
    for i, j in by_high.tolist():
        if kept[j] == j and kept[i] == i:
            kept[j] = i
    return np.array(kept)


def _recompute(what: str, kind: str, path: Path, index: _Index, rows: np.ndarray, k: int,
               workers: _Workers, hasher: MinHasher | None = None) -> list:
    """_recompute_task's results for `rows`, re-read from the input by the workers."""
    spans = [(int(index.offsets[r]), int(index.lengths[r])) for r in rows.tolist()]
    tasks = [(what, kind, path, k, spans[i: i + SPANS_PER_TASK], hasher)
             for i in range(0, len(spans), SPANS_PER_TASK)]
    return list(itertools.chain.from_iterable(workers.imap(_recompute_task, tasks)))


def _exact_groups(kind: str, path: Path, index: _Index, workers: _Workers) -> tuple[np.ndarray, dict]:
    """(each row's exact representative: the lowest row with its exact key; stats).

    Exercises sharing a screen key get their AST key; the others' screen keys stay, and are
    unique. index.keys then holds the exact keys."""
    stats = {"ast_checked": 0, "unparsable_code": 0}
    if kind == "exercise":
        _, inverse, counts = np.unique(index.keys, return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse.ravel()] > 1)
        results = _recompute("exact", kind, path, index, shared, 0, workers)
        if results:
            index.keys[shared] = np.frombuffer(b"".join(key for key, _ in results), "S16")
        stats = {"ast_checked": len(shared), "unparsable_code": sum(not ok for _, ok in results)}
    # np.unique's first occurrence is the lowest id: rows are sorted by id.
    _, first, inverse = np.unique(index.keys, return_index=True, return_inverse=True)
    return first[inverse.ravel()], stats


def _jaccards(kind: str, path: Path, index: _Index, pairs: np.ndarray, k: int, workers: _Workers,
              bar: tqdm) -> np.ndarray:
    """True Jaccard of each pair, CONFIRM_PAIRS at a time: only one step's shingle sets (recomputed
    from the input by the workers) are held, whatever the number of candidates."""
    sims = np.empty(len(pairs), float)
    for lo in range(0, len(pairs), CONFIRM_PAIRS):
        step = pairs[lo: lo + CONFIRM_PAIRS]
        docs = np.unique(step)
        sets = dict(zip(docs.tolist(), _recompute("shingles", kind, path, index, docs, k, workers), strict=True))
        sims[lo: lo + len(step)] = [jaccard(sets[i], sets[j]) for i, j in step.tolist()]
        bar.update(len(step))
    return sims


def _near_clusters(kind: str, path: Path, index: _Index, rep: np.ndarray, dd: DedupeConfig, hasher: MinHasher,
                   workers: _Workers, progress: bool) -> tuple[np.ndarray, dict[int, float], dict]:
    """(each row's survivor, true Jaccard of each near-removed row with it, stats): LSH candidates
    among exact representatives (plus residual pairs among the rows of crowded buckets, from
    their recomputed signatures), confirmed by true Jaccard, survivors in id order (_survivors)."""
    n = len(index.ids)
    eligible = np.flatnonzero((rep == np.arange(n)) & (index.counts > 0))
    local, crowded = lsh_candidates(index.bands, rows=eligible)
    found = [local]
    crowded_rows = np.flatnonzero(crowded)
    if len(crowded_rows) > 1:
        sig = np.stack(_recompute("signatures", kind, path, index, eligible[crowded_rows], dd.shingle_size, workers,
                                  hasher))
        found.append(crowded_rows[residual_pairs(sig)])
        del sig
    pairs = eligible[_unique_pairs(found, len(eligible))]  # sorted: eligible ascends
    del found, local
    with tqdm(total=len(pairs), desc=f"confirm {kind}", unit="pair", disable=not progress, mininterval=0.5) as bar:
        sims = _jaccards(kind, path, index, pairs, dd.shingle_size, workers, bar)
        keep = sims >= dd.threshold
        confirmed, confirmed_sims = pairs[keep], sims[keep]
    survivor = _survivors(n, confirmed)[rep]
    # A removed row's Jaccard with its survivor is their confirmed pair's (confirmed is sorted).
    removed = np.flatnonzero(survivor != rep)
    at = np.searchsorted(confirmed[:, 0] * n + confirmed[:, 1], survivor[removed] * n + rep[removed])
    jaccards = dict(zip(removed.tolist(), confirmed_sims[at].tolist(), strict=True))
    return survivor, jaccards, {"candidate_pairs": len(pairs), "confirmed_pairs": len(confirmed),
                                "crowded_rows": len(crowded_rows)}


def _decide(kind: str, path: Path, index: _Index, dd: DedupeConfig, hasher: MinHasher, workers: _Workers,
            progress: bool) -> _Outcome:
    n = len(index.ids)
    rows = np.arange(n)
    rep, stats = rows, {"ast_checked": 0, "unparsable_code": 0}
    if dd.exact and n:
        rep, stats = _exact_groups(kind, path, index, workers)
    survivor, jaccards = rep, {}
    stats.update({"candidate_pairs": 0, "confirmed_pairs": 0, "crowded_rows": 0})
    if dd.near and n:
        survivor, jaccards, near_stats = _near_clusters(kind, path, index, rep, dd, hasher, workers, progress)
        stats.update(near_stats)
    removed = survivor != rows
    exact = removed & (index.keys == index.keys[survivor]) if dd.exact else np.zeros(n, bool)
    sizes = np.bincount(survivor[removed], minlength=n) + 1  # members per survivor
    stats.update({
        "in": n, "kept": int(n - removed.sum()), "removed_exact": int(exact.sum()),
        "removed_near": int((removed & ~exact).sum()), "clusters": int((sizes > 1).sum()),
        "largest_cluster": int(sizes.max()) if n else 0,
        "without_shingles": int((index.counts == 0).sum()) if dd.near else 0,
        # Diversity as the run goes on: the share removed in each block of 1,000 records in id
        # (= generation) order; a rising curve means the prompt space is running out.
        "duplicate_rate_per_1000": [round(float(removed[i:i + 1000].mean()), 4) for i in range(0, n, 1000)],
    })
    return _Outcome(survivor, exact, jaccards, stats)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def _lines(fd: int, index: _Index, rows: Iterable[int]) -> Iterator[tuple[int, str]]:
    """(row, line) read by offset; pread rather than mmap, so page cache is not counted in our RSS."""
    for r in rows:
        yield r, os.pread(fd, int(index.lengths[r]), int(index.offsets[r])).decode("utf-8")


def _kept_lines(fd: int, index: _Index, outcome: _Outcome) -> Iterator[str]:
    """Kept records in id order: the input line itself when already canonical (the usual case)."""
    kept = np.flatnonzero(outcome.survivor == np.arange(len(index.ids))).tolist()
    for r, line in _lines(fd, index, kept):
        yield (line if index.canonical[r] else dumps(json.loads(line))) + "\n"


def _removed_lines(fd: int, index: _Index, outcome: _Outcome) -> Iterator[tuple[str, str]]:
    """(id, line) of removed records in id order, each naming the record it duplicates."""
    removed = np.flatnonzero(outcome.survivor != np.arange(len(index.ids))).tolist()
    for r, line in _lines(fd, index, removed):
        exact = bool(outcome.exact[r])
        rec = {**json.loads(line), "duplicate_of": index.id(int(outcome.survivor[r])),
               "kind_of_duplicate": "exact" if exact else "near",
               "jaccard": 1.0 if exact else round(outcome.jaccard[r], 6)}
        yield index.id(r), dumps(rec) + "\n"


def _write_outputs(out_dir: Path, paths: dict[str, Path], indexes: dict[str, _Index],
                   outcomes: dict[str, _Outcome], progress: bool) -> None:
    total = sum(len(i.ids) for i in indexes.values())
    with contextlib.ExitStack() as stack, tqdm(total=total, desc="write", unit="rec", disable=not progress,
                                               mininterval=0.5) as bar:
        fds = {kind: stack.enter_context(paths[kind].open("rb")).fileno() for kind in KINDS}
        for kind in KINDS:
            with atomic_writer(out_dir / INPUT_FILES[kind]) as fh:
                for line in _kept_lines(fds[kind], indexes[kind], outcomes[kind]):
                    fh.write(line)
                    bar.update(1)
        with atomic_writer(out_dir / REMOVED_FILE) as fh:
            streams = [_removed_lines(fds[kind], indexes[kind], outcomes[kind]) for kind in KINDS]
            for _, line in heapq.merge(*streams, key=lambda item: item[0]):
                fh.write(line)
                bar.update(1)


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


def _index_file(kind: str, path: Path, params: _Params, workers: _Workers, progress: bool) -> _Index:
    tasks = [_BlockTask(path, off, length, lineno, params) for off, length, lineno in _split_blocks(path, BLOCK_BYTES)]
    blocks = []
    with tqdm(total=path.stat().st_size, desc=f"index {kind}", unit="B", unit_scale=True, disable=not progress,
              mininterval=0.5) as bar:
        for task, block in zip(tasks, workers.imap(_index_block, tasks), strict=True):
            blocks.append(block)
            bar.update(task.length)
    index = _Index.merge(blocks, params.bands)
    dup = np.flatnonzero(index.ids[1:] == index.ids[:-1])
    if len(dup):
        raise RecordError(f"{path}: record id {index.id(int(dup[0]))!r} appears more than once")
    return index


def run_dedupe(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: returns its stats (also written to stats.json)."""
    dd = cfg.dedupe
    paths = {kind: Path(dd.input_dir) / INPUT_FILES[kind] for kind in KINDS}
    for path in paths.values():  # both inputs are checked before any work
        if not path.is_file():
            raise RecordError(f"records file not found: {path}")
    out_dir = Path(dd.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, configs_dir(config_path), "dedupe", out_dir)
    bands, rows = lsh_params(dd.threshold, dd.num_perm, dd.candidate_recall)
    hasher = MinHasher(bands * rows, cfg.seed)  # permutations beyond bands*rows would go unused
    t0 = time.monotonic()
    indexes, outcomes = {}, {}
    with _Workers(dd.workers or _cores()) as workers:
        for kind in KINDS:
            params = _Params(kind, dd.exact, dd.near, dd.shingle_size, bands, rows, hasher)
            indexes[kind] = _index_file(kind, paths[kind], params, workers, progress)
        t_index = time.monotonic()
        for kind in KINDS:
            outcomes[kind] = _decide(kind, paths[kind], indexes[kind], dd, hasher, workers, progress)
    t_decide = time.monotonic()
    _write_outputs(out_dir, paths, indexes, outcomes, progress)
    wall = time.monotonic() - t0
    n_docs = sum(len(i.ids) for i in indexes.values())
    stats = {
        **{kind: outcomes[kind].stats for kind in KINDS},
        "kept": {kind: outcomes[kind].stats["kept"] for kind in KINDS},
        "removed": {kind: outcomes[kind].stats["in"] - outcomes[kind].stats["kept"] for kind in KINDS},
        "lsh": {"num_perm": dd.num_perm, "permutations_used": bands * rows, "bands": bands, "rows": rows,
                "threshold": dd.threshold,
                "candidate_recall": dd.candidate_recall,
                "p_candidate_at_threshold": round(candidate_probability(dd.threshold, bands, rows), 4),
                "shingle_size": dd.shingle_size, "exact": dd.exact, "near": dd.near},
        "timing": {"wall_s": round(wall, 3), "index_s": round(t_index - t0, 3),
                   "decide_s": round(t_decide - t_index, 3), "write_s": round(time.monotonic() - t_decide, 3),
                   "docs_per_s": round(n_docs / max(wall, 1e-9), 1), "workers": workers.used},
    }
    write_json(out_dir / "stats.json", stats)
    log.info("dedupe: kept %s, removed %s (bands=%d rows=%d) in %.1fs",
             stats["kept"], stats["removed"], bands, rows, wall)
    return stats


def main(args) -> int:
    from pipeline.core.stage import load_stage_config

    cfg, path = load_stage_config(args)
    stats = run_dedupe(cfg, path, progress=not args.quiet)
    print(dumps({"kept": stats["kept"], "removed": stats["removed"],
                 "bands": stats["lsh"]["bands"], "rows": stats["lsh"]["rows"]}))
    return 0
