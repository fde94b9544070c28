"""CLIP training: the loss falls, checkpoints resume, the temperature is clamped,
and torchrun with two CPU processes (gloo) trains on the global batch."""

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
from training.distributed import Dist
from training.methods.clip import MAX_LOGIT_SCALE, Clip, ClipConfig
from training.trainer import TrainConfig, Trainer, warmup_cosine

TINY = str(CONFIGS / "tiny-vit.json")


def tiny_method(**kw: object) -> Clip:
    cfg = dict(model=TINY, train_size=256, val_size=64, test_size=64)
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


def test_train_checkpoint_resume_and_evaluate(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = TrainConfig(out=str(out), steps=6, batch_size=32, eval_every=3, checkpoint_every=3, progress=False)
    torch.manual_seed(0)
    metrics = Trainer(tiny_method(), cfg, Dist()).fit()
    assert set(metrics) >= {"zero_shot_top1_seen", "zero_shot_top1_held_out", "shape_accuracy"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert (out / "checkpoints" / "step_0000006.pt").is_file()
    assert (out / "curves.png").stat().st_size > 1000
    assert list((out / "tensorboard").iterdir())
    first = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert first["step"] == 6 and first["model_name"] == "tiny-vit"

    # Asking for more steps in the same folder resumes at step 6, not 0.
    resumed = Trainer(tiny_method(), TrainConfig(**{**cfg.__dict__, "steps": 9}), Dist())
    assert resumed.maybe_resume() and resumed.step == 6
    resumed.fit()
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert state["step"] == 9
    assert any(not torch.equal(state["state_dict"][k], first["state_dict"][k]) for k in first["state_dict"])


def test_folder_of_images_with_csv_captions(tmp_path: Path) -> None:
    from training.data import procedural

    rows = ["image,caption"]
    for i, (img, spec) in enumerate(procedural.ShapesDataset("train", 40)):
        img.save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{spec.caption(procedural.CAPTION_TEMPLATES[0])}")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    method = tiny_method(data=str(tmp_path))
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=16, progress=False)
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
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert state["step"] == 3
    assert "zero_shot_top1_seen" in json.loads((out / "metrics.json").read_text())
