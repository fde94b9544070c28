"""The durable store of one collection: SQLite in WAL mode with synchronous=FULL.

SQLite is the log: a write is acknowledged only after its transaction has
committed, and with ``synchronous=FULL`` a commit has reached the disk. The
FAISS index is derived from these tables (index/collection.py).

Tables:
    items(rowid, id, seq, vector, metadata)   rowid = the FAISS id (AUTOINCREMENT: never reused)
    deletions(rowid, seq)                      rowids removed at seq (replayed as tombstones)
    meta(key, value)                           the collection's spec and the last sequence number

Group commit: writers hand their batches to one writer thread, which takes
every batch waiting, writes them in one transaction and commits once, so
concurrent clients share an fsync while each acknowledgement still means
"on disk". A batch either commits whole or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("tandem.index")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    seq INTEGER NOT NULL,
    vector BLOB NOT NULL,
    metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS items_seq ON items(seq);
CREATE TABLE IF NOT EXISTS deletions(rowid INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS deletions_seq ON deletions(seq);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreFull(OSError):
    """The disk (or the database) is full: the write was not stored."""


class StoreClosed(RuntimeError):
    """The store was closed (its collection dropped, or the server stopping) before or while a call used it."""


@dataclass
class Put:
    id: str
    vector: np.ndarray  # float32 [dim]
    metadata: str  # canonical JSON


@dataclass
class Written:
    """What one committed write did: for the in-memory index to apply."""

    seq: int
    added: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (rowid, vector)
    removed: list[int] = field(default_factory=list)  # rowids
    not_found: int = 0


@dataclass
class _Job:
    puts: Sequence[Put] = ()
    delete_ids: Sequence[str] = ()
    delete_where: tuple[str, list[Any]] | None = None
    future: Future[Written] = field(default_factory=Future)


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    # Before the first table exists only: 16 KiB pages hold several 2 KB rows (a 512-d vector) where 4 KiB
    # pages hold one, which left half of every page empty.
    db.execute("PRAGMA page_size=16384")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=10000")
    return db


class Store:
    """One collection's SQLite file. Reads may come from any thread; writes go through the writer thread."""

    def __init__(self, path: Path, dim: int, on_commit: Callable[[list[Written]], None] | None = None,
                 after_commit: Callable[[], None] | None = None):
        """`on_commit` runs in the writer thread after each commit and before any writer hears back,
        in commit order: the in-memory index applies writes there, so an acknowledged write is searchable.
        `after_commit` runs there once they have heard back (work the next writes may wait for, but not these)."""
        self.path, self.dim, self.on_commit, self.after_commit = Path(path), dim, on_commit, after_commit
        self._db = connect(self.path)
        self._db.executescript(SCHEMA)
        self._read_lock = threading.Lock()  # one read connection, shared
        self._readers: list[sqlite3.Connection] = []  # idle connections of `consistent` reads
        self._closed = False  # set under both locks: no read or write starts after it
        self._write_gate = threading.Lock()  # a write is queued whole before close() queues the writer's end
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name=f"store-{self.path.parent.name}", daemon=True)
        self._writer_db = connect(self.path)
        # Items stored, kept by the writer thread (the one place that changes them): count(*) reads the whole
        # table, which cost ms per commit at 100k items.
        self._count = int(self._db.execute("SELECT count(*) FROM items").fetchone()[0])
        self.commits = 0  # transactions committed (each is one fsync): for metrics and tests
        self._writer.start()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """The read connection, alone, while the store is open (closing it during a read crashed SQLite)."""
        with self._read_lock:
            if self._closed:
                raise self._closed_error()
            yield

    def _closed_error(self) -> StoreClosed:
        return StoreClosed(f"collection {self.path.parent.name!r} was dropped (or the server is stopping) while this "
                           "call ran")

    # -- meta ------------------------------------------------------------------
    def get_meta(self) -> dict[str, str]:
        with self._reading():
            return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, values: dict[str, str]) -> None:
        with self._reading():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(values.items()))
            self._db.execute("COMMIT")

    def last_seq(self) -> int:
        return int(self.get_meta().get("seq", "0"))

    # -- writes (group commit) -------------------------------------------------
    def write(self, puts: Sequence[Put] = (), delete_ids: Sequence[str] = (),
              delete_where: tuple[str, list[Any]] | None = None) -> Future[Written]:
        """Queue one write; the future resolves once it is committed (durable), or fails whole."""
        job = _Job(puts, delete_ids, delete_where)
        with self._write_gate:
            if self._closed:
                raise self._closed_error()
            self._jobs.put(job)
        return job.future

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            jobs = [job]
            while True:  # everything that queued up while the last commit was on disk
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                jobs.append(nxt)
            self._commit(jobs)

    def _commit(self, jobs: list[_Job]) -> None:
        db = self._writer_db
        results: list[Written] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            seq = int((db.execute("SELECT value FROM meta WHERE key='seq'").fetchone() or ["0"])[0])
            for job in jobs:
                seq += 1
                results.append(self._apply(db, job, seq))
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('seq', ?)", (str(seq),))
            db.execute("COMMIT")
            self.commits += 1
            self._count += sum(len(w.added) - len(w.removed) for w in results)
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            error: Exception = e
            if isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower():
                error = StoreFull(f"the disk holding {self.path} is full ({e}); nothing of this write was stored")
            for job in jobs:
                job.future.set_exception(error)
            return
        if self.on_commit is not None:
            try:
                self.on_commit(results)
            except Exception as e:  # the data is safe on disk; the index is rebuilt from it at the next start
                log.exception("applying committed writes to the index failed")
                for job in jobs:
                    job.future.set_exception(e)
                return
        for job, written in zip(jobs, results):
            job.future.set_result(written)
        if self.after_commit is not None:
            try:
                self.after_commit()
            except Exception:  # a snapshot that failed (disk full, ...): the store has every write
                log.exception("after a commit")

    def _apply(self, db: sqlite3.Connection, job: _Job, seq: int) -> Written:
        out = Written(seq)
        doomed: list[int] = []
        if job.delete_where is not None:
            where, params = job.delete_where
            doomed += [r for (r,) in db.execute(f"SELECT rowid FROM items WHERE {where}", params)]
        for item_id in job.delete_ids:
            row = db.execute("SELECT rowid FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                out.not_found += 1
            else:
                doomed.append(row[0])
        for put in job.puts:  # an upsert of a stored id replaces it: old rowid out, new rowid in
            row = db.execute("SELECT rowid FROM items WHERE id = ?", (put.id,)).fetchone()
            if row is not None:
                doomed.append(row[0])
        doomed = sorted(set(doomed))
        if doomed:
            db.executemany("DELETE FROM items WHERE rowid = ?", [(r,) for r in doomed])
            db.executemany("INSERT OR REPLACE INTO deletions(rowid, seq) VALUES (?, ?)", [(r, seq) for r in doomed])
        out.removed = doomed
        for put in job.puts:
            vec = np.ascontiguousarray(put.vector, np.float32)
            cur = db.execute("INSERT INTO items(id, seq, vector, metadata) VALUES (?, ?, ?, ?)",
                             (put.id, seq, vec.tobytes(), put.metadata))
            out.added.append((int(cur.lastrowid), vec))  # type: ignore[arg-type]
        return out

    # -- reads -----------------------------------------------------------------
    def _vector(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, np.float32)

    def count(self) -> int:
        """Items stored now (committed)."""
        return self._count

    def get(self, ids: Sequence[str]) -> dict[str, tuple[int, np.ndarray, str]]:
        """{id: (rowid, vector, metadata JSON)} for the ids stored."""
        out: dict[str, tuple[int, np.ndarray, str]] = {}
        with self._reading():
            for start in range(0, len(ids), 500):
                chunk = list(ids[start : start + 500])
                marks = ",".join("?" * len(chunk))
                for item_id, rowid, blob, meta in self._db.execute(
                        f"SELECT id, rowid, vector, metadata FROM items WHERE id IN ({marks})", chunk):
                    out[item_id] = (rowid, self._vector(blob), meta)
        return out

    def newest(self, before: int, limit: int) -> list[tuple[int, str, str]]:
        """Up to `limit` items (rowid, id, metadata JSON) with rowids below `before`, newest first: a page of a
        walk from the newest item back (before = 2**63 - 1 to start)."""
        with self._reading():
            return self._db.execute("SELECT rowid, id, metadata FROM items WHERE rowid < ? ORDER BY rowid DESC "
                                    "LIMIT ?", (before, limit)).fetchall()

    def by_rowids(self, rowids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """{rowid: (id, metadata JSON)} for the rowids still stored."""
        out: dict[int, tuple[str, str]] = {}
        with self._reading():
            for start in range(0, len(rowids), 500):
                chunk = [int(r) for r in rowids[start : start + 500]]
                marks = ",".join("?" * len(chunk))
                for rowid, item_id, meta in self._db.execute(
                        f"SELECT rowid, id, metadata FROM items WHERE rowid IN ({marks})", chunk):
                    out[rowid] = (item_id, meta)
        return out

    def matching(self, where: str, params: list[Any]) -> np.ndarray:
        """int64 rowids of the items a filter (SQL over `metadata`) matches."""
        with self._reading():
            return _matching(self._db, where, params)

    def rows_by_rowid(self, rowids: Sequence[int]) -> dict[int, np.ndarray]:
        with self._reading():
            return _rows_by_rowid(self._db, rowids)

    def scan(self, after_seq: int = 0, up_to_seq: int | None = None, batch: int = 10_000
             ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rowids int64 [b], vectors float32 [b, dim]) of the stored items written in (after_seq, up_to_seq]; each
        page a read of its own (see `consistent` for one state throughout)."""
        last, top = 0, up_to_seq if up_to_seq is not None else 2**62
        while True:
            with self._reading():
                page = _scan_page(self._db, self.dim, after_seq, top, last, batch)
            if page is None:
                return
            last = int(page[0][-1])
            yield page

    @contextlib.contextmanager
    def consistent(self) -> Iterator[Reader]:
        """Reads that all see one state of the store: one SQLite read transaction on a connection of their own
        (kept for the next such read), for searches that read in several queries (a filter's matches, then their
        vectors; a scan page by page). A write committed meanwhile is seen by all of them or by none: an item
        replaced between two of them is neither missed nor found twice."""
        with self._read_lock:
            if self._closed:
                raise self._closed_error()
            db = self._readers.pop() if self._readers else connect(self.path)
        db.execute("BEGIN")  # deferred: the snapshot is taken at the first read
        try:
            yield Reader(db, self.dim)
        finally:
            db.execute("COMMIT")
            with self._read_lock:
                if self._closed or len(self._readers) >= 4:
                    db.close()
                else:
                    self._readers.append(db)

    def deleted_after(self, seq: int) -> np.ndarray:
        with self._reading():
            return np.fromiter((r for (r,) in self._db.execute("SELECT rowid FROM deletions WHERE seq > ?", (seq,))),
                               np.int64)

    def prune_deletions(self, up_to_seq: int) -> None:
        """Forget deletions that a durable snapshot no longer needs."""
        with self._reading():
            self._db.execute("DELETE FROM deletions WHERE seq <= ?", (up_to_seq,))

    def close(self) -> None:
        """Writes queued before this commit; later calls raise StoreClosed; reads in progress on the shared
        connection finish first (a `consistent` reader keeps its own connection until it returns it)."""
        with self._write_gate, self._read_lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._writer.join(timeout=30)
        self._writer_db.close()
        with self._read_lock:
            self._db.close()
            for db in self._readers:
                db.close()
            self._readers.clear()


class Reader:
    """The reads of Store.consistent, on its connection (within one read transaction)."""

    def __init__(self, db: sqlite3.Connection, dim: int):
        self.db, self.dim = db, dim

    def matching(self, where: str, params: list[Any]) -> np.ndarray:
        return _matching(self.db, where, params)

    def rows_by_rowid(self, rowids: Sequence[int]) -> dict[int, np.ndarray]:
        return _rows_by_rowid(self.db, rowids)

    def scan(self, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        last = 0
        while (page := _scan_page(self.db, self.dim, 0, 2**62, last, batch)) is not None:
            last = int(page[0][-1])
            yield page


def _matching(db: sqlite3.Connection, where: str, params: list[Any]) -> np.ndarray:
    return np.fromiter((r for (r,) in db.execute(f"SELECT rowid FROM items WHERE {where}", params)), np.int64)


def _rows_by_rowid(db: sqlite3.Connection, rowids: Sequence[int]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(rowids), 500):
        chunk = [int(r) for r in rowids[start : start + 500]]
        marks = ",".join("?" * len(chunk))
        for rowid, blob in db.execute(f"SELECT rowid, vector FROM items WHERE rowid IN ({marks})", chunk):
            out[rowid] = np.frombuffer(blob, np.float32)
    return out


def _scan_page(db: sqlite3.Connection, dim: int, after_seq: int, top: int, last: int, batch: int
               ) -> tuple[np.ndarray, np.ndarray] | None:
    rows = db.execute("SELECT rowid, vector FROM items WHERE seq > ? AND seq <= ? AND rowid > ? ORDER BY rowid "
                      "LIMIT ?", (after_seq, top, last, batch)).fetchall()
    if not rows:
        return None
    return (np.array([r for r, _ in rows], np.int64),
            np.frombuffer(b"".join(v for _, v in rows), np.float32).reshape(len(rows), dim))
