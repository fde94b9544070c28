"""bundle.image.preprocess (the one function the server calls) reproduces open_clip's `preprocess`
pixel for pixel on real photos in every format and mode a client sends, and decodes strictly."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import skimage.data
import torch
from PIL import Image

from bundle import ImageSpec
from bundle.image import FORMATS, ImageInputError, decode, decode_bytes, load_rgb, preprocess
from tests.conftest import png_bytes
from tests.photos import photo_cases

PHOTOS = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "camera")}
MAX_PIXELS = 40_000_000


def spec_for(model: str) -> tuple[ImageSpec, object]:
    """Our ImageSpec and open_clip's own preprocess for an architecture."""
    m, _, pre = open_clip.create_model_and_transforms(model, pretrained=None)
    pp = open_clip.get_model_preprocess_cfg(m)
    spec = ImageSpec(file="", sha256="", size=pp["size"] if isinstance(pp["size"], int) else pp["size"][0],
                     mean=tuple(pp["mean"]), std=tuple(pp["std"]), resize_mode=pp["resize_mode"],
                     interpolation=pp["interpolation"])
    return spec, pre


@pytest.mark.parametrize("model", ["ViT-B-32", "RN50"])
@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_pixels_match_open_clip_preprocess(model: str, photo: str) -> None:
    # Tolerance: 1e-5 on normalised values (float32 rounding of the same PIL
    # resize; observed max abs difference is ~5e-7).
    spec, pre = spec_for(model)
    arr = PHOTOS[photo]
    img = Image.fromarray(arr)
    ours = preprocess(png_bytes(img), spec, MAX_PIXELS)
    theirs = pre(img).numpy()
    assert ours.shape == theirs.shape == (3, spec.size, spec.size)
    assert np.abs(ours - theirs).max() < 1e-5


CASES = photo_cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_kind_of_photo_matches_open_clip_preprocess(case: str) -> None:
    """Encoded bytes through our preprocess vs the decoded PIL image through open_clip's (ViT-B-32's).

    Covers JPEG, PNG, WebP (lossy, lossless), 8-bit grayscale, RGBA (a real
    transparent logo and photos with faded alpha: resized premultiplied, as
    open_clip does), a 17.6-megapixel photo and 9x6 and 1x1 pixel images.
    """
    spec, pre = spec_for("ViT-B-32")
    data = CASES[case]
    ours = preprocess(data, spec, MAX_PIXELS)
    theirs = pre(Image.open(io.BytesIO(data))).numpy()
    assert np.abs(ours - theirs).max() < 1e-5


def test_extreme_aspect_ratio_is_resized_without_the_huge_intermediate() -> None:
    """A 20x3000 strip: open_clip builds a 224x33,600 image first; we resize only the crop's source box."""
    spec, pre = spec_for("ViT-B-32")
    strip = Image.fromarray(PHOTOS["coffee"]).resize((20, 3000), Image.Resampling.BICUBIC)
    ours = preprocess(png_bytes(strip), spec, MAX_PIXELS)
    np.testing.assert_allclose(ours, pre(strip).numpy(), atol=2e-2)  # same taps, float rounding of the box
    cos = float((ours.ravel() @ pre(strip).numpy().ravel()) / np.linalg.norm(ours) / np.linalg.norm(pre(strip).numpy()))
    assert cos > 0.99999


def test_squash_resize_matches_open_clip() -> None:
    spec, _ = spec_for("ViT-B-32")
    spec = ImageSpec(**{**spec.__dict__, "resize_mode": "squash"})
    pre = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std, resize_mode="squash")
    img = Image.fromarray(PHOTOS["astronaut"][:, :400])
    assert np.abs(preprocess(png_bytes(img), spec, MAX_PIXELS) - pre(img).numpy()).max() < 1e-5


@pytest.mark.parametrize("photo", ["coffee", "camera"])
def test_embeddings_match_open_clip_end_to_end(tiny_repo, tiny_checkpoint, photo: str) -> None:  # type: ignore[no-untyped-def]
    """JPEG bytes -> our preprocessing -> ONNX Runtime  vs  PIL -> open_clip preprocess -> PyTorch.

    Same weights (the bundle was exported from tiny_checkpoint). Tolerance:
    cosine >= 0.9999, the export parity gate.
    """
    from bundle import load_bundle
    from server.runtime import Tower
    from training.models import build_model

    bundle = load_bundle(tiny_repo / "tiny-clip" / "1")
    data = png_bytes(Image.fromarray(PHOTOS[photo]), "JPEG", quality=90)
    ours = Tower(bundle.image_path, ["CPUExecutionProvider"])(preprocess(data, bundle.manifest.image, MAX_PIXELS)[None])
    model, _, _ = build_model(None, tiny_checkpoint)
    pre = open_clip.image_transform(bundle.manifest.image.size, is_train=False, mean=bundle.manifest.image.mean,
                                    std=bundle.manifest.image.std)
    with torch.no_grad():
        theirs = model.encode_image(pre(Image.open(io.BytesIO(data)))[None]).numpy()
    cos = float((ours * theirs).sum() / np.linalg.norm(ours) / np.linalg.norm(theirs))
    assert cos >= 0.9999


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_accepted_format_decodes(fmt: str) -> None:
    img = Image.fromarray(PHOTOS["chelsea"]).resize((64, 48))
    out = decode(png_bytes(img, fmt), MAX_PIXELS)
    assert out.mode in ("RGB", "RGBA") and out.size == (64, 48)
    assert load_rgb(png_bytes(img, fmt)).mode == "RGB"


def test_gif_uses_first_frame() -> None:
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    buf = io.BytesIO()
    red.save(buf, "GIF", save_all=True, append_images=[blue])
    assert load_rgb(buf.getvalue()).getpixel((4, 4))[0] > 200


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_rgb(png_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)  # portrait after rotation
    assert out.getpixel((10, 5))[0] > 200 and out.getpixel((10, 35))[0] < 50  # white half now on top


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_modes_become_8bit_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    if mode == "I;16":
        img = Image.fromarray(np.full((10, 10), 65535 // 2, dtype=np.uint16))
        assert img.mode == "I;16"
    else:
        img = Image.fromarray(PHOTOS["astronaut"][:32, :32]).convert(mode)
    out = load_rgb(png_bytes(img, fmt))
    assert out.mode == "RGB"
    assert preprocess(png_bytes(img, fmt), spec_for("RN50")[0], MAX_PIXELS).shape == (3, 224, 224)
    if mode == "I;16":  # mid-grey stays mid-grey instead of clipping to white
        assert 120 <= out.getpixel((5, 5))[0] <= 135


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a recognisable image"),
        (png_bytes(Image.new("RGB", (64, 64)), "JPEG")[:200], "truncated or corrupt"),
        (png_bytes(Image.new("RGB", (8, 8)), "TIFF"), "TIFF, which is not accepted"),
    ],
)
def test_bad_bytes_are_refused_with_reason(data: bytes, message: str) -> None:
    with pytest.raises(ImageInputError, match=message):
        decode(data, MAX_PIXELS)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # A 20000x20000 PNG compresses to a few hundred KB but would need 1.2 GB to decode.
    data = png_bytes(Image.new("L", (20000, 20000)))
    with pytest.raises(ImageInputError, match="400,000,000 pixels, over the limit"):
        decode(data, MAX_PIXELS)


def test_16_bit_grey_is_rounded_to_8_bits_exactly_and_band_by_band() -> None:
    # Every 16-bit value, 300 pixels a row so that the bands (1 Mi pixels each) end mid-image on a larger copy.
    values = np.arange(65536, dtype=np.uint16)
    img = Image.fromarray(np.tile(values, 64).reshape(-1, 2048))  # 2048 x 2048: 4 Mi pixels, 4 bands
    want = np.clip(np.tile(values, 64).astype(np.float64) / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
    out = decode(png_bytes(img), MAX_PIXELS)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out).reshape(-1), want)


@pytest.mark.parametrize("mode, bytes_per_pixel", [("L", 1), ("RGB", 4), ("RGBA", 4), ("LA", 4), ("P", 1 + 4),
                                                   ("I;16", 2 + 1), ("1", 1 + 1)])
def test_decode_memory_is_estimated_from_the_mode(mode: str, bytes_per_pixel: int) -> None:
    img = Image.new("L", (30, 20)).convert(mode) if mode != "I;16" else Image.fromarray(np.zeros((20, 30), np.uint16))
    with Image.open(io.BytesIO(png_bytes(img))) as opened:
        assert opened.mode == mode
        assert decode_bytes(opened) == 30 * 20 * bytes_per_pixel


def test_a_rotated_jpeg_counts_its_rotated_copy() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(io.BytesIO(png_bytes(Image.new("RGB", (30, 20)), "JPEG", exif=exif.tobytes()))) as opened:
        assert decode_bytes(opened) == 30 * 20 * (4 + 4)


def test_decode_memory_is_checked_before_decoding() -> None:
    # 6300 x 6300 16-bit grey: 78 KB of PNG under the pixel limit, 119 MB to decode. Only its header is sent
    # here, so any attempt to decode would fail as truncated instead.
    header = png_bytes(Image.fromarray(np.zeros((6300, 6300), np.uint16)))[:200]
    with pytest.raises(ImageInputError, match=r"is 6300x6300 I;16 and would take 113\.6 MiB to decode, over the "
                                              r"limit of 64\.0 MiB \(server option max_image_decode_bytes\)"):
        decode(header, MAX_PIXELS, max_bytes=64 << 20)
    with pytest.raises(ImageInputError, match="truncated"):
        decode(header, MAX_PIXELS, max_bytes=128 << 20)
