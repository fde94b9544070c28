"""SwAV (Caron et al., 2020): online clustering. Crops are projected and scored against
`prototypes` unit vectors; Sinkhorn-Knopp turns the scores of each global crop into soft codes
that every other crop must predict (swapped prediction). Multi-crop: 2 global + `local_crops`
small crops (any number). The prototypes are re-normalised before every step and kept frozen for the first
`freeze_prototypes_steps` steps, as in the paper. Temperature 0.1, epsilon 0.05, 3 iterations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import VITS, build_backbone
from training.config import SwAVConfig
from training.heads import swav_projector
from training.losses import SwAVLoss
from training.transforms import MultiView, recipe

from .base import SSLMethod


class SwAV(SSLMethod):
    name, recipe = "swav", "swav"
    config: SwAVConfig

    def __init__(self, config: SwAVConfig, dist=None, probe_classes=None):  # type: ignore[no-untyped-def]
        super().__init__(config, dist, probe_classes)
        config = self.config  # the method's own config class
        c = config
        if c.backbone in VITS:  # local crops are smaller than global ones
            self.backbone = build_backbone(c.backbone, c.image_size, c.patch_size, dynamic_size=True)
        self.projector = swav_projector(self.backbone.dim, c.hidden_dim, c.out_dim)
        self.prototypes = nn.Linear(c.out_dim, c.prototypes, bias=False)
        self.criterion = SwAVLoss(config.temperature)

    def views(self) -> MultiView:
        patch = getattr(getattr(self.backbone.net, "patch_embed", None), "patch_size", (1,))[0]
        return recipe("swav", self.config.image_size, self.config.min_crop_scale, multiple=patch,
                      local_crops=self.config.local_crops)

    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        features = [self.backbone(v) for v in views]
        scores = [self.prototypes(F.normalize(self.projector(h), dim=1)) for h in features]
        return self.criterion(scores[:2], scores[2:]), features[0]

    def after_backward(self, step: int) -> None:
        if step < self.config.freeze_prototypes_steps and self.prototypes.weight.grad is not None:
            self.prototypes.weight.grad = None
