"""What "the same model" means between two runs of a tower: the probe inputs and the cosine they must keep.

`tandem export` compares ONNX Runtime with PyTorch on a probe batch before it
writes a bundle (training/export.py); the server compares an fp16 conversion
with the fp32 tower it came from before it serves it (server/runtime.py). Both
hold the result to the threshold of its precision.
"""

from __future__ import annotations

import numpy as np

# Minimum row-by-row cosine against fp32 per precision.
PARITY_THRESHOLD = {"fp32": 0.9999, "fp16": 0.999}
PROBE_TEXTS = [
    "a photo of a dog.",
    "a small red circle on a white background.",
    "",
    "an extremely long caption " + "that keeps going " * 30,
    "Ünïcödé, emoji 🙂 and punctuation!?",
    "a diagram",
    "two cats on a sofa",
    "x",
]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest row-by-row cosine of two [n, dim] arrays (nan if either has a non-finite value)."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def probe_pixels(size: int, n: int = 8) -> np.ndarray:
    """A fixed [n, 3, size, size] float32 batch in the normalised range: noise and smooth gradients, seed 0
    (numpy's counterpart of the export's torch probe, for processes without torch)."""
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((n // 2, 3, size, size), dtype=np.float32)
    ramp = np.linspace(-2, 2, size, dtype=np.float32)
    smooth = np.broadcast_to(ramp[None, None, :, None] * ramp[None, None, None, :], (n - n // 2, 3, size, size))
    smooth = smooth * (rng.random((n - n // 2, 3, 1, 1), dtype=np.float32) * 2 - 1)
    return np.concatenate([noise, smooth]).astype(np.float32)
