"""Crash-safe files, for everything that writes what must survive a crash (snapshots, checkpoints, bundles)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: a rename in it is durable once this returns)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_atomically(tmp: Path, path: Path) -> None:
    """A file written at `tmp` (in the same folder) becomes `path`: fsync it, rename, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """temp file, fsync, rename, fsync the folder: the file is either old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    move_atomically(tmp, path)
