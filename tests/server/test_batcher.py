"""The dynamic batcher merges concurrent requests, splits big ones and bounds its queue.

No test here orders events by sleeping. The stand-in model can be *held*: each run
announces itself (`Model.started`) and then blocks on a threading.Event until the test
calls `release()`. While the worker is stuck in such a run, whatever the test submits
piles up in the queue in a known order, and the next runs are fully determined by
max_batch_size (with max_queue_delay 0 the worker takes what is queued at once).
Waiting on the event loop alone (a request reaching the queue, a cancelled request
leaving it, a full batch being taken) is a bounded number of `asyncio.sleep(0)` turns,
which involves no clock. Waiting on the model's thread is an await on its
announcement or on the request's own future. Those awaits have a generous timeout
(GUARD_S) so that a broken batcher fails instead of hanging. No assertion depends on
how long anything takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from server.batcher import Batcher, QueueFull

GUARD_S = 30.0  # only against a deadlock in a broken batcher; nothing asserts on elapsed time
FOREVER_US = 10**12  # a max_queue_delay (~11 days) no test outlives: "wait for company" never times out
TURNS = 1000  # event-loop turns to wait for something that needs only the loop (a few turns suffice)


class Model:
    """A stand-in model run in the executor's thread: row r -> [2 * r[0]]. Every batch is recorded.

    A held model announces each run on `started()` and then blocks until `release()`. After
    that, runs go straight through. A batch with a negative first value raises (a failed run).
    """

    def __init__(self, held: bool) -> None:
        self.batches: list[list[float]] = []  # first value of each row, per run
        self._loop = asyncio.get_running_loop()
        self._started: asyncio.Queue[list[float]] = asyncio.Queue()
        self._go = threading.Event()
        if not held:
            self._go.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        values = batch[:, 0].tolist()
        self.batches.append(values)
        self._loop.call_soon_threadsafe(self._started.put_nowait, values)
        if not self._go.wait(GUARD_S):
            raise RuntimeError("the test never released the model")
        if min(values) < 0:
            raise RuntimeError("poisoned batch")
        return batch[:, :1] * 2

    async def started(self) -> list[float]:
        """The next run the model has begun (its rows' first values), waiting for its thread."""
        return await asyncio.wait_for(self._started.get(), GUARD_S)

    def release(self) -> None:
        self._go.set()


def rows(*values: float) -> np.ndarray:
    """A request with one row per value (3 columns, the first being the value)."""
    return np.repeat(np.asarray(values, np.float32)[:, None], 3, axis=1)


def span(start: int, n: int) -> list[float]:
    return [float(v) for v in range(start, start + n)]


def doubled(values: list[float]) -> np.ndarray:
    """What the model returns for rows with these first values."""
    return np.asarray(values, np.float32)[:, None] * 2


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


@contextlib.asynccontextmanager
async def batcher(held: bool = False, **config: Any) -> AsyncIterator[tuple[Model, Batcher]]:
    model = Model(held)
    pool = ThreadPoolExecutor(1)
    b = Batcher(model, pool, **config)
    try:
        yield model, b
    finally:
        model.release()  # a failed test must not leave the thread blocked
        await b.stop()
        pool.shutdown(wait=True)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Turn the event loop until `condition` holds. Only for things the loop alone brings about."""
    for _ in range(TURNS):
        if condition():
            return
        await asyncio.sleep(0)
    pytest.fail(f"{what}: still not so after {TURNS} turns of the event loop")


async def turns(n: int = 50) -> None:
    """Let every ready task run to its next await, n times over (to show something does *not* happen)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def occupy(model: Model, b: Batcher, values: list[float]) -> asyncio.Task[np.ndarray]:
    """Submit a first request and wait until its run has begun. With the model held, the worker
    is then stuck in that run, and everything submitted next stays queued until model.release()."""
    task = asyncio.create_task(b.submit(rows(*values)))
    await model.started()
    return task


async def enqueue(b: Batcher, values: list[float]) -> asyncio.Task[np.ndarray]:
    """Submit a request and wait until its rows are in the queue (the worker must not be free to take them)."""
    before = b.queued_rows
    task = asyncio.create_task(b.submit(rows(*values)))
    await until(lambda: b.queued_rows == before + len(values), f"{len(values)} row(s) queued")
    return task


async def result(task: asyncio.Task[np.ndarray]) -> np.ndarray:
    return await asyncio.wait_for(task, GUARD_S)


def test_queued_requests_from_several_callers_share_one_run_and_each_gets_its_own_rows() -> None:
    async def main() -> None:
        async with batcher(held=True, max_batch_size=64, max_queue_delay_us=0) as (model, b):
            busy = await occupy(model, b, [1.0])
            inputs = [span(100, 1), span(200, 3), span(300, 2), span(400, 5)]
            callers = [await enqueue(b, x) for x in inputs]
            model.release()
            np.testing.assert_array_equal(await result(busy), doubled([1.0]))
            for x, caller in zip(inputs, callers):
                np.testing.assert_array_equal(await result(caller), doubled(x))  # its own rows, in order
            assert model.batches == [[1.0], sum(inputs, [])]  # one run for all four, in arrival order

    run(main)


def test_a_partial_batch_waits_for_company_and_a_full_one_runs_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        async with batcher(max_batch_size=4, max_queue_delay_us=FOREVER_US) as (model, b):
            first = await enqueue(b, span(10, 3))
            await turns()  # the worker has had every chance to take it
            assert b.queued_rows == 3 and not first.done()  # 3 < 4 rows: it waits (the delay never ends)
            second = asyncio.create_task(b.submit(rows(*span(20, 2))))  # 5 rows: a full batch of 4 can go
            await until(lambda: b.queued_rows == 1, "a full batch taken, the delay notwithstanding")
            np.testing.assert_array_equal(await result(first), doubled(span(10, 3)))
            assert model.batches == [span(10, 3) + [20.0]]
            await turns()
            assert b.queued_rows == 1 and not second.done()  # the leftover row waits for company again
            third = asyncio.create_task(b.submit(rows(*span(30, 3))))  # 4 rows: full again
            np.testing.assert_array_equal(await result(second), doubled(span(20, 2)))
            np.testing.assert_array_equal(await result(third), doubled(span(30, 3)))
            assert model.batches == [span(10, 3) + [20.0], [21.0] + span(30, 3)]

    run(main)


def test_a_request_larger_than_the_batch_is_split_and_reassembled_in_order() -> None:
    async def main() -> None:
        async with batcher(max_batch_size=4, max_queue_delay_us=0) as (model, b):
            out = await asyncio.wait_for(b.submit(rows(*span(0, 10))), GUARD_S)
            np.testing.assert_array_equal(out, doubled(span(0, 10)))
            assert model.batches == [span(0, 4), span(4, 4), span(8, 2)]

    run(main)


def test_a_split_request_shares_runs_with_its_neighbours_and_each_gets_its_own_rows() -> None:
    async def main() -> None:
        async with batcher(held=True, max_batch_size=4, max_queue_delay_us=0) as (model, b):
            busy = await occupy(model, b, [1.0])
            a = await enqueue(b, span(100, 6))
            c = await enqueue(b, span(200, 3))
            model.release()
            await result(busy)
            np.testing.assert_array_equal(await result(a), doubled(span(100, 6)))
            np.testing.assert_array_equal(await result(c), doubled(span(200, 3)))
            assert model.batches == [[1.0], span(100, 4), span(104, 2) + span(200, 2), [202.0]]
            assert b.queued_rows == 0

    run(main)


def test_the_queue_is_refused_past_max_queue_rows_at_once() -> None:
    async def main() -> None:
        async with batcher(held=True, max_batch_size=2, max_queue_delay_us=0, max_queue_rows=4) as (model, b):
            busy = await occupy(model, b, [1.0, 2.0])  # taken into the run: not counted as queued
            filling = await enqueue(b, span(10, 4))  # exactly max_queue_rows: accepted
            refused = asyncio.create_task(b.submit(rows(99.0)))
            await asyncio.sleep(0)  # one step of `refused`: it must not wait for room
            assert refused.done()
            with pytest.raises(QueueFull, match="max_queue_rows=4"):
                refused.result()
            assert b.queued_rows == 4  # the refused row was not counted
            model.release()
            np.testing.assert_array_equal(await result(busy), doubled([1.0, 2.0]))
            np.testing.assert_array_equal(await result(filling), doubled(span(10, 4)))
            assert b.queued_rows == 0
            again = await asyncio.wait_for(b.submit(rows(*span(20, 4))), GUARD_S)  # room again
            np.testing.assert_array_equal(again, doubled(span(20, 4)))
            assert model.batches == [[1.0, 2.0], span(10, 2), span(12, 2), span(20, 2), span(22, 2)]

    run(main)


def test_a_cancelled_request_at_the_head_leaves_the_queue_and_never_runs() -> None:
    async def main() -> None:
        async with batcher(held=True, max_batch_size=2, max_queue_delay_us=0) as (model, b):
            busy = await occupy(model, b, [1.0, 2.0])
            doomed = await enqueue(b, span(10, 6))
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            assert b.queued_rows == 0
            model.release()
            await result(busy)
            survivor = await asyncio.wait_for(b.submit(rows(3.0)), GUARD_S)
            np.testing.assert_array_equal(survivor, doubled([3.0]))
            assert model.batches == [[1.0, 2.0], [3.0]]  # the cancelled rows never ran

    run(main)


def test_a_cancelled_split_request_drops_only_its_rows_not_yet_taken() -> None:
    async def main() -> None:
        async with batcher(held=True, max_batch_size=2, max_queue_delay_us=0) as (model, b):
            big = await occupy(model, b, span(10, 5))  # rows 10, 11 run; 12..14 wait at the head
            after = await enqueue(b, [50.0])
            assert b.queued_rows == 4
            big.cancel()
            with pytest.raises(asyncio.CancelledError):
                await big
            assert b.queued_rows == 1  # the 3 untaken rows left; the 2 in the run were no longer counted
            model.release()
            np.testing.assert_array_equal(await result(after), doubled([50.0]))
            assert model.batches == [[10.0, 11.0], [50.0]]
            assert b.queued_rows == 0

    run(main)


def test_cancelling_a_request_behind_others_removes_only_it() -> None:
    async def main() -> None:
        async with batcher(held=True, max_batch_size=8, max_queue_delay_us=0) as (model, b):
            busy = await occupy(model, b, [1.0])
            first = await enqueue(b, span(10, 2))
            second = await enqueue(b, span(20, 3))
            third = await enqueue(b, span(30, 1))
            second.cancel()
            with pytest.raises(asyncio.CancelledError):
                await second
            assert b.queued_rows == 3
            model.release()
            await result(busy)
            np.testing.assert_array_equal(await result(first), doubled(span(10, 2)))
            np.testing.assert_array_equal(await result(third), doubled(span(30, 1)))
            assert model.batches == [[1.0], span(10, 2) + span(30, 1)]

    run(main)


def test_a_failing_run_fails_only_its_requests_and_the_worker_keeps_going() -> None:
    async def main() -> None:
        async with batcher(held=True, max_batch_size=3, max_queue_delay_us=0) as (model, b):
            busy = await occupy(model, b, [1.0])
            poisoned = await enqueue(b, [-1.0, -2.0])
            bystander = await enqueue(b, [5.0])  # shares the poisoned run
            later = await enqueue(b, span(30, 2))  # does not fit in it: the next run
            model.release()
            np.testing.assert_array_equal(await result(busy), doubled([1.0]))
            for task in (poisoned, bystander):
                with pytest.raises(RuntimeError, match="poisoned batch"):
                    await result(task)
            np.testing.assert_array_equal(await result(later), doubled(span(30, 2)))
            fresh = await asyncio.wait_for(b.submit(rows(7.0)), GUARD_S)
            np.testing.assert_array_equal(fresh, doubled([7.0]))
            assert model.batches == [[1.0], [-1.0, -2.0, 5.0], span(30, 2), [7.0]]

    run(main)


def test_a_failing_run_drops_the_rest_of_a_split_request() -> None:
    async def main() -> None:
        async with batcher(held=True, max_batch_size=2, max_queue_delay_us=0) as (model, b):
            busy = await occupy(model, b, [1.0])
            split = await enqueue(b, [-1.0, -2.0, *span(10, 5)])  # only its first run fails
            after = await enqueue(b, [50.0])
            model.release()
            await result(busy)
            with pytest.raises(RuntimeError, match="poisoned batch"):
                await result(split)
            assert b.queued_rows == 0  # split's 5 untaken rows left with it (and `after` was taken)
            np.testing.assert_array_equal(await result(after), doubled([50.0]))
            assert model.batches == [[1.0], [-1.0, -2.0], [50.0]]  # the rest of `split` never ran

    run(main)


def test_stop_fails_queued_and_running_requests_and_empties_the_queue() -> None:
    async def main() -> None:
        async with batcher(held=True, max_batch_size=2, max_queue_delay_us=0, max_queue_rows=4) as (model, b):
            running = await occupy(model, b, span(10, 2))  # all its rows in the run: no longer in the queue
            queued = await enqueue(b, span(20, 3))
            assert b.queued_rows == 3
            await b.stop()
            await until(lambda: running.done() and queued.done(), "every request answered after stop()")
            for task in (running, queued):
                with pytest.raises(RuntimeError, match="shutting down"):
                    task.result()
            assert b.queued_rows == 0
            model.release()
            # submit starts the worker again; the queue's count of rows starts from zero (3 + 4 > max_queue_rows)
            again = await asyncio.wait_for(b.submit(rows(*span(30, 4))), GUARD_S)
            np.testing.assert_array_equal(again, doubled(span(30, 4)))
            assert model.batches == [[10.0, 11.0], span(30, 2), span(32, 2)]

    run(main)


def test_idle_only_when_nothing_is_queued_or_running_and_inline_runs_skip_the_queue() -> None:
    """The search path runs a lone request inline when the batcher is idle (server/collections.py)."""
    async def main() -> None:
        async with batcher(held=True, max_batch_size=8, max_queue_delay_us=0) as (model, b):
            assert b.idle and b.quick_run_s == float("inf")
            busy = await occupy(model, b, [1.0])
            assert not b.idle  # a run in progress
            queued = await enqueue(b, [2.0])
            assert not b.idle
            model.release()
            np.testing.assert_array_equal(await result(busy), doubled([1.0]))
            np.testing.assert_array_equal(await result(queued), doubled([2.0]))
            await until(lambda: b.idle, "the batcher idle again")
            np.testing.assert_array_equal(b.run_inline(rows(5.0, 6.0)), doubled([5.0, 6.0]))
            assert model.batches[-1] == [5.0, 6.0] and 0 <= b.quick_run_s < GUARD_S

    run(main)


def test_requests_that_outwait_the_queue_timeout_fail_unrun_and_the_rest_run() -> None:
    from server.batcher import QueueExpired

    async def main() -> None:
        async with batcher(held=True, max_batch_size=8, max_queue_delay_us=0) as (model, b):
            busy = await occupy(model, b, [1.0])
            b.queue_timeout_s = 1e-6  # from now on: whatever waits behind the held run has waited too long
            late = await enqueue(b, [2.0, 3.0])
            model.release()
            np.testing.assert_array_equal(await result(busy), doubled([1.0]))
            with pytest.raises(QueueExpired, match="queue_timeout_ms"):
                await result(late)
            assert b.queued_rows == 0 and [2.0, 3.0] not in model.batches
            b.queue_timeout_s = 0.0
            np.testing.assert_array_equal(await result(asyncio.create_task(b.submit(rows(4.0)))), doubled([4.0]))

    run(main)


def test_a_lone_request_runs_at_once_when_no_company_is_coming() -> None:
    """The server's batchers wait max_queue_delay only while more requests are in flight than queued
    (server/registry.py): with none coming, even an endless delay does not hold a request back."""
    async def main() -> None:
        coming = {"more": False}
        async with batcher(max_batch_size=8, max_queue_delay_us=FOREVER_US,
                           company_coming=lambda queued: coming["more"]) as (model, b):
            np.testing.assert_array_equal(await result(asyncio.create_task(b.submit(rows(1.0)))), doubled([1.0]))
            coming["more"] = True  # now the worker waits for company: two requests share one run
            first = asyncio.create_task(b.submit(rows(2.0)))
            await turns()
            assert model.batches == [[1.0]]  # still waiting
            second = asyncio.create_task(b.submit(rows(3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)))  # fills the batch
            np.testing.assert_array_equal(await result(first), doubled([2.0]))
            await result(second)
            assert model.batches == [[1.0], [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]]

    run(main)


class Gated:
    """A stand-in model whose runs are released one by one, in any order: release(v) lets the run whose
    first row's value is v return."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started: asyncio.Queue[float] = asyncio.Queue()
        self._gates: dict[float, threading.Event] = {}
        self._lock = threading.Lock()

    def _gate(self, v: float) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(v, threading.Event())

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        first = float(batch[0, 0])
        self._loop.call_soon_threadsafe(self._started.put_nowait, first)
        if not self._gate(first).wait(GUARD_S):
            raise RuntimeError("the test never released this run")
        return batch[:, :1] * 2

    async def started(self) -> float:
        return await asyncio.wait_for(self._started.get(), GUARD_S)

    def release(self, v: float) -> None:
        self._gate(v).set()

    def release_all(self) -> None:
        with self._lock:
            for gate in self._gates.values():
                gate.set()


def test_with_two_runners_the_next_batch_runs_while_one_is_in_progress_and_rows_come_back_in_order() -> None:
    async def main() -> None:
        model, pool = Gated(), ThreadPoolExecutor(2)
        b = Batcher(model, pool, max_batch_size=4, max_queue_delay_us=0, runners=2)
        try:
            split = asyncio.create_task(b.submit(rows(*span(0, 6))))  # runs [0..3] and [4, 5]
            assert {await model.started(), await model.started()} == {0.0, 4.0}  # both in progress at once
            third = asyncio.create_task(b.submit(rows(100.0)))
            await until(lambda: b.queued_rows == 1, "the third request queued")
            await turns()
            assert b.queued_rows == 1  # two runners, both busy: it waits for one
            model.release(4.0)  # the later run ends first
            assert await model.started() == 100.0  # its runner took the queued request
            await turns()
            assert not split.done()  # half of its rows are back, not all
            model.release(0.0)
            np.testing.assert_array_equal(await result(split), doubled(span(0, 6)))  # in order nonetheless
            model.release(100.0)
            np.testing.assert_array_equal(await result(third), doubled([100.0]))
            assert b.idle
        finally:
            model.release_all()
            await b.stop()
            pool.shutdown(wait=True)

    run(main)


def test_runners_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="runners"):
        Batcher(lambda x: x, ThreadPoolExecutor(1), runners=0)
