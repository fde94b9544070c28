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

# We warn of collapse when the std falls below STD_WARN_FRACTION of the healthy 1/sqrt(d), or the effective
# rank below RANK_WARN. Measured (procedural shapes, 16-256 images, seeds 0-2; std as a fraction of healthy):
#   random init     ResNets std 0.107-0.39 (lowest: resnet18-small at 32-128 px and resnet18 at 96-224 px,
#                   0.107-0.14: BatchNorm at its initial statistics puts every image in a narrow cone), ViTs
#                   0.65-0.79; effective rank >= 5.4 (vit-micro, 16 images)
#   trained         25 steps of each method on 16 images: std 0.18-0.82, effective rank >= 4.25 (MAE, vit-micro)
#   collapsed       (64 x 512, tests/training/test_ssl_methods.py) constant: std 0, rank 1; constant + 1%
#                   noise: std 0.0098; positive multiples of one direction: std 0; signed multiples of one
#                   direction (rank 1): std 0.79, rank 1.00; a short line off the origin: std 0.11, rank 1.16
# The std line was 0.1, within 7% of random-init ResNet-18s; 0.03 is near the geometric mean of 0.0098 and
# 0.107, a factor of ~3.3 from each. The rank line 2 sits between 1.16 (collapsed) and 4.25 (healthy).
# Not flagged: rank 1 plus isotropic noise (0.1% of the norm gives effective rank 2.9 on 16 x 512, 8.4 on
# 64 x 512): the entropy of singular values counts a noise floor as dimensions; the std catches collapse to
# a point, not to a line.
STD_WARN_FRACTION = 0.03
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
