"""FAISS on the GPU, when this faiss build has GPU support (the faiss-gpu wheels) and sees a GPU.

A collection keeps its index on the CPU, the copy that snapshots are written
from, and searches a GPU copy of it when `available()`. Nothing here runs on a
CPU-only machine; index/collection.py's search path for the copy is tested on
the CPU with a CPU clone standing in for it (tests/index/test_collection.py).

GPU indexes take no IDSelector, so a collection with deleted items asks the
copy for k + (number of tombstones) hits and drops the deleted ones itself;
when that would exceed FAISS's GPU limit of MAX_K hits it searches on the CPU
until compaction (a background rebuild) has cleared the tombstones.
"""

from __future__ import annotations

import functools
import logging
import threading

import faiss

log = logging.getLogger("tandem.index")

MAX_K = 2048  # the most hits a FAISS GPU search returns per query (GPU_MAX_SELECTION_K)
# Every GPU copy shares one StandardGpuResources, which FAISS allows one user at a time, searches included:
# whoever searches, fills or makes a GPU copy holds this.
LOCK = threading.Lock()


@functools.cache
def available() -> bool:
    """Whether FAISS can search on a GPU here (a faiss build with GPU support and a visible device)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except RuntimeError as e:  # a driver problem: say so once and search on the CPU
        log.warning("faiss has GPU support but could not count the GPUs (%s); searching on the CPU", e)
        return False


@functools.cache
def _resources() -> faiss.StandardGpuResources:
    return faiss.StandardGpuResources()


def to_device(index: faiss.Index, nprobe: int) -> faiss.Index:
    """A GPU copy of `index` (an IndexIDMap over a factory index), searching with `nprobe` lists if IVF.
    Raises RuntimeError for an index type FAISS has no GPU version of (HNSW, for example)."""
    options = faiss.GpuClonerOptions()
    options.useFloat16 = False  # the same scores as the CPU copy; fp16 halves memory at some recall
    with LOCK:
        copy = faiss.index_cpu_to_gpu(_resources(), 0, index, options)
        if nprobe:
            faiss.GpuParameterSpace().set_index_parameter(copy, "nprobe", nprobe)
    return copy
