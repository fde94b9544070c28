"""Checkpoint files that survive a crash at any moment.

    OUT/checkpoints/step_0000250.pt   one per --checkpoint-every steps; the newest --keep-checkpoints are kept
    OUT/checkpoints/latest.pt         the newest, what a resumed run, `tandem eval` and `tandem export` read

Every file is written to a temporary name beside its destination, fsynced, renamed over the destination, and
then the directory is fsynced, so after a crash (power loss included) a name holds either the old complete
file or the new complete one. `latest.pt` is a hard link to the newest step file where the filesystem has
hard links, else a copy written the same way. A checkpoint holds tensors and plain data only (numbers,
strings, lists, dicts), so it loads with `torch.load(weights_only=True)`: no pickled code runs on resume.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bundle.files import fsync_path

LATEST = "latest.pt"


def _temporary(dest: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return Path(name)


def atomic_save(state: dict[str, Any], dest: Path) -> None:
    """torch.save(state) to `dest`: temporary file, fsync, rename, fsync the directory."""
    tmp = _temporary(dest)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(dest.parent)


def point_latest(step_file: Path) -> Path:
    """Make LATEST in the same folder the newest checkpoint: a hard link, or a copy where links fail."""
    latest = step_file.parent / LATEST
    tmp = _temporary(latest)
    try:
        tmp.unlink()
        try:
            os.link(step_file, tmp)
        except OSError:  # no hard links here (some network and FUSE filesystems, FAT)
            with open(step_file, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(tmp, latest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(latest.parent)
    return latest


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step_*.pt files (LATEST stays); returns what was deleted."""
    steps = sorted(folder.glob("step_*.pt"))
    old = steps[: max(0, len(steps) - keep)]
    for path in old:
        path.unlink(missing_ok=True)
    return old


def load(path: Path) -> dict[str, Any]:
    """A checkpoint onto the CPU, tensors and plain data only."""
    return torch.load(path, map_location="cpu", weights_only=True)
