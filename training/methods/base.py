"""What every self-supervised visual method shares: backbone, data, views, evaluation, checkpoints.

A method subclasses SSLMethod, builds its heads in __init__ and defines
``ssl_loss(views) -> (loss, features of the first view)``, plus ``after_step``
for momentum updates where it has them. The trainer calls ``forward(views,
labels)`` through DDP (so gradients are synchronised): the method's loss plus,
where the data has labels, the cross-entropy of an online linear probe on the
*detached* backbone features (solo-learn's monitor: it learns alongside and
never changes the encoder).

Every default is in the method's config class (training/config.py).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import build_backbone
from training.config import METHODS, SSLConfig
from training.data import procedural
from training.data.images import FolderImages, ShapesImages, folder_classes, stack
from training.data.shards import ShardImages, is_shards
from training.distributed import Dist
from training.evaluation.collapse import collapse_stats, collapse_warning
from training.evaluation.features import extract
from training.evaluation.knn import knn_accuracy
from training.optim import cosine_schedule, frozen_copy, update_momentum
from training.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, recipe

log = logging.getLogger("tandem.ssl")


def data_classes(data: str) -> int:
    """Labels the training data carries (for the online probe): 56 for shapes, an ImageFolder's classes, else 0."""
    if data == "shapes":
        return len(procedural.class_labels())
    if is_shards(data):
        return 0
    return len(folder_classes(Path(data))) if Path(data).is_dir() else 0


class SSLMethod(nn.Module):
    name = "ssl"
    recipe = "simclr"
    sync_batchnorm = True  # convert BatchNorm to SyncBatchNorm under DDP
    needs_vit = False  # True where the method only works on a ViT backbone (MAE)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.name in METHODS:  # (optimiser, lr at batch 128, weight decay), read from the method's config
            config = METHODS[cls.name]
            optimizer = config.__dataclass_fields__["optimizer"].default
            cls.default_optimizer = (optimizer, *config.OPTIMIZERS[optimizer])

    def __init__(self, config: SSLConfig, dist: Dist | None = None, probe_classes: int | None = None):
        """`probe_classes`: classes of the online linear probe (None: as many as the data has labels; 0: none).
        A plain SSLConfig becomes the method's own config class, its other settings at their defaults."""
        super().__init__()
        if type(config) is not METHODS[self.name]:
            config = METHODS[self.name].from_dict({**asdict(config), "method": self.name})  # type: ignore[assignment]
        self.config, self.dist = config, dist or Dist()
        self.backbone = build_backbone(config.backbone, config.image_size, config.patch_size)
        self._eval: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = {}
        self._progress = (0, 1)
        self.probe_classes = data_classes(config.data) if probe_classes is None else probe_classes
        # BatchNorm without affine standardises the features, so one probe lr suits every optimiser.
        self.probe = (nn.Sequential(nn.BatchNorm1d(self.backbone.dim, affine=False),
                                    nn.Linear(self.backbone.dim, self.probe_classes))
                      if self.probe_classes else None)
        self.last_probe_loss: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        return self

    # -- step ------------------------------------------------------------------
    def ssl_loss(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the method's loss, backbone features [B, dim] of views[0] or None)."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        loss, features = self.ssl_loss(views)
        if self.probe is None or labels is None:
            return loss
        if features is None:
            with torch.no_grad():
                features = self.backbone(views[0])
        # Unlabelled images (-1) are ignored; a batch without any label adds 0, not NaN.
        logits = self.probe(features.detach().float())
        known = labels >= 0
        probe_loss = (F.cross_entropy(logits[known], labels[known]) if bool(known.any())
                      else logits.sum() * 0.0)
        self.last_probe_loss = probe_loss.detach()
        return loss + probe_loss

    # -- data ------------------------------------------------------------------
    def views(self) -> Any:
        return recipe(self.recipe, self.config.image_size, self.config.min_crop_scale)

    def dataset(self) -> torch.utils.data.Dataset:
        c = self.config
        if c.data == "shapes":
            return ShapesImages("train", c.train_size, self.views(), c.seed, progress=self.dist.is_main)
        if is_shards(c.data):
            return ShardImages(c.data, self.views(), seed=c.seed)
        return FolderImages(Path(c.data), self.views())

    @staticmethod
    def collate(items: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        views = [torch.stack([item[0][v] for item in items]) for v in range(len(items[0][0]))]
        return views, torch.tensor([item[1] for item in items])

    def loss(self, model: nn.Module, batch: tuple[list[torch.Tensor], torch.Tensor], device: torch.device
             ) -> torch.Tensor:
        labels = batch[1].to(device, non_blocking=True) if batch[1] is not None else None
        return model([v.to(device, non_blocking=True) for v in batch[0]], labels)

    def after_step(self, step: int = 0, total: int = 1) -> dict[str, Any]:
        """Scalars to log (floats or 0-d tensors: the trainer reads them only when it logs)."""
        self._progress = (step, total)
        return {} if self.last_probe_loss is None else {"probe_loss": self.last_probe_loss}

    # -- export ----------------------------------------------------------------
    def projector_module(self) -> nn.Module | None:
        """The head whose output may be exported after the backbone (None: backbone only)."""
        return getattr(self, "projector", None)

    def encoder(self, with_projector: bool = False) -> nn.Module:
        """image [B, 3, S, S] -> embedding [B, d]: the backbone, optionally followed by the projector."""
        head = self.projector_module() if with_projector else None
        if with_projector and head is None:
            raise ValueError(f"{self.name} has no projector to export")
        return nn.Sequential(self.backbone, head) if head is not None else self.backbone

    def preprocessing(self) -> dict[str, Any]:
        return {"size": self.config.image_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                "resize_mode": "shortest", "interpolation": "bicubic"}

    # -- evaluation ------------------------------------------------------------
    def _labelled(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(images, labels, second labels) of "bank", "val" or "test"; for shapes the second labels are the shape.

        Shapes: the bank is drawn from the training split, val and test from their own splits. An
        ImageFolder is cut 80/10/10 (by seed) into bank, val and test; other data has no labels (None).
        """
        if split not in self._eval:
            self._eval[split] = self._load_labelled(split)
        return self._eval[split]

    def _load_labelled(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        c = self.config
        transform = eval_transform(c.image_size)
        if c.data == "shapes":
            n = {"bank": c.eval_bank_size, "val": c.val_size, "test": c.test_size}[split]
            shapes = ShapesImages("train" if split == "bank" else split, n, transform, c.seed)
            x, y = stack(shapes)
            return x, y, shapes.shapes
        if not self.probe_classes and not (Path(c.data).is_dir() and folder_classes(Path(c.data))):
            return None
        folder = FolderImages(Path(c.data), transform)
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(c.seed))
        cut, cut2 = int(0.8 * len(order)), int(0.9 * len(order))
        part = {"bank": order[:cut][: c.eval_bank_size], "val": order[cut:cut2][: c.val_size],
                "test": order[cut2:][: c.test_size]}[split]
        x, y = stack(torch.utils.data.Subset(folder, part.tolist()))
        return x, y, y

    def evaluate(self, split: str) -> dict[str, float]:
        """kNN top-1 (bank: labelled training images; queries: `split`), the online linear probe's top-1,
        and collapse statistics.

        On shapes, `knn_top1` and `online_linear_top1` score the 56
        size-colour-shape classes and `knn_shape_top1` the 4 shapes: colour
        jitter and random crops teach invariance to colour and size, so the
        shape is the label these methods are built to recover.
        """
        bank, queries = self._labelled("bank"), self._labelled(split)
        if bank is None or queries is None or not len(queries[0]) or not len(bank[0]):
            return {}
        device = self.dist.device
        train_x = F.normalize(extract(self.backbone, bank[0], device=device, normalize=False), dim=1)
        raw = extract(self.backbone, queries[0], device=device, normalize=False)
        test_x = F.normalize(raw, dim=1)
        stats = collapse_stats(test_x)
        warning = collapse_warning(stats)
        if warning:
            log.warning("%s at step %d: %s", self.name, self._progress[0], warning)
        out = {"knn_top1": knn_accuracy(train_x, bank[1], test_x, queries[1])}
        if self.config.data == "shapes":
            out["knn_shape_top1"] = knn_accuracy(train_x, bank[2], test_x, queries[2])
        if self.probe is not None:
            out["online_linear_top1"] = self.probe_accuracy(raw, queries[1])
        return {**out, "embedding_std": stats["std"], "effective_rank": stats["effective_rank"]}

    @torch.no_grad()
    def probe_accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 of the online probe on backbone features [n, dim] (unnormalised, as it trains on them)."""
        assert self.probe is not None
        was_training = self.probe.training
        self.probe.eval()
        device = next(self.probe.parameters()).device
        pred = torch.cat([self.probe(features[i : i + 1024].to(device)).argmax(1).cpu()
                          for i in range(0, len(features), 1024)])
        self.probe.train(was_training)
        return float((pred == labels).float().mean())

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"method": self.name, "ssl_config": asdict(self.config), "model_name": self.config.backbone,
                "probe_classes": self.probe_classes}


class MomentumMethod(SSLMethod):
    """A method with a target network: an EMA of the online backbone and projector.

    The momentum is `config.momentum` throughout (MoCo v2), or rises from it to 1
    along a cosine over the run when `momentum_to_one` is set (BYOL, MoCo v3).
    """

    momentum_to_one = True

    def make_targets(self) -> None:
        """Call after the online projector exists."""
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)  # type: ignore[has-type]
        self.m = self.config.momentum

    def targets(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.target_projector(self.target_backbone(v)) for v in views]

    def after_step(self, step: int = 0, total: int = 1) -> dict[str, Any]:
        extra = super().after_step(step, total)
        if self.momentum_to_one:
            self.m = cosine_schedule(step, total, self.config.momentum, 1.0)
        update_momentum(self.backbone, self.target_backbone, self.m)
        update_momentum(self.projector, self.target_projector, self.m)  # type: ignore[has-type]
        return {**extra, "momentum": self.m}
