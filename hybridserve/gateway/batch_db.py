"""The SQLite database of the Batch API (files, batches, batch lines), opened on first use.

It lives beside the budget ledger (`batch_paths`): `hybridserve-batches.sqlite` and a
`hybridserve-files` folder, unless `gateway.files_dir` names the folder. Nothing is created
on disk until a file is uploaded: a gateway that never sees the Batch API leaves no trace,
and one restarted over an existing database resumes what it holds. Gateway replicas that
share the file (one host, or one volume) share the batches: each batch is run by the replica
holding its lease (see batch_runner), and a write waits up to BUSY_TIMEOUT_MS for another
replica's.

Like the ledger, it runs in WAL mode with synchronous=NORMAL: a committed row survives a
crash of the gateway process. All access goes through one lock, so batch validation may
insert its lines from a worker thread while the event loop keeps answering.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hybridserve.config import GatewayConfig

DB_NAME = "hybridserve-batches.sqlite"
FILES_DIR_NAME = "hybridserve-files"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, lines INTEGER NOT NULL,
    created_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, owner TEXT NOT NULL, key_id TEXT,
    endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL,
    status TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    in_progress_at REAL, finalizing_at REAL, completed_at REAL, failed_at REAL, expired_at REAL,
    cancelling_at REAL, cancelled_at REAL, output_file_id TEXT, error_file_id TEXT,
    errors TEXT, metadata TEXT, total INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', status_code INTEGER, request_id TEXT, response TEXT,
    error TEXT, usd REAL NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0,
    gateway_tokens INTEGER NOT NULL DEFAULT 0, device_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, line))""",
    "CREATE INDEX IF NOT EXISTS batch_lines_by_state ON batch_lines (batch_id, state)",
)
# Columns added after the first release: (table, column, type); added to an older database on open.
_ADDED = (("batches", "lease_holder", "TEXT"), ("batches", "lease_until", "REAL"))
BUSY_TIMEOUT_MS = 10_000   # replicas sharing the file wait this long for each other's writes


def batch_paths(gw: GatewayConfig) -> tuple[Path, Path]:
    """(database, files folder) for a gateway config: beside the ledger unless files_dir is set."""
    ledger = Path(gw.ledger_path)
    folder = Path(gw.files_dir) if gw.files_dir else ledger.with_name(FILES_DIR_NAME)
    return ledger.with_name(DB_NAME), folder


class BatchDb:
    """One SQLite connection, opened (and the schema made) on the first write or on a read of a
    database that already exists."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.RLock()
        self._db: sqlite3.Connection | None = None

    def exists(self) -> bool:
        return self._db is not None or self.path.exists()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            for statement in _SCHEMA:
                db.execute(statement)
            for table, column, kind in _ADDED:
                if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            self._db = db
        return self._db

    def read(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows of a query; none when the database does not exist yet (nothing is created)."""
        if not self.exists():
            return []
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def read_dicts(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        """`read`, each row as {column: value}."""
        if not self.exists():
            return []
        with self.lock:
            cur = self.db.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def write(self, sql: str, args: tuple = ()) -> int:
        """Run one statement; the number of rows it changed."""
        with self.lock:
            return self.db.execute(sql, args).rowcount

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Statements that commit together or not at all."""
        with self.lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            if self._db is not None:
                self._db.close()
                self._db = None

