"""The score cache: every evaluation stored in an embedded sqlite database.

A score is keyed by the evaluator's identity (name, arguments, version, direction) and the
candidate's identity (ingredient content fingerprints + weights + rules + dtype), so a re-run — or a
run after one new ingredient arrived — evaluates only what is new. The database lives under the
user cache dir by default (``SOUP_CACHE`` or ``--cache`` to move it; a path or ``sqlite:///path``).

Concurrent runs: WAL journal, a busy timeout and one short transaction per write, so several
processes (or threads) can read and write the same file without corrupting it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import SoupError
from .evaluate import Score

__all__ = ["ScoreCache", "default_cache_path", "candidate_key", "evaluator_key"]


def default_cache_path() -> Path:
    if os.environ.get("SOUP_CACHE"):
        return Path(os.environ["SOUP_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("soup")) / "scores.sqlite"


def _stable(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def evaluator_key(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(_stable(identity).encode()).hexdigest()


def candidate_key(fingerprints: Sequence[str], weights: Sequence[float], *, rules: Sequence[Any] = (),
                  dtype: str | None = None) -> str:
    """Content identity of a soup: ingredients with a non-zero weight, their weights, rules, dtype."""
    parts = sorted((fp, round(float(w), 12)) for fp, w in zip(fingerprints, weights) if w != 0)
    return hashlib.sha256(_stable({"parts": parts, "rules": list(rules), "dtype": dtype}).encode()).hexdigest()


class ScoreCache:
    """Get and put scores; ``ScoreCache(None)`` is a cache that remembers nothing (``--no-cache``)."""

    def __init__(self, location: str | Path | None = "default") -> None:
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if location is None:
            self.path = None
            return
        self.path = default_cache_path() if location == "default" else _path_of(location)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS scores (evaluator TEXT NOT NULL, candidate TEXT NOT NULL, "
                "value REAL NOT NULL, metrics TEXT NOT NULL, \"primary\" TEXT NOT NULL, name TEXT, "
                "identity TEXT, created TEXT, PRIMARY KEY (evaluator, candidate))")
        except sqlite3.Error as e:
            raise SoupError(f"score cache {self.path}: {e}") from None

    def get(self, evaluator: str, candidate: str) -> Score | None:
        if self._db is None:
            return None
        with self._lock:
            row = self._db.execute('SELECT value, metrics, "primary" FROM scores WHERE evaluator=? AND candidate=?',
                                   (evaluator, candidate)).fetchone()
        return None if row is None else Score(row[0], json.loads(row[1]), row[2])

    def put(self, evaluator: str, candidate: str, score: Score, *, name: str = "",
            identity: Mapping[str, Any] | None = None) -> None:
        if self._db is None:
            return
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (evaluator, candidate, score.value, json.dumps(score.metrics), score.primary, name,
                              _stable(identity or {}), now))

    def count(self) -> int:
        if self._db is None:
            return 0
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _path_of(location: str | Path) -> Path:
    text = str(location)
    if text.startswith("sqlite:///"):
        return Path(text[len("sqlite:///"):])
    if "://" in text:
        raise SoupError(f"score cache {text!r}: only sqlite paths or sqlite:/// URLs are supported")
    return Path(text)
