"""The dynamic batcher merges concurrent requests, splits big ones and bounds its queue."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from server.batcher import Batcher, QueueFull


class Recorder:
    """A stand-in model that records each batch it runs: row i -> [i * 2]."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[int] = []
        self.gate = gate

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(len(batch))
        return batch[:, :1] * 2


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_concurrent_requests_share_one_run_and_get_their_own_rows() -> None:
    async def main() -> None:
        model = Recorder()
        b = Batcher(model, ThreadPoolExecutor(1), max_batch_size=64, max_queue_delay_us=200_000)
        inputs = [np.full((n, 3), i, np.float32) for i, n in enumerate([1, 3, 2, 5])]
        outs = await asyncio.gather(*(b.submit(x) for x in inputs))
        for i, (x, out) in enumerate(zip(inputs, outs)):
            assert out.shape == (len(x), 1) and np.all(out == i * 2)
        assert model.batches == [11]  # one run for all four requests
        await b.stop()

    run(main())


def test_full_batch_runs_without_waiting_for_the_delay() -> None:
    async def main() -> None:
        model = Recorder()
        b = Batcher(model, ThreadPoolExecutor(1), max_batch_size=4, max_queue_delay_us=60_000_000)
        out = await asyncio.wait_for(b.submit(np.ones((4, 2), np.float32)), timeout=5)
        assert out.shape == (4, 1) and model.batches == [4]
        await b.stop()

    run(main())


def test_request_larger_than_batch_is_split_and_reassembled_in_order() -> None:
    async def main() -> None:
        model = Recorder()
        b = Batcher(model, ThreadPoolExecutor(1), max_batch_size=4, max_queue_delay_us=0)
        x = np.arange(10, dtype=np.float32)[:, None]
        out = await b.submit(x)
        np.testing.assert_array_equal(out[:, 0], x[:, 0] * 2)
        assert model.batches == [4, 4, 2]
        await b.stop()

    run(main())


def test_queue_full_is_refused_immediately() -> None:
    async def main() -> None:
        gate = threading.Event()
        b = Batcher(Recorder(gate), ThreadPoolExecutor(1), max_batch_size=2, max_queue_delay_us=0, max_queue_rows=4)
        first = asyncio.create_task(b.submit(np.ones((2, 1), np.float32)))  # taken by the worker, blocked
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(b.submit(np.ones((4, 1), np.float32)))  # fills the queue
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="max_queue_rows=4"):
            await b.submit(np.ones((1, 1), np.float32))
        gate.set()
        assert (await first).shape == (2, 1) and (await queued).shape == (4, 1)
        await b.stop()

    run(main())


async def busy_batcher() -> tuple[threading.Event, Recorder, Batcher, asyncio.Task]:  # type: ignore[type-arg]
    """A batcher (max batch 2) whose model is stuck on a first batch until `gate` is set."""
    gate = threading.Event()
    model = Recorder(gate)
    b = Batcher(model, ThreadPoolExecutor(1), max_batch_size=2, max_queue_delay_us=0, max_queue_rows=100)
    busy = asyncio.create_task(b.submit(np.ones((2, 1), np.float32)))
    await asyncio.sleep(0.05)
    return gate, model, b, busy


def test_cancelled_request_leaves_the_queue_and_others_still_run() -> None:
    async def main() -> None:
        gate, model, b, busy = await busy_batcher()
        doomed = asyncio.create_task(b.submit(np.ones((6, 1), np.float32)))
        await asyncio.sleep(0.05)
        assert b.queued_rows == 6
        doomed.cancel()
        await asyncio.sleep(0.01)
        assert b.queued_rows == 0
        gate.set()
        await busy
        survivor = await b.submit(np.full((1, 1), 3, np.float32))
        assert survivor[0, 0] == 6 and model.batches == [2, 1]  # the cancelled rows never ran
        await b.stop()

    run(main())


def test_a_failing_run_fails_only_its_requests() -> None:
    async def main() -> None:
        calls = {"n": 0}

        def flaky(batch: np.ndarray) -> np.ndarray:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return batch

        b = Batcher(flaky, ThreadPoolExecutor(1), max_batch_size=8, max_queue_delay_us=0)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(np.ones((1, 1), np.float32))
        assert (await b.submit(np.ones((1, 1), np.float32))).shape == (1, 1)
        await b.stop()

    run(main())


def test_cancelling_a_request_behind_others_removes_only_it() -> None:
    async def main() -> None:
        gate, model, b, busy = await busy_batcher()
        first = asyncio.create_task(b.submit(np.full((2, 1), 1, np.float32)))
        second = asyncio.create_task(b.submit(np.full((3, 1), 2, np.float32)))  # other shape than `first`
        await asyncio.sleep(0.05)
        second.cancel()
        await asyncio.sleep(0.01)
        assert second.cancelled() and b.queued_rows == 2
        gate.set()
        await busy
        assert np.all(await first == 2) and model.batches == [2, 2]
        await b.stop()

    run(main())


def test_a_failing_run_drops_the_rest_of_a_split_request() -> None:
    async def main() -> None:
        def broken(batch: np.ndarray) -> np.ndarray:
            raise RuntimeError("model exploded")

        b = Batcher(broken, ThreadPoolExecutor(1), max_batch_size=2, max_queue_delay_us=0)
        with pytest.raises(RuntimeError, match="exploded"):
            await b.submit(np.ones((7, 1), np.float32))
        await asyncio.sleep(0.01)
        assert b.queued_rows == 0
        await b.stop()

    run(main())
