"""Self-supervised losses against small hand-computed examples, Sinkhorn marginals,
momentum updates and schedules, and MAE masking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import InfoNCELoss, NegativeCosineSimilarity, NTXentLoss, SwAVLoss, masked_patch_mse, sinkhorn
from training.methods.mae import patchify, random_masking
from training.optim import cosine_schedule, frozen_copy, update_momentum


def unit(*rows: list[float]) -> torch.Tensor:
    x = torch.tensor(rows, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def test_nt_xent_matches_hand_computation() -> None:
    z0, z1 = unit([1, 0], [0, 1]), unit([1, 1], [-1, 1])
    t = 0.5
    views = torch.cat([z0, z1]).numpy()
    positive = {0: 2, 1: 3, 2: 0, 3: 1}
    expected = 0.0
    for v in range(4):  # -log softmax over the 3 other views
        sims = {u: float(views[v] @ views[u]) / t for u in range(4) if u != v}
        expected += -(sims[positive[v]] - math.log(sum(math.exp(s) for s in sims.values())))
    expected /= 4
    assert NTXentLoss(t)(z0, z1).item() == pytest.approx(expected, rel=1e-9)


def test_nt_xent_is_low_for_matching_views_and_high_for_swapped() -> None:
    z = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    assert NTXentLoss(0.1)(z, z) < NTXentLoss(0.1)(z, z.roll(1, dims=0))


def test_info_nce_with_queue_matches_hand_computation() -> None:
    q, k, queue = unit([1, 0]), unit([1, 1]), unit([0, 1], [-1, 0])
    t = 0.2
    logits = np.array([q[0] @ k[0], q[0] @ queue[0], q[0] @ queue[1]]) / t
    expected = -(logits[0] - np.log(np.exp(logits).sum()))
    assert InfoNCELoss(t)(q, k, queue).item() == pytest.approx(expected, rel=1e-9)


def test_info_nce_in_batch_keys_and_2t_scaling() -> None:
    q, k = unit([1, 0], [0, 1]), unit([1, 0.2], [0.1, 1])
    t = 0.2
    logits = (q @ k.T / t).numpy()
    expected = np.mean([-(logits[i, i] - np.log(np.exp(logits[i]).sum())) for i in range(2)])
    assert InfoNCELoss(t)(q, k).item() == pytest.approx(expected, rel=1e-9)
    assert InfoNCELoss(t, scale_by_2t=True)(q, k).item() == pytest.approx(expected * 2 * t, rel=1e-9)


def test_negative_cosine_and_stop_gradient() -> None:
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[1.0, 0.0], [-1.0, -1.0]], requires_grad=True)
    loss = NegativeCosineSimilarity()(p, z)
    assert loss.item() == pytest.approx((-1.0 + 1.0) / 2, abs=1e-6)
    loss.backward()
    assert p.grad is not None and z.grad is None  # the target gets no gradient


def test_sinkhorn_marginals_are_equal_partitions() -> None:
    scores = torch.rand(12, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1  # cosines
    codes = sinkhorn(scores, epsilon=0.05, iterations=50)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(12))  # each sample: a distribution
    torch.testing.assert_close(codes.sum(dim=0), torch.full((5,), 12 / 5), atol=1e-3, rtol=0)  # each prototype: B/K


def test_swav_loss_is_swapped_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    s1, s2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    t = 0.1
    q1, q2 = sinkhorn(s1), sinkhorn(s2)

    def ce(codes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return -(codes * torch.log_softmax(scores / t, dim=1)).sum(1).mean()

    expected = (ce(q1, s2) + ce(q2, s1)) / 2
    assert SwAVLoss(t)([s1, s2], []).item() == pytest.approx(expected.item(), rel=1e-5)


def test_masked_mse_ignores_visible_patches() -> None:
    patches = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    pred = torch.zeros(2, 4, 12)
    base = masked_patch_mse(pred, patches, mask, normalize_target=False)
    manual = ((patches**2).mean(-1) * mask).sum() / 3
    assert base.item() == pytest.approx(manual.item(), rel=1e-6)
    pred_changed = pred.clone()
    pred_changed[0, 1] += 5.0  # a visible patch
    assert masked_patch_mse(pred_changed, patches, mask, normalize_target=False) == base


def test_random_masking_hides_the_ratio_and_restores_order() -> None:
    ids_keep, ids_restore, mask = random_masking(64, 0.75, 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert ids_keep.shape == (3, 16) and mask.shape == (3, 64)
    assert (mask.sum(1) == 48).all()  # 75% hidden in every sample
    for b in range(3):  # kept ids are exactly the unmasked positions
        assert set(ids_keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    shuffled = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), torch.arange(64).expand(3, -1))


def test_patchify_round_trip_layout() -> None:
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (2, 4, 12)
    assert p[0, 1, 0].item() == img[0, 0, 0, 2].item()  # second patch starts at column 2, channel 0 first


def test_momentum_update_and_cosine_schedule() -> None:
    online = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        online.weight.fill_(1.0)
    target = frozen_copy(online)
    with torch.no_grad():
        target.weight.fill_(0.0)
    update_momentum(online, target, 0.9)
    torch.testing.assert_close(target.weight, torch.full((1, 2), 0.1))
    assert not target.weight.requires_grad
    assert cosine_schedule(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_schedule(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_schedule(100, 100, 0.996) == pytest.approx(1.0)
