"""SimSiam (Chen & He, 2021): a siamese network with a predictor and a stop-gradient on the
other branch; no negatives, no momentum encoder. Loss 0.5 * (D(p0, z1) + D(p1, z0)), D = -cos."""

from __future__ import annotations

import torch

from training.config import SimSiamConfig
from training.heads import simsiam_predictor, simsiam_projector
from training.losses import NegativeCosineSimilarity

from .base import SSLMethod


class SimSiam(SSLMethod):
    name, recipe = "simsiam", "simsiam"
    config: SimSiamConfig

    def __init__(self, config: SimSiamConfig, dist=None, probe_classes=None):  # type: ignore[no-untyped-def]
        super().__init__(config, dist, probe_classes)
        config = self.config  # the method's own config class
        c = config
        self.projector = simsiam_projector(self.backbone.dim, c.hidden_dim, c.hidden_dim)
        self.predictor = simsiam_predictor(c.hidden_dim, max(8, c.hidden_dim // 4))
        self.criterion = NegativeCosineSimilarity()

    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h0, h1 = (self.backbone(v) for v in views[:2])
        z0, z1 = self.projector(h0), self.projector(h1)
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0)), h0  # the criterion detaches z
