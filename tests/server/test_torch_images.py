"""Image decoding with torchvision (server/torch_images.py, setting image_decoder) on its CPU path: on a GPU server
the same code runs nvJPEG and CUDA kernels. It must give Pillow's pixels, within one 8-bit level."""

from __future__ import annotations

import grpc
import numpy as np
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from bundle import load_bundle
from bundle.image import preprocess
from bundle.parity import min_cosine
from server.client import TandemClient
from server.torch_images import TorchImages
from tests.conftest import SHIPPED_MODELS, start_server
from tests.photos import photo_cases
from tests.server.test_bad_input import expect

SPEC = load_bundle(SHIPPED_MODELS / "tandem-shapes" / "1").manifest.image
PHOTOS = photo_cases()
LIMIT = 1 << 26
ONE_LEVEL = 1 / 255 / min(SPEC.std) + 1e-6  # one 8-bit step, normalised


def test_it_takes_plain_rgb_jpegs_and_gives_pillows_pixels() -> None:
    names = list(PHOTOS)
    out, seconds = TorchImages(SPEC, "cpu").batch([PHOTOS[n] for n in names], LIMIT, None)
    taken = {n for n, x in zip(names, out) if x is not None}
    # RGB JPEGs and PNGs; grayscale, RGBA, WebP: Pillow's
    assert taken == {"jpeg", "jpeg-portrait", "large-jpeg", "png", "small-png", "one-pixel-png"} and seconds > 0
    for name, x in zip(names, out):
        if x is not None:
            ref = preprocess(PHOTOS[name], SPEC, LIMIT)
            assert x.shape == ref.shape and x.dtype == np.float32
            assert np.abs(x - ref).max() <= ONE_LEVEL, name


def test_it_leaves_to_pillow_what_it_would_not_reproduce_or_may_not_decode() -> None:
    from PIL import Image

    from tests.photos import encode

    images = TorchImages(SPEC, "cpu")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    rotated = encode(Image.new("RGB", (40, 30), (200, 30, 30)), "JPEG", exif=exif)
    cmyk = encode(Image.new("CMYK", (40, 30), (0, 200, 200, 0)), "JPEG")
    strip = encode(Image.new("RGB", (4000, 10), (0, 0, 200)), "JPEG")  # bundle/image.py resizes a box of it
    rgb16 = _png_rgb16(40, 30)  # Pillow says RGB; torchvision would read 16-bit values
    for data in (rotated, cmyk, strip, rgb16):
        assert not images.takes(data, LIMIT, None)
    assert not images.takes(PHOTOS["large-jpeg"], 4000 * 4000, None)  # over max_image_pixels: Pillow refuses it
    assert not images.takes(PHOTOS["large-jpeg"], LIMIT, 1 << 20)  # over max_image_decode_bytes likewise
    broken = PHOTOS["jpeg"][:400] + b"\x00" * 400  # a JPEG header, then garbage
    out, _ = images.batch([PHOTOS["jpeg"], broken], LIMIT, None)
    assert out == [None, None]  # a batch that fails to decode goes to Pillow whole, which names the bad one


def _png_rgb16(w: int, h: int) -> bytes:
    """A 16-bit RGB PNG (Pillow writes none; Pillow reads it as 8-bit RGB), built chunk by chunk."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + np.full((w, 3), 40000, ">u2").tobytes() for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_server_decoding_jpegs_with_torchvision_answers_as_pillow_does() -> None:
    mixed = [PHOTOS[n] for n in ("jpeg", "png", "large-jpeg", "grayscale-jpeg", "jpeg-portrait")]
    torch_server, pil_server = start_server(SHIPPED_MODELS, image_decoder="torch"), start_server(SHIPPED_MODELS)
    try:
        decoder = torch_server.server.registry.models["tandem-shapes"]["1"].torch_images
        assert pil_server.server.registry.models["tandem-shapes"]["1"].torch_images is None  # auto on the CPU
        with TandemClient(torch_server.target) as a, TandemClient(pil_server.target) as b:
            before = decoder.decoded
            got, want = a.embed_image(mixed).embeddings, b.embed_image(mixed).embeddings
            assert decoder.decoded - before == 4  # the RGB JPEGs and PNG; the grey JPEG went to Pillow
            assert min_cosine(got, want) >= 0.9999  # each image in its place, Pillow's or torchvision's
            labels = a.classify(mixed[:2], ["cat", "astronaut"], top_k=1)
            assert [r[0].label for r in labels] == [r[0].label for r in b.classify(mixed[:2], ["cat", "astronaut"],
                                                                                     top_k=1)]
        stub = pb_grpc.InferenceStub(torch_server.channel())
        broken = PHOTOS["jpeg"][:400] + b"\x00" * 400
        expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[PHOTOS["jpeg"], broken]), timeout=30),
               grpc.StatusCode.INVALID_ARGUMENT, "images[1]")
    finally:
        torch_server.stop()
        pil_server.stop()
