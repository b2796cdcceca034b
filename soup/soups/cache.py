"""The score cache: every evaluation stored in a database table, ``soup_scores``.

A score is keyed by the evaluator's identity (name, arguments, version, direction) and the
candidate's identity (ingredient content fingerprints + weights + rules + dtype), so a re-run — or a
run after one new ingredient arrived — evaluates only what is new.

Where it lives: an embedded sqlite file under the user cache dir by default (``SOUP_CACHE`` or
``--cache`` to move it: a path or ``sqlite:///path``, the same file either way), or any SQLAlchemy
database URL — the same URL as an optuna storage (``postgresql+psycopg://user@host/db``), so machines
that share a study share their scores too. The table sits beside optuna's own tables.

Concurrent runs: one short transaction per write and a busy timeout (sqlite files also use the WAL
journal), so several processes, threads or machines can read and write the same cache. Two writers
of one key store equal scores (the key is the content), so the last one simply wins.

Per-example scores (racing, ``soup.soups.racing``) live in a second table, ``soup_example_scores``,
keyed by the same evaluator and candidate keys plus the example's index: an example scored once, by
any run on any machine sharing the database, is never scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from soup.errors import SoupError
from soup.soups.evaluate import Score

__all__ = ["ScoreCache", "default_cache_path", "candidate_key", "evaluator_key", "display_url", "db_file", "engine",
           "check_db_place", "ensure_table"]

TABLE = "soup_scores"
EXAMPLE_TABLE = "soup_example_scores"
_LEGACY_TABLE = "scores"  # sqlite caches written before the table was named for sharing a database

_metadata = sa.MetaData()
_scores = sa.Table(
    TABLE, _metadata,
    sa.Column("evaluator", sa.String(64), primary_key=True),  # evaluator_key: sha256 hex
    sa.Column("candidate", sa.String(64), primary_key=True),  # candidate_key: sha256 hex
    sa.Column("value", sa.Double, nullable=False),  # the primary metric (a 64-bit float, exact)
    sa.Column("metrics", sa.Text, nullable=False),  # JSON {metric: value}
    sa.Column("primary", sa.Text, nullable=False),
    sa.Column("name", sa.Text),  # the candidate's name when it was scored (for people reading the table)
    sa.Column("identity", sa.Text),  # the evaluator's identity, JSON
    sa.Column("created", sa.String(32)),
)
_examples = sa.Table(
    EXAMPLE_TABLE, _metadata,
    sa.Column("evaluator", sa.String(64), primary_key=True),  # evaluator_key
    sa.Column("candidate", sa.String(64), primary_key=True),  # candidate_key
    sa.Column("example", sa.Integer, primary_key=True, autoincrement=False),  # the example's index
    sa.Column("value", sa.Double, nullable=False),  # its score (64-bit float, exact)
)


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
                  dtype: str | None = None, extra: Mapping[str, Any] | None = None) -> str:
    """Content identity of a soup: ingredients with a non-zero weight, their weights, rules, dtype, the
    options that change its bytes (``extra``: a merge method and its parameters and base, a forced
    accumulation dtype...), and the soup's definition (``DEFINITION``: scores cached under an older
    definition are not reused)."""
    parts = sorted((fp, round(float(w), 12)) for fp, w in zip(fingerprints, weights) if w != 0)
    key = {"parts": parts, "rules": list(rules), "dtype": dtype, "definition": DEFINITION}
    if extra:
        key["options"] = dict(extra)
    return hashlib.sha256(_stable(key).encode()).hexdigest()


# what a candidate's tensors are: bump when the arithmetic changes (2: accumulation "auto", float64 for
# 32-bit inputs, instead of float32 for every input)
DEFINITION = 2


def display_url(url: str) -> str:
    """A database URL as it may be printed: the password masked (``postgresql://me:***@host/db``)."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: mask whatever sits between ':' and '@'
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def db_file(location: str | Path | None) -> Path | None:
    """The sqlite file a cache location or storage URL names (None for a database server or none)."""
    if location is None or location == "default":
        return None
    text = str(location)
    if "://" not in text:
        return Path(text)
    try:
        url = sa.engine.make_url(text)
    except Exception:
        return None
    return Path(url.database) if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
        else None


class ScoreCache:
    """Get and put scores; ``ScoreCache(None)`` is a cache that remembers nothing (``--no-cache``).

    Args:
        location: ``"default"`` (the user cache dir, or ``SOUP_CACHE``), a sqlite file path, a
            ``sqlite:///path`` URL, any SQLAlchemy database URL, or None for no cache.

    Raises:
        SoupError: the database cannot be opened (one line, password masked).
    """

    def __init__(self, location: str | Path | None = "default") -> None:
        self._engine: sa.engine.Engine | None = None
        self.path: Path | None = None  # the sqlite file, when the cache is one
        self.url: str | None = None  # the printable location (password masked)
        if location is None:
            return
        own = location == "default" and not os.environ.get("SOUP_CACHE")  # soup's own folder: created
        if location == "default":
            location = default_cache_path()
        text = str(location)
        if "://" not in text:  # a plain path: soup's own sqlite file
            self.path = Path(text)
            url = sa.engine.URL.create("sqlite", database=str(self.path))
        else:
            self.path = db_file(text)
            url = text
        self.url = str(self.path) if "://" not in text else display_url(text)
        try:
            if self.path is not None and own:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            check_db_place(text, "score cache")
            self._engine = engine(url)
            ensure_table(self._engine, _scores, legacy=_LEGACY_TABLE)
            ensure_table(self._engine, _examples)
        except OSError as e:
            raise SoupError(f"score cache {self.url}: {e.strerror or e}") from None
        except ModuleNotFoundError as e:
            raise SoupError(f"score cache {self.url}: the database driver is not installed ({e}); for PostgreSQL "
                            "install psycopg[binary] and write postgresql+psycopg://...") from None
        except (sa.exc.SQLAlchemyError, ValueError) as e:
            raise SoupError(f"score cache {self.url}: {_reason(e)}") from None

    def get(self, evaluator: str, candidate: str) -> Score | None:
        if self._engine is None:
            return None
        q = sa.select(_scores.c.value, _scores.c.metrics, _scores.c.primary).where(
            _scores.c.evaluator == evaluator, _scores.c.candidate == candidate)
        row = self._run(lambda conn: conn.execute(q).first())
        return None if row is None else Score(float(row[0]), json.loads(row[1]), row[2])

    def put(self, evaluator: str, candidate: str, score: Score, *, name: str = "",
            identity: Mapping[str, Any] | None = None) -> None:
        if self._engine is None:
            return
        values = dict(value=float(score.value), metrics=json.dumps(score.metrics), primary=score.primary, name=name,
                      identity=_stable(identity or {}),
                      created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        where = (_scores.c.evaluator == evaluator, _scores.c.candidate == candidate)

        def upsert(conn: sa.engine.Connection) -> None:  # portable: update, else insert
            if conn.execute(sa.update(_scores).where(*where).values(**values)).rowcount == 0:
                conn.execute(sa.insert(_scores).values(evaluator=evaluator, candidate=candidate, **values))

        try:
            self._run(upsert, write=True)
        except SoupError:
            # another writer inserted the same key between our update and insert: update its row
            self._run(lambda conn: conn.execute(sa.update(_scores).where(*where).values(**values)), write=True)

    def count(self) -> int:
        if self._engine is None:
            return 0
        return int(self._run(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(_scores)).scalar()))

    def get_examples(self, evaluator: str, candidate: str) -> dict[int, float]:
        """Every per-example score stored for this evaluator and candidate: ``{example index: value}``."""
        if self._engine is None:
            return {}
        q = sa.select(_examples.c.example, _examples.c.value).where(
            _examples.c.evaluator == evaluator, _examples.c.candidate == candidate)
        return {int(i): float(v) for i, v in self._run(lambda conn: conn.execute(q).all())}

    def put_examples(self, evaluator: str, candidate: str, values: Mapping[int, float]) -> None:
        """Store per-example scores; an index already stored (by another run, another machine) is left
        as it is: its value is the same, being a function of the content."""
        if self._engine is None or not values:
            return
        rows = [dict(evaluator=evaluator, candidate=candidate, example=int(i), value=float(v))
                for i, v in values.items()]

        def insert(conn: sa.engine.Connection) -> None:
            dialect = conn.dialect.name
            if dialect in ("sqlite", "postgresql"):  # insert-or-ignore in one statement
                from importlib import import_module

                stmt = import_module(f"sqlalchemy.dialects.{dialect}").insert(_examples).on_conflict_do_nothing()
                conn.execute(stmt, rows)
                return
            have = {int(i) for (i,) in conn.execute(sa.select(_examples.c.example).where(
                _examples.c.evaluator == evaluator, _examples.c.candidate == candidate))}
            fresh = [r for r in rows if r["example"] not in have]
            if fresh:
                conn.execute(sa.insert(_examples), fresh)

        try:
            self._run(insert, write=True)
        except SoupError:  # another writer stored some of them between our read and insert: once more
            self._run(insert, write=True)

    def count_examples(self) -> int:
        """How many per-example scores are stored."""
        if self._engine is None:
            return 0
        return int(self._run(lambda conn: conn.execute(sa.select(sa.func.count()).select_from(_examples)).scalar()))

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _run(self, fn, *, write: bool = False) -> Any:
        try:
            with (self._engine.begin() if write else self._engine.connect()) as conn:
                return fn(conn)
        except sa.exc.SQLAlchemyError as e:
            raise SoupError(f"score cache {self.url}: {_reason(e)}") from None


def check_db_place(location: str | Path, what: str) -> None:
    """Refuse an sqlite file that would be created where the user did not ask: in a folder that does
    not exist (sqlite creates the file, soup used to create the folders too, hiding a typo) or
    through a symbolic link to something missing. Database servers and existing files pass.

    Raises:
        SoupError: one line naming ``what`` (``score cache``, ``storage``) and the location.
    """
    path = db_file(location)
    if path is None:
        return
    shown = display_url(str(location)) if "://" in str(location) else str(location)
    if path.is_symlink() and not path.exists():
        raise SoupError(f"{what} {shown}: {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                        "soup never creates a link's target")
    folder = Path(os.path.abspath(path)).parent
    if not folder.is_dir():
        raise SoupError(f"{what} {shown}: the folder {folder} does not exist; soup creates no folder for a "
                        "database it is given: create it or fix the path")


def engine(url: str | sa.engine.URL) -> sa.engine.Engine:
    """An SQLAlchemy engine for soup's own tables: a busy timeout; sqlite files use the WAL journal
    (readers never block the writer). An sqlite file's folder must exist (``check_db_place``)."""
    if isinstance(url, str):
        check_db_place(url, "database")
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, pool_pre_ping=True)
    eng = sa.create_engine(parsed, connect_args={"timeout": 60})

    @sa.event.listens_for(eng, "connect")
    def _wal(dbapi_conn: Any, record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
        finally:
            cur.close()

    return eng


def ensure_table(eng: sa.engine.Engine, table: sa.Table, *, legacy: str | None = None) -> None:
    """Create ``table`` unless it exists (renaming an sqlite table called ``legacy``); safe when other
    processes race to do the same."""
    for attempt in range(5):
        try:
            with eng.begin() as conn:
                tables = set(sa.inspect(conn).get_table_names())
                if table.name in tables:
                    return
                if legacy and eng.dialect.name == "sqlite" and legacy in tables:
                    conn.execute(sa.text(f"ALTER TABLE {legacy} RENAME TO {table.name}"))
                    return
                table.create(conn, checkfirst=True)
            return
        except (sa.exc.IntegrityError, sa.exc.OperationalError, sa.exc.ProgrammingError):
            if attempt == 4:  # not a race after all
                raise
            import time

            time.sleep(0.05 * (attempt + 1))


def _reason(e: BaseException) -> str:
    """The database's own first line, without SQLAlchemy's statement dump and documentation link."""
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__
