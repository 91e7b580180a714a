"""Database engine and sessions: one engine per process, made by a factory (never at import)."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, CursorResult, Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import Executable

log = logging.getLogger(__name__)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, full fsync on commit and foreign keys."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"timeout": 30})
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Autocommit off in the driver so BEGIN IMMEDIATE below is ours to issue.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # Take the write lock at the start: no lock upgrade deadlocks between writers.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on any error."""
    with factory() as session, session.begin():
        yield session


class WriterLock:
    """Turns SQLite's one-writer rule into a queue instead of a poll.

    SQLite lets one connection write at a time; the others retry in its busy handler, which
    sleeps 1, 2, 5, 10… ms between tries: under concurrent writers most of the time goes to
    sleeping. Writers that hold this lock around their transaction wait their turn on a
    thread lock and, across processes, on ``flock`` of a file beside the database; each
    wakes the moment the previous one commits. PostgreSQL needs no such lock (row locks).
    """

    def __init__(self, path: Path | None) -> None:
        self._thread_lock = threading.Lock()
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        self._thread_lock.acquire()
        if self._path is not None:
            try:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()


_WRITER_LOCKS: dict[Path, WriterLock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def writer_lock(engine: Engine) -> WriterLock | nullcontext[None]:
    """The lock to hold around a write transaction on ``engine`` (see :class:`WriterLock`).

    One per database file and process, whoever asks: writers of the same process queue on
    its thread lock, and its lock file is opened once.
    """
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return nullcontext()
    if not url.database or url.database == ":memory:":
        return WriterLock(None)
    database = Path(url.database).resolve()
    with _WRITER_LOCKS_GUARD:
        lock = _WRITER_LOCKS.get(database)
        if lock is None:
            lock_path = database.with_name(database.name + ".writer-lock")
            lock = _WRITER_LOCKS[database] = WriterLock(lock_path)
        return lock


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def insert_ignore(dialect: str, table: Table, key: str | list[str]) -> Any:
    """``INSERT … ON CONFLICT (key) DO NOTHING`` for this dialect (values bound per call)."""
    columns = [key] if isinstance(key, str) else key
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=columns)
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=columns)
    raise RuntimeError(f"unsupported database {dialect}")  # pragma: no cover


class DriverStatement:
    """A Core statement compiled once per dialect and run with ``exec_driver_sql``.

    For the few statements the receive path runs per instance: SQLAlchemy's ``execute``
    of a cached Core statement still costs 0.1–0.15 ms of CPU per call (cache key,
    execution context, result metadata), ten times the driver's own time. Here the SQL
    string, the order of its parameters and their types' bind processors (enums, UTC
    datetimes) are worked out once; a call converts the values and hands them to the
    driver through the connection, so errors are still SQLAlchemy's (``DBAPIError``, with
    connection invalidation) and the transaction is the caller's.

    ``keys`` are the parameter names of an INSERT whose values are bound per call.
    """

    def __init__(self, statement: Executable, keys: Sequence[str] = ()) -> None:
        self._statement = statement
        self._keys = list(keys)
        self._compiled: dict[str, _Compiled] = {}

    def execute(self, connection: Connection, params: Mapping[str, Any]) -> CursorResult[Any]:
        compiled = self._compiled.get(connection.dialect.name)
        if compiled is None:
            compiled = self._compiled[connection.dialect.name] = _Compiled(
                self._statement, self._keys, connection.dialect
            )
        return connection.exec_driver_sql(compiled.sql, compiled.parameters(params))


class _Compiled:
    def __init__(self, statement: Executable, keys: list[str], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=keys or None)  # type: ignore[attr-defined]
        assert isinstance(compiled, SQLCompiler)
        self._compiled = compiled
        self.sql = compiled.string
        self._positional = compiled.positional
        # every parameter by the name the SQL string uses (anonymous ones resolved)
        binds = {compiled.bind_names[bind]: bind for bind in compiled.binds.values()}
        self._names: list[str] = (
            list(compiled.positiontup or []) if compiled.positional else list(binds)
        )
        self._processors: list[Callable[[Any], Any] | None] = [
            binds[name].type.bind_processor(dialect) for name in self._names
        ]

    def parameters(self, params: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        values = self._compiled.construct_params(dict(params))
        converted = [
            values[name] if processor is None else processor(values[name])
            for name, processor in zip(self._names, self._processors, strict=True)
        ]
        if self._positional:
            return tuple(converted)
        return dict(zip(self._names, converted, strict=True))
