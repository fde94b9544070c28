"""The shared training loop: AdamW with warm-up + cosine, bf16 autocast on GPU,
DDP under torchrun, checkpoint/resume, TensorBoard, a progress bar and
periodic evaluation. A *method* (training/methods/) supplies the model, the
loss and the evaluation; the loop is the same for all of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .distributed import Dist

log = logging.getLogger("tandem.train")


@dataclass
class TrainConfig:
    out: str = "runs/clip"
    steps: int = 1000
    batch_size: int = 256  # per process
    lr: float = 4e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    eval_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0
    workers: int = 0
    resume: bool = True  # pick up out/checkpoints/latest.pt if present
    progress: bool = True
    optimizer: str = "adamw"  # adamw | lars | sgd


class Method(Protocol):
    """What a training method gives the loop."""

    model: torch.nn.Module

    def dataset(self) -> torch.utils.data.Dataset: ...

    def collate(self, items: list[Any]) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor: ...

    def after_step(self, step: int, total: int) -> dict[str, float]: ...

    def evaluate(self, split: str) -> dict[str, float]: ...

    def checkpoint_meta(self) -> dict[str, Any]: ...


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Gains, biases, embeddings and the temperature are not weight-decayed (as open_clip)."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name or "embedding" in name


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default), LARS or SGD with momentum; no weight decay on gains, biases and embeddings."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": config.weight_decay},
        {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    if config.optimizer == "lars":
        from .optim import LARS

        return LARS(groups, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
    raise ValueError(f"optimizer must be adamw, lars or sgd, not {config.optimizer!r}")


def warmup_cosine(warmup: int, total: int):  # type: ignore[no-untyped-def]
    """LR multiplier: linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    def __init__(self, method: Method, config: TrainConfig, dist: Dist):
        self.method, self.config, self.dist = method, config, dist
        self.out = Path(config.out)
        self.ckpt_dir = self.out / "checkpoints"
        model = method.model.to(dist.device)
        if dist.enabled and dist.device.type == "cuda" and getattr(method, "sync_batchnorm", False):
            # SyncBatchNorm is CUDA-only; CPU (gloo) processes keep per-process BatchNorm statistics.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = DistributedDataParallel(model) if dist.enabled else model
        self.optimizer = make_optimizer(method.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(config.warmup_steps, config.steps)
        )
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.autocast = dist.device.type == "cuda"  # bf16 on GPU; fp32 on CPU

    # -- checkpoints -----------------------------------------------------------
    def save(self) -> Path:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "state_dict": self.method.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "train_config": asdict(self.config),
            "history": self.history,
            **self.method.checkpoint_meta(),
        }
        path = self.ckpt_dir / f"step_{self.step:07d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint
        latest = self.ckpt_dir / "latest.pt"
        tmp_latest = latest.with_suffix(".tmp")
        tmp_latest.unlink(missing_ok=True)
        os.link(path, tmp_latest)
        os.replace(tmp_latest, latest)
        return path

    def maybe_resume(self) -> bool:
        latest = self.ckpt_dir / "latest.pt"
        if not (self.config.resume and latest.is_file()):
            return False
        state = torch.load(latest, map_location="cpu", weights_only=False)
        self.method.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state.get("history", [])
        if self.dist.is_main:
            log.info("resumed from %s at step %d", latest, self.step)
        return True

    # -- loop ------------------------------------------------------------------
    def _batches(self, loader: DataLoader, sampler: Any) -> Iterator[Any]:
        epoch = 0
        while True:
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    def fit(self) -> dict[str, float]:
        cfg, dist = self.config, self.dist
        torch.manual_seed(cfg.seed + dist.rank)
        self.maybe_resume()
        dataset = self.method.dataset()
        g = torch.Generator().manual_seed(cfg.seed + self.step)
        sampler = (DistributedSampler(dataset, dist.world_size, dist.rank, seed=cfg.seed + self.step, drop_last=True)
                   if dist.enabled else RandomSampler(dataset, generator=g))
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.workers, collate_fn=self.method.collate,
                            persistent_workers=cfg.workers > 0)
        if len(loader) == 0:
            raise ValueError(f"{len(dataset)} training pairs are fewer than one batch of {cfg.batch_size}")
        writer = SummaryWriter(str(self.out / "tensorboard")) if dist.is_main else None
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not (dist.is_main and cfg.progress),
                   dynamic_ncols=True)
        batches = self._batches(loader, sampler)
        t_last, n_last = time.perf_counter(), 0
        self.model.train()
        while self.step < cfg.steps:
            batch = next(batches)
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.method.loss(self.model, batch, dist.device)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {self.step}; lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if hasattr(self.method, "after_backward"):
                self.method.after_backward(self.step)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            extra = self.method.after_step(self.step, cfg.steps)
            n_last += cfg.batch_size * dist.world_size
            bar.update(1)
            if dist.is_main and (self.step % 10 == 0 or self.step == cfg.steps):
                now = time.perf_counter()
                row = {"step": self.step, "loss": loss.item(), "lr": self.scheduler.get_last_lr()[0],
                       "samples_per_s": n_last / (now - t_last), **extra}
                t_last, n_last = now, 0
                bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: f"{v:.3g}" for k, v in extra.items()})
                self._log(writer, row)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._evaluate("val", writer)
            if (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps) and dist.is_main:
                self.save()
        bar.close()
        final = self._evaluate("test", writer) if dist.is_main else {}
        if writer:
            writer.close()
        if dist.is_main:
            (self.out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
            plot_curves(self.history, self.out / "curves.png")
        return final

    def _evaluate(self, split: str, writer: SummaryWriter | None) -> dict[str, float]:
        if not self.dist.is_main:
            return {}
        self.model.eval()
        metrics = self.method.evaluate(split)
        self.model.train()
        if metrics:
            row = {"step": self.step, **{f"{split}/{k}": v for k, v in metrics.items()}}
            self._log(writer, row)
            tqdm.write(f"step {self.step} {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _log(self, writer: SummaryWriter | None, row: dict[str, float]) -> None:
        self.history.append(row)
        if writer:
            for k, v in row.items():
                if k != "step":
                    writer.add_scalar(k, v, row["step"])


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Training scalars (one panel each) and validation metrics (one panel, a line each) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = {k for row in history for k in row}
    train_keys = sorted(k for k in keys if "/" not in k and k not in ("step", "lr", "samples_per_s"))
    val_keys = sorted(k for k in keys if k.startswith("val/"))
    panels: list[list[str]] = [[k] for k in train_keys] + ([val_keys] if val_keys else [])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, group in zip(axes[0], panels):
        for key in group:
            pts = [(r["step"], r[key]) for r in history if key in r]
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, label=key.removeprefix("val/"))
        ax.set_title(group[0] if len(group) == 1 else "validation")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(group) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
