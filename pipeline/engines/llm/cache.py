"""The content-addressed request cache (SQLite, WAL, durable across kill -9) and the lookup of a
request's cached answer."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from pipeline.core.config import ModelPreset
from pipeline.core.records import dumps
from pipeline.engines.llm.protocol import LLMRequest, LLMResult, request_key


class RequestCache:
    """SQLite in WAL mode: each finished request is committed before it is used, so kill -9 loses none."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash can lose the last commits.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, response TEXT, created REAL)"
        )

    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT response FROM responses WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, response: dict) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", (key, model, dumps(response), time.time())
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for the Batch API's submissions table (pipeline.engines.batch) beside the answers."""
        return self._db

    def close(self) -> None:
        self._db.close()


def lookup(cache: RequestCache | None, preset: ModelPreset, req: LLMRequest) -> LLMResult | None:
    """The cached result of a request, or None. Lets a stage skip starting a server when all are cached."""
    if cache is None:
        return None
    key = request_key(preset.identity(), preset.api, req.messages, req.prompt, req.params)
    hit = cache.get(key)
    if hit is None:
        return None
    return LLMResult(id=req.id, key=key, choices=hit["choices"], usage=hit["usage"],
                     cost_usd=hit["cost_usd"], cached=True, attempts=0)
