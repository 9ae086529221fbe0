"""sqlite verdict cache shared by the lm-eval filters and ``axolotl-treft judge``."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .prompts import template_hash


class JudgeCache:
    """Verdicts keyed by endpoint, model, scoring mode, prompt template, metric, question, answer and context.

    Every verdict is committed as soon as it arrives (WAL, ``synchronous=NORMAL``: safe against a crashed
    run, cheap enough for thousands of verdicts per minute).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, value TEXT, t REAL)")

    @staticmethod
    def key(
        base_url: str,
        model: str,
        mode: str,
        template: str,
        metric: str,
        question: str,
        answer: str,
        context: str = "",
    ) -> str:
        blob = json.dumps(
            [base_url.rstrip("/"), model, mode, template_hash(template), metric, question, answer, context]
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM verdicts WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?)",
                (key, json.dumps(dict(value)), time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
