"""A lock that many readers share and one writer holds alone, for a collection's index.

Searches and snapshots only read the FAISS index, and FAISS lets CPU indexes be
searched and serialized from several threads at once; adding vectors or swapping
the index in needs it alone. A writer that is waiting holds new readers back, so
a steady stream of searches cannot starve the writes (each acknowledged only once
it is in the index).

Written by hand: the standard library has none, and fasteners' ReaderWriterLock
(the well-kept one) cannot be tried without blocking, which a search on the
event loop needs (index/collection.py, ``wait=False``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ReadWriteLock:
    """Not reentrant: a thread holding it must not take it again (either way)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    def acquire_read(self, blocking: bool = True) -> bool:
        """Share the lock; False at once, with blocking=False, when a writer holds it or waits for it."""
        with self._cond:
            if self._writing or self._writers_waiting:
                if not blocking:
                    return False
                while self._writing or self._writers_waiting:
                    self._cond.wait()
            self._readers += 1
            return True

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    @contextmanager
    def read(self) -> Iterator[None]:
        self.acquire_read()
        try:
            yield
        finally:
            self.release_read()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: let the readers it held back go on
                self._writers_waiting -= 1
                self._cond.notify_all()
                raise
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
