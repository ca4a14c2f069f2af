"""The decontaminate stage's records in and dataset out: the pool's exercises and textbooks, and the
kept records as a Hugging Face dataset (train.jsonl and one parquet shard, flat string columns).

    python -c "import datasets; print(datasets.load_dataset('data/dataset')['train'])"
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.records import RecordError, atomic_path, read_jsonl, write_jsonl
from pipeline.core.schema import KIND_FILES, RECORD_FIELDS, exercise_program, exercise_prompt, require_parsed

KINDS = KIND_FILES  # the input files, by kind
DATASET_COLUMNS = ("id", "kind", "text", "prompt", "completion", "tests", "topic", "subtopic", "audience",
                   "difficulty", "model")
PARQUET_SHARD = "data/train-00000-of-00001.parquet"


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
    with atomic_path(dataset_dir / PARQUET_SHARD) as tmp:  # a killed run never leaves half a shard
        table.to_parquet(str(tmp))
    return {"rows": len(rows), "columns": list(DATASET_COLUMNS), "jsonl": "train.jsonl", "parquet": PARQUET_SHARD}
