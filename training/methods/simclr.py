"""SimCLR (Chen et al., 2020): two augmented views, a projector, NT-Xent over the 2N views.
Negatives are gathered across ranks under torchrun. Paper temperature 0.5 (CIFAR) / 0.1 (ImageNet); default 0.5."""

from __future__ import annotations

import torch

from training.heads import simclr_projector
from training.losses import NTXentLoss

from .base import SSLConfig, SSLMethod


class SimCLR(SSLMethod):
    name, recipe = "simclr", "simclr"

    def __init__(self, config: SSLConfig, dist=None):  # type: ignore[no-untyped-def]
        super().__init__(config, dist)
        self.projector = simclr_projector(self.backbone.dim, config.hidden_dim, config.out_dim)
        self.criterion = NTXentLoss(self.temperature(0.5))

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z0, z1 = (self.projector(self.backbone(v)) for v in views[:2])
        return self.criterion(z0, z1)
