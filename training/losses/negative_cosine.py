"""Negative cosine similarity with a stop-gradient on the target: BYOL (Grill et al., 2020)
and SimSiam (Chen & He, 2021).

    loss = -mean_i cos(p_i, stopgrad(z_i))

(BYOL writes it as 2 - 2 cos, the same gradient.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NegativeCosineSimilarity(nn.Module):
    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """prediction, target: [N, D]. The target is detached here."""
        return -F.cosine_similarity(prediction, target.detach(), dim=1).mean()
