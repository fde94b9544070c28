"""SwAV (Caron et al., 2020): online clustering. Crops are projected and scored against
`prototypes` unit vectors; Sinkhorn-Knopp turns the scores of each global crop into soft codes
that every other crop must predict (swapped prediction). Multi-crop: 2 global + `local_crops`
small crops. The prototypes are re-normalised before every step and kept frozen for the first
`freeze_prototypes_steps` steps, as in the paper. Temperature 0.1, epsilon 0.05, 3 iterations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import VITS, build_backbone
from training.heads import swav_projector
from training.losses import SwAVLoss
from training.transforms import MultiView, recipe

from .base import SSLConfig, SSLMethod


class SwAV(SSLMethod):
    name, recipe = "swav", "swav"

    def __init__(self, config: SSLConfig, dist=None):  # type: ignore[no-untyped-def]
        super().__init__(config, dist)
        c = config
        if c.backbone in VITS:  # local crops are smaller than global ones
            self.backbone = build_backbone(c.backbone, c.image_size, c.patch_size, dynamic_size=True)
        self.projector = swav_projector(self.backbone.dim, c.hidden_dim, c.out_dim)
        self.prototypes = nn.Linear(c.out_dim, c.prototypes, bias=False)
        self.criterion = SwAVLoss(self.temperature(0.1))

    def views(self) -> MultiView:
        patch = getattr(getattr(self.backbone.net, "patch_embed", None), "patch_size", (1,))[0]
        full = recipe("swav", self.config.image_size, self.config.min_crop_scale, multiple=patch)
        return MultiView(full.views[: 2 + self.config.local_crops])

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        scores = [self.prototypes(F.normalize(self.projector(self.backbone(v)), dim=1)) for v in views]
        return self.criterion(scores[:2], scores[2:])

    def after_backward(self, step: int) -> None:
        if step < self.config.freeze_prototypes_steps and self.prototypes.weight.grad is not None:
            self.prototypes.weight.grad = None
