"""Step `extract`: every source file split into snippets, written as records that the dedupe and
decontaminate stages read unchanged.

A documented top-level function becomes an exercise record (signature and docstring as the prompt,
the body as the solution: :func:`pipeline.core.snippets.exercise_parsed`); a documented class or a
whole small file becomes a textbook record (its text, one code block). Files are processed in
shards of `corpus.shard_size` (:func:`pipeline.core.records.iter_sharded`): each finished shard is
saved under `corpus.work_dir`, so a killed run redoes at most one.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from pipeline.core.artifacts import CorpusPoolStats
from pipeline.core.config import CorpusConfig
from pipeline.core.records import atomic_writer, dumps, iter_sharded, sha256_text
from pipeline.core.schema import KIND_FILES
from pipeline.core.snippets import Snippet, exercise_parsed, extract_snippets, parse_module

POOL_FILES = KIND_FILES  # the pool dedupe and decontaminate read
EXTRACT_VERSION = 1  # bump when a snippet's record changes: old shards then match nothing


def snippet_record(snip: Snippet, item: dict) -> dict:
    """One snippet as a record; the id hashes where it came from and its text (unique in a run)."""
    where = f"{item['source']}:{item['path']}:{item.get('row', '')}:{snip.lineno}:{snip.unit}"
    rec = {"id": "corpus-" + sha256_text(where + "\n" + snip.text)[:20], "model": "natural",
           "source": {"source": item["source"], "path": item["path"], "line": snip.lineno, "unit": snip.unit,
                      "name": snip.name},
           "attributes": {"topic": item["path"].split("/")[0].removesuffix(".py")}}
    if snip.unit == "function":
        return {**rec, "kind": "exercise", "parsed": exercise_parsed(snip)}
    return {**rec, "kind": "textbook", "parsed": {"title": snip.name, "text": snip.text, "code_blocks": [snip.text]}}


def extract_shard(items: list[dict], cc: CorpusConfig) -> list[dict]:
    """A shard's records, then one `_stats` entry counting its files (saved with the shard)."""
    out, counts = [], Counter()
    for item in items:
        text = item["text"] if "text" in item else Path(item["file"]).read_text(encoding="utf-8", errors="replace")
        snippets = extract_snippets(text, item["path"], tuple(cc.units), cc.min_body_lines, cc.max_lines,
                                    cc.file_max_lines)
        counts["files_read"] += 1
        if snippets:
            counts["files_with_snippets"] += 1
        elif parse_module(text) is None:
            counts["files_unparsable_or_generated"] += 1
        for snip in snippets:
            counts[f"snippets_{snip.unit}"] += 1
            counts["snippet_chars"] += len(snip.text)
            out.append(snippet_record(snip, item))
    return [*out, {"_stats": dict(counts)}]


def run_extract(cc: CorpusConfig, progress: bool) -> dict:
    from pipeline.stages.corpus.sources import iter_items

    t0 = time.monotonic()
    out_dir = Path(cc.pool_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"units": cc.units, "min_body_lines": cc.min_body_lines, "max_lines": cc.max_lines,
                "file_max_lines": cc.file_max_lines, "version": EXTRACT_VERSION}
    fingerprint = dumps(settings)
    work = Path(cc.work_dir) / f"extract-{sha256_text(fingerprint)[:12]}"
    skipped: Counter = Counter()
    counts: Counter = Counter()
    shards_before = set(work.glob("shard-*.jsonl"))
    with atomic_writer(out_dir / POOL_FILES["exercise"]) as ex, atomic_writer(out_dir / POOL_FILES["textbook"]) as tb:
        files = {"exercise": ex, "textbook": tb}
        stream = iter_sharded(iter_items(cc, skipped), cc.shard_size, work, fingerprint,
                              lambda shard: extract_shard(shard, cc), progress=progress, desc="extract")
        for rec in stream:
            if "_stats" in rec:
                counts.update(rec["_stats"])
            else:
                files[rec["kind"]].write(dumps(rec) + "\n")
    reused = len(shards_before & set(work.glob("shard-*.jsonl")))
    from pipeline.stages.corpus.sources import resolve_root

    stats = {
        "enabled": True,
        "sources": {"roots": {spec: [str(p) for p in resolve_root(spec)] for spec in cc.roots},
                    "files": list(cc.files), "hf_dataset": cc.hf_dataset or None, "max_files": cc.max_files},
        "files": {"read": counts["files_read"], "with_snippets": counts["files_with_snippets"],
                  "unparsable_or_generated": counts["files_unparsable_or_generated"],
                  "skipped": dict(sorted(skipped.items()))},
        "snippets": {unit: counts[f"snippets_{unit}"] for unit in cc.units},
        "records": {"exercise": sum(counts[f"snippets_{u}"] for u in cc.units if u == "function"),
                    "textbook": sum(counts[f"snippets_{u}"] for u in cc.units if u != "function")},
        "snippet_chars": counts["snippet_chars"],
        "settings": settings,
        "timing": {"wall_s": round(time.monotonic() - t0, 2), "shards_reused": reused},
    }
    stats["snippets_total"] = sum(stats["snippets"].values())
    CorpusPoolStats.parse(stats, out_dir / "stats.json").write(out_dir / "stats.json")
    return stats
