"""Under DDP the contrastive losses see the *global* batch: features are gathered across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.loss import ClipLoss

from tests.conftest import CONFIGS
from training.distributed import Dist
from training.losses import NTXentLoss
from training.methods.clip import Clip, ClipConfig


def _features(n: int = 8, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def _rank(rank: int, init_file: str, out: mp.Queue[tuple[int, float]]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    method = Clip(ClipConfig(model=str(CONFIGS / "tiny-vit.json")), Dist(rank, 2, 0, torch.device("cpu")))
    img, txt = _features()
    half = slice(rank * 4, rank * 4 + 4)
    loss = method.loss_fn(img[half].clone().requires_grad_(), txt[half], torch.tensor(10.0))
    loss.backward()  # gradients flow through the gather
    # SimCLR's NT-Xent: negatives from both ranks, so each rank's loss is its half of the global loss.
    ntxent = NTXentLoss(0.5)(img[half].clone().requires_grad_(), txt[half])
    ntxent.backward()
    out.put((rank, loss.item(), ntxent.item()))
    dist.destroy_process_group()


def test_each_rank_sees_the_global_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), out)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (clip, ntx) for r, clip, ntx in (out.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    img, txt = _features()
    whole = ClipLoss()(img, txt, torch.tensor(10.0)).item()
    local_only = ClipLoss()(img[:4], txt[:4], torch.tensor(10.0)).item()
    assert abs(results[0][0] - whole) < 1e-5 and abs(results[1][0] - whole) < 1e-5
    assert abs(local_only - whole) > 1e-3  # the check can tell gathered from local
    # NT-Xent averages over views: the mean of the ranks' losses is the full-batch loss.
    full = NTXentLoss(0.5)(img, txt).item()
    assert abs((results[0][1] + results[1][1]) / 2 - full) < 1e-5
    assert abs(NTXentLoss(0.5)(img[:4], txt[:4]).item() - results[0][1]) > 1e-3
