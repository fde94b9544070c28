"""The shared training loop: AdamW/LARS/SGD with warm-up + cosine, bf16 autocast on GPU,
DDP under torchrun, crash-safe checkpoints and resume (mid-epoch for webdataset
shards), TensorBoard, a progress bar and periodic evaluation. A *method*
(training/methods/) supplies the model, the data, the loss and the evaluation;
the loop is the same for all of them.

Under torchrun every rank stops together: a NaN/inf loss on any rank is agreed
through an all-reduce before the backward pass, and rank 0's evaluation and
checkpointing end in an all-reduce that tells the other ranks whether it
failed; the process group's timeout (--dist-timeout-min) bounds every wait.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from . import checkpoints
from .config import TrainConfig
from .data.shards import Shards, StreamState
from .distributed import Dist

log = logging.getLogger("tandem.train")


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


class Batches:
    """The collate of a DataLoader: the method's collate over the items that decoded, plus what the
    stream says about them: {"skipped": corrupt samples left out} and, for webdataset shards, the
    Position of the worker that made the batch."""

    def __init__(self, collate: Any, tagged: bool):
        self.collate, self.tagged = collate, tagged

    def __call__(self, items: list[Any]) -> tuple[Any, dict[str, Any]]:
        if self.tagged:  # (item, Position) from Shards
            last = items[-1][1]
            return self.collate([item for item, _ in items]), {
                "skipped": sum(pos.skipped for _, pos in items), "position": last}
        good = [item for item in items if item is not None]
        if not good:
            return None, {"skipped": len(items)}
        return self.collate(good), {"skipped": len(items) - len(good)}


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
        self.stream = StreamState()  # this rank's place in webdataset shards
        self.skipped = 0  # corrupt samples this rank skipped
        self.autocast = dist.device.type == "cuda"  # bf16 on GPU; fp32 on CPU

    # -- checkpoints -----------------------------------------------------------
    def save(self, streams: list[dict[str, Any]]) -> Path:
        """Write step_N.pt and point latest.pt at it (training/checkpoints.py); rank 0 only.
        `streams`: every rank's StreamState, so each resumes its own shards where it stopped."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "state_dict": self.method.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "train_config": asdict(self.config),
            "history": self.history,
            "streams": streams,
            **self.method.checkpoint_meta(),
        }
        path = self.ckpt_dir / f"step_{self.step:07d}.pt"
        checkpoints.atomic_save(state, path)
        checkpoints.point_latest(path)
        checkpoints.prune(self.ckpt_dir, self.config.keep_checkpoints)
        return path

    def maybe_resume(self) -> bool:
        latest = self.ckpt_dir / checkpoints.LATEST
        if not (self.config.resume and latest.is_file()):
            return False
        state = checkpoints.load(latest)
        self.method.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state.get("history", [])
        streams = state.get("streams") or []
        if self.dist.rank < len(streams):
            self.stream = StreamState.from_dict(streams[self.dist.rank])
            self.skipped = self.stream.skipped
        if self.dist.is_main:
            log.info("resumed from %s at step %d", latest, self.step)
        return True

    # -- data ------------------------------------------------------------------
    def _loader(self, dataset: Any) -> tuple[DataLoader, Any]:
        cfg, dist = self.config, self.dist
        if isinstance(dataset, Shards):
            if len(dataset.shards) < dist.world_size:
                raise ValueError(f"{dataset.urls}: {len(dataset.shards)} shards for {dist.world_size} processes; "
                                 "each process needs at least one shard")
            if len(dataset.shards) < dist.world_size * max(1, cfg.workers) and dist.is_main:
                log.warning("%d shards for %d processes x %d workers: some workers read nothing",
                            len(dataset.shards), dist.world_size, cfg.workers)
            return DataLoader(dataset, batch_size=cfg.batch_size, drop_last=True, num_workers=cfg.workers,
                              collate_fn=Batches(self.method.collate, tagged=True)), None
        g = torch.Generator().manual_seed(cfg.seed + self.step)
        sampler = (DistributedSampler(dataset, dist.world_size, dist.rank, seed=cfg.seed + self.step, drop_last=True)
                   if dist.enabled else RandomSampler(dataset, generator=g))
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                            num_workers=cfg.workers, collate_fn=Batches(self.method.collate, tagged=False),
                            persistent_workers=cfg.workers > 0)
        if len(loader) == 0:
            raise ValueError(f"{len(dataset)} training items are fewer than one batch of {cfg.batch_size}")
        return loader, sampler

    def _batches(self, loader: DataLoader, sampler: Any) -> Iterator[Any]:
        """Batches without end, epoch after epoch; counts skipped samples and tracks the shard stream."""
        dataset, epoch = loader.dataset, 0
        streaming = isinstance(dataset, Shards)
        if streaming:
            epoch = self.stream.epoch
            same = (self.stream.workers, self.stream.world_size) == (self.config.workers, self.dist.world_size)
            if self.stream.taken and not same:
                log.warning("rank %d: the checkpoint's data position was for %d processes x %d workers; restarting "
                            "epoch %d of the shards from its beginning", self.dist.rank, self.stream.world_size,
                            self.stream.workers, epoch)
            dataset.resume_taken = dict(self.stream.taken) if same else {}
        while True:
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
            if streaming:
                dataset.epoch = epoch
                self.stream = StreamState(epoch, dict(dataset.resume_taken), self.config.workers,
                                          self.dist.world_size, self.skipped)
            count = 0
            for batch, info in loader:
                self.skipped += info["skipped"]
                if streaming:
                    pos = info["position"]
                    self.stream.taken[pos.worker] = pos.taken
                    self.stream.skipped = self.skipped
                if batch is not None:
                    count += 1
                    yield batch
            if streaming:
                dataset.resume_taken = {}
                if count == 0:
                    raise ValueError(f"rank {self.dist.rank} read no full batch of {self.config.batch_size} from "
                                     f"its shards of {dataset.urls} in epoch {epoch}")
            epoch += 1

    # -- collectives -----------------------------------------------------------
    def _agree(self, failed: bool) -> bool:
        """True when this or any other rank failed: one all-reduce, so every rank stops together."""
        if not self.dist.enabled:
            return failed
        flag = torch.tensor([1.0 if failed else 0.0], device=self.dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _on_main(self, what: str, fn: Any) -> Any:
        """Run fn() on rank 0 only. The other ranks wait in one all-reduce (bounded by the process group
        timeout) that also tells them whether rank 0 failed, so none is left blocked in a later collective."""
        result, error = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except Exception as e:  # re-raised below, after the other ranks know
                error = e
        if self._agree(error is not None):
            if error is not None:
                raise error
            raise RuntimeError(f"rank 0 failed while {what}; rank {self.dist.rank} stops too (see rank 0's error)")
        return result

    def _gather_streams(self) -> list[dict[str, Any]]:
        state = self.stream.to_dict()
        if not self.dist.enabled:
            return [state]
        out: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(out, state)
        return out

    # -- loop ------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        cfg, dist = self.config, self.dist
        torch.manual_seed(cfg.seed + dist.rank)
        self.maybe_resume()
        loader, sampler = self._loader(self.method.dataset())
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
            # Every rank learns whether any rank's loss is NaN/inf before the backward pass (a collective
            # under DDP), so all stop together instead of some waiting for the one that stopped.
            if self._agree(not bool(torch.isfinite(loss.detach()))):
                raise FloatingPointError(f"the loss became non-finite at step {self.step} (rank {dist.rank}: "
                                         f"{loss.item()}); lower --lr or check the data")
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
                       "samples_per_s": n_last / (now - t_last), **{k: float(v) for k, v in extra.items()}}
                if self.skipped:
                    row["skipped_samples"] = float(self.skipped)
                t_last, n_last = now, 0
                bar.set_postfix(loss=f"{row['loss']:.3f}", **{k: f"{v:.3g}" for k, v in row.items()
                                                              if k not in ("step", "loss", "lr", "samples_per_s")})
                self._log(writer, row)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._on_main("evaluating", lambda: self._evaluate("val", writer))
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                streams = self._gather_streams()
                skipped = sum(s["skipped"] for s in streams)
                path = self._on_main("saving a checkpoint", partial(self.save, streams))
                if dist.is_main:
                    log.info("step %d: wrote %s%s", self.step, path,
                             f"; {skipped} corrupt samples skipped so far" if skipped else "")
        bar.close()
        final = self._on_main("evaluating on the test split", lambda: self._finish(writer)) or {}
        return final

    def _finish(self, writer: SummaryWriter | None) -> dict[str, float]:
        final = self._evaluate("test", writer)
        if writer:
            writer.close()
        (self.out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        plot_curves(self.history, self.out / "curves.png")
        return final

    def _evaluate(self, split: str, writer: SummaryWriter | None) -> dict[str, float]:
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
