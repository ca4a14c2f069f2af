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

Fast and lean at 10M records: blocks of the input (``dedupe.shard_bytes``) are indexed in
worker processes (JSON, tokens, a cheap screen key, then MinHash and band hashes in numpy over
whole batches). Only ids, byte offsets, 16-byte keys and shingle counts stay in memory (~50
bytes a record); band hashes go to disk band by band, and LSH reads one band at a time.
Parsing is most of the cost, so only exercises sharing a screen key (which AST-equal code
always shares) are parsed. Candidate buckets come from sorting band hashes, never from
comparing all pairs; candidates' shingle sets are recomputed from the input for confirmation,
CONFIRM_PAIRS pairs at a time so memory does not grow with the candidates, and kept records
are copied from it. Workers are spawned: call `run_dedupe` from a script only under
``if __name__ == "__main__":``.

Resumable: each indexed block is saved as a shard named by the hash of its bytes and of the
params, and each confirmation step under the hash of the whole index and of its pairs, in
``output_dir/.shards``; a killed run reads them back and redoes only the work in flight
(stats.json's ``timing.resumed`` says how much). The folder is deleted once the outputs are
written.

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
import shutil
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
SHARDS_DIR = ".shards"  # work in progress, under output_dir: what a killed run resumes from

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


def _bucket_pairs(column: np.ndarray, all_pairs_bucket: int, link_crowded: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes i * n + j, i < j, of the pairs that one column's buckets give; the rows of its crowded
    buckets), by sorting the column.

    A bucket of up to `all_pairs_bucket` rows gives all its pairs; a bigger one gives, with
    `link_crowded`, each row paired with the bucket's lowest row and with its neighbour (a star
    and a chain, O(size)), else nothing. Only the rows of shared buckets are carried past the
    sort, so the temporaries are ~26 bytes a row, whatever the number of bands."""
    n = len(column)
    order = np.argsort(column, kind="stable")  # stable: rows ascend within a bucket, so i < j below
    values = column[order]
    same = values[1:] == values[:-1]
    shared = np.zeros(n, bool)
    shared[1:] = same
    shared[:-1] |= same
    del same
    at = np.flatnonzero(shared)
    del shared
    rows, values = order[at], values[at]
    del order, at
    m = len(rows)
    if m == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    new = np.ones(m, bool)
    new[1:] = values[1:] != values[:-1]
    starts = np.flatnonzero(new)
    run = np.cumsum(new) - 1
    first = starts[run]
    size = np.diff(np.append(starts, m))[run]
    end = first + size
    small = size <= all_pairs_bucket
    pos = np.arange(m)
    linked = (pos != first) & (small | link_crowded)
    found = [rows[first[linked]] * n + rows[linked]]  # the star
    for d in range(1, min(all_pairs_bucket, int(size.max()))):  # pairs d apart in a bucket
        p = pos[: m - d]
        ok = linked[: m - d] & (p + d < end[: m - d]) & (small[: m - d] | (d == 1))
        found.append(rows[p[ok]] * n + rows[p[ok] + d])
    return np.unique(np.concatenate(found)), rows[~small]


def _as_columns(matrix: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    return (matrix[:, j] for j in range(matrix.shape[1])) if isinstance(matrix, np.ndarray) else matrix


def _decode(codes: np.ndarray, n: int) -> np.ndarray:
    return np.stack([codes // n, codes % n], 1) if len(codes) else np.empty((0, 2), np.int64)


def lsh_candidates(bands: np.ndarray | Iterable[np.ndarray],
                   all_pairs_bucket: int = ALL_PAIRS_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """(unique (i, j), i < j, sorted, of rows sharing a bucket in at least one band; whether each row
    is in a crowded bucket, bigger than `all_pairs_bucket`, in some band), by sorting band hashes.

    `bands` is a (records, bands) matrix or its columns one at a time (the stage reads them
    from disk, so the matrix is never in memory). A crowded bucket (boilerplate) gives a star
    and a chain (_bucket_pairs), so a bucket costs O(size) and clusters still connect; near
    pairs inside it that are not neighbours are found by `residual_pairs` on the crowded
    rows' signatures."""
    codes, crowded, n = np.empty(0, np.int64), np.zeros(0, bool), 0
    for column in _as_columns(bands):
        n = len(column)
        if len(crowded) != n:
            crowded = np.zeros(n, bool)
        if n < 2:
            break
        found, crowded_rows = _bucket_pairs(column, all_pairs_bucket, link_crowded=True)
        del column
        crowded[crowded_rows] = True
        codes = np.union1d(codes, found)  # a pair found in several bands is held once
    return _decode(codes, n), crowded


def candidate_pairs(bh: np.ndarray, all_pairs_bucket: int = ALL_PAIRS_BUCKET) -> np.ndarray:
    """Unique (i, j), i < j, of rows sharing a bucket in at least one band (lsh_candidates' pairs)."""
    return lsh_candidates(bh, all_pairs_bucket)[0]


def residual_pairs(sig: np.ndarray | Iterable[np.ndarray], all_pairs_bucket: int = ALL_PAIRS_BUCKET) -> np.ndarray:
    """Unique (i, j), i < j, of rows whose signatures share a value at some position that at most
    `all_pairs_bucket` rows share: LSH with one row per band, for the rows of crowded buckets.
    `sig` is a (records, positions) matrix or its columns one at a time.

    Why: members of a crowded bucket agree on the boilerplate's minima, so a band rarely tells
    two near copies apart from the rest (their bands fall into the crowded bucket), and the
    star and chain only pair neighbours. But where a signature value comes from a record's own
    code, few records share it: two near copies at Jaccard 0.8 share such a value at several of
    the positions, unrelated members almost never. Values shared by more rows are boilerplate
    (or common code) and give nothing here."""
    codes, n = np.empty(0, np.int64), 0
    for column in _as_columns(sig):
        n = len(column)
        codes = np.union1d(codes, _bucket_pairs(column, all_pairs_bucket, link_crowded=False)[0])
    return _decode(codes, n)


def _unique_pairs(found: list[np.ndarray], n: int) -> np.ndarray:
    """The pairs in `found` as unique (low, high) rows, sorted."""
    if not found:
        return np.empty((0, 2), np.int64)
    codes = [np.minimum(p[:, 0], p[:, 1]).astype(np.int64) * n + np.maximum(p[:, 0], p[:, 1]) for p in found]
    return _decode(np.unique(np.concatenate(codes)), n)


# ---------------------------------------------------------------------------------------
# Reading and indexing the input, in worker processes; what a killed run keeps
# ---------------------------------------------------------------------------------------


class _Columns:
    """A (rows, width) matrix kept on disk column by column and appended a block of rows at a time:
    reading one column holds that column, never the matrix (band hashes at 10M records are
    1.3 GB, one band's column 80 MB). Scratch: rebuilt by every run."""

    def __init__(self, directory: Path, width: int, dtype: type) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.paths = [directory / f"column-{j:03d}.bin" for j in range(width)]
        self._files = [path.open("wb") for path in self.paths]

    def append(self, block: np.ndarray) -> None:
        for j, fh in enumerate(self._files):
            fh.write(np.ascontiguousarray(block[:, j], self.dtype).tobytes())

    def close(self) -> None:
        for fh in self._files:
            fh.close()
        self._files = []

    def column(self, j: int) -> np.ndarray:
        return np.fromfile(self.paths[j], self.dtype)

    def columns(self, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        for j in range(len(self.paths)):
            yield self.column(j) if rows is None else self.column(j)[rows]


@dataclass(frozen=True)
class _Params:
    kind: str
    exact: bool
    near: bool
    shingle_size: int
    bands: int
    rows: int
    hasher: MinHasher

    def fingerprint(self) -> str:
        """What decides a block's index (the hasher follows from the seed and bands x rows)."""
        what = {"format": 2, "kind": self.kind, "exact": self.exact, "near": self.near, "k": self.shingle_size,
                "bands": self.bands, "rows": self.rows, "a": self.hasher.a.tolist(), "b": self.hasher.b.tolist()}
        return hashlib.blake2b(dumps(what).encode(), digest_size=8).hexdigest()


@dataclass
class _BlockTask:
    path: Path
    offset: int
    length: int
    params: _Params
    shard_dir: Path  # finished blocks are saved here: a killed run redoes only the unfinished ones


BLOCK_COLUMNS = ("ids", "offsets", "lengths", "keys", "counts", "canonical", "bands")


@dataclass
class _Block:
    """Pass 1's result for one block of the input, in input order."""

    ids: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    keys: np.ndarray
    counts: np.ndarray
    canonical: np.ndarray
    bands: np.ndarray  # (records, bands) uint64; (records, 0) without near dedupe
    lines: int = 0  # newlines in the block: the main process numbers lines from them, in order
    digest: str = ""  # of the block's bytes and the params: its shard's name
    reused: bool = False  # loaded from a shard a previous run saved
    error: tuple[int, str] | None = None  # (line in the block, message naming it) of a bad record


@dataclass
class _Index:
    """What pass 1 learned about one input file: one entry per record, in id order once merged.
    ~50 bytes a record stay in memory; the band hashes stay on disk (`band_store`)."""

    ids: np.ndarray  # record ids, UTF-8 ("S"): ~10 bytes a record where a list of str costs ~70
    offsets: np.ndarray  # byte offset of the record's line
    lengths: np.ndarray  # line length, newline excluded
    keys: np.ndarray  # 16-byte screen keys ("S16"), exact keys once _decide has refined them
    counts: np.ndarray  # shingles (0: not part of near dedupe)
    canonical: np.ndarray  # the line is already dumps(record)
    band_store: _Columns | None  # LSH band hashes in input order, column by column
    order: np.ndarray | None  # input row of each id-ordered row; None when the input is in id order
    digest: str  # of every block's digest: names what decisions may be resumed from
    reused_blocks: int
    blocks: int

    def id(self, row: int) -> str:
        return self.ids[row].decode("utf-8", "surrogatepass")

    def bands(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Each band's hashes of `rows` (id-ordered rows), one band at a time."""
        return self.band_store.columns(rows if self.order is None else self.order[rows])

    @classmethod
    def merge(cls, blocks: Iterable[_Block], band_store: _Columns | None) -> _Index:
        """The blocks' entries concatenated and sorted by id (the order of outputs and survivors);
        their band hashes appended to `band_store` as they come.

        UTF-8 bytes sort as their code points, so the byte order is str's order."""
        parts: dict[str, list[np.ndarray]] = {name: [] for name in BLOCK_COLUMNS[:-1]}
        digests, reused = [], 0
        for block in blocks:
            for name, column in parts.items():
                column.append(getattr(block, name))
            if band_store is not None:
                band_store.append(block.bands)
            digests.append(block.digest)
            reused += block.reused
        if band_store is not None:
            band_store.close()
        empty = {"ids": "S1", "offsets": np.int64, "lengths": np.int32, "keys": "S16", "counts": np.int32,
                 "canonical": bool}
        columns = {}
        for name in BLOCK_COLUMNS[:-1]:  # a column's blocks are let go once it is whole
            blocks_of = parts.pop(name)
            if not blocks_of:
                columns[name] = np.empty(0, empty[name])
            elif name == "ids":  # the widest block's width
                columns[name] = np.concatenate(blocks_of)
            else:
                columns[name] = np.concatenate(blocks_of).astype(empty[name], copy=False)
            del blocks_of
        ids, order = columns["ids"], None
        if len(ids) > 1 and not (ids[1:] >= ids[:-1]).all():
            order = np.argsort(ids, kind="stable")
            for name in BLOCK_COLUMNS[:-1]:  # one column's copy at a time
                columns[name] = columns[name][order]
        digest = hashlib.blake2b("\n".join(digests).encode(), digest_size=8).hexdigest()
        return cls(**columns, band_store=band_store, order=order, digest=digest, reused_blocks=reused,
                   blocks=len(digests))


def _parse_line(raw: bytes, path: Path, lineno: int, kind: str) -> tuple[dict, str]:
    """A record and its line as text; errors name the file, line and record id."""
    rec = parse_record_line(raw, path, lineno, RECORD_FIELDS)
    line = raw.decode("utf-8")
    rid = rec["id"]
    if not isinstance(rid, str):
        raise RecordError(f"{path}:{lineno}: record id must be a string, got {rid!r}")
    require_parsed(rec, f"{path}:{lineno}", kind)
    return rec, line


def _iter_lines(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    """(absolute offset, line without newline) for every line of a block read at `offset`."""
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
    bands = np.zeros((len(tokens), p.bands if p.near else 0), _U64)
    if not p.near:
        return counts, bands
    for lo in range(0, len(tokens), BATCH_DOCS):
        hashes, c = shingle_hashes(tokens[lo: lo + BATCH_DOCS], p.shingle_size)
        counts[lo: lo + len(c)] = c
        bands[lo: lo + len(c)] = band_hashes(p.hasher.signatures(hashes, c), p.bands, p.rows)
    return counts, bands


def _index_block(task: _BlockTask) -> _Block:
    """Pass 1 over one block: validate, screen key, shingle count and band hashes of each record.

    A finished block is saved as a shard named by the hash of its bytes and the params (the
    file's existence is its completion marker, as in datatrove), so a killed run, or a run on
    an input that grew, reads it back instead of redoing it."""
    with task.path.open("rb") as fh:
        fh.seek(task.offset)
        data = fh.read(task.length)
    digest = hashlib.blake2b(data, digest_size=12, key=task.params.fingerprint().encode()).hexdigest()
    shard = task.shard_dir / f"block-{task.offset:013d}-{digest}.npz"
    lines = data.count(b"\n")
    if shard.is_file():
        with np.load(shard) as saved:
            return _Block(**{name: saved[name] for name in BLOCK_COLUMNS}, lines=lines, digest=digest, reused=True)
    p = task.params
    ids, offsets, lengths, keys, canonical, tokens = [], [], [], [], [], []
    for lineno, (offset, raw) in enumerate(_iter_lines(data, task.offset), 1):
        if not raw.strip():
            continue
        try:
            rec, line = _parse_line(raw, task.path, lineno, p.kind)
        except RecordError as exc:  # numbered within the block: the main process knows the lines before it
            return _Block(*(np.empty(0),) * len(BLOCK_COLUMNS), error=(lineno, str(exc)))
        text = record_text(p.kind, rec["parsed"])
        toks = _raw_tokens(p.kind, text)
        if p.exact:
            keys.append(screen_key(p.kind, toks, text))
        ids.append(rec["id"])
        offsets.append(offset)
        lengths.append(len(raw))
        canonical.append(dumps(rec) == line)
        tokens.append(toks)
    del data
    counts, bands = _near_columns(tokens, p)
    block = _Block(
        ids=np.array([i.encode("utf-8", "surrogatepass") for i in ids], "S") if ids else np.empty(0, "S1"),
        offsets=np.array(offsets, np.int64), lengths=np.array(lengths, np.int64),
        keys=np.frombuffer(b"".join(keys), "S16") if p.exact else np.zeros(len(ids), "S16"),
        counts=counts, canonical=np.array(canonical, bool), bands=bands, lines=lines, digest=digest)
    _save_atomically(shard, lambda fh: np.savez(fh, **{name: getattr(block, name) for name in BLOCK_COLUMNS}))
    return block


def _save_atomically(path: Path, save: Callable[[BinaryIO], object]) -> None:
    """save(file) to a temp file, then renamed: the file appears whole or not at all (it is a
    completion marker)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        save(fh)
    os.replace(tmp, path)


def _split_blocks(path: Path, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of newline-aligned blocks of at least `size` bytes (to the end of the line
    in which `size` falls). Only the bytes at each boundary are read: the workers count lines."""
    total = path.stat().st_size
    start = 0
    with path.open("rb") as fh:
        while start < total:
            pos, end = start + size - 1, total
            while pos < total:  # the first newline at or after pos ends the block
                fh.seek(pos)
                chunk = fh.read(4096)
                nl = chunk.find(b"\n")
                if nl >= 0:
                    end = pos + nl + 1
                    break
                pos += len(chunk)
            yield start, end - start
            start = end


def _recompute_task(task: tuple[str, str, Path, int, np.ndarray, np.ndarray, MinHasher | None]) -> object:
    """For the records at (offsets, lengths), in order: their exact keys (what="exact": the keys
    joined as bytes, and whether each parsed), their sorted shingle sets (what="shingles", a list)
    or their MinHash signatures (what="signatures", the hasher's as in pass 1: one matrix)."""
    what, kind, path, k, offsets, lengths, hasher = task
    texts = []
    with path.open("rb") as fh:
        for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
            fh.seek(offset)
            texts.append(record_text(kind, json.loads(fh.read(length))["parsed"]))
    if what == "exact":
        keys = [exact_key(kind, t) for t in texts]
        return b"".join(key for key, _ in keys), np.array([ok for _, ok in keys], bool)
    out = []
    for lo in range(0, len(texts), BATCH_DOCS):
        hashes, counts = shingle_hashes([_raw_tokens(kind, t) for t in texts[lo: lo + BATCH_DOCS]], k)
        if what == "signatures":
            out.append(hasher.signatures(hashes, counts))
        else:
            out.extend(np.unique(h) for h in np.split(hashes, np.cumsum(counts)[:-1]))
    if what == "signatures":
        return np.concatenate(out) if out else np.empty((0, hasher.num_perm), np.uint32)
    return out


class _Workers:
    """Maps tasks in order over a process pool, or in this process when there is one task or core."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: multiprocessing.pool.Pool | None = None

    def imap(self, fn: Callable, tasks: Iterable, count: int) -> Iterator:
        """fn over `count` tasks, in order; a pool takes a generator's tasks as it needs them."""
        if self.workers <= 1 or count <= 1:
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
    resumed: dict  # blocks and confirmation steps read back from a killed run's shards


def _survivors(n: int, pairs: np.ndarray) -> np.ndarray:
    """Each row's survivor over the confirmed edges `pairs` (i < j): in id order, a row with a
    confirmed edge to a lower row that is kept is removed as that row's duplicate (the lowest
    such), else kept.

    Why not union-find's components: a chain A~B~C joins C to A although A and C may be under
    the threshold; here every removed row is at or above the threshold with the record kept in
    its place, so every removal is confirmed. Only the rows in some pair enter the loop."""
    survivor = np.arange(n)
    if len(pairs) == 0:
        return survivor
    nodes, local = np.unique(pairs, return_inverse=True)  # ascending: local order is row order
    local = local.reshape(pairs.shape)
    by_high = local[np.lexsort((local[:, 0], local[:, 1]))]  # by j, then i: a row's lower rows are decided
    kept = list(range(len(nodes)))
    for i, j in by_high.tolist():
        if kept[j] == j and kept[i] == i:
            kept[j] = i
    survivor[nodes] = nodes[kept]
    return survivor


def _recompute(what: str, kind: str, path: Path, index: _Index, rows: np.ndarray, k: int,
               workers: _Workers, hasher: MinHasher | None = None) -> Iterator:
    """_recompute_task's results for `rows`, SPANS_PER_TASK rows a task, in order, re-read from the
    input by the workers. Tasks are made as the pool takes them: nothing grows with `rows`."""
    tasks = ((what, kind, path, k, index.offsets[rows[lo: lo + SPANS_PER_TASK]],
              index.lengths[rows[lo: lo + SPANS_PER_TASK]], hasher) for lo in range(0, len(rows), SPANS_PER_TASK))
    return workers.imap(_recompute_task, tasks, -(-len(rows) // SPANS_PER_TASK))


def _exact_groups(kind: str, path: Path, index: _Index, workers: _Workers) -> tuple[np.ndarray, dict]:
    """(each row's exact representative: the lowest row with its exact key; stats).

    Exercises sharing a screen key get their AST key; the others' screen keys stay, and are
    unique. index.keys then holds the exact keys."""
    stats = {"ast_checked": 0, "unparsable_code": 0}
    if kind == "exercise":
        _, inverse, counts = np.unique(index.keys, return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse.ravel()] > 1)
        del inverse, counts
        unparsable, lo = 0, 0
        for keys, parsed in _recompute("exact", kind, path, index, shared, 0, workers):
            index.keys[shared[lo: lo + len(parsed)]] = np.frombuffer(keys, "S16")
            unparsable += int((~parsed).sum())
            lo += len(parsed)
        stats = {"ast_checked": len(shared), "unparsable_code": unparsable}
    # np.unique's first occurrence is the lowest id: rows are sorted by id.
    _, first, inverse = np.unique(index.keys, return_index=True, return_inverse=True)
    return first[inverse.ravel()], stats


def _checkpointed(path: Path, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """(compute()'s array, whether it was read back from `path`, where a previous run saved it)."""
    if path.is_file():
        return np.load(path), True
    value = compute()
    _save_atomically(path, lambda fh: np.save(fh, value))
    return value, False


def _jaccards(kind: str, path: Path, index: _Index, pairs: np.ndarray, k: int, workers: _Workers,
              work: Path, bar: tqdm) -> tuple[np.ndarray, int]:
    """(true Jaccard of each pair, steps read back from a killed run), CONFIRM_PAIRS at a time:
    only one step's shingle sets (recomputed from the input by the workers) are held, whatever
    the number of candidates. Each finished step is saved under the input's digest and its
    pairs' hash, so a killed run resumes at the step it was in."""
    sims = np.empty(len(pairs), float)
    reused = 0
    for lo in range(0, len(pairs), CONFIRM_PAIRS):
        step = pairs[lo: lo + CONFIRM_PAIRS]

        def confirm(step: np.ndarray = step) -> np.ndarray:
            docs = np.unique(step)
            sets = dict(zip(docs.tolist(), itertools.chain.from_iterable(
                _recompute("shingles", kind, path, index, docs, k, workers)), strict=True))
            return np.array([jaccard(sets[i], sets[j]) for i, j in step.tolist()], float)

        name = hashlib.blake2b(step.tobytes(), digest_size=8).hexdigest()
        sims[lo: lo + len(step)], was_saved = _checkpointed(
            work / f"confirm-{index.digest}" / f"step-{lo // CONFIRM_PAIRS:06d}-{name}.npy", confirm)
        reused += was_saved
        bar.update(len(step))
    return sims, reused


def _crowded_signatures(kind: str, path: Path, index: _Index, rows: np.ndarray, k: int, hasher: MinHasher,
                        workers: _Workers, work: Path) -> _Columns:
    """The MinHash signatures of `rows`, recomputed by the workers and kept on disk by position."""
    store = _Columns(work / "crowded-signatures", hasher.num_perm, np.uint32)
    for sig in _recompute("signatures", kind, path, index, rows, k, workers, hasher):
        store.append(sig)
    store.close()
    return store


def _near_clusters(kind: str, path: Path, index: _Index, rep: np.ndarray, dd: DedupeConfig, hasher: MinHasher,
                   workers: _Workers, work: Path, progress: bool) -> tuple[np.ndarray, dict[int, float], dict]:
    """(each row's survivor, true Jaccard of each near-removed row with it, stats): LSH candidates
    among exact representatives (plus residual pairs among the rows of crowded buckets, from
    their recomputed signatures), confirmed by true Jaccard, survivors in id order (_survivors)."""
    n = len(index.ids)
    eligible = np.flatnonzero((rep == np.arange(n)) & (index.counts > 0))
    found, crowded = lsh_candidates(index.bands(eligible))
    found = [found]
    crowded_rows = np.flatnonzero(crowded)
    del crowded
    if len(crowded_rows) > 1:
        sig = _crowded_signatures(kind, path, index, eligible[crowded_rows], dd.shingle_size, hasher, workers, work)
        found.append(crowded_rows[residual_pairs(sig.columns())])
    pairs = eligible[_unique_pairs(found, len(eligible))]  # sorted: eligible ascends
    del found
    with tqdm(total=len(pairs), desc=f"confirm {kind}", unit="pair", disable=not progress, mininterval=0.5) as bar:
        sims, reused = _jaccards(kind, path, index, pairs, dd.shingle_size, workers, work, bar)
        keep = sims >= dd.threshold
        confirmed, confirmed_sims = pairs[keep], sims[keep]
    del pairs, sims
    survivor = _survivors(n, confirmed)[rep]
    # A removed row's Jaccard with its survivor is their confirmed pair's (confirmed is sorted).
    removed = np.flatnonzero(survivor != rep)
    at = np.searchsorted(confirmed[:, 0] * n + confirmed[:, 1], survivor[removed] * n + rep[removed])
    jaccards = dict(zip(removed.tolist(), confirmed_sims[at].tolist(), strict=True))
    return survivor, jaccards, {"candidate_pairs": int(keep.size), "confirmed_pairs": len(confirmed),
                                "crowded_rows": len(crowded_rows), "confirm_steps_reused": reused}


def _decide(kind: str, path: Path, index: _Index, dd: DedupeConfig, hasher: MinHasher, workers: _Workers,
            work: Path, progress: bool) -> _Outcome:
    n = len(index.ids)
    rows = np.arange(n)
    rep, stats = rows, {"ast_checked": 0, "unparsable_code": 0}
    if dd.exact and n:
        rep, stats = _exact_groups(kind, path, index, workers)
    survivor, jaccards = rep, {}
    stats.update({"candidate_pairs": 0, "confirmed_pairs": 0, "crowded_rows": 0})
    reused = 0
    if dd.near and n:
        survivor, jaccards, near_stats = _near_clusters(kind, path, index, rep, dd, hasher, workers, work, progress)
        reused = near_stats.pop("confirm_steps_reused")
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
    return _Outcome(survivor, exact, jaccards, stats, {"blocks": index.blocks, "blocks_reused": index.reused_blocks,
                                                       "confirm_steps_reused": reused})


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


def _index_file(kind: str, path: Path, params: _Params, workers: _Workers, work: Path, shard_bytes: int,
                progress: bool) -> _Index:
    tasks = [_BlockTask(path, off, length, params, work / "blocks") for off, length in _split_blocks(path, shard_bytes)]
    band_store = _Columns(work / "bands", params.bands, _U64) if params.near else None

    def blocks() -> Iterator[_Block]:
        lines = 0  # before the block
        with tqdm(total=path.stat().st_size, desc=f"index {kind}", unit="B", unit_scale=True, disable=not progress,
                  mininterval=0.5) as bar:
            for task, block in zip(tasks, workers.imap(_index_block, tasks, len(tasks)), strict=True):
                if block.error:
                    at, message = block.error
                    raise RecordError(message.replace(f"{path}:{at}:", f"{path}:{lines + at}:", 1))
                yield block
                lines += block.lines
                bar.update(task.length)

    index = _Index.merge(blocks(), band_store)
    dup = np.flatnonzero(index.ids[1:] == index.ids[:-1])
    if len(dup):
        raise RecordError(f"{path}: record id {index.id(int(dup[0]))!r} appears more than once")
    return index


def run_dedupe(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: returns its stats (also written to stats.json).

    Work in progress lives in ``output_dir/.shards`` (indexed blocks and confirmation steps,
    which a killed run reads back; band hashes and crowded rows' signatures, scratch) and is
    deleted once the outputs are written."""
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
    indexes, outcomes, works = {}, {}, {}
    with _Workers(dd.workers or _cores()) as workers:
        for kind in KINDS:
            params = _Params(kind, dd.exact, dd.near, dd.shingle_size, bands, rows, hasher)
            works[kind] = out_dir / SHARDS_DIR / f"{kind}-{params.fingerprint()}"
            indexes[kind] = _index_file(kind, paths[kind], params, workers, works[kind], dd.shard_bytes, progress)
        t_index = time.monotonic()
        for kind in KINDS:
            outcomes[kind] = _decide(kind, paths[kind], indexes[kind], dd, hasher, workers, works[kind], progress)
    t_decide = time.monotonic()
    _write_outputs(out_dir, paths, indexes, outcomes, progress)
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)  # finished: the shards have served their purpose
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
                   "docs_per_s": round(n_docs / max(wall, 1e-9), 1), "workers": workers.used,
                   # How much a killed run's shards saved this one (0 on a clean run).
                   "resumed": {kind: outcomes[kind].resumed for kind in KINDS}},
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
