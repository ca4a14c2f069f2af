"""Records I/O: canonical JSONL, atomic writes, sorted by id.

Every stage reads and writes records as JSON Lines with one canonical encoding (sorted
keys, UTF-8, no ASCII escaping) so that the same records give byte-identical files.

    python -c "from pipeline.core.records import read_jsonl; print(len(read_jsonl('data/generate/exercises.jsonl')))"
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm


class RecordError(ValueError):
    """A records file or a record in it is malformed; the message names the file and line."""


def dumps(obj: Any) -> str:
    """Canonical JSON: the one encoding used for files, hashes and cache keys."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(folder: Path) -> str:
    """sha256 over (relative path, file sha256) of every file under `folder`, sorted."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return sha256_text("\n".join(f"{p.relative_to(folder).as_posix()} {sha256_file(p)}" for p in files))


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[TextIO]:
    """Write via a temp file + rename, so a killed stage never leaves a half-written output.

    Streamed: a million records need not sit in memory as one string.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, tmp_name: str | None = None) -> Iterator[Path]:
    """A temp path beside `path` for any writer (binary, parquet, numpy) to fill; renamed onto
    `path` when the block ends, removed if it raises: the file appears whole or not at all.
    `tmp_name` fixes the temp's name (several processes writing one file); default per process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name or f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path, tmp_name: str | None = None) -> Iterator[Path]:
    """An empty temp folder beside `path` to fill; when the block ends it replaces `path` whole
    (the old folder is removed first), and if the block raises it is removed: a killed save
    never leaves half a model. `tmp_name` fixes the temp's name (several processes saving one
    model); default per process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name or f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path) as fh:
        fh.write(text)


def write_jsonl(path: str | Path, records: Iterable[dict], sort_key: str | None = "id") -> int:
    rows = list(records)
    if sort_key:
        rows.sort(key=lambda r: r[sort_key])
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))
    return len(rows)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n")


def parse_record_line(raw: bytes, path: str | Path, lineno: int, required: Iterable[str] = ()) -> dict:
    """One JSONL line as a record; errors name the file, the line and the record id."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path}:{lineno}: not UTF-8 ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise RecordError(f"{path}:{lineno}: a record must be a JSON object")
    missing = [k for k in required if k not in rec]
    if missing:
        raise RecordError(f"{path}:{lineno}: record {rec.get('id', '?')!r} is missing field(s) {missing}")
    return rec


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    """Read records; a bad line or a record missing a required field names the file, line and id."""
    return list(iter_jsonl(path, required))


def iter_jsonl(path: str | Path, required: Iterable[str] = ()) -> Iterator[dict]:
    """Records one at a time (memory does not grow with the file); errors as read_jsonl's."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"records file not found: {path}")
    required = tuple(required)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                yield parse_record_line(raw, path, lineno, required)


def iter_sharded(items: Iterable[dict], shard_size: int, work_dir: str | Path, fingerprint: str,
                 fn: Callable[[list[dict]], list[dict]], progress: bool = False, desc: str = "",
                 total: int | None = None) -> Iterator[dict]:
    """Apply `fn` to `items` shard by shard, saving each finished shard, so a killed run resumes;
    yield the results in order. One shard is in memory at a time, whatever the input's size.

    A shard's results are written atomically under a name that hashes the shard's records and
    `fingerprint` (the config that decides the results): the file's existence is the shard's
    completion marker (datatrove's). A re-run skips finished shards; a changed config or input
    matches none.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    items = iter(items)
    with tqdm(total=total, desc=desc, unit="rec", disable=not progress, mininterval=0.5) as bar:
        for n in itertools.count():
            shard = list(itertools.islice(items, shard_size))
            if not shard:
                return
            digest = sha256_text(fingerprint + "\n" + "".join(dumps(r) + "\n" for r in shard))[:16]
            path = work_dir / f"shard-{n:06d}-{digest}.jsonl"
            if path.is_file():
                with path.open(encoding="utf-8") as fh:
                    done = [json.loads(line) for line in fh]
            else:
                done = fn(shard)
                with atomic_writer(path) as fh:
                    fh.writelines(dumps(r) + "\n" for r in done)
            bar.update(len(shard))
            del shard
            yield from done
