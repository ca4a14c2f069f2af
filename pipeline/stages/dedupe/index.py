"""Pass 1: each input file indexed in blocks by worker processes, lean and resumable.

Blocks of the input (``dedupe.shard_bytes``) are indexed in worker processes (JSON, tokens, a
cheap screen key, then MinHash and band hashes in numpy over whole batches). Only ids, byte
offsets, 16-byte keys and shingle counts stay in memory (~50 bytes a record); band hashes go
to disk band by band (Columns), and LSH reads one band at a time.

Resumable: each indexed block is saved as a shard named by the hash of its bytes and of the
params, under ``output_dir/.shards``; a killed run reads them back and redoes only the blocks
that were in flight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from pipeline.core.records import RecordError, atomic_path, dumps, parse_record_line
from pipeline.core.schema import RECORD_FIELDS, require_parsed
from pipeline.stages.dedupe.lsh import band_hashes
from pipeline.stages.dedupe.minhash import BATCH_DOCS, U64, MinHasher, shingle_hashes
from pipeline.stages.dedupe.normalize import raw_tokens, record_text, screen_key
from pipeline.stages.dedupe.workers import Workers


class Columns:
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
class Params:
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
class BlockTask:
    path: Path
    offset: int
    length: int
    params: Params
    shard_dir: Path  # finished blocks are saved here: a killed run redoes only the unfinished ones


BLOCK_COLUMNS = ("ids", "offsets", "lengths", "keys", "counts", "canonical", "bands")


@dataclass
class Block:
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
class Index:
    """What pass 1 learned about one input file: one entry per record, in id order once merged.
    ~50 bytes a record stay in memory; the band hashes stay on disk (`band_store`)."""

    ids: np.ndarray  # record ids, UTF-8 ("S"): ~10 bytes a record where a list of str costs ~70
    offsets: np.ndarray  # byte offset of the record's line
    lengths: np.ndarray  # line length, newline excluded
    keys: np.ndarray  # 16-byte screen keys ("S16"), exact keys once decide_kind has refined them
    counts: np.ndarray  # shingles (0: not part of near dedupe)
    canonical: np.ndarray  # the line is already dumps(record)
    band_store: Columns | None  # LSH band hashes in input order, column by column
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
    def merge(cls, blocks: Iterable[Block], band_store: Columns | None) -> Index:
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


def _near_columns(tokens: list[list[str]], p: Params) -> tuple[np.ndarray, np.ndarray]:
    """(shingle counts, band hashes) of tokenised documents, in numpy batches of BATCH_DOCS."""
    counts = np.zeros(len(tokens), np.int64)
    bands = np.zeros((len(tokens), p.bands if p.near else 0), U64)
    if not p.near:
        return counts, bands
    for lo in range(0, len(tokens), BATCH_DOCS):
        hashes, c = shingle_hashes(tokens[lo: lo + BATCH_DOCS], p.shingle_size)
        counts[lo: lo + len(c)] = c
        bands[lo: lo + len(c)] = band_hashes(p.hasher.signatures(hashes, c), p.bands, p.rows)
    return counts, bands


def _index_block(task: BlockTask) -> Block:
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
            return Block(**{name: saved[name] for name in BLOCK_COLUMNS}, lines=lines, digest=digest, reused=True)
    p = task.params
    ids, offsets, lengths, keys, canonical, tokens = [], [], [], [], [], []
    for lineno, (offset, raw) in enumerate(_iter_lines(data, task.offset), 1):
        if not raw.strip():
            continue
        try:
            rec, line = _parse_line(raw, task.path, lineno, p.kind)
        except RecordError as exc:  # numbered within the block: the main process knows the lines before it
            return Block(*(np.empty(0),) * len(BLOCK_COLUMNS), error=(lineno, str(exc)))
        text = record_text(p.kind, rec["parsed"])
        toks = raw_tokens(p.kind, text)
        if p.exact:
            keys.append(screen_key(p.kind, toks, text))
        ids.append(rec["id"])
        offsets.append(offset)
        lengths.append(len(raw))
        canonical.append(dumps(rec) == line)
        tokens.append(toks)
    del data
    counts, bands = _near_columns(tokens, p)
    block = Block(
        ids=np.array([i.encode("utf-8", "surrogatepass") for i in ids], "S") if ids else np.empty(0, "S1"),
        offsets=np.array(offsets, np.int64), lengths=np.array(lengths, np.int64),
        keys=np.frombuffer(b"".join(keys), "S16") if p.exact else np.zeros(len(ids), "S16"),
        counts=counts, canonical=np.array(canonical, bool), bands=bands, lines=lines, digest=digest)
    save_atomically(shard, lambda fh: np.savez(fh, **{name: getattr(block, name) for name in BLOCK_COLUMNS}))
    return block


def save_atomically(path: Path, save: Callable[[BinaryIO], object]) -> None:
    """save(file) to a temp file, then renamed: the file appears whole or not at all (it is a
    completion marker)."""
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        save(fh)


def split_blocks(path: Path, size: int) -> Iterator[tuple[int, int]]:
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


def index_file(kind: str, path: Path, params: Params, workers: Workers, work: Path, shard_bytes: int,
               progress: bool) -> Index:
    """One input file's Index: its blocks indexed by the workers (or read back from their shards), merged
    in id order; a bad record's error names its line in the whole file, a repeated id fails."""
    tasks = [BlockTask(path, off, length, params, work / "blocks") for off, length in split_blocks(path, shard_bytes)]
    band_store = Columns(work / "bands", params.bands, U64) if params.near else None

    def blocks() -> Iterator[Block]:
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

    index = Index.merge(blocks(), band_store)
    dup = np.flatnonzero(index.ids[1:] == index.ids[:-1])
    if len(dup):
        raise RecordError(f"{path}: record id {index.id(int(dup[0]))!r} appears more than once")
    return index
