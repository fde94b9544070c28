"""Frozen features of a backbone over a labelled set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract(backbone: nn.Module, images: torch.Tensor, batch_size: int = 256,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """images: float32 [n, 3, S, S] (already normalised) -> L2-normalised features [n, dim] on the CPU."""
    was_training = backbone.training
    backbone.eval()
    out = [F.normalize(backbone(images[i : i + batch_size].to(device)).float(), dim=1).cpu()
           for i in range(0, len(images), batch_size)]
    backbone.train(was_training)
    return torch.cat(out)
