"""MoCo v2 (Chen et al., 2020b) and MoCo v3 (Chen et al., 2021).

v2: query encoder + momentum key encoder (EMA, m = 0.99 by default here, 0.999
in the paper for 200 epochs); a queue of `queue_size` past keys supplies the
negatives; temperature 0.2. The queue is filled with keys gathered from all
ranks, so it is the same everywhere. (The paper's shuffle-BN is not
implemented: under DDP BatchNorm is synchronised instead.)

v3: no queue; a predictor on the query side; the loss is symmetric over the
two views with in-batch keys from all ranks as negatives, scaled by 2T
(T = 0.2); the momentum follows a cosine schedule from `momentum` to 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.config import MoCoV2Config, MoCoV3Config
from training.heads import moco_v2_projector, moco_v3_predictor, moco_v3_projector
from training.losses import InfoNCELoss
from training.losses.gather import gather

from .base import MomentumMethod


class MoCoV2(MomentumMethod):
    name, recipe = "moco_v2", "moco_v2"
    momentum_to_one = False
    config: MoCoV2Config

    def __init__(self, config: MoCoV2Config, dist=None, probe_classes=None):  # type: ignore[no-untyped-def]
        super().__init__(config, dist, probe_classes)
        config = self.config  # the method's own config class
        self.projector = moco_v2_projector(self.backbone.dim, config.hidden_dim, config.out_dim)
        self.make_targets()
        self.criterion = InfoNCELoss(config.temperature)
        g = torch.Generator().manual_seed(config.seed)
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.out_dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        keys = gather(keys)
        n, size = len(keys), len(self.queue)
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(views[0])
        k = F.normalize(self.targets(views[1:2])[0], dim=1)
        loss = self.criterion(self.projector(h), k, self.queue.clone().detach())
        self._enqueue(k)
        return loss, h


class MoCoV3(MomentumMethod):
    name, recipe = "moco_v3", "moco_v3"
    config: MoCoV3Config

    def __init__(self, config: MoCoV3Config, dist=None, probe_classes=None):  # type: ignore[no-untyped-def]
        super().__init__(config, dist, probe_classes)
        config = self.config  # the method's own config class
        c = config
        self.projector = moco_v3_projector(self.backbone.dim, c.hidden_dim, c.out_dim)
        self.predictor = moco_v3_predictor(c.out_dim, c.hidden_dim, c.out_dim)
        self.make_targets()
        self.criterion = InfoNCELoss(config.temperature, scale_by_2t=True)

    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h0, h1 = (self.backbone(v) for v in views[:2])
        q0, q1 = (self.predictor(self.projector(h)) for h in (h0, h1))
        k0, k1 = self.targets(views[:2])
        return self.criterion(q0, k1) + self.criterion(q1, k0), h0

