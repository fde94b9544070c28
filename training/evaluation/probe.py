"""Frozen-feature evaluation of any image encoder on labelled data: kNN, linear probe, collapse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from training.data.images import FolderImages, ShapesImages, stack

from .collapse import collapse_stats
from .features import extract
from .knn import knn_accuracy
from .linear import linear_probe_accuracy


def labelled_sets(data: str, transform: Callable[[Image.Image], torch.Tensor], train_size: int, test_size: int,
                  split: str = "test", seed: int = 0, label: str = "class"
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """((train images, labels), (test images, labels)) from the procedural set (label "class" or
    "shape") or an ImageFolder (80/20 split)."""
    if data == "shapes":
        return (stack(ShapesImages("train", train_size, transform, seed, label=label)),
                stack(ShapesImages(split, test_size, transform, seed, label=label)))
    folder = FolderImages(Path(data), transform)
    if not folder.classes:
        raise ValueError(f"{data} has no class sub-folders: evaluation needs labels")
    x, y = stack(folder)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def evaluate_encoder(encoder: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                     test: tuple[torch.Tensor, torch.Tensor], linear: bool = True) -> dict[str, float]:
    train_x, test_x = extract(encoder, train[0]), extract(encoder, test[0])
    out = {"knn_top1": knn_accuracy(train_x, train[1], test_x, test[1])}
    if linear:
        out["linear_top1"] = linear_probe_accuracy(train_x, train[1], test_x, test[1])
    stats = collapse_stats(test_x)
    out["embedding_std"], out["effective_rank"] = stats["std"], stats["effective_rank"]
    out["embedding_std_healthy"] = stats["std_healthy"]
    return out
