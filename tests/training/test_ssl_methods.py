"""Each self-supervised method learns on a fixed tiny batch without collapsing; checkpoints
export to parity-checked image bundles that the server serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from server.client import FailedPrecondition, TandemClient
from tests.conftest import png_bytes, start_server
from training.config import SSLConfig, TrainConfig, config_class
from training.data import procedural
from training.distributed import Dist
from training.evaluation.collapse import collapse_stats, collapse_warning
from training.export import FUSED_ATTENTION_OPS, export_bundle
from training.methods import SSL_METHODS, ssl_class, ssl_config
from training.trainer import Trainer


def tiny_config(method: str, **kw: object) -> SSLConfig:
    """A CPU-sized config of `method`; settings the method does not have are left out."""
    base = dict(backbone="vit-micro" if method == "mae" else "resnet18-small", image_size=16, batch_size=16,
                hidden_dim=64, out_dim=32, queue_size=64, prototypes=8, freeze_prototypes_steps=0, local_crops=2,
                train_size=64, eval_bank_size=64, val_size=32, test_size=32, decoder_width=32, decoder_depth=1)
    base.update(kw)
    known = set(config_class(method).__dataclass_fields__)
    return ssl_config(method, **{k: v for k, v in base.items() if k in known})


def tiny_run(config: SSLConfig, out: Path, **loop: object) -> TrainConfig:
    return TrainConfig.for_run(config, out=str(out), progress=False, **loop)  # type: ignore[arg-type]


def fixed_batch(method, n: int = 16) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    images = [procedural.ShapesDataset("train", n)[i][0] for i in range(n)]
    views = method.views()
    per_image = [views(img) for img in images]
    return [torch.stack([v[k] for v in per_image]) for k in range(len(per_image[0]))]


@pytest.mark.parametrize("name", SSL_METHODS)
def test_method_loss_falls_on_a_fixed_batch_without_collapse(name: str) -> None:
    torch.manual_seed(0)
    method = ssl_class(name)(tiny_config(name))
    batch = fixed_batch(method)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    # MoCo v2 on one fixed batch would queue its own keys as negatives; hold its queue at the
    # initial random keys so the falling loss measures what the encoder learns.
    queue0 = method.queue.clone() if name == "moco_v2" else None
    for step in range(25):
        if queue0 is not None:
            method.queue.copy_(queue0)
        loss = method(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step + 1, 25)
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    with torch.no_grad():
        method.eval()
        stats = collapse_stats(method.backbone(batch[0]))
    assert collapse_warning(stats) is None, stats


def test_momentum_target_follows_online_network() -> None:
    method = ssl_class("byol")(tiny_config("byol", momentum=0.5))
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.target_backbone.parameters()]
    method.after_step(0, 10)  # step 0: momentum is exactly the configured start
    for b, t, o in zip(before, method.target_backbone.parameters(), method.backbone.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * o)


def test_moco_v2_queue_takes_the_newest_keys() -> None:
    method = ssl_class("moco_v2")(tiny_config("moco_v2", queue_size=20))
    batch = fixed_batch(method, n=8)
    method(batch)
    method(batch)
    assert int(method.queue_ptr) == 16
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(20))


def test_swav_prototypes_frozen_at_the_start() -> None:
    method = ssl_class("swav")(tiny_config("swav", freeze_prototypes_steps=5))
    loss = method(fixed_batch(method, n=8))
    loss.backward()
    method.after_backward(step=0)
    assert method.prototypes.weight.grad is None
    loss = method(fixed_batch(method, n=8))
    loss.backward()
    method.after_backward(step=5)
    assert method.prototypes.weight.grad is not None


def test_mae_needs_a_vit() -> None:
    with pytest.raises(ValueError, match="MAE needs a ViT"):
        ssl_class("mae")(tiny_config("mae", backbone="timm:resnet10t"))


def test_mae_embeds_an_image_as_its_mean_patch_token() -> None:
    """The MAE loss never reads the class token, so the exported embedding is the mean of the patch tokens."""
    torch.manual_seed(0)
    mae = ssl_class("mae")(tiny_config("mae")).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = mae.backbone.net.forward_features(images)
        assert torch.allclose(mae.backbone(images), tokens[:, 1:].mean(dim=1), atol=1e-6)
        assert not torch.allclose(mae.backbone(images), tokens[:, 0], atol=1e-3)


@pytest.fixture(scope="module")
def ssl_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Short real training runs (trainer, checkpoint) for a ResNet and a ViT backbone."""
    out = {}
    for name, backbone in (("simclr", "resnet18-small"), ("mae", "vit-micro")):
        run = tmp_path_factory.mktemp(name)
        config = tiny_config(name, backbone=backbone, image_size=32, steps=4, lr=1e-3, weight_decay=1e-4)
        method = ssl_class(name)(config)
        metrics = Trainer(method, tiny_run(config, run, eval_every=4, checkpoint_every=4), Dist()).fit()
        assert {"knn_top1", "knn_shape_top1", "online_linear_top1", "embedding_std", "effective_rank"} <= set(metrics)
        out[name] = run / "checkpoints" / "latest.pt"
    return out


@pytest.mark.parametrize("name", ["simclr", "mae"])
def test_ssl_export_passes_parity_with_plain_ops(ssl_checkpoints, tmp_path, name: str) -> None:  # type: ignore[no-untyped-def]
    result = export_bundle(None, tmp_path, f"{name}-enc", "1", checkpoint=ssl_checkpoints[name])
    m = result.manifest
    assert m.kind == "image" and m.text is None and m.parity["min_cosine"] >= 0.9999
    assert m.image.size == 32 and m.dim == (512 if name == "simclr" else 96)
    ops = {n.op_type for n in onnx.load(str(result.path / "image.onnx")).graph.node}
    assert not ops & FUSED_ATTENTION_OPS


def test_export_with_projector(ssl_checkpoints, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = export_bundle(None, tmp_path, "proj", "1", checkpoint=ssl_checkpoints["simclr"], with_projector=True)
    assert result.manifest.dim == 32 and result.manifest.architecture.endswith("+projector")
    with pytest.raises(ValueError, match="no projector"):
        export_bundle(None, tmp_path, "mae-proj", "1", checkpoint=ssl_checkpoints["mae"], with_projector=True)


# How much closer (in cosine) SimCLR training must bring two views of one image than two views of
# different images, beyond what the same network did at its initial weights. Measured through the server on the
# 128 view pairs of `two_views_of_unseen_shapes` (resnet-micro, 32 px; 20 steps of batch 16, lr 2e-3; seeds 0-9):
#   initial weights              gap 0.027-0.048: a random convnet already puts crops of one image a little
#                                closer, which is why "two views closer than two images" passed untrained
#   another seed's initial       gain -0.021 to +0.021 over this seed's initial weights
#   lr 0 (BatchNorm statistics   gain +0.056 to +0.096 (seeds 0-2): a trainer that never updates a weight
#   move, weights do not)        still shifts the eval-mode features
#   trained                      gain +0.202 to +0.271 (gap 0.235-0.305)
# 0.15 lies between the largest gain without learning (+0.096) and the smallest with it (+0.202).
VIEW_GAP_GAIN = 0.15


def two_views_of_unseen_shapes(n: int = 128) -> tuple[list[Image.Image], list[Image.Image]]:
    """Two random views (a crop of 30-100% of the image, a flip, a colour jitter; 32 px) of each of n
    procedural test-split images, which training never draws. Fixed by seed."""
    from torchvision.transforms import v2 as T

    torch.manual_seed(0)
    augment = T.Compose([T.RandomResizedCrop(32, scale=(0.3, 1.0)), T.RandomHorizontalFlip(),
                         T.ColorJitter(0.4, 0.4, 0.4, 0.1)])
    images = [procedural.render(procedural.sample(0, "test", i)) for i in range(n)]
    return [augment(img) for img in images], [augment(img) for img in images]


def view_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Unit embeddings of first and second views, one row per image: the mean cosine of the two views of one
    image minus the mean cosine of views of two different images."""
    sims = a @ b.T
    return float(sims.diagonal().mean() - sims[~np.eye(len(sims), dtype=bool)].mean())


@pytest.fixture(scope="module")
def simclr_before_and_after(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Checkpoints of one SimCLR resnet-micro at its random initialisation and after 20 Trainer steps from it."""
    run = tmp_path_factory.mktemp("simclr-micro")
    torch.manual_seed(0)
    config = tiny_config("simclr", backbone="resnet-micro", image_size=32, train_size=256, steps=20, warmup_steps=2,
                         lr=2e-3, weight_decay=1e-4)
    method = ssl_class("simclr")(config)
    initial = run / "initial.pt"
    torch.save({"state_dict": method.state_dict(), **method.checkpoint_meta()}, initial)
    Trainer(method, tiny_run(config, run, eval_every=20, checkpoint_every=20), Dist()).fit()
    return initial, run / "checkpoints" / "latest.pt"


def test_served_simclr_bundle_pulls_two_views_of_an_image_together_beyond_its_initial_weights(
        simclr_before_and_after, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Served as image bundles, the trained encoder embeds two views of an unseen image closer together, relative
    to views of other images, than the same network did at its starting weights (by VIEW_GAP_GAIN); the bundle is
    image-only, so the server refuses to classify with it."""
    initial, trained = simclr_before_and_after
    repo = tmp_path / "repo"
    export_bundle(None, repo, "simclr-init", "1", checkpoint=initial)
    export_bundle(None, repo, "simclr-enc", "1", checkpoint=trained)
    views_a, views_b = two_views_of_unseen_shapes()
    server = start_server(repo)
    try:
        gap = {}
        for name in ("simclr-init", "simclr-enc"):
            with TandemClient(server.target, model=name) as c:
                a, b = (c.embed_image([png_bytes(v) for v in views]).embeddings for views in (views_a, views_b))
            assert a.shape == b.shape == (len(views_a), 256)
            gap[name] = view_gap(a, b)
        with TandemClient(server.target, model="simclr-enc") as c:
            info = c.get_model()
            with pytest.raises(FailedPrecondition):
                c.classify([png_bytes(views_a[0])], ["a circle", "a square"])
    finally:
        server.stop()
    assert info.kind == "image" and list(info.towers) == ["image"]
    assert gap["simclr-enc"] > gap["simclr-init"] + VIEW_GAP_GAIN, gap


@pytest.mark.parametrize(
    "method, backbone, size",
    [("simclr", "resnet18", 32), ("moco_v2", "resnet-micro", 32), ("byol", "vit-tiny", 32),
     ("simsiam", "timm:resnet10t", 32), ("swav", "vit-micro", 32)],
)
def test_export_parity_for_every_backbone_kind(tmp_path, method: str, backbone: str, size: int) -> None:  # type: ignore[no-untyped-def]
    """ImageNet-stem ResNet, the CPU-sized ResNet, a 12-layer ViT, a timm model, and SwAV's variable-size ViT."""
    torch.manual_seed(0)
    m = ssl_class(method)(tiny_config(method, backbone=backbone, image_size=size))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": m.state_dict(), **m.checkpoint_meta()}, ckpt)
    result = export_bundle(None, tmp_path, "enc", "1", checkpoint=ckpt)
    assert result.manifest.parity["min_cosine"] >= 0.9999 and result.manifest.dim == m.backbone.dim


def test_image_folder_training_and_eval_cli(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An ImageFolder trains SimSiam; `tandem eval knn` scores a checkpoint and a random init."""
    from cli import main

    for i, (img, spec) in enumerate(procedural.ShapesDataset("train", 48)):
        folder = tmp_path / "data" / spec.shape
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i}.png")
    run = tmp_path / "run"
    args = ["train", "simsiam", "--data", str(tmp_path / "data"), "--out", str(run), "--steps", "2",
            "--batch-size", "8", "--image-size", "16", "--hidden-dim", "32", "--eval-every", "2", "--no-progress"]
    assert main(args) == 0
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["method"] == "simsiam" and state["step"] == 2
    assert state["probe_classes"] == 4  # the class sub-folders
    common = ["--data", str(tmp_path / "data"), "--image-size", "16"]
    assert main(["eval", "knn", "--checkpoint", str(run / "checkpoints" / "latest.pt"), *common]) == 0
    assert main(["eval", "linear", "--backbone", "resnet18-small", *common]) == 0


def collapsed_embeddings(kind: str, n: int = 64, d: int = 512) -> torch.Tensor:
    """[n, d] embeddings of an encoder that has collapsed in one of the ways the collapse check must flag."""
    g = torch.Generator().manual_seed(0)
    offset, direction = torch.randn(d, generator=g), F.normalize(torch.randn(d, generator=g), dim=0)
    scale = torch.rand(n, 1, generator=g) + 0.5
    sign = torch.randn(n, 1, generator=g).sign()
    return {
        "constant": offset.expand(n, d),
        "constant plus 1% noise": offset + 0.01 * torch.randn(n, d, generator=g),
        "positive multiples of one direction": scale * direction,
        "signed multiples of one direction (rank 1)": sign * scale * direction,
        "a short line off the origin (rank 1)": offset + 3 * sign * scale * direction,
    }[kind]


@pytest.mark.parametrize("kind", ["constant", "constant plus 1% noise", "positive multiples of one direction",
                                  "signed multiples of one direction (rank 1)",
                                  "a short line off the origin (rank 1)"])
def test_collapsed_embeddings_are_flagged(kind: str) -> None:
    """Measured (collapse.py has the thresholds' reasoning), std as a fraction of healthy: constant std 0;
    1% noise std 0.0098; positive multiples std 0; signed multiples effective rank 1.00; a line off the origin
    std 0.11 (so only its rank, 1.16, flags it)."""
    stats = collapse_stats(collapsed_embeddings(kind))
    assert collapse_warning(stats) is not None, stats


@pytest.mark.parametrize("backbone, size", [("resnet18-small", 64), ("vit-micro", 32)])
def test_random_init_backbones_are_not_flagged_as_collapsed(backbone: str, size: int) -> None:
    """A random-init ResNet puts every image in a narrow cone: per-dimension std 0.107-0.13 of the healthy value
    (resnet18-small at 64 px, the lowest measured), yet its features tell images apart; a random-init ViT has the
    lowest effective rank measured (5.4 on 16 images). Neither is collapse, and neither may be flagged."""
    from training.backbones import build_backbone
    from training.data.images import ShapesImages, stack
    from training.evaluation.features import extract
    from training.transforms import eval_transform

    torch.manual_seed(0)
    images, _ = stack(ShapesImages("test", 32, eval_transform(size), canvas=size))
    stats = collapse_stats(extract(build_backbone(backbone, size), images))
    assert collapse_warning(stats) is None, stats


def test_torchrun_two_cpu_processes_train_simclr_on_shards(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """DDP over gloo on webdataset shards: both ranks step, each reads its own shards with its own worker, rank 0
    checkpoints every rank's stream position."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.training.shard_data import write_shards

    urls = write_shards(tmp_path / "shards", shards=4, per_shard=16, corrupt=None, labels=True)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "simclr", "--data", urls, "--out", str(out), "--steps", "2", "--batch-size", "8",
           "--image-size", "16", "--hidden-dim", "32", "--workers", "1", "--eval-every", "2", "--no-progress",
           "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 2 and state["method"] == "simclr"
    streams = state["streams"]
    assert [s["world_size"] for s in streams] == [2, 2]
    assert all(s["taken"]["0"] >= 16 for s in streams)  # two batches of 8 from each rank's own worker


def test_swav_local_crops_fit_a_vit_patch_grid() -> None:
    """Small crops of a ViT's multi-crop must be whole patches (32 px global, patch 8 -> 16 px local)."""
    method = ssl_class("swav")(tiny_config("swav", backbone="vit-micro", image_size=32, patch_size=8))
    views = fixed_batch(method, n=4)
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]
    assert torch.isfinite(method(views))


def test_throughput_benchmark_counts_every_view() -> None:
    """The GPU throughput script runs on the CPU path; its FLOP count sees SimCLR's two views (and two
    backward passes' worth of work) against one view for the supervised step. Speed is not asserted."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ssl_throughput.py"
    spec = importlib.util.spec_from_file_location("ssl_throughput", path)
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    rows = bench.measure(bench.parse_args(["--methods", "simclr", "mae", "--batch-size", "8", "--image-size", "16",
                                           "--steps", "1", "--warmup", "0", "--device", "cpu"]))
    by = {(r["method"], r["backbone"]): r for r in rows}
    assert set(by) == {("supervised", "resnet-micro"), ("simclr", "resnet-micro"), ("supervised", "vit-micro"),
                       ("mae", "vit-micro")}
    assert by["simclr", "resnet-micro"]["gflop_per_step"] > 1.9 * by["supervised", "resnet-micro"]["gflop_per_step"]
    # MAE's encoder sees a quarter of the patches: cheaper than a supervised step despite its decoder.
    assert by["mae", "vit-micro"]["gflop_per_step"] < by["supervised", "vit-micro"]["gflop_per_step"]
    assert all(r["images_per_s"] > 0 and r["of_peak"] is None for r in rows)


@pytest.mark.parametrize("name", ["simclr", "mae"])
def test_online_probe_learns_from_detached_features(name: str) -> None:
    """The probe's loss reaches no encoder weight: the backbone's gradients are the same with and without
    labels, while the probe itself gets gradients."""
    torch.manual_seed(0)
    method = ssl_class(name)(tiny_config(name))
    assert method.probe is not None and method.probe_classes == 56
    batch = fixed_batch(method, n=8)
    labels = torch.arange(8) % 56

    def backbone_grads(with_labels: bool) -> list[torch.Tensor]:
        method.zero_grad()
        torch.manual_seed(1)  # the same masks for MAE
        (method(batch, labels) if with_labels else method(batch)).backward()
        return [p.grad.clone() for p in method.backbone.parameters() if p.grad is not None]

    without, with_probe = backbone_grads(False), backbone_grads(True)
    assert without and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(without, with_probe))
    assert method.probe[1].weight.grad is not None and method.probe[1].weight.grad.abs().sum() > 0
    assert method.after_step(1, 10)["probe_loss"] > 0


class Collapsed(torch.nn.Module):
    """An encoder that has collapsed: every image gets the same embedding (plus float noise)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 1e-6 + 1.0


def test_the_collapse_check_flags_a_collapsed_encoder_and_passes_a_healthy_one(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    torch.manual_seed(0)
    method = ssl_class("simclr")(tiny_config("simclr", image_size=32))
    with caplog.at_level(logging.WARNING, logger="tandem.ssl"):
        healthy = method.evaluate("val")
    assert not [r for r in caplog.records if "collapsed" in r.getMessage()], healthy
    method.backbone.net = Collapsed(method.backbone.net)
    with caplog.at_level(logging.WARNING, logger="tandem.ssl"):
        collapsed = method.evaluate("val")
    assert any("embeddings look collapsed" in r.getMessage() for r in caplog.records), collapsed
    assert collapsed["embedding_std"] < 0.03 * healthy["embedding_std"]
