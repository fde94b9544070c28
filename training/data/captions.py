"""Image–caption pairs for CLIP training: the procedural set or your own folder.

Your own data is a folder of images plus one index file in it:

    captions.csv     a header row with `image,caption` (more columns are ignored)
    captions.jsonl   one {"image": "cats/1.jpg", "caption": "a cat on a sofa"} per line

Image paths are relative to the folder. An image may appear on several rows
(several captions); each row is one training pair. An image that does not
decode yields None (logged), which the trainer skips and counts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from bundle.captions import read_caption_rows
from bundle.image import ImageInputError, load_image

from . import procedural

log = logging.getLogger("tandem.data")

Transform = Callable[[Image.Image], torch.Tensor]


def read_index(folder: Path) -> list[tuple[Path, str]]:
    """(image path, caption) rows from captions.csv or captions.jsonl in `folder`."""
    folder = Path(folder)
    csv_path, jsonl_path = folder / "captions.csv", folder / "captions.jsonl"
    if csv_path.is_file():
        rows = read_caption_rows(csv_path)
    elif jsonl_path.is_file():
        rows = read_caption_rows(jsonl_path)
    else:
        raise FileNotFoundError(f"{folder} has neither captions.csv nor captions.jsonl")
    if not rows:
        raise ValueError(f"{folder}: the caption index is empty")
    missing = [img for img, _ in rows if not (folder / img).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} images named in the index are missing, e.g. {missing[:3]}")
    return [(folder / img, caption) for img, caption in rows]


class FolderCaptions(Dataset):
    """Pairs from a folder; images are loaded and transformed on access."""

    def __init__(self, folder: Path, transform: Transform):
        self.rows, self.transform = read_index(folder), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str] | None:
        path, caption = self.rows[i]
        try:
            image = load_image(path)
        except ImageInputError as e:
            log.warning("skipping %s: %s", path, e)
            return None
        return self.transform(image), caption


class ShapesCaptions(Dataset):
    """The procedural set, drawn once and kept in memory as preprocessed tensors.

    Each access picks a caption template at random, so the same image is seen
    with different wordings across epochs.
    """

    def __init__(self, split: str, length: int, transform: Transform, seed: int = 0,
                 indices: range | None = None, progress: bool = True):
        self.samples: list[procedural.Sample] = []
        indices = indices if indices is not None else range(length)
        self.images = torch.empty(0)
        tensors = []
        for i in tqdm(indices, desc=f"drawing {split} shapes", disable=not progress, leave=False):
            spec = procedural.sample(seed, split, i)
            tensors.append(transform(procedural.render(spec)))
            self.samples.append(spec)
        self.images = torch.stack(tensors)
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.images[i], self.samples[i].random_caption(self._rng)
