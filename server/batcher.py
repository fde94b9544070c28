"""Dynamic batching: requests from many clients share one ONNX Runtime run.

One Batcher serves one (model, tower). Callers ``await batcher.submit(x)``
with x of shape [n, ...]; a worker task takes the oldest pending requests,
waits at most ``max_queue_delay_us`` for more to arrive, and runs up to
``max_batch_size`` rows at once in a thread (ONNX Runtime releases the GIL).
Each caller gets back exactly its own rows. A request larger than the batch
limit is split into several runs. The queue holds at most ``max_queue_rows``
rows; past that ``submit`` raises QueueFull at once instead of letting
latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from . import metrics

RunFn = Callable[[np.ndarray], np.ndarray]


class QueueFull(RuntimeError):
    pass


class QueueExpired(RuntimeError):
    """The request waited in the queue longer than the queue timeout and was not run."""


@dataclass(eq=False)  # identity, not field, equality: rows are numpy arrays
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)
    done_rows: list[np.ndarray] = field(default_factory=list)
    offset: int = 0  # rows already taken into a batch


class Batcher:
    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        max_batch_size: int = 32,
        max_queue_delay_us: int = 2000,
        max_queue_rows: int = 4096,
        labels: tuple[str, str] = ("model", "tower"),
        queue_timeout_us: int = 0,
        company_coming: Callable[[int], bool] | None = None,
    ):
        """company_coming(n): whether requests other than the n queued ones are on their way (being decoded or
        tokenised, say). The worker waits up to max_queue_delay_us for company only while it says so; a lone
        request runs at once. None: always wait (a fixed delay, as Triton's dynamic batcher).
        queue_timeout_us: a request whose first rows have waited longer than this when a batch is formed
        fails with QueueExpired instead of running (Triton's queue policy, REJECT); 0 waits as long as it takes."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run, self._executor = run, executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_rows = max_queue_rows
        self.queue_timeout_s = queue_timeout_us / 1e6
        self._company_coming = company_coming or (lambda n: True)
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._running: list[_Pending] = []  # requests with rows in the run in progress
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._labels = labels
        self._recent_runs: deque[float] = deque(maxlen=8)  # seconds per run, latest last
        # Export the series from the start: a rate() or increase() over a series that appears at its first
        # rejection never counts that first one.
        metrics.QUEUE_REJECTED.labels(*labels)
        metrics.QUEUE_EXPIRED.labels(*labels)
        metrics.QUEUE_ROWS.labels(*labels).set(0)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker(), name=f"batcher-{self._labels}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for p in (*self._running, *self._queue):  # a request in the cancelled run would wait forever
            if not p.future.done():
                p.future.set_exception(RuntimeError("server is shutting down"))
        self._running = []
        self._queue.clear()
        self._queued_rows = 0
        metrics.QUEUE_ROWS.labels(*self._labels).set(0)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def _ran(self, seconds: float) -> None:
        self._recent_runs.append(seconds)
        metrics.STAGE_SECONDS.labels("inference", *self._labels).observe(seconds)

    @property
    def quick_run_s(self) -> float:
        """The fastest of the last 8 runs (inf before the first): what a run costs when the machine is not busy
        with something else (a run in a thread also waits for the GIL, so the latest one alone overstates it)."""
        return min(self._recent_runs, default=float("inf"))

    @property
    def idle(self) -> bool:
        """Nothing queued and no run in progress."""
        return not self._queue and not self._running

    def run_inline(self, rows: np.ndarray) -> np.ndarray:
        """Run `rows` at once in the calling thread (the event loop), skipping the queue and the thread hop.
        Only for a lone caller of a run known to be short (see quick_run_s): the loop serves no one meanwhile."""
        metrics.BATCH_SIZE.labels(*self._labels).observe(len(rows))
        started = time.perf_counter()
        out = self._run(rows)
        self._ran(time.perf_counter() - started)
        return out

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Run `rows` ([n, ...]) through the model; returns [n, dim] in order."""
        n = len(rows)
        if n == 0:
            raise ValueError("nothing to run")
        if self._queued_rows + n > self.max_queue_rows:
            metrics.QUEUE_REJECTED.labels(*self._labels).inc()
            raise QueueFull(
                f"the {self._labels[1]} queue of {self._labels[0]} holds {self._queued_rows} items "
                f"(limit max_queue_rows={self.max_queue_rows}); retry with backoff"
            )
        self.start()
        pending = _Pending(rows, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_rows += n
        metrics.QUEUE_ROWS.labels(*self._labels).set(self._queued_rows)
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The caller went away (deadline, disconnect): drop rows not yet taken.
            if pending in self._queue:
                self._queue.remove(pending)
                self._queued_rows -= n - pending.offset
                metrics.QUEUE_ROWS.labels(*self._labels).set(self._queued_rows)
            raise

    def _expire(self) -> None:
        """Fail the queued requests that waited past the queue timeout (none of their rows has run)."""
        oldest = time.perf_counter() - self.queue_timeout_s
        while self._queue and self._queue[0].offset == 0 and self._queue[0].enqueued < oldest:
            p = self._queue.popleft()
            self._queued_rows -= len(p.rows)
            metrics.QUEUE_EXPIRED.labels(*self._labels).inc()
            if not p.future.done():
                p.future.set_exception(QueueExpired(
                    f"the request waited more than {self.queue_timeout_s * 1000:g} ms (queue_timeout_ms) in the "
                    f"{self._labels[1]} queue of {self._labels[0]} and was not run; the server is overloaded, "
                    "retry with backoff"))

    def _take_batch(self) -> list[tuple[_Pending, int, int]]:
        """Pop up to max_batch_size rows from the head: (request, start, stop) slices."""
        if self.queue_timeout_s:
            self._expire()
        taken: list[tuple[_Pending, int, int]] = []
        room = self.max_batch_size
        while self._queue and room:
            p = self._queue[0]
            stop = min(len(p.rows), p.offset + room)
            taken.append((p, p.offset, stop))
            room -= stop - p.offset
            p.offset = stop
            if stop == len(p.rows):
                self._queue.popleft()
        self._queued_rows -= self.max_batch_size - room
        return taken

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for company while some is coming, but never past the oldest request's deadline.
            deadline = self._queue[0].enqueued + self.max_queue_delay_s
            while (self._queued_rows < self.max_batch_size and self._company_coming(len(self._queue))
                   and (wait := deadline - time.perf_counter()) > 0):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except TimeoutError:
                    break
            taken = self._take_batch()
            if not taken:  # nothing queued, or all of it expired
                metrics.QUEUE_ROWS.labels(*self._labels).set(self._queued_rows)
                continue
            metrics.QUEUE_ROWS.labels(*self._labels).set(self._queued_rows)
            now = time.perf_counter()
            for p, start, _ in taken:
                if start == 0:
                    metrics.STAGE_SECONDS.labels("queue", *self._labels).observe(now - p.enqueued)
            batch = np.concatenate([p.rows[a:b] for p, a, b in taken]) if len(taken) > 1 else taken[0][0].rows[
                taken[0][1] : taken[0][2]
            ]
            metrics.BATCH_SIZE.labels(*self._labels).observe(len(batch))
            started = time.perf_counter()
            self._running = [p for p, _, _ in taken]
            try:
                out = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as e:  # a failed run fails its requests, not the worker
                self._running = []
                for p, _, _ in taken:
                    if not p.future.done():
                        p.future.set_exception(e)
                    if p in self._queue:  # rest of a split request: drop it, it has failed
                        self._queue.remove(p)
                        self._queued_rows -= len(p.rows) - p.offset
                metrics.QUEUE_ROWS.labels(*self._labels).set(self._queued_rows)
                continue
            self._running = []
            self._ran(time.perf_counter() - started)
            cursor = 0
            for p, a, b in taken:
                p.done_rows.append(out[cursor : cursor + b - a])
                cursor += b - a
                if b == len(p.rows) and not p.future.done():
                    parts = p.done_rows
                    p.future.set_result(parts[0] if len(parts) == 1 else np.concatenate(parts))
