"""Image bytes -> the float32 tensor a bundle's image tower expects.

Decoding is strict: only JPEG, PNG, WebP, GIF (first frame) and BMP are
accepted; the pixel count is checked from the header *before* any pixels are
decoded (decompression bombs never allocate); EXIF orientation is applied.
The geometry then reproduces open_clip's inference transform with
torchvision's own resize and centre-crop on PIL images, so pixels match
``open_clip``'s ``preprocess`` exactly for RGB and grayscale input (see
tests/server/test_preprocess.py). Deliberate difference: palette, RGBA and
16-bit images are converted to 8-bit RGB *before* resizing (open_clip resizes
first, which samples palette images with nearest-neighbour).
"""

from __future__ import annotations

import io

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from .bundle import ImageSpec

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}
# Our own pixel limit (checked before decoding) replaces PIL's global one.
Image.MAX_IMAGE_PIXELS = None


class ImageInputError(ValueError):
    """The bytes are not an image we can use; the message says why."""


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Decode to an 8-bit RGB PIL image, or raise ImageInputError."""
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
    try:
        img.load()  # first frame only for GIF and animated WebP
        return to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError) as e:
        raise ImageInputError(f"could not be decoded as {img.format} ({e}); is it truncated or corrupt?") from None


def _unsupported_reason(data: bytes) -> str:
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:
        fmt = None
    accepted = ", ".join(FORMATS)
    if fmt:
        return f"is {fmt}, which is not accepted; send one of {accepted}"
    return f"is not a recognisable image ({len(data)} bytes, starts {data[:8]!r}); send one of {accepted}"


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16/32-bit grayscale is rescaled, alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode != "F" else max(float(arr.max()), 1e-12)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def geometry(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize and crop exactly as open_clip's inference transform does."""
    interpolation = _INTERPOLATION[spec.interpolation]
    if spec.resize_mode == "squash":
        return TF.resize(img, [spec.size, spec.size], interpolation=interpolation)
    img = TF.resize(img, spec.size, interpolation=interpolation)  # shortest side -> size
    return TF.center_crop(img, [spec.size, spec.size])


def to_tensor(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """float32 [3, size, size]: pixels / 255, then (x - mean) / std per channel."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(data: bytes, spec: ImageSpec, max_pixels: int) -> np.ndarray:
    """Bytes -> float32 [3, size, size] ready for the image tower."""
    return to_tensor(geometry(decode(data, max_pixels), spec), spec)
