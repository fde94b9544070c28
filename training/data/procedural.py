"""Procedural image–caption data: coloured shapes on plain or noisy backgrounds.

Every image is drawn from its own seed, so a split is a pure function of
(seed, split, index): no files, no download, the same pixels on every machine.

A *class* is (size, colour, shape), e.g. "small red circle": 2 x 7 x 4 = 56
classes. Position and background vary freely and are mentioned in some
captions only. Some (colour, shape) pairs are held out of the training split
entirely (both sizes) so that zero-shot accuracy on them measures
compositional generalisation: the model saw "red" and "triangle", never a red
triangle.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 200, 220),
    "blue": (30, 60, 230),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
BACKGROUNDS = ("black", "white", "gray", "noisy")
# (colour, shape) pairs never shown in training, at either size.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "cross"),
    ("blue", "circle"),
    ("yellow", "square"),
)
SPLITS = ("train", "val", "test")

# Caption templates. The first four have the default zero-shot ensemble's
# shape ("a photo of a {}."), so short label prompts are in-distribution.
# Templates that mention position or background are drawn less often: when
# most captions name them, the cheapest way to tell pairs apart is position
# and background, and the slower-to-learn shape gets little gradient.
CAPTION_TEMPLATES = (
    "a photo of a {size} {colour} {shape}.",
    "a picture of a {size} {colour} {shape}.",
    "an image of a {size} {colour} {shape}.",
    "a {size} {colour} {shape}.",
    "a {size} {colour} {shape} on a {background} background.",
    "a {size} {colour} {shape} {position}.",
    "a {colour} {shape}, {size}, {position} on {background}.",
    "there is a {size} {colour} {shape} {position} of the picture.",
    "{background} background with a {size} {shape} coloured {colour}.",
    "a {shape} that is {colour} and {size}.",
)
CAPTION_WEIGHTS = (4, 4, 4, 4, 1, 1, 1, 1, 1, 3)

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")


@dataclass(frozen=True)
class Sample:
    """What one image shows; enough to redraw it and to caption it."""

    size: str
    colour: str
    shape: str
    background: str
    cx: float  # centre, as a fraction of the canvas side
    cy: float
    radius: float  # half the shape's extent, as a fraction of the side
    angle: float  # rotation in degrees (triangles and crosses)
    seed: int

    @property
    def label(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def position(self) -> str:
        row = _ROWS[min(int(self.cy * 3), 2)]
        col = _COLS[min(int(self.cx * 3), 2)]
        if row == "middle" and col == "centre":
            return "in the centre"
        if row == "middle":
            return f"on the {col}"
        if col == "centre":
            return f"at the {row}"
        return f"in the {row} {col}"

    def random_caption(self, rng: random.Random) -> str:
        return self.caption(rng.choices(CAPTION_TEMPLATES, CAPTION_WEIGHTS)[0])

    def caption(self, template: str) -> str:
        return template.format(
            size=self.size,
            colour=self.colour,
            shape=self.shape,
            background=self.background,
            position=self.position,
        )


def class_labels() -> list[str]:
    """All 56 class names, "small red circle" style, in a fixed order."""
    return [f"{s} {c} {h}" for s in SIZES for c in COLOURS for h in SHAPES]


def is_held_out(label: str) -> bool:
    _, colour, shape = label.split(" ")
    return (colour, shape) in HELD_OUT


def _seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample(seed: int, split: str, index: int) -> Sample:
    """The deterministic description of image `index` of `split`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(_seed(seed, split, index))
    while True:
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        if split != "train" or (colour, shape) not in HELD_OUT:
            break
    size = rng.choice(SIZES)
    radius = rng.uniform(0.12, 0.17) if size == "small" else rng.uniform(0.27, 0.36)
    margin = radius + 0.02
    return Sample(
        size=size,
        colour=colour,
        shape=shape,
        background=rng.choice(BACKGROUNDS),
        cx=rng.uniform(margin, 1 - margin),
        cy=rng.uniform(margin, 1 - margin),
        radius=radius,
        angle=rng.uniform(-12, 12),
        seed=rng.getrandbits(32),
    )


def _polygon(cx: float, cy: float, points: Sequence[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    a = np.deg2rad(angle)
    c, s = np.cos(a), np.sin(a)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def render(spec: Sample, canvas: int = 64) -> Image.Image:
    """Draw `spec` as an RGB image of canvas x canvas pixels."""
    rng = np.random.default_rng(spec.seed)
    if spec.background == "noisy":
        pixels = rng.integers(60, 196, size=(canvas, canvas, 1), dtype=np.uint8).repeat(3, axis=2)
        img = Image.fromarray(pixels, "RGB")
    else:
        grey = {"black": 0, "white": 255, "gray": 128}[spec.background]
        img = Image.new("RGB", (canvas, canvas), (grey, grey, grey))
    # Small per-image jitter of the hue keeps colours from being one exact RGB.
    jitter = rng.integers(-15, 16, size=3)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[spec.colour]) + jitter, 0, 255))
    draw = ImageDraw.Draw(img)
    cx, cy, r = spec.cx * canvas, spec.cy * canvas, spec.radius * canvas
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif spec.shape == "square":
        side = r * 0.9
        pts = [(-side, -side), (side, -side), (side, side), (-side, side)]
        draw.polygon(_polygon(cx, cy, pts, spec.angle), fill=fill)
    elif spec.shape == "triangle":
        pts = [(0.0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)]
        draw.polygon(_polygon(cx, cy, pts, spec.angle), fill=fill)
    elif spec.shape == "cross":
        w = r * 0.36
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        draw.polygon(_polygon(cx, cy, pts, spec.angle), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(spec.shape)
    return img


class ShapesDataset:
    """`length` images of one split; item i is (PIL image, Sample)."""

    def __init__(self, split: str = "train", length: int = 10_000, seed: int = 0, canvas: int = 64):
        self.split, self.length, self.seed, self.canvas = split, length, seed, canvas

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, Sample]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        spec = sample(self.seed, self.split, index)
        return render(spec, self.canvas), spec

    def __iter__(self) -> Iterator[tuple[Image.Image, Sample]]:
        return (self[i] for i in range(self.length))
