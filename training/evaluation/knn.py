"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018):
each of the k most similar training features votes for its label with weight exp(cos / T)."""

from __future__ import annotations

import torch


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Features L2-normalised [n, d]; labels int64 [n]. Returns top-1 accuracy in [0, 1]."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(test_x), chunk):
        sims = test_x[start : start + chunk] @ train_x.T
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(sims), classes)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == test_y[start : start + chunk]).sum())
    return correct / len(test_x)
