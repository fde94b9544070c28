"""Real photographs (they ship in scikit-image's wheel) encoded the ways clients send them.

Each case is (name, encoded bytes). Used by the pixel-parity tests of
bundle/image.py and by the ViT-B-32 end-to-end parity test.
"""

from __future__ import annotations

import io

import numpy as np
import skimage.data
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _radial_alpha(img: Image.Image) -> Image.Image:
    """The photo with an alpha channel fading from opaque centre to transparent corners."""
    w, h = img.size
    y, x = np.mgrid[0:h, 0:w]
    r = np.hypot((x - w / 2) / (w / 2), (y - h / 2) / (h / 2))
    alpha = (np.clip(1.3 - r, 0, 1) * 255).astype(np.uint8)
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def photo_cases() -> dict[str, bytes]:
    astronaut = Image.fromarray(skimage.data.astronaut())
    chelsea = Image.fromarray(skimage.data.chelsea())
    coffee = Image.fromarray(skimage.data.coffee())
    rocket = Image.fromarray(skimage.data.rocket())
    camera = Image.fromarray(skimage.data.camera())  # 8-bit grayscale
    logo = Image.fromarray(skimage.data.logo())  # a real RGBA image
    retina = Image.fromarray(skimage.data.retina())
    return {
        "jpeg": encode(chelsea, "JPEG", quality=90),
        "jpeg-portrait": encode(rocket.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=85),
        "png": encode(astronaut, "PNG"),
        "webp-lossy": encode(coffee, "WEBP", quality=80),
        "webp-lossless": encode(rocket, "WEBP", lossless=True),
        "grayscale-png": encode(camera, "PNG"),
        "grayscale-jpeg": encode(camera, "JPEG", quality=90),
        "rgba-png": encode(logo, "PNG"),
        "rgba-faded-png": encode(_radial_alpha(astronaut), "PNG"),
        "rgba-faded-webp": encode(_radial_alpha(coffee), "WEBP", lossless=True),
        "large-jpeg": encode(retina.resize((4200, 4200), Image.Resampling.LANCZOS), "JPEG", quality=90),
        "small-png": encode(chelsea.resize((9, 6), Image.Resampling.LANCZOS), "PNG"),
        "one-pixel-png": encode(chelsea.resize((1, 1)), "PNG"),
    }
