"""The GPU path's two pieces on their CPU path: IO binding with a preallocated output buffer, and fp16 towers
converted when loaded (server/runtime.py). On CUDA both are the default; here they are asked for."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bundle import load_bundle
from bundle.image import preprocess
from bundle.parity import PROBE_TEXTS, min_cosine, probe_pixels
from bundle.tokenizer import ClipTokenizer
from server.client import TandemClient
from server.runtime import Tower, fp16_tower
from tests.conftest import SHIPPED_MODELS, start_server
from tests.photos import photo_cases

CPU = ["CPUExecutionProvider"]
PHOTOS = [photo_cases()[k] for k in ("jpeg", "png", "webp-lossy", "grayscale-png")]
BUNDLE = load_bundle(SHIPPED_MODELS / "tandem-shapes" / "1")


def text_ids(n: int) -> np.ndarray:
    tok = ClipTokenizer(BUNDLE.tokenizer_path, BUNDLE.manifest.text.context_length)  # type: ignore[union-attr]
    return tok.encode_batch([f"a {c} circle number {i}" for i, c in zip(range(n), ["red", "blue", "green"] * n)])[0]


@pytest.mark.parametrize("tower", ["image", "text"])
def test_io_binding_gives_what_a_plain_run_gives(tower: str) -> None:
    path = BUNDLE.image_path if tower == "image" else BUNDLE.text_path
    plain, bound = Tower(path, CPU), Tower(path, CPU, io_binding=True, max_batch=8)
    assert bound.io_binding and not Tower(path, CPU).io_binding  # on the CPU only when asked for
    x = probe_pixels(BUNDLE.manifest.image.size, 12) if tower == "image" else text_ids(12)
    first = bound(x[:3])
    kept = first.copy()
    for rows in (x[3:8], x[:1], x[:8], x):  # under, at and over the buffer's 8 rows (over: a plain run)
        np.testing.assert_array_equal(bound(rows), plain(rows))
    np.testing.assert_array_equal(first, kept)  # a result handed out is not overwritten by later runs


def test_io_binding_runners_in_parallel_keep_their_own_buffers() -> None:
    plain, bound = Tower(BUNDLE.text_path, CPU), Tower(BUNDLE.text_path, CPU, io_binding=True, max_batch=4)
    x = text_ids(64)
    batches = [x[i : i + 1 + i % 4] for i in range(0, 60, 4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(bound, batches * 8))
    for batch, out in zip(batches * 8, got):
        np.testing.assert_array_equal(out, plain(batch))


def test_an_fp16_conversion_is_kept_only_when_it_keeps_parity() -> None:
    path = BUNDLE.image_path
    fp32 = Tower(path, CPU)
    make = lambda model: Tower(model, CPU, "fp16")  # noqa: E731
    probe = probe_pixels(BUNDLE.manifest.image.size)
    fp16, why = fp16_tower(path, fp32, probe, make)
    assert fp16 is not None and fp16.precision == "fp16", why
    assert "runs in fp16" in why
    # Real photographs, not the probe: close to fp32, and not the same numbers (it really runs in half precision)
    x = np.stack([preprocess(p, BUNDLE.manifest.image, 1 << 26) for p in PHOTOS])
    a, b = fp32(x), fp16(x)
    assert min_cosine(a, b) >= 0.999 and not np.array_equal(a, b)

    refused, why = fp16_tower(path, fp32, probe, make, threshold=1.5)  # unreachable: a cosine is at most 1
    assert refused is None and "only to cosine" in why and "needs 1.5" in why
    broken, why = fp16_tower(BUNDLE.tokenizer_path, fp32, probe, make)  # not an ONNX file
    assert broken is None and why.startswith("could not be converted to fp16")


def test_a_server_asked_for_fp16_serves_the_converted_towers_and_says_so() -> None:
    server = start_server(SHIPPED_MODELS, precision="fp16")
    try:
        with TandemClient(server.target) as c:
            info = c.get_model()
            assert info.precision == "fp16"
            texts = [t for t in PROBE_TEXTS if t]
            half = c.embed_text(texts).embeddings
            images = c.embed_image(PHOTOS[:2]).embeddings
    finally:
        server.stop()
    full = start_server(SHIPPED_MODELS)  # precision auto: fp32 on the CPU
    try:
        with TandemClient(full.target) as c:
            assert c.get_model().precision == "fp32"
            assert min_cosine(half, c.embed_text(texts).embeddings) >= 0.999
            assert min_cosine(images, c.embed_image(PHOTOS[:2]).embeddings) >= 0.999
            assert not np.array_equal(half, c.embed_text(texts).embeddings)
    finally:
        full.stop()
