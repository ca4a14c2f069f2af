"""Where natural code comes from: folders and globs of .py files (the offline default: the standard
library and site-packages of the Python running the stage), JSONL or parquet files of source text,
and a Hugging Face dataset streamed where there is a network (e.g. a The Stack subset).

Each source yields *items*, one per file, in a fixed order (a walk is sorted), so the same sources
give the same shards on every run: a folder's file as its path, size and mtime (read later, in its
shard), a row as its text.
"""

from __future__ import annotations

import glob
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.config import ConfigError, CorpusConfig
from pipeline.core.records import RecordError, iter_jsonl
from pipeline.core.snippets import MAX_FILE_BYTES, iter_python_files, path_skip_reason, skip_reason

# `stdlib` and `site-packages` in corpus.roots: sysconfig's names for the running Python's folders.
NAMED_ROOTS = {"stdlib": "stdlib", "site-packages": "purelib"}


def resolve_root(spec: str) -> list[Path]:
    """A corpus.roots entry as the folders or files it names; a name that matches nothing is an error."""
    head, _, rest = spec.partition("/")
    if head in NAMED_ROOTS:
        path = Path(sysconfig.get_paths()[NAMED_ROOTS[head]]) / rest
        if not path.exists():
            raise ConfigError(f"corpus.roots: {spec} ({path}) does not exist")
        return [path]
    if any(c in spec for c in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
        if not matches:
            raise ConfigError(f"corpus.roots: the glob {spec!r} matches nothing")
        return matches
    if not Path(spec).exists():
        raise ConfigError(f"corpus.roots: {spec} does not exist")
    return [Path(spec)]


def folder_items(cc: CorpusConfig, skipped: Counter) -> Iterator[dict]:
    for spec in cc.roots:
        roots = resolve_root(spec)
        for root in roots:
            label = spec if len(roots) == 1 else str(root)
            for path in iter_python_files(root):
                if root.is_dir():
                    reason = skip_reason(path, root)
                    rel = path.relative_to(root).as_posix()
                else:
                    reason, rel = None, path.name
                if reason:
                    skipped[reason] += 1
                    continue
                st = path.stat()
                yield {"source": label, "path": rel, "file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def row_item(row: dict, source: str, i: int, cc: CorpusConfig, skipped: Counter, where: str) -> dict | None:
    text = row.get(cc.text_field)
    if not isinstance(text, str):
        raise RecordError(f"{where}: row {i} has no string field {cc.text_field!r} (corpus.text_field)")
    path = str(row.get(cc.path_field) or f"row-{i}")
    reason = path_skip_reason(path) if cc.path_field in row else None
    if reason is None and cc.path_field in row and not path.endswith(".py"):
        reason = "not_python"
    if reason is None and len(text.encode("utf-8", "replace")) > MAX_FILE_BYTES:
        reason = "too_large"
    if reason:
        skipped[reason] += 1
        return None
    return {"source": source, "path": path, "row": i, "text": text}


def file_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        raise ConfigError(f"corpus.files: {path}: expected a .jsonl or .parquet file")


def file_items(cc: CorpusConfig, skipped: Counter) -> Iterator[dict]:
    for name in cc.files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"corpus.files: {path} does not exist")
        for i, row in enumerate(file_rows(path)):
            item = row_item(row, path.name, i, cc, skipped, str(path))
            if item:
                yield item


def hf_items(cc: CorpusConfig, skipped: Counter) -> Iterator[dict]:
    """Rows of a Hugging Face dataset, streamed (never downloaded whole); needs a network."""
    if not cc.hf_dataset:
        return
    import datasets

    try:
        stream = datasets.load_dataset(cc.hf_dataset, cc.hf_config or None, data_dir=cc.hf_data_dir or None,
                                       split=cc.hf_split, streaming=True)
    except Exception as exc:  # offline, unknown name, gated dataset: one clear line
        raise ConfigError(f"corpus.hf_dataset: cannot stream {cc.hf_dataset!r} ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(stream):
        item = row_item(row, cc.hf_dataset, i, cc, skipped, f"corpus.hf_dataset {cc.hf_dataset}")
        if item:
            yield item


def iter_items(cc: CorpusConfig, skipped: Counter) -> Iterator[dict]:
    """Every source's files in order (folders, then files, then the HF dataset), at most corpus.max_files;
    files left out are counted in `skipped` by reason."""
    n = 0
    for source in (folder_items, file_items, hf_items):
        for item in source(cc, skipped):
            if cc.max_files and n >= cc.max_files:
                return
            n += 1
            yield item
