"""InfoNCE for MoCo (He et al., 2020; Chen et al., 2020b; Chen et al., 2021).

Each query's positive is the key of the other view of its image. Negatives are
either a queue of keys from earlier batches (MoCo v2: pass `queue`), or the
other keys of the batch, gathered from all ranks (MoCo v3: no queue).

    loss = -log( exp(q.k+/T) / (exp(q.k+/T) + sum_neg exp(q.k-/T)) )

MoCo v3 scales the loss by 2T, as in its paper (`scale_by_2t`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gather import gather, world


class InfoNCELoss(nn.Module):
    def __init__(self, temperature: float = 0.2, scale_by_2t: bool = False):
        super().__init__()
        self.temperature, self.scale_by_2t = temperature, scale_by_2t

    def forward(self, query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None) -> torch.Tensor:
        """query, key: [N, D]; queue: [K, D] or None. Keys carry no gradient (momentum encoder)."""
        q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
        t = self.temperature
        if queue is not None:
            pos = (q * k).sum(1, keepdim=True)
            logits = torch.cat([pos, q @ F.normalize(queue, dim=1).T], dim=1) / t
            labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
        else:
            logits = q @ gather(k).T / t
            labels = torch.arange(len(q), device=q.device) + world()[0] * len(q)
        loss = F.cross_entropy(logits, labels)
        return loss * 2 * t if self.scale_by_2t else loss
