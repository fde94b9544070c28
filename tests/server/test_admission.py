"""Admission before work: full means RESOURCE_EXHAUSTED at once, before any decoding; a request that fails, is
cancelled or waited too long stops the work it has not started; everyone else is still served.

Counters (tandem_preprocess_items_total, tandem_admission_rejected_total), not timing, say what work ran. One
preprocessing thread makes the order of the work a request queues the order it runs in.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
from PIL import Image
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from server.admission import ADMISSION_REJECTED, PREPROCESS_ITEMS
from tests.conftest import RunningServer, png_bytes, start_server
from tests.server.test_bad_input import expect

GOOD = png_bytes(Image.new("RGB", (40, 30), (200, 30, 30)))
C = grpc.StatusCode
MODEL = ("tiny-clip", "1")


@pytest.fixture(scope="module")
def server(tiny_repo) -> Iterator[RunningServer]:  # type: ignore[no-untyped-def]
    s = start_server(tiny_repo, default_model="tiny-clip", preprocess_threads=1, max_items_per_request=32,
                     max_inflight_items=32, max_preprocess_items=40, max_queue_rows=64, queue_timeout_ms=1000)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.InferenceStub]:
    channel = server.channel()
    yield pb_grpc.InferenceStub(channel)
    channel.close()


def count(tower: str, outcome: str) -> float:
    return PREPROCESS_ITEMS.labels(tower, outcome)._value.get()


def counts(tower: str = "image") -> dict[str, float]:
    return {o: count(tower, o) for o in ("ok", "invalid", "cancelled", "expired")}


def rejected(reason: str, tower: str = "image") -> float:
    return ADMISSION_REJECTED.labels(MODEL[0], tower, reason)._value.get()


def drain(server: RunningServer) -> None:
    """Wait until the one preprocessing thread has run (or skipped) everything queued before now."""
    server.server.registry.preprocess_pool.submit(lambda: None).result(timeout=30)


@contextmanager
def held(server: RunningServer, hold) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Keep `hold()` (an admission context manager) entered on the server's event loop for the block."""
    entered, release = threading.Event(), None

    async def keep() -> None:
        nonlocal release
        release = asyncio.Event()
        with hold():
            entered.set()
            await release.wait()

    done = asyncio.run_coroutine_threadsafe(keep(), server.loop)
    assert entered.wait(30)
    try:
        yield
    finally:
        server.loop.call_soon_threadsafe(release.set)  # type: ignore[union-attr]
        done.result(timeout=30)


@contextmanager
def blocked_preprocessing(server: RunningServer) -> Iterator[None]:
    """The one preprocessing thread busy until the block ends: what requests queue meanwhile waits."""
    gate, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        gate.wait(60)

    server.server.registry.preprocess_pool.submit(block)
    assert started.wait(30)
    try:
        yield
    finally:
        gate.set()


def still_serving(stub: pb_grpc.InferenceStub) -> None:
    assert stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD]), timeout=30).embeddings.rows == 1
    assert stub.EmbedText(pb.EmbedTextRequest(texts=["ok"]), timeout=30).embeddings.rows == 1


def inference(server: RunningServer):  # type: ignore[no-untyped-def]
    return server.server.collections_service.inference


def test_a_full_model_refuses_at_once_without_decoding(server, stub) -> None:  # type: ignore[no-untyped-def]
    admission = inference(server).admission
    with held(server, lambda: admission.admit(*MODEL, "image", 30)):
        before, refused = counts(), rejected("inflight")
        expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD] * 3), timeout=30),
               C.RESOURCE_EXHAUSTED, "30 image items in flight", "brings 3", "max_inflight_items=32")
        expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD] * 3, labels=["a", "b"]), timeout=30),
               C.RESOURCE_EXHAUSTED, "max_inflight_items=32")
        assert counts() == before  # nothing was decoded
        assert rejected("inflight") == refused + 2
        # What fits is admitted, and the text tower has its own budget.
        assert stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD] * 2), timeout=30).embeddings.rows == 2
        assert stub.EmbedText(pb.EmbedTextRequest(texts=["a"] * 32), timeout=30).embeddings.rows == 32
    still_serving(stub)


def test_a_full_preprocessing_queue_refuses_at_once(server, stub) -> None:  # type: ignore[no-untyped-def]
    admission = inference(server).admission
    with held(server, lambda: admission.preprocess("other-model", "image", 39)):
        before = counts("text")
        expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD] * 2), timeout=30),
               C.RESOURCE_EXHAUSTED, "39 images and texts", "max_preprocess_items=40")
        long = "a red circle " * 20  # 260 characters: over INLINE_TOKENIZE_CHARS, tokenised in a thread
        expect(lambda: stub.EmbedText(pb.EmbedTextRequest(texts=[long, long]), timeout=30),
               C.RESOURCE_EXHAUSTED, "max_preprocess_items=40")
        assert counts("text") == before
        assert stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD]), timeout=30).embeddings.rows == 1
        # A short text is tokenised on the event loop: it needs no preprocessing place and is served.
        assert stub.EmbedText(pb.EmbedTextRequest(texts=["a", "b"]), timeout=30).embeddings.rows == 2
    still_serving(stub)


def test_a_non_image_item_fails_its_request_before_any_decoding(server, stub) -> None:  # type: ignore[no-untyped-def]
    before = counts()
    expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD] * 25 + [b"junk", b""]), timeout=30),
           C.INVALID_ARGUMENT, "images[25] is not a recognisable image (4 bytes")
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD, b""], labels=["a", "b"]), timeout=30),
           C.INVALID_ARGUMENT, "images[1] is empty (0 bytes)")
    drain(server)
    assert counts() == before  # nothing decoded, nothing started


def test_a_failed_image_stops_the_rest_of_its_request(server, stub) -> None:  # type: ignore[no-untyped-def]
    before = counts()
    truncated = GOOD[:60]  # a PNG's first bytes: it looks like an image until it is decoded
    expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[truncated] + [GOOD] * 25), timeout=30),
           C.INVALID_ARGUMENT, "images[0]")
    drain(server)
    after = counts()
    # The bad image ran first (one thread, in order); the 25 after it never started.
    assert after["invalid"] - before["invalid"] == 1
    assert after["ok"] - before["ok"] == 0
    assert after["cancelled"] - before["cancelled"] == 25
    still_serving(stub)


def test_a_cancelled_request_leaves_nothing_queued(server, stub) -> None:  # type: ignore[no-untyped-def]
    before = counts()
    with blocked_preprocessing(server):
        expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD] * 20), timeout=0.5), C.DEADLINE_EXCEEDED)
        for _ in range(300):  # the server hears of the deadline on its own; wait for it (not a timed assertion)
            if count("image", "cancelled") - before["cancelled"] == 20:
                break
            time.sleep(0.05)
        assert count("image", "cancelled") - before["cancelled"] == 20
    drain(server)
    assert count("image", "ok") == before["ok"]  # none of the 20 was decoded once the thread was free
    assert inference(server).admission.inflight[(*MODEL, "image")] == 0
    still_serving(stub)


def test_a_request_that_waited_past_the_queue_timeout_is_not_run(server, stub) -> None:  # type: ignore[no-untyped-def]
    before, refused = counts(), rejected("queue_timeout")
    admission = inference(server).admission
    with ThreadPoolExecutor(1) as client, blocked_preprocessing(server):
        answer = client.submit(stub.EmbedImage, pb.EmbedImageRequest(images=[GOOD] * 3), timeout=30)
        while admission.inflight.get((*MODEL, "image"), 0) < 3:  # admitted, queued behind the busy thread
            time.sleep(0.01)
        # Refused when the timeout passes, while the thread is still busy (it used to wait for the thread)
        with pytest.raises(grpc.RpcError) as info:
            answer.result(timeout=20)
    assert info.value.code() == C.UNAVAILABLE and "queue_timeout_ms=1000" in info.value.details()
    drain(server)
    after = counts()
    assert after["ok"] == before["ok"] and after["expired"] - before["expired"] == 1
    assert after["cancelled"] - before["cancelled"] == 2  # the other two were not started either
    assert rejected("queue_timeout") == refused + 1
    still_serving(stub)


def test_a_request_under_way_is_not_timed_out_by_its_own_later_items(server, stub, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The queue timeout covers the wait before a request's first item starts. Here each image takes 0.6 s on
    the one preprocessing thread, so the third starts 1.2 s after the request arrived, past queue_timeout_ms
    =1000: it waited for the request's own items, not for an overloaded server, and must run."""
    import server.service as service

    real = service.preprocess

    def slow(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "preprocess", slow)
    before = counts()
    assert stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD] * 3), timeout=30).embeddings.rows == 3
    after = counts()
    assert after["ok"] - before["ok"] == 3 and after["expired"] == before["expired"]


def test_a_request_that_never_started_still_times_out() -> None:
    from server.admission import QueueTimeout, Work

    waited = Work(arrived=time.monotonic() - 2, timeout_s=1)
    with pytest.raises(QueueTimeout):
        waited.may_start("image")
    assert waited.stop.is_set()  # its other items are skipped
    under_way = Work(timeout_s=1)
    assert under_way.may_start("image")
    under_way.arrived -= 2  # its next items start 2 s after it arrived
    assert under_way.may_start("image")


def test_more_prompts_than_one_request_may_bring_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    templates = [f"{{}} {i}" for i in range(5)]  # 7 labels x 5 templates = 35 > max_inflight_items 32
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD], labels=[f"l{i}" for i in range(7)],
                                                    templates=templates), timeout=30),
           C.INVALID_ARGUMENT, "35 prompts", "more than the server takes in one request (max_inflight_items=32)")


def test_the_server_options_carry_the_connection_limits() -> None:
    from server.config import ServerConfig, grpc_server_options

    options = dict(grpc_server_options(ServerConfig(max_message_bytes=1 << 20, max_connection_age_s=600)))
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 1 << 20
    assert options["grpc.max_connection_age_ms"] == 600_000 and options["grpc.max_concurrent_streams"] == 256
    assert "grpc.max_connection_age_ms" not in dict(grpc_server_options(ServerConfig(max_connection_age_s=0)))
    server = grpc.server(ThreadPoolExecutor(1), options=list(options.items()))  # gRPC takes every one of them
    assert server.add_insecure_port("127.0.0.1:0") > 0
    server.start()
    server.stop(0)
