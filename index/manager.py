"""All collections of a server: one folder each under ``<data_dir>/collections/``.

This is the small interface the gRPC layer talks to (create, get, list, drop,
close). A second backend (a distributed engine such as Milvus, for
collections larger than one machine) would implement the same methods.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from .collection import BACKGROUND_JOIN_S, STORE_FILE, Collection, CollectionError, Spec, check_name, shown

log = logging.getLogger("tandem.index")


class CollectionNotFound(KeyError):
    pass


class CollectionExists(ValueError):
    pass


class Collections:
    def __init__(self, data_dir: Path, snapshot_every: int = 20_000, device: str = "auto"):
        """`device`: "cpu", or "auto"/"cuda" to search on a GPU when FAISS can (index/gpu.py)."""
        self.root = Path(data_dir) / "collections"
        self.snapshot_every, self.device = snapshot_every, device
        self._by_name: dict[str, Collection] = {}
        self._lock = threading.Lock()
        self._owner: int | None = None  # the open, flock()ed lock file while this process owns the folder

    def claim(self) -> None:
        """Take the data folder for this process alone (an exclusive flock on <data_dir>/.tandem.lock, released
        by the kernel however the process ends). A second server on the same folder would index only its own
        writes, snapshot sequence numbers that include the other's and delete its half-made collections."""
        if self._owner is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root.parent / ".tandem.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(f"data_dir {self.root.parent} is in use by another Tandem server (pid {holder}): two "
                               "servers must not share one. Stop the other one, or give this one its own --data-dir"
                               ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._owner = fd

    def load(self) -> None:
        """Open every collection on disk (recovering each index); leftovers of interrupted creates and drops go."""
        if self._owner is None:
            self.claim()
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith("."):  # .creating-* / .dropped-*: never acknowledged, or already dropped
                shutil.rmtree(folder, ignore_errors=True)
                continue
            if folder.is_dir() and not (folder / STORE_FILE).exists():  # lost+found, a copy's leftovers, ...
                log.warning("%s has no %s: not a collection, left alone", folder, STORE_FILE)
                continue
            if folder.is_dir():
                try:
                    self._by_name[folder.name] = Collection.open(folder, self.snapshot_every, self.device)
                except Exception as e:
                    raise RuntimeError(f"collection {folder.name} in {folder} could not be opened: {e}. Its data is in "
                                       f"{folder / 'store.sqlite'}; move the folder away to start without it") from e

    def create(self, spec: Spec) -> Collection:
        check_name(spec.name)
        with self._lock:
            if spec.name in self._by_name:
                raise CollectionExists(f"collection {spec.name!r} exists already; drop it first or pick another name")
            if (self.root / spec.name).exists():
                raise CollectionExists(f"a folder named {spec.name!r} is still in the data dir: a collection being "
                                       "dropped (retry in a few seconds), or a folder that is not a collection "
                                       "(move it away); or pick another name")
            tmp = self.root / f".creating-{spec.name}-{os.getpid()}-{time.monotonic_ns()}"
            Collection.create(tmp, spec, device="cpu").close(snapshot=False)
            final = self.root / spec.name
            os.replace(tmp, final)  # the collection exists from here on, whole
            c = Collection.open(final, self.snapshot_every, self.device)
            self._by_name[spec.name] = c
            return c

    def get(self, name: str) -> Collection:
        c = self._by_name.get(name)
        if c is None:
            names = sorted(self._by_name)
            known = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") or "none"
            raise CollectionNotFound(f"collection {shown(name)} does not exist (collections: {known})")
        return c

    def has(self, c: Collection) -> bool:
        """Whether `c` is still one of the collections (not dropped)."""
        return self._by_name.get(c.spec.name) is c

    def all(self) -> list[Collection]:
        return [self._by_name[n] for n in sorted(self._by_name)]

    def drop(self, name: str) -> None:
        with self._lock:
            c = self.get(name)
            del self._by_name[name]
        c.close(snapshot=False)
        gone = self.root / f".dropped-{name}-{time.monotonic_ns()}"
        os.replace(c.folder, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def close(self) -> None:
        collections = self.all()
        for c in collections:  # all of them first: their background trainings share one wait below
            c.stop_background()
        deadline = time.monotonic() + BACKGROUND_JOIN_S
        for c in collections:
            c.close(deadline=deadline)
        self._by_name.clear()
        if self._owner is not None:
            os.close(self._owner)  # releases the flock
            self._owner = None


__all__ = ["Collections", "CollectionNotFound", "CollectionExists", "CollectionError", "Spec"]
