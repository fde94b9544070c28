"""Images without captions, for the self-supervised methods.

    shapes        the procedural set (training/data/procedural.py); labels kept for evaluation only
    FOLDER        an ImageFolder (one sub-folder per class: labels used for evaluation only)
                  or a flat folder of images (no labels, no evaluation)
    SHARDS        webdataset tar shards (training/data/shards.py)

Every dataset yields (transform(image), label) with label -1 when unknown; a folder image that does not
decode yields None (logged), which the trainer skips and counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from bundle.image import ImageInputError, load_rgb

from . import procedural

log = logging.getLogger("tandem.data")

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


class ShapesImages(Dataset):
    """`length` procedural images of a split, drawn once into memory.

    label: "class" = index of the 56 size-colour-shape classes; "shape" = index
    of the 4 shapes (the label that survives colour and crop augmentations).
    """

    def __init__(self, split: str, length: int, transform: Callable[[Image.Image], Any], seed: int = 0,
                 progress: bool = False, canvas: int = 64, label: str = "class"):
        self.transform = transform
        self.pixels = np.empty((length, canvas, canvas, 3), np.uint8)
        labels = procedural.class_labels()
        self.labels = torch.empty(length, dtype=torch.long)
        self.shapes = torch.empty(length, dtype=torch.long)  # shape index, whatever `label` is
        for i in tqdm(range(length), desc=f"drawing {split} shapes", disable=not progress, leave=False):
            spec = procedural.sample(seed, split, i)
            self.pixels[i] = np.asarray(procedural.render(spec, canvas))
            self.shapes[i] = procedural.SHAPES.index(spec.shape)
            self.labels[i] = labels.index(spec.label) if label == "class" else self.shapes[i]

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.pixels[i])), int(self.labels[i])


def folder_classes(folder: Path) -> list[str]:
    """The class sub-folders of an ImageFolder, sorted (empty for a flat folder)."""
    return sorted(d.name for d in Path(folder).iterdir() if d.is_dir())


class FolderImages(Dataset):
    """Images under a folder: class sub-folders give labels, a flat folder gives -1."""

    def __init__(self, folder: Path, transform: Callable[[Image.Image], Any]):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        self.transform = transform
        classes = folder_classes(folder)
        if classes:
            self.files = [(f, c) for c, name in enumerate(classes) for f in sorted((folder / name).rglob("*"))
                          if f.suffix.lower() in EXTENSIONS]
        else:
            self.files = [(f, -1) for f in sorted(folder.iterdir()) if f.suffix.lower() in EXTENSIONS]
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {folder}")
        self.classes = classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        path, label = self.files[i]
        try:
            image = load_rgb(path)
        except ImageInputError as e:
            log.warning("skipping %s: %s", path, e)
            return None
        return self.transform(image), label


def stack(dataset: Dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (tensor, label) items of a dataset whose transform gives one tensor, as two stacked tensors."""
    n = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    items = [item for item in (dataset[i] for i in range(n)) if item is not None]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
