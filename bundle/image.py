"""Image bytes -> the float32 tensor a bundle's image tower expects (Pillow + numpy, no torch).

:func:`preprocess` is the one function the server calls, the tests check,
and (through :func:`load_rgb`, its decoding half) the training data loaders
read files with, so training and serving see the same pixels.

Decoding is strict: only JPEG, PNG, WebP, GIF (first frame) and BMP are
accepted; the pixel count and the memory decoding will take (width x height x
bytes per pixel of the file's mode and of the mode it is converted to, see
:func:`decode_bytes`) are checked from the header *before* any pixels are
decoded (decompression bombs never allocate); EXIF orientation is applied.

The geometry reproduces open_clip's inference transform (torchvision's
``Resize`` and ``CenterCrop`` on PIL images, which call ``Image.resize`` with
the sizes and rounding copied here), so pixels match open_clip's
``preprocess`` for RGB, grayscale and RGBA input (tests/bundle/test_image.py).
Like open_clip, RGBA and LA images are resized with their alpha (Pillow
resamples them premultiplied) and the alpha is dropped afterwards.
Deliberate differences, where open_clip's result is an accident of PIL:
palette images without transparency are converted to RGB before resizing
(open_clip resizes the palette indices with nearest-neighbour), 16-bit and
float grayscale is rescaled to 8 bits (open_clip clips it to white), and
CMYK, YCbCr and 1-bit images become RGB before resizing.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .manifest import ImageSpec

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}
# Past this many times the output area, the shortest-side resize would build a
# huge intermediate image (a 1 x 10,000 strip becomes 224 x 2,240,000), so
# only the centre crop's source box is resized: the same filter taps, without
# the intermediate.
_BOX_RESIZE_AREA = 8
# Our own pixel limit (checked before decoding) replaces PIL's global one.
Image.MAX_IMAGE_PIXELS = None
# Bytes per pixel Pillow stores for a mode; every mode not listed takes 4 (RGB is stored as RGBX, LA as LXXA).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_GREY_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_BAND_PIXELS = 1 << 20  # high-depth grey is brought to 8 bits this many pixels at a time


class ImageInputError(ValueError):
    """The bytes are not an image we can use; the message says why."""


def decode_bytes(img: Image.Image) -> int:
    """Peak bytes :func:`decode` allocates for an opened, not yet loaded image, from its header alone.

    The decoded pixels (Pillow's storage of the file's mode), a rotated copy when
    EXIF orientation asks for one, and the image in the mode it resizes in
    (none for RGB, RGBA, L and LA: they resize as they are).
    """
    width, height = img.size
    stored = _STORED_BYTES.get(img.mode, 4)
    converted = 0 if img.mode in ("RGB", "RGBA", "L", "LA") else 1 if img.mode in (*_GREY_HIGH_DEPTH, "1") else 4
    rotated = stored if header_orientation(img) in range(2, 9) else 0
    return width * height * (stored + rotated + converted)


def header_orientation(img: Image.Image) -> int:
    """EXIF orientation from the EXIF block read with the header (getexif would decode a PNG to find one stored
    after the pixels; such a late block can rotate the image without being counted in the budget)."""
    if "exif" not in img.info:
        return 1
    exif = Image.Exif()
    try:
        exif.load(img.info["exif"])
    except Exception:  # a malformed EXIF block: decoding reports it, or ignores it as open_clip's loader does
        return 1
    orientation = exif.get(0x0112, 1)  # 0x0112: Orientation
    return orientation if isinstance(orientation, int) else 1


def decode(data: bytes, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Decode, apply EXIF orientation, and bring to a mode that resizes like open_clip:
    RGB, RGBA, L or LA. Raise ImageInputError with the reason otherwise.

    `max_bytes` bounds the memory decoding takes (:func:`decode_bytes`), checked before decoding.
    """
    if not data:
        raise ImageInputError("is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageInputError(_unsupported_reason(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # header cut short or malformed
        raise ImageInputError(f"could not be decoded ({e}); is it truncated or corrupt?") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageInputError(
            f"is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(server option max_image_pixels); downscale it before sending"
        )
    if max_bytes is not None and (need := decode_bytes(img)) > max_bytes:
        raise ImageInputError(
            f"is {width}x{height} {img.mode} and would take {_size(need)} to decode, over the limit of "
            f"{_size(max_bytes)} (server option max_image_decode_bytes); downscale it or send 8-bit colour"
        )
    try:
        img.load()  # first frame only for GIF and animated WebP
        return _resample_mode(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError) as e:
        raise ImageInputError(f"could not be decoded as {img.format} ({e}); is it truncated or corrupt?") from None
    except MemoryError:  # Pillow refuses some shapes whatever the budget, e.g. a single 16-bit row over 256 MiB
        raise ImageInputError(f"is {width}x{height} {img.mode}, a shape {img.format} cannot be decoded in memory "
                              "(a row over 256 MiB); downscale it") from None


# The first bytes of the accepted formats (WebP: RIFF, 4 bytes of size, WEBP).
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def sniff(data: bytes) -> str | None:
    """Why `data` cannot be an accepted image, from its first bytes alone, or None if it may be one: a request's
    empty or non-image items are refused before any of its images is decoded (decode says the same, later)."""
    if not data:
        return "is empty (0 bytes)"
    if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    return _unsupported_reason(data)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _unsupported_reason(data: bytes) -> str:
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:
        fmt = None
    accepted = ", ".join(FORMATS)
    if fmt:
        return f"is {fmt}, which is not accepted; send one of {accepted}"
    return f"is not a recognisable image ({len(data)} bytes, starts {data[:8]!r}); send one of {accepted}"


def _resample_mode(img: Image.Image) -> Image.Image:
    """RGB, RGBA, L and LA as they are; everything else to one of them (see the module docstring)."""
    if img.mode in ("RGB", "RGBA", "L", "LA"):
        return img
    if img.mode in _GREY_HIGH_DEPTH:
        return _grey_to_8bit(img)
    if img.mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("PA", "RGBa"):
        return img.convert("RGBA")
    if img.mode == "La":
        return img.convert("LA")
    if img.mode == "1":
        return img.convert("L")
    return img.convert("RGB")


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int) grey: round(v * 255 / 65535), clipped to 0..65535 first; float grey: scaled by its
    maximum. Band by band, in integers (float32 for float images), so that memory stays at the 8-bit result plus
    one band instead of several float64 copies of the whole image."""
    width, height = img.size
    top = None
    if img.mode == "F":
        extrema = img.getextrema()
        top = np.float32(max(float(extrema[1]), 1e-12))  # type: ignore[arg-type, index]
    out = np.empty((height, width), np.uint8)
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for y in range(0, height, rows):
        band = np.asarray(img.crop((0, y, width, min(height, y + rows))))
        if top is None:  # v * 255 / 65535 = v / 257; rounded half up in integers
            out[y : y + len(band)] = (np.clip(band, 0, 65535).astype(np.uint32) + 128) // 257
        else:
            out[y : y + len(band)] = np.clip(band / top * np.float32(255.0) + np.float32(0.5), 0, 255)
    return Image.fromarray(out, "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha dropped (not composited), grayscale replicated, as PIL's convert does."""
    img = _resample_mode(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(source: bytes | str | Path, max_pixels: int = 1 << 31) -> Image.Image:
    """An image file (path or bytes) decoded as the server decodes it (RGB, RGBA, L or LA).

    For training loaders whose transforms resize first and convert to RGB
    after, as open_clip's do: they then see what the server sees.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return decode(data, max_pixels)


def load_rgb(source: bytes | str | Path, max_pixels: int = 1 << 31) -> Image.Image:
    """:func:`load_image` as 8-bit RGB, for transforms that need RGB from the start (colour jitter).

    Transparent images lose their alpha before resizing here, after it in
    serving: the only place training and serving pixels can differ.
    """
    return to_rgb(load_image(source, max_pixels))


def geometry(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize and crop exactly as open_clip's inference transform does (torchvision on PIL)."""
    resample = _RESAMPLE[spec.interpolation]
    size, (w, h) = spec.size, img.size
    if spec.resize_mode == "squash":
        return img if (w, h) == (size, size) else img.resize((size, size), resample)
    new_w, new_h, top, left = shortest_side_plan(w, h, size)
    if new_w * new_h > _BOX_RESIZE_AREA * size * size:
        sx, sy = w / new_w, h / new_h
        return img.resize((size, size), resample, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    return img if (new_w, new_h) == (size, size) else img.crop((left, top, left + size, top + size))


def shortest_side_plan(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, top, left): torchvision's Resize(size) (the shorter side becomes `size`, the longer is
    truncated to int), then CenterCrop(size) (offsets rounded half to even, as Python's round() does)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_w, new_h, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def is_box_resize(w: int, h: int, size: int) -> bool:
    """Whether :func:`geometry` resizes only the crop's source box (a very long strip), not the whole image."""
    new_w, new_h, _, _ = shortest_side_plan(w, h, size)
    return new_w * new_h > _BOX_RESIZE_AREA * size * size


def to_tensor(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """float32 [3, size, size]: pixels / 255, then (x - mean) / std per channel (torchvision's ToTensor, Normalize)."""
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(data: bytes, spec: ImageSpec, max_pixels: int, seconds: dict[str, float] | None = None,
               max_decode_bytes: int | None = None) -> np.ndarray:
    """Encoded image -> float32 [3, size, size] ready for the image tower.

    Raises ImageInputError for bytes it cannot use. With `seconds`, records the
    time spent in "decode" (bytes -> pixels) and "preprocess" (resize, crop,
    normalise), for the server's stage metrics.
    """
    started = time.perf_counter()
    img = decode(data, max_pixels, max_decode_bytes)
    decoded = time.perf_counter()
    tensor = to_tensor(to_rgb(geometry(img, spec)), spec)
    if seconds is not None:
        seconds["decode"], seconds["preprocess"] = decoded - started, time.perf_counter() - decoded
    return tensor


def preprocess_pixels(rgb: np.ndarray, spec: ImageSpec, seconds: dict[str, float] | None = None) -> np.ndarray:
    """8-bit RGB pixels (uint8 [height, width, 3]) -> float32 [3, size, size]: what :func:`preprocess` does after
    decoding, so raw pixels and a lossless file of them give the same tensor. At the model's size, no resizing."""
    started = time.perf_counter()
    tensor = to_tensor(geometry(Image.fromarray(rgb, "RGB"), spec), spec)
    if seconds is not None:
        seconds["preprocess"] = time.perf_counter() - started
    return tensor
