"""Image decoding and resizing with torchvision: nvJPEG and CUDA kernels on a GPU server (setting image_decoder).

Pillow decodes a 500 x 375 JPEG and resizes it at about 250 images/s a core; nvJPEG on a GPU did 11,000 a
second (../shared/DEVICE.md). This module is the server's only use of torch, imported only when the setting
asks for it (`image_decoder` torch, or auto on CUDA with torchvision installed): the serving install stays
torch-free.

It takes only the images whose pixels it reproduces: RGB JPEGs (not grayscale or CMYK) and, on the CPU, 8-bit
RGB PNGs, without an EXIF rotation, within the server's pixel and decode-memory limits, resized by the shorter
side or squashed as the bundle says (not a very long strip, which bundle/image.py resizes through a box).
libjpeg-turbo and libpng (torchvision on the CPU) decode the same pixels as Pillow; the resize differs from
Pillow's by at most one 8-bit level on a few pixels (tests/server/test_torch_images.py). Everything else, and a
batch that fails to decode, is left to Pillow, which also words the errors. On the CPU it decodes and resizes
1.6-2.2 times as many images a thread as Pillow (docs/benchmarks.md).
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from bundle.image import decode_bytes, header_orientation, is_box_resize, shortest_side_plan
from bundle.manifest import ImageSpec


class TorchImages:
    """One model's image preprocessing on `device` ("cuda" or "cpu") with torchvision."""

    def __init__(self, spec: ImageSpec, device: str):
        import torch
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg
        from torchvision.transforms.v2 import functional as F

        self.torch, self.decode_jpeg, self.decode_image, self.F = torch, decode_jpeg, decode_image, F
        self.rgb = ImageReadMode.RGB
        if device == "cpu":
            # Parallel across requests in the preprocessing threads, not inside one image: torch's own thread
            # pool would compete with them and with ONNX Runtime for the same cores.
            torch.set_num_threads(1)
        # On CUDA, nvJPEG decodes JPEGs in one batch; on the CPU libjpeg-turbo and libpng decode JPEGs and PNGs.
        self.formats = ("JPEG",) if device != "cpu" else ("JPEG", "PNG")
        self.spec, self.device = spec, device
        self.mode = {"bicubic": F.InterpolationMode.BICUBIC, "bilinear": F.InterpolationMode.BILINEAR,
                     "nearest": F.InterpolationMode.NEAREST}[spec.interpolation]
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(3, 1, 1)
        self.decoded = 0  # images this has decoded (the tests read it)

    def takes(self, data: bytes, max_pixels: int, max_bytes: int | None) -> bool:
        """Whether this image is one whose pixels torchvision reproduces (the module's docstring); from its header."""
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            if data[24:26] != b"\x08\x02":  # IHDR bit depth 8, colour type 2 (RGB): torchvision reads 16-bit as is
                return False
        elif not data.startswith(b"\xff\xd8\xff"):
            return False
        try:
            img = Image.open(io.BytesIO(data), formats=self.formats)
        except Exception:  # not a format taken here, or a header Pillow's path words the error for
            return False
        w, h = img.size
        if img.mode != "RGB" or w * h > max_pixels or (max_bytes is not None and decode_bytes(img) > max_bytes):
            return False
        return header_orientation(img) == 1 and not (
            self.spec.resize_mode == "shortest" and is_box_resize(w, h, self.spec.size))

    def batch(self, images: Sequence[bytes], max_pixels: int, max_bytes: int | None
              ) -> tuple[list[np.ndarray | None], float]:
        """The model's input, float32 [3, size, size], for each image this module takes (None for the others),
        decoded together (one nvJPEG batch on CUDA); and the seconds it took."""
        started = time.perf_counter()
        out: list[np.ndarray | None] = [None] * len(images)
        picked = [i for i, data in enumerate(images) if self.takes(data, max_pixels, max_bytes)]
        if not picked:
            return out, 0.0
        torch = self.torch
        data = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in picked]
        try:
            if self.device == "cpu":
                decoded = [self.decode_image(d, mode=self.rgb) for d in data]
            else:
                decoded = self.decode_jpeg(data, mode=self.rgb, device=self.device)
            x = torch.stack([self._geometry(t) for t in decoded]).float().div_(255).sub_(self.mean).div_(self.std)
            rows = x.cpu().numpy()
        except RuntimeError:  # a corrupt image, GPU memory ...: Pillow takes them all (and names a bad one)
            return out, 0.0
        for row, i in zip(rows, picked):
            out[i] = row
        self.decoded += len(picked)
        return out, time.perf_counter() - started

    def _geometry(self, t):  # type: ignore[no-untyped-def]
        """bundle/image.py's geometry on a uint8 [3, h, w] tensor: resize (antialiased, as Pillow), centre crop."""
        size, (h, w) = self.spec.size, t.shape[1:]
        antialias = self.mode != self.F.InterpolationMode.NEAREST
        if self.spec.resize_mode == "squash":
            return t if (w, h) == (size, size) else self.F.resize(t, [size, size], self.mode, antialias=antialias)
        new_w, new_h, top, left = shortest_side_plan(w, h, size)
        if (new_w, new_h) != (w, h):
            t = self.F.resize(t, [new_h, new_w], self.mode, antialias=antialias)
        return t[:, top : top + size, left : left + size]


def available() -> bool:
    """Whether torchvision can be imported (the GPU extra, or a training install)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True
