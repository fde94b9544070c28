"""SwAV: swapped prediction of Sinkhorn-Knopp cluster assignments (Caron et al., 2020).

Each crop's prototype scores are turned into soft codes by Sinkhorn-Knopp
(an equal-partition constraint over the batch); each crop then predicts the
codes of the *other* global crops with a softmax at temperature T.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .gather import world


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes [B, K] from prototype scores [B, K].

    Q = exp(scores / epsilon), then alternately normalise so that every
    prototype gets 1/K of the total mass and every sample 1/B. Returned scaled
    so that each row (sample) sums to 1. Under torchrun the column sums are
    taken over the global batch.
    """
    _, world_size = world()
    top = scores.max()
    if world_size > 1:  # one shift for all ranks, or their masses would be weighted differently
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp((scores - top) / epsilon).T  # [K, B]
    total = q.sum()
    if world_size > 1:
        dist.all_reduce(total)
    q /= total
    k, b = q.shape
    b_global = b * world_size
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)
        if world_size > 1:
            dist.all_reduce(rows)
        q /= rows * k
        q /= q.sum(dim=0, keepdim=True) * b_global
    return (q * b_global).T


class SwAVLoss(nn.Module):
    def __init__(self, temperature: float = 0.1, epsilon: float = 0.05, iterations: int = 3):
        super().__init__()
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, iterations

    def forward(self, global_scores: list[torch.Tensor], local_scores: list[torch.Tensor]) -> torch.Tensor:
        """Scores [B, K] per crop: the global crops (codes come from these) and the local crops."""
        crops = global_scores + local_scores
        total, terms = torch.zeros((), device=crops[0].device), 0
        for i, scores in enumerate(global_scores):
            codes = sinkhorn(scores.detach().float(), self.epsilon, self.iterations)
            for j, other in enumerate(crops):
                if j == i:
                    continue
                total = total - (codes * F.log_softmax(other / self.temperature, dim=1)).sum(dim=1).mean()
                terms += 1
        return total / terms
