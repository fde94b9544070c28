"""What the gRPC layer (server/collections.py) may use of a collection: the whole contract of a backend.

index.collection.Collection (SQLite + FAISS, one machine) implements it. A
second backend, such as a Milvus client for collections larger than one
machine, implements the same methods and a manager like index.manager.Collections
(load, create, get, all, drop, close); server/ needs no change. Items are
addressed by string ids; `rowid`s are the backend's own integer handles, valid
within one collection, which search results carry until `resolve` turns them
into ids and metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import numpy as np

from .collection import IndexBusy, Spec
from .store import Put, Written

__all__ = ["CollectionBackend", "IndexBusy", "Put", "Spec", "Written"]


class CollectionBackend(Protocol):
    spec: Spec
    device: str  # where unfiltered searches run: "cpu" or "cuda"
    kind: str  # the index searched now, as a FAISS factory string (or the backend's own name)

    @property
    def exact(self) -> bool:
        """Whether unfiltered searches are exact right now."""

    def count(self) -> int:
        """Items stored (committed)."""

    def describe(self) -> dict[str, Any]:
        """count, index_kind, trained, exact, device, durable_seq, snapshot_seq, deleted_pending."""

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors [n, dim] as the backend stores and compares them (unit length for cosine)."""

    def write(self, puts: Sequence[Put] = (), delete_ids: Sequence[str] = (),
              delete_where: tuple[str, list[Any]] | None = None) -> Future[Written]:
        """One atomic write; the future resolves once it is durable and searchable."""

    def get(self, ids: Sequence[str]) -> dict[str, tuple[int, np.ndarray, str]]:
        """{id: (rowid, vector, metadata JSON)} for the ids stored."""

    def resolve(self, rowids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """{rowid: (id, metadata JSON)} for the rowids still stored."""

    def newest(self, before: int, limit: int) -> list[tuple[int, str, str]]:
        """Up to `limit` stored items (rowid, id, metadata JSON) with rowids below `before`, newest first."""

    def search(self, queries: np.ndarray, k: int, where: tuple[str, list[Any]] | None = None,
               exact: bool = False, wait: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
        """(scores [n, k], rowids [n, k] with -1 for none, exact?); higher scores are better. `where` is a
        compiled filter (index.filters.compile_filter). wait=False: raise IndexBusy at once instead of waiting
        while a write holds the index (the caller is the event loop)."""

    def rebuild(self) -> None:
        """Compact and retrain the index from the stored items."""
