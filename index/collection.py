"""One collection: the durable store (index/store.py) plus the FAISS index derived from it.

Index life:
- The index is an ``IndexIDMap`` over a ``faiss.index_factory`` index; FAISS
  ids are the store's rowids, never reused.
- Writes reach the index in the store's writer thread, right after their
  commit and before the writer is answered: an acknowledged write is durable
  and searchable.
- Deletes (and replaced items) become tombstones: an ``IDSelector`` keeps them
  out of every search, because GPU indexes and some CPU ones cannot remove
  ids. ``rebuild`` (in the background) builds a fresh index from the stored
  items only, which drops them.
- Specs that need training (IVF, PQ, ...) and the default "auto" spec answer
  exactly from a Flat index until enough vectors exist; then the real index
  is trained and filled in a background thread and swapped in.
- Snapshots: the index is written to ``index-<seq>.faiss`` (temp file, fsync,
  rename, fsync dir), then ``snapshot.json`` names it with its sequence number
  and sha256, written the same way. Start-up loads the snapshot when its hash
  is right and replays the store's writes after it; a missing or corrupt
  snapshot is logged and the index is rebuilt from the store.
- Locking: searches and snapshots share the index (index/rwlock.py), writes
  and swaps hold it alone. The periodic snapshot writes the index to a
  temporary file (FAISS streams it there: no copy of the index in memory) in
  the store's writer thread once the writers it committed have heard back, so
  searches go on meanwhile and only writes wait; the file is hashed, fsynced
  and renamed in a background thread.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bundle.files import move_atomically, write_atomically
from bundle.manifest import sha256_of

from . import gpu
from .rwlock import ReadWriteLock
from .store import Put, Reader, Store, StoreClosed, Written, connect

log = logging.getLogger("tandem.index")

METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
AUTO = "auto"
AUTO_MIN_VECTORS = 50_000  # below this, exact search is fast enough and needs no training
EXACT_FILTER_MAX = 20_000  # a filter matching at most this many items is answered by scoring them exactly
# IVF indexes get the smallest nprobe reaching this recall@10 on a sample of their own vectors (each query's
# own item left out). 0.97 on the sample gave 0.95-0.97 on unseen queries (docs/benchmarks.md).
TARGET_RECALL = 0.97
EXACT_BLOCK = 10_000  # stored vectors scored at once by an exact search over a filter's matches
HNSW_EF_SEARCH = 64  # candidates an HNSW search keeps (FAISS's default is 16); see _with_ef_search
SNAPSHOT_EVERY_CHANGES = 20_000
STORE_FILE, SNAPSHOT_FILE = "store.sqlite", "snapshot.json"
SEARCH_THREADS = os.cpu_count() or 1
# Deleted items wait as tombstones in the index; past this share of it a background rebuild compacts them away.
COMPACT_DELETED_FRACTION = 0.1
COMPACT_MIN_DELETED = 1000
BACKGROUND_JOIN_S = 5.0  # how long close() waits for a background training or compaction


class IndexBusy(RuntimeError):
    """A search that would have to wait for a write holding the index, or for the GPU (Collection.search,
    wait=False)."""


class CollectionError(ValueError):
    """A request the collection cannot take (bad spec, wrong dimension, ...); the message says why."""


@dataclass(frozen=True)
class Spec:
    name: str
    model: str
    version: str
    model_sha256: str
    dim: int
    metric: str
    index_spec: str
    created_at: str

    @staticmethod
    def new(name: str, model: str, version: str, model_sha256: str, dim: int, metric: str, index_spec: str) -> Spec:
        return Spec(name, model, version, model_sha256, dim, metric or "cosine", index_spec.strip() or AUTO,
                    dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


MAX_SPEC_CHARS = 200
MAX_NLIST = 1 << 18  # IVF lists; training wants 39 vectors a list, so 10M vectors for the largest
# FAISS builds these graphs once over all the vectors; a collection adds them a write at a time.
WHOLE_BUILD_ONLY = ("NSG", "NNDescent")


def check_spec(dim: int, index_spec: str, metric: str) -> None:
    """Raise CollectionError unless FAISS can build `index_spec` for `dim` and `metric`, and a collection can
    use what it builds: parameters FAISS accepts but aborts on later (HNSW0), cannot search with (IVF0), or
    takes minutes to allocate (IVF99999999) are refused here, before anything is stored."""
    if metric not in METRICS:
        raise CollectionError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    if index_spec == AUTO:
        return
    if len(index_spec) > MAX_SPEC_CHARS or not index_spec.isprintable():
        raise CollectionError(f"index_spec {shown(index_spec)} is not a FAISS index_factory string (at most "
                              f"{MAX_SPEC_CHARS} printable characters); e.g. 'Flat', 'HNSW32', 'IVF1024,Flat'")
    if "IDMap" in index_spec:
        raise CollectionError(f"index_spec {index_spec!r}: leave out IDMap, ids are mapped by the collection")
    if "L2norm" in index_spec and metric != "cosine":
        raise CollectionError(f"index_spec {index_spec!r}: L2norm makes the index compare directions, while metric "
                              f"{metric} compares the vectors as given (exact and filtered searches would score "
                              "differently); use metric cosine, which stores unit vectors, without L2norm")
    for name in WHOLE_BUILD_ONLY:
        if name in index_spec:
            raise CollectionError(f"index_spec {index_spec!r}: FAISS builds {name} indexes once over all their "
                                  "vectors, and a collection adds vectors a write at a time; use 'HNSW32' for a graph")
    for m in re.finditer(r"IVF(\d+)", index_spec):
        if not 1 <= int(m.group(1)) <= MAX_NLIST:
            raise CollectionError(f"index_spec {index_spec!r}: IVF needs 1 to {MAX_NLIST:,} lists, got {m.group(1)} "
                                  "(about 4 x sqrt(vectors) is usual; 'auto' picks it as the collection grows)")
    for m in re.finditer(r"IMI(\d+)x(\d+)", index_spec):
        if int(m.group(1)) * int(m.group(2)) > 18:
            raise CollectionError(f"index_spec {index_spec!r}: IMI{m.group(1)}x{m.group(2)} makes "
                                  f"2^{int(m.group(1)) * int(m.group(2))} lists, more than {MAX_NLIST:,}")
    for m in re.finditer(r"HNSW(\d+)", index_spec):
        if not 2 <= int(m.group(1)) <= 256:
            raise CollectionError(f"index_spec {index_spec!r}: HNSW needs 2 to 256 neighbours a node, got "
                                  f"{m.group(1)} (16 to 64 is usual)")
    try:
        built = faiss.index_factory(dim, index_spec, METRICS[metric])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "not understood"
        raise CollectionError(f"index_spec {index_spec!r} is not a FAISS index_factory string FAISS can build "
                              f"for dim {dim} ({first}); e.g. 'Flat', 'HNSW32', 'IVF1024,Flat'") from None
    index = faiss.downcast_index(built)  # a view: `built` keeps it alive
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            t = index.chain.at(i)
            if t.d_out > t.d_in:  # PCA2000 on 64 dims: FAISS builds it and fails only when training it
                raise CollectionError(f"index_spec {index_spec!r}: a transform cannot make {t.d_out} dimensions out "
                                      f"of {t.d_in} (the model's dim is {dim}); ask for at most {t.d_in}")


def shown(text: str, limit: int = 80) -> str:
    """`text` quoted for an error message, cut to `limit` characters: messages travel in gRPC trailers, which
    refuse more than 8 KiB, and need not echo a client's whole input back."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


@functools.lru_cache(maxsize=64)
def _exact_kind(kind: str, dim: int, metric: str) -> bool:
    """Whether a factory string scores every vector exactly: a flat index, after normalisation only, or re-ranked
    exactly by a refine step over one ('L2norm,Flat', 'Flat,Refine(Flat)')."""
    return _exact_index(faiss.index_factory(dim, kind, METRICS[metric]))


def _exact_index(owner: faiss.Index) -> bool:
    index = faiss.downcast_index(owner)  # a view: `owner` keeps the C++ object alive meanwhile
    if isinstance(index, faiss.IndexFlat):
        return True
    if isinstance(index, faiss.IndexPreTransform):
        steps = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        return all(isinstance(t, faiss.NormalizationTransform) for t in steps) and _exact_index(index.index)
    if isinstance(index, faiss.IndexRefine):
        return _exact_index(index.refine_index) and _exact_index(index.base_index)
    return False


def _with_ef_search(index: faiss.Index) -> faiss.Index:
    """An HNSW index (IndexIDMap over it) searching HNSW_EF_SEARCH candidates, not FAISS's 16: on clustered
    64-d vectors recall@10 0.96 -> 1.0 for 28 -> 43 us a query; on uniform noise, the worst case, 0.41 -> 0.78
    (docs/benchmarks.md). Searches that come back short take more (Collection._widen)."""
    inner = faiss.downcast_index(index.index)
    if (hnsw := getattr(inner, "hnsw", None)) is not None and hnsw.efSearch < HNSW_EF_SEARCH:
        hnsw.efSearch = HNSW_EF_SEARCH
    return index


def _auto_nlist(n: int) -> int:
    return int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(n)))))


class Collection:
    """Thread-safe: searches and snapshots share `_lock`, index updates hold it alone; the store serialises
    writes."""

    def __init__(self, folder: Path, spec: Spec, snapshot_every: int = SNAPSHOT_EVERY_CHANGES, device: str = "auto"):
        """`device`: "cpu", or "auto"/"cuda" to search a GPU copy of the index when FAISS can (index/gpu.py)."""
        self.folder, self.spec, self.snapshot_every = Path(folder), spec, snapshot_every
        self._use_gpu = device != "cpu" and gpu.available()
        self._lock = ReadWriteLock()
        self._snapshot_lock = threading.Lock()
        self._background_lock = threading.Lock()
        self._rebuild_lock = threading.Lock()
        self._tombstones: set[int] = set()
        self._dead: np.ndarray | None = None  # the tombstones as a sorted array (built when needed)
        # (selector, the objects it points into), built by the first search that needs it; one attribute so that
        # searches building it at once each keep their own pair alive
        self._selector: tuple[faiss.IDSelector, list[object]] | None = None
        self.indexed_seq = 0
        self.snapshot_seq = 0
        self._generation = 0  # counts index swaps: a snapshot of an older index never replaces a newer one's
        self._snapshot_written = (-1, -1)  # (generation, seq) of the snapshot on disk
        self.kind = "Flat"
        self.device = "cpu"  # where unfiltered searches run: "cuda" while a GPU copy of the index exists
        self.replica: faiss.Index | None = None  # that GPU copy
        self.nprobe = 0
        self._changes_since_snapshot = 0
        self._background: threading.Thread | None = None
        self._closed = False
        self._background_failed = False  # the last background training failed: none starts until a Rebuild works
        self.index = self._new_index("Flat")
        self.replica = self._device_copy(self.index, 0)
        self.store = Store(self.folder / STORE_FILE, spec.dim, on_commit=self._apply, after_commit=self._after_commit)

    # -- creation and recovery -----------------------------------------------------
    @classmethod
    def create(cls, folder: Path, spec: Spec, device: str = "auto") -> Collection:
        check_spec(spec.dim, spec.index_spec, spec.metric)
        folder.mkdir(parents=True)
        c = cls(folder, spec, device=device)
        c.store.set_meta({"spec": json.dumps(asdict(spec)), "seq": "0"})
        c._maybe_train_in_background()
        return c

    @classmethod
    def open(cls, folder: Path, snapshot_every: int = SNAPSHOT_EVERY_CHANGES, device: str = "auto") -> Collection:
        db = connect(folder / STORE_FILE)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:  # no meta table: not a collection's store
            meta = {}
        finally:
            db.close()
        if "spec" not in meta:
            raise CollectionError(f"{folder}: no collection spec in {STORE_FILE}; the folder is not a collection")
        for stale in folder.glob("index-*.tmp"):  # a snapshot cut short by a crash
            stale.unlink(missing_ok=True)
        c = cls(folder, Spec(**json.loads(meta["spec"])), snapshot_every, device)
        c._recover()
        return c

    def _recover(self) -> None:
        started = time.perf_counter()
        loaded = self._load_snapshot()
        with self._lock.write():
            self.replica = None  # copied to the GPU once the index is whole
            for rowids, vectors in self.store.scan(after_seq=self.snapshot_seq if loaded else 0):
                self._add(rowids, vectors)
            # The deletions of items the index holds: a snapshot keeps deleted ids (tombstones) until a rebuild.
            # Items added and deleted after the snapshot were never replayed into it: they are not tombstones
            # (counting them made searches expect more live items than the index has).
            deleted = self.store.deleted_after(0)
            held = faiss.vector_to_array(self.index.id_map) if loaded and len(deleted) else deleted[:0]
            self._tombstones = set(np.intersect1d(deleted, held).tolist())
            self._selector = self._dead = None
            self.indexed_seq = self.store.last_seq()
            self.replica = self._device_copy(self.index, self.nprobe, self.kind)
        log.info("collection %s: %d items, %s index%s, recovered in %.2f s (snapshot at seq %d, store at seq %d)",
                 self.spec.name, self.store.count(), self.kind, "" if self.trained else " (waiting to train: exact)",
                 time.perf_counter() - started, self.snapshot_seq if loaded else 0, self.indexed_seq)
        self._maybe_train_in_background()

    def _load_snapshot(self) -> bool:
        path = self.folder / SNAPSHOT_FILE
        if not path.exists():
            return False
        try:
            snap = json.loads(path.read_text())
            file = self.folder / snap["file"]
            seq, stored = int(snap["seq"]), self.store.last_seq()
            if not 0 <= seq <= stored:  # the store was restored from an older copy, or lost its last commits
                raise ValueError(f"it is at seq {seq} and the store at seq {stored}: a snapshot can only be at or "
                                 "behind its store (was store.sqlite restored from a backup?)")
            if sha256_of(file) != snap["sha256"]:
                raise ValueError(f"{snap['file']} does not match the sha256 in {SNAPSHOT_FILE}")
            index = faiss.read_index(str(file))  # from the file: no second copy of the index in memory
        except Exception as e:  # corrupt, truncated, missing file: the store still has everything
            log.warning("collection %s: snapshot unusable (%s); rebuilding the index from the store",
                        self.spec.name, e)
            return False
        with self._lock.write():
            self.index, self.kind = _with_ef_search(index), snap["kind"]
            self.nprobe = int(snap.get("nprobe", 0))
            self._set_nprobe()
            self.snapshot_seq = int(snap["seq"])
            self._snapshot_written = (self._generation, self.snapshot_seq)
        return True

    # -- the index -------------------------------------------------------------------
    def _new_index(self, factory: str) -> faiss.Index:
        return _with_ef_search(faiss.IndexIDMap(faiss.index_factory(self.spec.dim, factory, METRICS[self.spec.metric])))

    def _set_nprobe(self) -> None:
        if self.nprobe:
            faiss.extract_index_ivf(self.index).nprobe = self.nprobe

    def _device_copy(self, index: faiss.Index, nprobe: int, kind: str = "Flat") -> faiss.Index | None:
        """A GPU copy of `index` to search, when this collection searches on a GPU (None otherwise)."""
        if not self._use_gpu:
            return None
        try:
            replica = gpu.to_device(index, nprobe)
        except RuntimeError as e:  # no GPU version of this index type (HNSW, ...): the CPU answers
            log.warning("collection %s: %s cannot search on the GPU (%s); searching on the CPU", self.spec.name,
                        kind, str(e).strip().splitlines()[-1] if str(e).strip() else e)
            replica = None
        self.device = "cuda" if replica is not None else "cpu"
        return replica

    def _add(self, rowids: np.ndarray, vectors: np.ndarray,
             to: tuple[faiss.Index, faiss.Index | None] | None = None) -> None:
        """Add to the index and its GPU copy (or to `to`, the index being built and its copy)."""
        if len(rowids):
            x, ids = np.ascontiguousarray(vectors, np.float32), rowids.astype(np.int64)
            index, replica = to or (self.index, self.replica)
            index.add_with_ids(x, ids)
            if replica is not None:
                with gpu.LOCK:
                    replica.add_with_ids(x, ids)

    def _apply(self, batch: list[Written]) -> None:
        """Committed writes, in commit order (runs in the store's writer thread, before the writers hear back)."""
        with self._lock.write():
            for w in batch:
                if w.added:
                    self._add(np.array([r for r, _ in w.added], np.int64), np.stack([v for _, v in w.added]))
                if w.removed:
                    self._tombstones.update(w.removed)
                    self._selector = self._dead = None
                self.indexed_seq = w.seq
                self._changes_since_snapshot += len(w.added) + len(w.removed)
        self._maybe_train_in_background()  # started before the writers hear back: a test can wait for it

    def _after_commit(self) -> None:
        """In the writer thread, once the writers of a commit have heard back: snapshot when enough changed
        (serialized here, where searches go on and only later writes wait; written to disk in the background)."""
        if self._changes_since_snapshot >= self.snapshot_every and not self._closed and not self._busy():
            snap = self._serialize()
            with self._background_lock:
                if not self._closed and not self._busy():
                    self._start_background(lambda: self._write_snapshot(*snap), f"snapshot-{self.spec.name}")
                    return
            snap[-1].unlink(missing_ok=True)  # a training started meanwhile (it snapshots), or closing

    def _dead_ids(self) -> np.ndarray:
        if self._dead is None:
            self._dead = np.sort(np.fromiter(self._tombstones, np.int64, len(self._tombstones)))
        return self._dead

    def _alive_selector(self) -> tuple[faiss.IDSelector, list[object]] | None:
        """The selector that keeps tombstones out, with what it points into (hold both while searching)."""
        if not self._tombstones:
            return None
        if (pair := self._selector) is None:
            ids = self._dead_ids()
            batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            self._selector = pair = (faiss.IDSelectorNot(batch), [ids, batch])
        return pair

    # -- items (index.backend.CollectionBackend: what the gRPC layer uses) ------------------
    def count(self) -> int:
        return self.store.count()

    def write(self, puts: Sequence[Put] = (), delete_ids: Sequence[str] = (),
              delete_where: tuple[str, list[Any]] | None = None) -> Future[Written]:
        """One atomic write (group-committed); the future resolves once it is on disk and in the index."""
        return self.store.write(puts, delete_ids, delete_where)

    def get(self, ids: Sequence[str]) -> dict[str, tuple[int, np.ndarray, str]]:
        return self.store.get(ids)

    def resolve(self, rowids: Sequence[int]) -> dict[int, tuple[str, str]]:
        return self.store.by_rowids(rowids)

    def newest(self, before: int, limit: int) -> list[tuple[int, str, str]]:
        return self.store.newest(before, limit)

    # -- search ------------------------------------------------------------------------
    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as the index holds them: unit length for cosine, float32, contiguous."""
        x = np.ascontiguousarray(vectors, np.float32)
        if self.spec.metric == "cosine":
            # np.linalg.norm(x, axis=1, keepdims=True)'s arithmetic without its argument checks (a batch-1 search
            # pays for every array call)
            x = x / np.maximum(np.sqrt(np.add.reduce(x * x, axis=1, keepdims=True)), 1e-12)
        return x

    def search(self, queries: np.ndarray, k: int, where: tuple[str, list] | None = None, exact: bool = False,
               wait: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
        """(scores float32 [n, k], rowids int64 [n, k] with -1 for none, exact?). Higher scores are better.
        wait=False (an unfiltered search only): raise IndexBusy instead of waiting for a write to the index."""
        q = self.prepare(queries)
        # FAISS's OpenMP threads cost more than they save on a few queries: waking a second thread on busy
        # cores adds scheduler ticks (ms) to batch-1 latency. The setting is per calling thread.
        faiss.omp_set_num_threads(1 if len(q) < 16 else SEARCH_THREADS)
        sel: faiss.IDSelector | None = None
        rows = None
        if where is not None:
            # Only live items are in the store, so the matches need no tombstone filtering. The matches and
            # their vectors are read in one state of the store (a write between the two neither hides an item
            # nor shows it twice).
            with self.store.consistent() as reader:
                rows = reader.matching(*where)
                if exact or len(rows) <= EXACT_FILTER_MAX:
                    return (*self._exact_over(q, k, rows, reader), True)
            sel = faiss.IDSelectorBatch(len(rows), faiss.swig_ptr(rows))
        elif exact and self._approximate:
            return (*self._exact_all(q, k), True)
        if not self._lock.acquire_read(blocking=wait):
            raise IndexBusy(self.spec.name)
        try:
            alive = None  # holds the selector and what it points into until FAISS is done with them
            if where is None:
                if self.replica is not None and k + len(self._tombstones) <= gpu.MAX_K:
                    if not gpu.LOCK.acquire(blocking=wait):  # another search or copy is using the GPU
                        raise IndexBusy(self.spec.name)
                    try:
                        d, i = self._search_replica(q, k)
                    finally:
                        gpu.LOCK.release()
                    if self._approximate:  # short answers are searched again on the CPU copy
                        alive = self._alive_selector()
                        d, i = self._widen(q, k, d, i, alive[0] if alive else None,
                                           min(k, self.index.ntotal - len(self._tombstones)), None)
                    return d, i, not self._approximate
                if (alive := self._alive_selector()) is not None:
                    sel = alive[0]
            try:
                d, i = self._scores(*self.index.search(q, k, params=self._params(sel) if sel is not None else None))
            except RuntimeError:
                if sel is None:
                    raise
                # IndexRefine and IndexPQ take no IDSelector: a filter's matches are scored exactly, deletions
                # dropped from a longer list
                if rows is not None:
                    return (*self._exact_over(q, k, rows), True)
                d, i = self._search_dropping_dead(self.index, q, k)
                sel = None  # the widening below searches without one too
            if self._approximate:
                allowed = len(rows) if rows is not None else self.index.ntotal - len(self._tombstones)
                d, i = self._widen(q, k, d, i, sel, min(k, allowed), rows)
            return d, i, not self._approximate
        finally:
            self._lock.release_read()

    def _widen(self, q: np.ndarray, k: int, d: np.ndarray, i: np.ndarray, sel: faiss.IDSelector | None, want: int,
               rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Queries an approximate search answered with fewer than `want` hits although that many items are
        allowed, searched again: HNSW stops after efSearch candidates, so deletions or a filter that exclude a
        query's neighbourhood leave it short, and an IVF index's nprobe lists can hold fewer than a large k.
        Each retry takes 4x the effort (efSearch, nprobe) up to the whole index; what is still short is scored
        exactly (the filter's matches, or every stored item). Called under the index's read lock."""
        short = np.flatnonzero((i >= 0).sum(1) < want)
        if not len(short):
            return d, i
        inner = faiss.downcast_index(self.index.index)
        hnsw = getattr(inner, "hnsw", None)
        nlist = faiss.extract_index_ivf(self.index).nlist if self.nprobe else 0
        effort, top = (hnsw.efSearch, max(want, 4096)) if hnsw is not None else (self.nprobe, nlist)
        while len(short) and 0 < effort < top:
            effort = min(4 * effort, top)
            params = (faiss.SearchParametersHNSW(sel=sel, efSearch=effort) if hnsw is not None
                      else faiss.SearchParametersIVF(sel=sel, nprobe=effort))
            try:
                d[short], i[short] = self._scores(*self.index.search(q[short], k, params=params))
            except RuntimeError:  # an index that takes no such parameters (IVF under a Refine): score exactly
                break
            short = short[(i[short] >= 0).sum(1) < want]
        if len(short):
            d[short], i[short] = (self._exact_over(q[short], k, rows) if rows is not None
                                  else self._exact_all(q[short], k))
        return d, i

    def _search_replica(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the GPU copy, which takes no IDSelector."""
        return self._search_dropping_dead(self.replica, q, k)

    def _search_dropping_dead(self, index: faiss.Index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search an index without an IDSelector: ask for k more hits per tombstone, drop the deleted ones, keep
        the best k alive ones in order (padding with -inf / -1 when fewer are left)."""
        dead = len(self._tombstones)
        d, i = self._scores(*index.search(q, k + dead))
        if dead:
            gone = np.isin(i, self._dead_ids())
            d[gone], i[gone] = -np.inf, -1
            order = np.argsort(gone, axis=1, kind="stable")[:, :k]  # alive first, each group in score order
            d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
        return d, i

    @property
    def _approximate(self) -> bool:
        return self.kind != "Flat" and not _exact_kind(self.kind, self.spec.dim, self.spec.metric)

    @property
    def exact(self) -> bool:
        """Whether unfiltered searches are exact now (no lock: a plain attribute read)."""
        return not self._approximate

    @property
    def trained(self) -> bool:
        """False while an explicit spec that needs training waits for enough vectors (searches are exact
        meanwhile). "auto" is exact by design while small, so it counts as trained."""
        return self.spec.index_spec in (AUTO, self.kind)

    def _params(self, sel: faiss.IDSelector) -> faiss.SearchParameters:
        if self.nprobe:
            p = faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        elif (hnsw := getattr(faiss.downcast_index(self.index.index), "hnsw", None)) is not None:
            p = faiss.SearchParametersHNSW(sel=sel, efSearch=hnsw.efSearch)
        else:
            p = faiss.SearchParameters(sel=sel)
        p._keep = sel  # keep the selector alive as long as the parameters
        return p

    def _scores(self, d: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = d.astype(np.float32, copy=False)  # FAISS's own output array: changed in place below
        if self.spec.metric == "l2":
            d = -d  # squared distance -> higher is better
        d[i < 0] = -np.inf
        return d, i

    def _score_block(self, q: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.spec.metric == "l2":
            return -((q * q).sum(1)[:, None] - 2 * q @ v.T + (v * v).sum(1)[None, :])
        return q @ v.T

    def _exact_over(self, q: np.ndarray, k: int, rowids: np.ndarray, reader: Reader | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Score the given stored items exactly (a filter's matches; read through `reader` when given, else one
        deleted or replaced since the filter ran is left out), EXACT_BLOCK at a time."""
        source = reader or self.store

        def pages() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for start in range(0, len(rowids), EXACT_BLOCK):  # memory for one block, however many match
                block = rowids[start : start + EXACT_BLOCK]
                got = source.rows_by_rowid(block)
                if len(got) < len(block):
                    block = np.fromiter((r for r in block if int(r) in got), np.int64)
                if len(block):
                    yield block, np.stack([got[int(r)] for r in block])

        return self._best_of(q, k, pages())

    def _exact_all(self, q: np.ndarray, k: int, up_to_seq: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Score every stored item, a block at a time (exact: true on an approximate index): those written up to
        `up_to_seq`, or else all of one state of the store (an item replaced during the scan counts once)."""
        if up_to_seq is not None:
            return self._best_of(q, k, self.store.scan(up_to_seq=up_to_seq))
        with self.store.consistent() as reader:
            return self._best_of(q, k, reader.scan())

    def _best_of(self, q: np.ndarray, k: int, pages: Iterable[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """The best k of (rowids, vectors) pages for each query, scored exactly; -inf / -1 where fewer."""
        best_s = np.full((len(q), k), -np.inf, np.float32)
        best_i = np.full((len(q), k), -1, np.int64)
        for rowids, vectors in pages:
            s, i = _top_k(self._score_block(q, vectors), np.broadcast_to(rowids, (len(q), len(rowids))), k)
            best_s, best_i = _top_k(np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1), k)
        return best_s, best_i

    # -- training, rebuild, snapshots -------------------------------------------------
    def _target_factory(self, n: int) -> str | None:
        """The factory string the collection should train now, or None to stay as it is."""
        spec = self.spec.index_spec
        if spec == AUTO:
            return f"IVF{_auto_nlist(n)},Flat" if n >= AUTO_MIN_VECTORS and self.kind == "Flat" else None
        if self.kind == spec:
            return None
        probe = faiss.index_factory(self.spec.dim, spec, METRICS[self.spec.metric])
        if probe.is_trained:
            return spec  # needs no training (Flat, HNSW): build it at once
        ivf = faiss.try_extract_index_ivf(probe)
        needed = max(1000, 39 * ivf.nlist) if ivf is not None else 10_000
        return spec if n >= needed else None

    def _busy(self) -> bool:
        t = self._background
        return t is not None and t.is_alive() and t is not threading.current_thread()

    def _maybe_train_in_background(self) -> None:
        """Train the real index once there are enough vectors; compact once too many are deleted."""
        with self._background_lock:  # the writer thread and a finishing background thread may both ask
            if self._closed or self._busy() or self._rebuild_lock.locked() or self._background_failed:
                return  # closed, busy, a Rebuild call at it already, or the last try failed
            target = self._target_factory(self.store.count())
            if target is not None:
                self._start_background(lambda: self.rebuild(target), f"train-{self.spec.name}")
            elif len(self._tombstones) >= max(COMPACT_MIN_DELETED, COMPACT_DELETED_FRACTION * self.index.ntotal):
                self._start_background(self.rebuild, f"compact-{self.spec.name}")

    def _start_background(self, fn, name: str) -> None:  # type: ignore[no-untyped-def]
        def run() -> None:
            try:
                fn()
            except StoreClosed:  # closed meanwhile (dropped, or the server stopping): nothing to finish
                log.info("collection %s: background %s stopped: the collection was closed", self.spec.name, name)
                return
            except Exception:
                log.exception("collection %s: background %s failed; it is not retried until a Rebuild call or a "
                              "restart", self.spec.name, name)
                self._background_failed = True  # retrying at once failed ~100 times a second, flooding the log
                return
            # Writes that arrived meanwhile may call for training (they found this thread busy and went on).
            self._maybe_train_in_background()

        self._background = threading.Thread(target=run, name=name, daemon=True)
        self._background.start()

    def rebuild(self, factory: str | None = None) -> None:
        """Build a fresh index from the stored items (training it if needed), swap it in, snapshot it.

        Writes go on meanwhile; those committed after the build started are
        applied to the new index before the swap. One rebuild at a time: a
        second one waits (two at once could each forget the other's deletions).
        """
        with self._rebuild_lock:
            self._rebuild(factory)
            self._background_failed = False

    def _rebuild(self, factory: str | None) -> None:
        n = self.store.count()
        if factory is None and self.spec.index_spec == AUTO and n >= AUTO_MIN_VECTORS:
            factory = f"IVF{_auto_nlist(n)},Flat"  # lists grow with the collection
        factory = factory or (self._target_factory(n) or self.kind)
        started = time.perf_counter()
        with self._lock.read():
            seq0 = self.indexed_seq  # the build reads items up to here; later writes are added below
        index = self._new_index(factory)
        nprobe = 0
        if not index.is_trained:
            ivf = faiss.try_extract_index_ivf(index.index)
            sample = self._sample(max(100_000, 64 * (ivf.nlist if ivf is not None else 0)), seq0)
            index.train(sample)
        for rowids, vectors in self.store.scan(up_to_seq=seq0):
            index.add_with_ids(vectors, rowids)
        if faiss.try_extract_index_ivf(index.index) is not None:
            nprobe = self._tune_nprobe(index, seq0)  # a factory string cannot say nprobe; FAISS's default of 1 is poor
        replica = self._device_copy(index, nprobe, factory)  # before the lock: copying to the GPU takes a while
        with self._lock.write():
            # Writes applied while building; those committed but not applied yet reach the new index via _apply.
            for rowids, vectors in self.store.scan(after_seq=seq0, up_to_seq=self.indexed_seq):
                self._add(rowids, vectors, to=(index, replica))
            self.index, self.replica, self.kind, self.nprobe = index, replica, factory, nprobe
            self._generation += 1
            self._set_nprobe()
            self._tombstones = set(self.store.deleted_after(seq0).tolist()) & self._tombstones
            self._selector = self._dead = None
        log.info("collection %s: built %s over %d items in %.1f s%s", self.spec.name, factory, index.ntotal,
                 time.perf_counter() - started, f", nprobe {nprobe}" if nprobe else "")
        self.snapshot()
        self.store.prune_deletions(seq0)  # the durable index no longer holds what was deleted before seq0

    def _sample(self, n: int, up_to_seq: int | None = None) -> np.ndarray:
        """About n stored vectors spread evenly over the whole collection (not its first rows)."""
        step = max(1, self.store.count() // n)
        parts = [vectors[::step] for _, vectors in self.store.scan(up_to_seq=up_to_seq)]
        return np.concatenate(parts)[:n] if parts else np.zeros((0, self.spec.dim), np.float32)

    def _tune_nprobe(self, index: faiss.Index, seq: int) -> int:
        """Smallest nprobe whose recall@10 reaches TARGET_RECALL on 200 stored vectors used as queries, each
        query's own item left out of both answers (a query finds itself for free; users' queries are new).
        The truth is exact search over what the index holds (writes up to `seq`)."""
        sample = self._sample(200, seq)
        if len(sample) == 0:
            return 1
        _, truth = self._exact_all(sample, 11, up_to_seq=seq)
        ivf = faiss.extract_index_ivf(index.index)

        def others(rows: np.ndarray, own: np.ndarray) -> list[set[int]]:
            return [set([r for r in row if r != o][:10]) for row, o in zip(rows, own)]

        own = truth[:, 0]  # each sample vector's own rowid is its best exact match
        want = others(truth, own)
        nprobe = 1
        while nprobe < ivf.nlist:
            ivf.nprobe = nprobe
            _, got = index.search(sample, 11)
            recall = np.mean([len(g & w) / max(1, len(w)) for g, w in zip(others(got, own), want)])
            if recall >= TARGET_RECALL:
                break
            nprobe *= 2
        return min(nprobe, ivf.nlist)

    def snapshot(self) -> None:
        """Write the index and the sequence number it includes, atomically (see the module docstring)."""
        self._write_snapshot(*self._serialize())

    def _serialize(self) -> tuple[int, int, str, int, Path]:
        """Write the index to a new temporary file and return (generation, seq, kind, nprobe, that file).
        Searches go on meanwhile (they share the lock); writes wait. FAISS streams the index into the file (the
        page cache: it reaches the disk in _write_snapshot), so no copy of the whole index is made in memory."""
        tmp = self.folder / f"index-{time.time_ns():x}.tmp"
        try:
            with open(tmp, "wb") as f, self._lock.read():
                faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
                self._changes_since_snapshot = 0  # only writers add to it, and they are held off
                return self._generation, self.indexed_seq, self.kind, self.nprobe, tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _write_snapshot(self, generation: int, seq: int, kind: str, nprobe: int, tmp: Path) -> None:
        """Make the file _serialize wrote the snapshot on disk, unless a newer one is there already."""
        with self._snapshot_lock:  # a Rebuild's snapshot and a background one must not interleave
            try:
                if (generation, seq) <= self._snapshot_written:
                    return  # a newer index, or this one at a later point, is on disk already
                # Never the name snapshot.json points to: a rebuild's index may be snapshotted at the same seq,
                # and generations start again at 0 with each start.
                name = f"index-{seq}-{time.time_ns():x}.faiss"
                digest = sha256_of(tmp)
                move_atomically(tmp, self.folder / name)
                meta = {"seq": seq, "file": name, "sha256": digest, "kind": kind, "nprobe": nprobe}
                write_atomically(self.folder / SNAPSHOT_FILE, json.dumps(meta).encode())
                for old in self.folder.glob("index-*.faiss"):
                    if old.name != name:
                        old.unlink(missing_ok=True)
                self._snapshot_written = (generation, seq)
                self.snapshot_seq = seq
            finally:
                tmp.unlink(missing_ok=True)  # gone already unless this stopped short

    # -- describe, close ---------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        with self._lock.read():
            return {"count": self.store.count(), "index_kind": self.kind, "trained": self.trained, "device": self.device,
                    "exact": not self._approximate, "durable_seq": self.indexed_seq,
                    "snapshot_seq": self.snapshot_seq, "deleted_pending": len(self._tombstones)}

    def stop_background(self) -> None:
        """No background training or compaction starts after this (close() calls it; Collections.close calls
        it on every collection first, so that their running ones share one wait)."""
        with self._background_lock:
            self._closed = True

    def close(self, snapshot: bool = True, deadline: float | None = None) -> None:
        """`deadline` (time.monotonic()): until when to wait for a background training (BACKGROUND_JOIN_S
        from now by default)."""
        self.stop_background()
        if self._background is not None:
            # A training or compaction is derived state (the store has every item): after a few seconds it is
            # left to end with the process (a daemon thread) rather than holding a shutdown past its grace.
            wait = BACKGROUND_JOIN_S if deadline is None else max(0.0, deadline - time.monotonic())
            self._background.join(timeout=wait)
            if self._background.is_alive():
                log.warning("collection %s: closing while its background %s still runs; it is abandoned (the "
                            "next start loads the last snapshot and replays the store after it)", self.spec.name,
                            self._background.name)
        self.store.close()
        if snapshot and self.indexed_seq != self.snapshot_seq:
            self.snapshot()


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k per row of scores [n, m] with their ids [n, m], best first; -inf / -1 pad rows shorter than k."""
    n, m = scores.shape
    if m > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, ids = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
    order = np.argsort(-scores, axis=1, kind="stable")
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.concatenate([scores, np.full((n, pad), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids, np.full((n, pad), -1, np.int64)], 1)
    return scores.astype(np.float32), ids.astype(np.int64)


_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise CollectionError(f"collection name {shown(name)} must be 1-64 characters of letters, digits, '_' and '-'")
