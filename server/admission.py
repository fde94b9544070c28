"""Admission before work: a request's items are counted against budgets before any decoding or tokenising,
and a request that fails, is cancelled or outstays its deadline stops the work it has not started.

- In flight, per (model, version, tower): the items of the requests being preprocessed, queued or run. A request
  that would pass ``max_inflight_items`` gets RESOURCE_EXHAUSTED at once (as text-embeddings-inference's
  semaphore ``try_acquire``), instead of decoding its images only to be refused by the batcher's queue.
- Preprocessing, all models together: items waiting for or in a preprocessing thread
  (``max_preprocess_items``), the bound on the thread pool's otherwise unbounded queue.
- Queue timeout (``queue_timeout_ms``, Triton's queue policy with REJECT): a request none of whose items has
  started after that long in the preprocessing queue is not started; it gets UNAVAILABLE. Once its first item
  starts, the request is under way: its other items are not timed out (they wait for threads its first items
  hold, not for a server that is overloaded).

All counting happens on the event loop (one thread): no locks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from .errors import ApiError
from .metrics import ADMISSION_REJECTED, INFLIGHT_ITEMS, PREPROCESS_ITEMS

__all__ = ["ADMISSION_REJECTED", "INFLIGHT_ITEMS", "PREPROCESS_ITEMS", "Admission", "QueueTimeout", "Work"]


def resource_exhausted(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class QueueTimeout(Exception):
    """An item waited longer than queue_timeout_ms before its work started."""


@dataclass
class Work:
    """One request's preprocessing: when it arrived, and whether its remaining items should still start.

    Worker threads read `stop` before starting an item; the event loop sets it when the request fails, is
    cancelled or passes its deadline. A thread that finds one of its request's items bad sets it too, so the
    request's next items are skipped even before the event loop hears of the failure.
    """

    arrived: float = field(default_factory=time.monotonic)
    timeout_s: float = 0.0  # 0: no queue timeout
    stop: threading.Event = field(default_factory=threading.Event)
    started: bool = False  # an item of the request has started: the queue timeout no longer applies
    expired: bool = False  # the queue timeout passed before any item started (set on the event loop)

    def may_start(self, tower: str) -> bool:
        """Called in the worker thread as an item starts: False (counted) when it must not run."""
        if self.stop.is_set():
            PREPROCESS_ITEMS.labels(tower, "cancelled").inc()
            return False
        if self.timeout_s and not self.started and time.monotonic() - self.arrived > self.timeout_s:
            PREPROCESS_ITEMS.labels(tower, "expired").inc()
            self.stop.set()
            raise QueueTimeout()
        self.started = True
        return True

    def expire(self) -> bool:
        """On the event loop, queue_timeout_ms after the request arrived: stop it if none of its items has
        started (True); a request waiting behind busy threads is refused now, not when a thread frees up."""
        if self.started or self.stop.is_set():
            return False
        self.expired = True
        self.stop.set()
        return True

    def timeout_error(self) -> ApiError:
        return ApiError(grpc.StatusCode.UNAVAILABLE,
                        f"the request waited more than queue_timeout_ms={self.timeout_s * 1000:.0f} for a "
                        "preprocessing thread and was not run; the server is overloaded, retry with backoff")


class Admission:
    """In-flight item counts per (model, version, tower) and the preprocessing count, with their limits."""

    def __init__(self, max_inflight_items: int, max_preprocess_items: int, queue_timeout_ms: int = 0):
        self.max_inflight_items, self.max_preprocess_items = max_inflight_items, max_preprocess_items
        self.timeout_s = queue_timeout_ms / 1000
        self.inflight: dict[tuple[str, str, str], int] = {}
        self.preprocessing = 0

    @contextmanager
    def admit(self, model: str, version: str, tower: str, n: int) -> Iterator[None]:
        """Hold n items of (model, version, tower) for the block, or raise RESOURCE_EXHAUSTED at once."""
        key = (model, version, tower)
        if key not in self.inflight:  # export the refusal series before the first refusal (for increase())
            for reason in ("inflight", "preprocess", "queue_timeout"):
                ADMISSION_REJECTED.labels(model, tower, reason)
        used = self.inflight.get(key, 0)
        if used + n > self.max_inflight_items:
            ADMISSION_REJECTED.labels(model, tower, "inflight").inc()
            raise resource_exhausted(
                f"{model}/{version} has {used} {tower} items in flight and this request brings {n}, more than "
                f"max_inflight_items={self.max_inflight_items}; retry with backoff"
            )
        self.inflight[key] = used + n
        INFLIGHT_ITEMS.labels(model, tower).inc(n)
        try:
            yield
        finally:
            self.inflight[key] -= n
            INFLIGHT_ITEMS.labels(model, tower).dec(n)

    @contextmanager
    def preprocess(self, model: str, tower: str, n: int, started: bool = False) -> Iterator[Work]:
        """Hold n preprocessing places for the block, or raise RESOURCE_EXHAUSTED at once; the Work it yields
        is stopped when the block ends, so that nothing of it starts afterwards."""
        if self.preprocessing + n > self.max_preprocess_items:
            ADMISSION_REJECTED.labels(model, tower, "preprocess").inc()
            raise resource_exhausted(
                f"{self.preprocessing} images and texts are waiting for or in preprocessing and this request "
                f"brings {n}, more than max_preprocess_items={self.max_preprocess_items}; retry with backoff"
            )
        self.preprocessing += n
        work = Work(timeout_s=self.timeout_s, started=started)  # started: a later part of a request under way
        try:
            yield work
        finally:
            work.stop.set()
            self.preprocessing -= n
