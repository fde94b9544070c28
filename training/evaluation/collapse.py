"""Collapse diagnostics for embeddings.

- `std`: mean per-dimension standard deviation of L2-normalised embeddings.
  Healthy embeddings spread over the sphere and sit near 1/sqrt(d); a
  collapsed encoder (every image -> one point) gives 0 (Chen & He, 2021).
- `effective_rank`: exp of the entropy of the normalised singular values
  (Roy & Vetterli, 2007); 1 when all embeddings lie on a line, up to d.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Below these fractions of the healthy value we warn of collapse.
STD_WARN_FRACTION = 0.1
RANK_WARN = 2.0


def collapse_stats(embeddings: torch.Tensor) -> dict[str, float]:
    z = F.normalize(embeddings.float(), dim=1)
    d = z.shape[1]
    std = float(z.std(dim=0).mean())
    s = torch.linalg.svdvals(z - z.mean(0))
    p = s / s.sum().clamp_min(1e-12)
    rank = float(torch.exp(-(p * (p + 1e-12).log()).sum()))
    return {"std": std, "std_healthy": 1 / math.sqrt(d), "effective_rank": rank}


def collapse_warning(stats: dict[str, float]) -> str | None:
    if stats["std"] < STD_WARN_FRACTION * stats["std_healthy"] or stats["effective_rank"] < RANK_WARN:
        return (f"embeddings look collapsed: per-dimension std {stats['std']:.4f} "
                f"(healthy ~{stats['std_healthy']:.4f}), effective rank {stats['effective_rank']:.2f}")
    return None
