"""SimSiam (Chen & He, 2021): a siamese network with a predictor and a stop-gradient on the
other branch; no negatives, no momentum encoder. Loss 0.5 * (D(p0, z1) + D(p1, z0)), D = -cos."""

from __future__ import annotations

import torch

from training.heads import simsiam_predictor, simsiam_projector
from training.losses import NegativeCosineSimilarity

from .base import SSLConfig, SSLMethod


class SimSiam(SSLMethod):
    name, recipe = "simsiam", "simsiam"
    # SGD as in the paper (lr 0.05 x batch/256 there, for 100+ epochs). On the shapes benchmark (1,000 steps):
    # AdamW let the effective rank fall to 15 and kNN accuracy drop as it trained; SGD lr 0.06, wd 5e-4
    # (lightly's CIFAR-10 recipe) gave linear probe +1.8 points over random init; lr 0.25, wd 1e-5 gave +5.7.
    default_optimizer = ("sgd", 0.25, 1e-5)

    def __init__(self, config: SSLConfig, dist=None):  # type: ignore[no-untyped-def]
        super().__init__(config, dist)
        c = config
        self.projector = simsiam_projector(self.backbone.dim, c.hidden_dim, c.hidden_dim)
        self.predictor = simsiam_predictor(c.hidden_dim, max(8, c.hidden_dim // 4))
        self.criterion = NegativeCosineSimilarity()

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        z0, z1 = (self.projector(self.backbone(v)) for v in views[:2])
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))  # the criterion detaches z
