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
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """temp file, fsync, rename, fsync the folder: the file is either old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
