"""CLIP training: the loss falls, a short run learns zero-shot colour, checkpoints resume, the temperature
is clamped, and torchrun with two CPU processes (gloo) trains on the global batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, ROOT
from training.config import TrainConfig
from training.distributed import Dist
from training.methods.clip import MAX_LOGIT_SCALE, Clip, ClipConfig
from training.trainer import Trainer, warmup_cosine

TINY = str(CONFIGS / "tiny-vit.json")


def tiny_method(**kw: object) -> Clip:
    cfg = dict(model=TINY, train_size=256, val_size=64, test_size=64, batch_size=32)
    cfg.update(kw)
    return Clip(ClipConfig(**cfg), Dist())  # type: ignore[arg-type]


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    method = tiny_method(train_size=32)
    data = method.dataset()
    images, ids = method.collate([data[i] for i in range(32)])
    opt = torch.optim.AdamW(method.model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = method.loss(method.model, (images, ids), torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_logit_scale_is_clamped_to_100() -> None:
    method = tiny_method()
    with torch.no_grad():
        method.model.logit_scale.fill_(10.0)
    assert method.after_step()["logit_scale"] == pytest.approx(100.0, rel=1e-6)
    assert method.model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


def test_warmup_then_cosine_schedule() -> None:
    f = warmup_cosine(10, 110)
    assert f(0) == 0.1 and f(9) == 1.0
    assert f(60) == 0.5 * (1 + math.cos(math.pi * 0.5))
    assert f(110) == 0.0


# How much a short run (250 steps of batch 32, lr 4e-3, warm-up 5) must raise zero-shot colour accuracy (the
# share of test images whose best-scoring label of the 56 names the right colour; chance 1/7) over the same
# network at its initial weights. Measured on the 256 test images, tiny-vit, seeds 0-9:
#   initial weights            0.086-0.203: a random model's few favourite labels cover some colours by luck,
#                              so two untrained networks differ by up to 0.117
#   a trainer that learns      lr 0: +0.000; every caption shifted onto the next pair's image: -0.051 to +0.004
#   nothing (200 steps)        (seeds 0, 4, 8)
#   trained                    +0.184 to +0.898 (accuracy 0.309-0.992); 8 of 10 seeds gain more than 0.35
# 0.15 is above the widest gap between two untrained networks and below the smallest gain from training.
ZERO_SHOT_COLOUR_GAIN = 0.15


def test_training_learns_zero_shot_colour_then_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    torch.manual_seed(0)
    method = tiny_method(train_size=1024, test_size=256, steps=250, warmup_steps=5)
    cfg = TrainConfig.for_run(method.config, out=str(out), eval_every=125, checkpoint_every=125, progress=False)
    method.model.eval()
    untrained = method.evaluate("test")
    metrics = Trainer(method, cfg, Dist()).fit()
    assert set(metrics) >= {"zero_shot_top1_seen", "zero_shot_top1_held_out", "shape_accuracy"}
    assert metrics["colour_accuracy"] > untrained["colour_accuracy"] + ZERO_SHOT_COLOUR_GAIN, (untrained, metrics)
    assert (out / "checkpoints" / "step_0000250.pt").is_file()
    assert (out / "curves.png").stat().st_size > 1000
    assert list((out / "tensorboard").iterdir())
    first = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)  # tensors and plain data only
    assert first["step"] == 250 and first["model_name"] == "tiny-vit"

    # Asking for more steps in the same folder resumes at step 250, not 0.
    resumed = Trainer(tiny_method(train_size=1024, test_size=256), TrainConfig(**{**cfg.__dict__, "steps": 253}),
                      Dist())
    assert resumed.maybe_resume() and resumed.step == 250
    resumed.fit()
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 253
    assert any(not torch.equal(state["state_dict"][k], first["state_dict"][k]) for k in first["state_dict"])


def test_folder_of_images_with_csv_captions(tmp_path: Path) -> None:
    from training.data import procedural

    rows = ["image,caption"]
    for i, (img, spec) in enumerate(procedural.ShapesDataset("train", 40)):
        img.save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{spec.caption(procedural.CAPTION_TEMPLATES[0])}")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    method = tiny_method(data=str(tmp_path), steps=2, batch_size=16)
    cfg = TrainConfig.for_run(method.config, out=str(tmp_path / "run"), progress=False)
    assert Trainer(method, cfg, Dist()).fit() == {}  # no zero-shot eval for free-form data
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").is_file()


def test_torchrun_two_cpu_processes_gather_the_global_batch(tmp_path: Path) -> None:
    """DDP over gloo: both ranks step together and rank 0 writes one checkpoint."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "clip", "--model", TINY, "--out", str(out), "--steps", "3",
           "--batch-size", "16", "--train-size", "128", "--val-size", "32", "--test-size", "32",
           "--eval-every", "3", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 3
    assert "zero_shot_top1_seen" in json.loads((out / "metrics.json").read_text())
