"""Frozen features of a backbone over a labelled set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract(backbone: nn.Module, images: torch.Tensor, batch_size: int = 256,
            device: torch.device | str = "cpu", normalize: bool = True) -> torch.Tensor:
    """images: float32 [n, 3, S, S] (already normalised) -> features [n, dim] on the CPU, L2-normalised
    unless `normalize` is False."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = backbone(images[i : i + batch_size].to(device)).float()
        out.append((F.normalize(x, dim=1) if normalize else x).cpu())
    backbone.train(was_training)
    return torch.cat(out)
