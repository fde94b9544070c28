"""MAE's reconstruction loss (He et al., 2022): mean squared error on the masked patches only,
against per-patch normalised pixels (each patch's pixels minus their mean, over their std)."""

from __future__ import annotations

import torch


def masked_patch_mse(prediction: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor,
                     normalize_target: bool = True) -> torch.Tensor:
    """prediction, patches: [B, N, P] (P = patch_size**2 * 3); mask: [B, N], 1 = masked (hidden).

    Visible patches do not count: the loss is the mean over masked patches of the
    per-patch MSE.
    """
    target = patches
    if normalize_target:
        mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        target = (patches - mean) / (var + 1e-6) ** 0.5
    per_patch = ((prediction - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
