"""The gRPC API over real localhost connections: embeddings, zero-shot, models,
health, reflection, metrics, wire format and the client's errors."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from bundle import load_bundle
from bundle.image import preprocess
from bundle.tokenizer import ClipTokenizer
from server.client import AsyncTandemClient, InvalidArgument, TandemClient
from tests.conftest import png_bytes

RED = png_bytes(Image.new("RGB", (50, 40), (220, 30, 30)))
BLUE = png_bytes(Image.new("RGB", (30, 60), (30, 30, 220)), "JPEG")


def raw_onnx(repo, tower: str, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    path = repo / "tiny-clip" / "1" / f"{tower}.onnx"
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_text_embeddings_equal_raw_onnx_runtime_normalised(tiny_server, tiny_repo) -> None:  # type: ignore[no-untyped-def]
    texts = ["a red circle", "a blue square", "x"]
    with TandemClient(tiny_server.target) as c:
        r = c.embed_text(texts)
        raw = c.embed_text(texts, normalize=False)
    ids, _ = ClipTokenizer(tiny_repo / "tiny-clip" / "1" / "tokenizer.json", 16).encode_batch(texts)
    want = raw_onnx(tiny_repo, "text", ids)
    np.testing.assert_allclose(raw.embeddings, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.embeddings, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
    assert r.normalized and not raw.normalized
    assert (r.model, r.version) == ("tiny-clip", "1")
    assert r.embeddings.dtype == np.float32 and r.embeddings.shape == (3, 32)


def test_image_embeddings_equal_raw_onnx_runtime(tiny_server, tiny_repo) -> None:  # type: ignore[no-untyped-def]
    spec = load_bundle(tiny_repo / "tiny-clip" / "1").manifest.image
    with TandemClient(tiny_server.target) as c:
        r = c.embed_image([RED, BLUE], normalize=False)
    x = np.stack([preprocess(b, spec, 10**8) for b in (RED, BLUE)])
    np.testing.assert_allclose(r.embeddings, raw_onnx(tiny_repo, "image", x), rtol=1e-4, atol=1e-5)


def test_image_files_from_disk(tiny_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "red.png"
    path.write_bytes(RED)
    with TandemClient(tiny_server.target) as c:
        by_path, by_bytes = c.embed_image([path]).embeddings, c.embed_image([RED]).embeddings
    np.testing.assert_array_equal(by_path, by_bytes)


def test_classify_probabilities_follow_cosines(tiny_server) -> None:  # type: ignore[no-untyped-def]
    labels = ["red", "blue", "green"]
    with TandemClient(tiny_server.target) as c:
        top = c.classify([RED], labels, templates=["{}"], top_k=3)[0]
        img = c.embed_image([RED]).embeddings[0]
        lab = c.embed_text(labels).embeddings
    assert sorted(s.index for s in top) == [0, 1, 2]
    assert abs(sum(s.probability for s in top) - 1) < 1e-5
    assert [s.probability for s in top] == sorted((s.probability for s in top), reverse=True)
    for s in top:  # with the "{}" template the label embedding is the label's text embedding
        assert s.cosine == pytest.approx(float(img @ lab[s.index]), abs=1e-4)
        assert s.label == labels[s.index]


def test_top_k_defaults_to_five_and_caps_at_label_count(tiny_server) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(tiny_server.target) as c:
        assert len(c.classify([RED], ["a", "b", "c", "d", "e"], top_k=0)[0]) == 5
        assert len(c.classify([RED], ["a", "b"], top_k=10)[0]) == 2


def test_async_client(tiny_server) -> None:  # type: ignore[no-untyped-def]
    async def main() -> tuple[int, int]:
        async with AsyncTandemClient(tiny_server.target) as c:
            texts, images = await asyncio.gather(c.embed_text(["a", "b"]), c.embed_image([RED]))
            return len(texts.embeddings), len(images.embeddings)

    assert asyncio.run(main()) == (2, 1)


def test_list_and_get_models(tiny_server) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(tiny_server.target) as c:
        r = c.list_models()
    by_name = {m.model.name: m for m in r.models}
    assert set(by_name) == {"tiny-clip", "tiny-image"}
    assert r.default_model.name == "tiny-clip"
    clip = by_name["tiny-clip"]
    assert (clip.kind, clip.dim, clip.image_size, clip.context_length) == ("clip", 32, 32, 16)
    assert list(clip.towers) == ["image", "text"] and clip.parity_min_cosine >= 0.9999
    assert by_name["tiny-image"].kind == "image" and by_name["tiny-image"].context_length == 0
    stub = pb_grpc.ModelsStub(tiny_server.channel())
    assert stub.GetModel(pb.GetModelRequest(model="tiny-image")).model.name == "tiny-image"


def test_health_is_serving_once_loaded(tiny_server) -> None:  # type: ignore[no-untyped-def]
    stub = health_pb2_grpc.HealthStub(tiny_server.channel())
    for service in ("", "tandem.v1.Inference"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_health_is_not_serving_until_models_are_loaded(tiny_repo) -> None:  # type: ignore[no-untyped-def]
    from server.app import TandemServer
    from server.config import ServerConfig

    async def main() -> tuple[int, grpc.StatusCode]:
        server = TandemServer(ServerConfig(models=str(tiny_repo), port=0, metrics_port=0))
        await server._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.server.start()  # listening, models not loaded yet
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            status = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())).status
            try:
                await pb_grpc.InferenceStub(ch).EmbedText(pb.EmbedTextRequest(texts=["a"]))
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
        await server.stop(0)
        return status, code

    status, code = asyncio.run(main())
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == grpc.StatusCode.UNAVAILABLE


def test_metrics_count_requests_stages_and_batches(tiny_server) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before_ok = value("tandem_requests_total", method="EmbedImage", code="OK")
    before_bad = value("tandem_requests_total", method="EmbedImage", code="INVALID_ARGUMENT")
    before_batches = value("tandem_batch_size_count", model="tiny-clip", tower="image")
    before_stages = {s: value("tandem_stage_seconds_count", stage=s, model="tiny-clip", tower="image")
                     for s in ("decode", "preprocess", "queue", "inference")}
    before_seconds = value("tandem_request_seconds_count", method="EmbedImage")
    with TandemClient(tiny_server.target) as c:
        c.embed_image([RED])
        with pytest.raises(InvalidArgument):
            c.embed_image([b"junk"])
    assert value("tandem_requests_total", method="EmbedImage", code="OK") == before_ok + 1
    assert value("tandem_requests_total", method="EmbedImage", code="INVALID_ARGUMENT") == before_bad + 1
    assert value("tandem_batch_size_count", model="tiny-clip", tower="image") == before_batches + 1
    # One good image: one decode, one preprocess, one queue wait, one inference run.
    for stage in ("decode", "preprocess", "queue", "inference"):
        assert value("tandem_stage_seconds_count", stage=stage, model="tiny-clip", tower="image") == \
            before_stages[stage] + 1, stage
    assert value("tandem_request_seconds_count", method="EmbedImage") == before_seconds + 2


def test_embeddings_are_one_raw_little_endian_float32_matrix(tiny_server) -> None:  # type: ignore[no-untyped-def]
    stub = pb_grpc.InferenceStub(tiny_server.channel())
    r = stub.EmbedText(pb.EmbedTextRequest(texts=["a", "b", "c"]))
    m = r.embeddings
    assert (m.rows, m.dim, m.dtype) == (3, r.dim, pb.DTYPE_FLOAT32) and len(m.values) == 0
    assert len(m.data) == 3 * r.dim * 4
    as_list = stub.EmbedText(pb.EmbedTextRequest(texts=["a", "b", "c"], float_list=True)).embeddings
    assert not as_list.data and (as_list.rows, as_list.dim) == (3, r.dim)
    np.testing.assert_array_equal(np.frombuffer(m.data, "<f4"), np.asarray(as_list.values, np.float32))


def test_float16_embeddings_are_the_float32_ones_rounded(tiny_server) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(tiny_server.target) as c:
        f32 = c.embed_image([RED, BLUE]).embeddings
        f16 = c.embed_image([RED, BLUE], dtype="float16").embeddings
        t16 = c.embed_text(["a red circle"], dtype="float16").embeddings
    assert f16.dtype == np.float16 and t16.dtype == np.float16 and f16.shape == f32.shape
    np.testing.assert_array_equal(f16, f32.astype(np.float16))


def test_client_decodes_without_copying_the_response_buffer(tiny_server) -> None:  # type: ignore[no-untyped-def]
    with TandemClient(tiny_server.target) as c:
        e = c.embed_text(["a", "b"]).embeddings
    assert not e.flags.owndata and not e.flags.writeable  # a view of the bytes that came off the wire
    owner = e
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner, bytes)


def test_client_raises_one_exception_type_per_status_family(tiny_server) -> None:  # type: ignore[no-untyped-def]
    from server.client import FailedPrecondition, NotFound, TandemError, Unavailable

    with TandemClient(tiny_server.target) as c:
        with pytest.raises(NotFound) as nf:
            TandemClient(tiny_server.target, model="nope").embed_text(["a"])
        assert nf.value.code == grpc.StatusCode.NOT_FOUND and "loaded models: tiny-clip, tiny-image" in nf.value.message
        with pytest.raises(InvalidArgument, match="texts\\[1\\] is empty"):
            c.embed_text(["fine", " "])
        with pytest.raises(FailedPrecondition, match="image-only"):
            TandemClient(tiny_server.target, model="tiny-image").embed_text(["a"])
    with socket_closed_port() as port, TandemClient(f"127.0.0.1:{port}", timeout_s=5) as c:
        with pytest.raises(Unavailable) as un:
            c.list_models()
        assert un.value.retryable and isinstance(un.value, TandemError)


def test_async_client_raises_the_same_types(tiny_server) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with AsyncTandemClient(tiny_server.target) as c:
            with pytest.raises(InvalidArgument, match="images\\[0\\]"):
                await c.embed_image([b"junk"])

    asyncio.run(main())


class socket_closed_port:
    """A localhost port nobody listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        pass


def test_an_oversized_message_is_not_reported_as_a_retryable_overload(tiny_server) -> None:  # type: ignore[no-untyped-def]
    from server.client import MessageTooLarge

    with TandemClient(tiny_server.target) as c, pytest.raises(MessageTooLarge) as info:
        c.embed_image([b"\xff" * (2 << 20)])  # the tiny server takes messages up to 1 MiB
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not info.value.retryable
    assert isinstance(info.value, InvalidArgument)



def test_raw_pixels_embed_and_classify_as_the_same_image_sent_as_png(tiny_server) -> None:  # type: ignore[no-untyped-def]
    """Raw RGB skips decoding and gives what decoding a lossless file of the same pixels gives: at the model's
    size (no resizing either) and at another size (resized and cropped the same way)."""
    rng = np.random.default_rng(3)
    with TandemClient(tiny_server.target) as c:
        size = c.get_model().image_size
        for h, w in ((size, size), (37, 61)):
            rgb = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
            pngs = [png_bytes(Image.fromarray(x)) for x in rgb]
            raw, files = c.embed_image(rgb).embeddings, c.embed_image(pngs).embeddings
            np.testing.assert_array_equal(raw, files)
            labels = ["red circle", "blue square", "green cross"]
            assert c.classify(rgb, labels, top_k=3) == c.classify(pngs, labels, top_k=3)
        with pytest.raises(ValueError, match="uint8 array"):
            c.embed_image(rgb.astype(np.float32))


def test_a_model_s_own_max_batch_size_splits_its_runs() -> None:
    """[server.model."tandem-shapes"] max_batch_size = 1: three texts of one request take three runs."""
    from prometheus_client import REGISTRY

    from tests.conftest import SHIPPED_MODELS, start_server

    def runs() -> float:
        return REGISTRY.get_sample_value("tandem_batch_size_count", {"model": "tandem-shapes", "tower": "text"}) or 0.0

    server = start_server(SHIPPED_MODELS, model_settings={"tandem-shapes": {"max_batch_size": 1}})
    try:
        with TandemClient(server.target) as c:
            before = runs()
            assert c.embed_text(["a red circle", "a blue square", "a green cross"]).embeddings.shape[0] == 3
            assert runs() == before + 3
    finally:
        server.stop()
