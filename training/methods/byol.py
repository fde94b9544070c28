"""BYOL (Grill et al., 2020): an online network (backbone, projector, predictor) predicts the
projection of the other view by a target network, an EMA of the online one whose momentum
follows a cosine schedule from `momentum` (paper: 0.996) to 1. Symmetric negative cosine loss; no negatives."""

from __future__ import annotations

import torch

from training.config import BYOLConfig
from training.heads import byol_projector
from training.losses import NegativeCosineSimilarity

from .base import MomentumMethod


class BYOL(MomentumMethod):
    name, recipe = "byol", "byol"
    config: BYOLConfig

    def __init__(self, config: BYOLConfig, dist=None, probe_classes=None):  # type: ignore[no-untyped-def]
        super().__init__(config, dist, probe_classes)
        config = self.config  # the method's own config class
        c = config
        self.projector = byol_projector(self.backbone.dim, c.hidden_dim, c.out_dim)
        self.predictor = byol_projector(c.out_dim, c.hidden_dim, c.out_dim)
        self.make_targets()
        self.criterion = NegativeCosineSimilarity()

    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h0, h1 = (self.backbone(v) for v in views[:2])
        p0, p1 = (self.predictor(self.projector(h)) for h in (h0, h1))
        t0, t1 = self.targets(views[:2])
        return self.criterion(p0, t1) + self.criterion(p1, t0), h0
