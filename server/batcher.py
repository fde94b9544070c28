"""Dynamic batching: requests from many clients share one ONNX Runtime run.

One Batcher serves one (model, tower). Callers ``await batcher.submit(x)``
with x of shape [n, ...]; a worker task takes the oldest pending requests,
waits at most ``max_queue_delay_us`` for more to arrive, and runs up to
``max_batch_size`` rows at once in a thread (ONNX Runtime releases the GIL).
Up to ``runners`` runs are in progress at once: while one runs, the worker
forms and starts the next (double-buffering), so a small model with one
thread per run keeps every core busy without intra-op synchronisation.
Each caller gets back exactly its own rows, in order. A request larger than
the batch limit is split into several runs. The queue holds at most
``max_queue_rows`` rows; past that ``submit`` raises QueueFull at once
instead of letting latency grow without bound.
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


class BatcherStopped(RuntimeError):
    """The batcher stopped before the request ran: the server is stopping, or (`gone`) what it served went away
    (a dropped collection)."""

    def __init__(self, message: str, gone: bool = False):
        super().__init__(message)
        self.gone = gone


class QueueExpired(RuntimeError):
    """The request waited in the queue longer than the queue timeout and was not run."""


@dataclass(eq=False)  # identity, not field, equality: rows are numpy arrays
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)
    done_rows: dict[int, np.ndarray] = field(default_factory=dict)  # start row -> output rows (runs end in any order)
    done: int = 0  # rows whose output is in done_rows
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
        runners: int = 1,
    ):
        """company_coming(n): whether requests other than the n this batcher holds (queued or running) are on
        their way (being decoded or tokenised, say). The worker waits up to max_queue_delay_us for company only
        while it says so and no run is in progress; a lone request runs at once. None: always wait (a fixed
        delay, as Triton's dynamic batcher).
        runners: most runs in progress at once (each in its own executor thread).
        queue_timeout_us: a request whose first rows have waited longer than this when a batch is formed
        fails with QueueExpired instead of running (Triton's queue policy, REJECT); 0 waits as long as it takes."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if runners < 1:
            raise ValueError("runners must be >= 1")
        self.runners = runners
        self._run, self._executor = run, executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.max_queue_rows = max_queue_rows
        self.queue_timeout_s = queue_timeout_us / 1e6
        self._company_coming = company_coming or (lambda n: True)
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._runs: dict[asyncio.Future[np.ndarray], list[tuple[_Pending, int, int]]] = {}  # run -> its slices
        self._held = 0  # requests queued or with rows in a run, not yet answered
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._labels = labels
        self._recent_runs: deque[float] = deque(maxlen=8)  # seconds per run, latest last
        # Export the series from the start: a rate() or increase() over a series that appears at its first
        # rejection never counts that first one.
        metrics.QUEUE_REJECTED.labels(*labels)
        metrics.QUEUE_EXPIRED.labels(*labels)
        metrics.QUEUE_ROWS.labels(*labels).set(0)
        # The series every run observes, looked up once (labels() takes a lock and builds a key each call).
        self._batch_size = metrics.BATCH_SIZE.labels(*labels)
        self._queue_seconds = metrics.STAGE_SECONDS.labels("queue", *labels)
        self._inference_seconds = metrics.STAGE_SECONDS.labels("inference", *labels)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker(), name=f"batcher-{self._labels}")

    async def stop(self, reason: str = "the server is shutting down; retry on another replica", gone: bool = False
                   ) -> None:
        """Stop; requests queued or in a run get BatcherStopped(reason, gone)."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        running = [p for taken in self._runs.values() for p, _, _ in taken]
        for p in (*running, *self._queue):  # a request in a cancelled run would wait forever
            if not p.future.done():
                p.future.set_exception(BatcherStopped(reason, gone))
        self._runs.clear()
        self._queue.clear()
        self._queued_rows = 0
        metrics.QUEUE_ROWS.labels(*self._labels).set(0)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def _ran(self, seconds: float) -> None:
        self._recent_runs.append(seconds)
        self._inference_seconds.observe(seconds)

    @property
    def quick_run_s(self) -> float:
        """The fastest of the last 8 runs (inf before the first): what a run costs when the machine is not busy
        with something else (a run in a thread also waits for the GIL, so the latest one alone overstates it)."""
        return min(self._recent_runs, default=float("inf"))

    @property
    def idle(self) -> bool:
        """Nothing queued and no run in progress."""
        return not self._queue and not self._runs

    def run_inline(self, rows: np.ndarray, run: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Run `rows` at once in the calling thread (the event loop), skipping the queue and the thread hop.
        Only for a lone caller of a run known to be short (see quick_run_s): the loop serves no one meanwhile.
        `run`, when given, stands in for the batcher's function (one that refuses rather than waits, say); an
        exception it raises reaches the caller and the run is not counted."""
        started = time.perf_counter()
        out = (run or self._run)(rows)
        self._ran(time.perf_counter() - started)
        self._batch_size.observe(len(rows))
        self._queue_seconds.observe(0.0)  # every run's rows have a queue time
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
        self._held += 1
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
        finally:
            self._held -= 1

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
            if not self._queue or len(self._runs) >= self.runners:
                self._wakeup.clear()
                await self._wakeup.wait()  # a submit, or the end of a run
                continue
            if not self._runs:
                # Idle: wait for company while some is coming, but never past the oldest request's deadline.
                # With a run in progress the next batch starts at once: it fills while the other runs.
                deadline = self._queue[0].enqueued + self.max_queue_delay_s
                # (Only this worker starts runs, so none can start while it waits here.)
                while (self._queue and self._queued_rows < self.max_batch_size
                       and self._company_coming(self._held) and (wait := deadline - time.perf_counter()) > 0):
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    except TimeoutError:
                        break
            taken = self._take_batch()
            metrics.QUEUE_ROWS.labels(*self._labels).set(self._queued_rows)
            if not taken:  # nothing queued, or all of it expired
                continue
            now = time.perf_counter()
            for p, start, _ in taken:
                if start == 0:
                    self._queue_seconds.observe(now - p.enqueued)
            batch = np.concatenate([p.rows[a:b] for p, a, b in taken]) if len(taken) > 1 else taken[0][0].rows[
                taken[0][1] : taken[0][2]
            ]
            self._batch_size.observe(len(batch))
            run = loop.run_in_executor(self._executor, self._timed_run, batch)
            self._runs[run] = taken
            run.add_done_callback(self._finished)

    def _timed_run(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        out = self._run(batch)
        return out, time.perf_counter() - started

    def _finished(self, run: asyncio.Future[tuple[np.ndarray, float]]) -> None:
        """A run ended (on the event loop): hand each request its rows, or the run's error."""
        taken = self._runs.pop(run, None)  # type: ignore[call-overload]
        self._wakeup.set()  # a runner is free
        if taken is None or run.cancelled():  # stop() already failed its requests
            return
        error = run.exception()
        if error is not None:  # a failed run fails its requests, not the worker
            for p, _, _ in taken:
                if not p.future.done():
                    p.future.set_exception(error)
                if p in self._queue:  # rest of a split request: drop it, it has failed
                    self._queue.remove(p)
                    self._queued_rows -= len(p.rows) - p.offset
            metrics.QUEUE_ROWS.labels(*self._labels).set(self._queued_rows)
            return
        out, seconds = run.result()
        self._ran(seconds)
        cursor = 0
        for p, a, b in taken:
            p.done_rows[a] = out[cursor : cursor + b - a]
            p.done += b - a
            cursor += b - a
            if p.done == len(p.rows) and not p.future.done():
                parts = [p.done_rows[k] for k in sorted(p.done_rows)]
                p.future.set_result(parts[0] if len(parts) == 1 else np.concatenate(parts))
