"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020).

For N pairs (z0[i], z1[i]) there are 2N views; each view's positive is its
pair and its 2N - 2 negatives are every other view in the batch — gathered
from all ranks under torchrun, so the negatives are the global batch.

    loss = mean over views v of  -log( exp(cos(v, v+)/T) / sum_{u != v} exp(cos(v, u)/T) )
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gather import gather, world


class NTXentLoss(nn.Module):
    def __init__(self, temperature: float = 0.5):
        super().__init__()
        self.temperature = temperature

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """z0, z1: [N, D] projections of two views of the same N images. Returns a scalar."""
        n = z0.shape[0]
        z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
        all0, all1 = gather(z0), gather(z1)
        offset = world()[0] * n
        idx = torch.arange(n, device=z0.device) + offset
        self_mask = F.one_hot(idx, all0.shape[0]).bool()
        t = self.temperature
        s00 = (z0 @ all0.T / t).masked_fill(self_mask, float("-inf"))
        s11 = (z1 @ all1.T / t).masked_fill(self_mask, float("-inf"))
        s01, s10 = z0 @ all1.T / t, z1 @ all0.T / t
        loss0 = F.cross_entropy(torch.cat([s01, s00], dim=1), idx)
        loss1 = F.cross_entropy(torch.cat([s10, s11], dim=1), idx)
        return (loss0 + loss1) / 2
