"""What every self-supervised visual method shares: backbone, data, views, evaluation, checkpoints.

A method subclasses SSLMethod, builds its heads in __init__ and defines
``forward(views) -> loss`` (the trainer calls it through DDP, so gradients are
synchronised), plus ``after_step`` for momentum updates where it has them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.backbones import build_backbone
from training.data.images import FolderImages, ShapesImages, stack
from training.distributed import Dist
from training.evaluation.collapse import collapse_stats, collapse_warning
from training.evaluation.features import extract
from training.evaluation.knn import knn_accuracy
from training.optim import cosine_schedule, frozen_copy, update_momentum
from training.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, recipe

log = logging.getLogger("tandem.ssl")


@dataclass
class SSLConfig:
    method: str = "simclr"
    backbone: str = "resnet18-small"
    image_size: int = 32
    patch_size: int | None = None  # ViTs: default image_size // 8
    data: str = "shapes"  # "shapes", an ImageFolder, or a flat folder of images
    train_size: int = 10_000  # procedural images drawn for training
    eval_bank_size: int = 2_000  # labelled images whose features the kNN monitor searches
    eval_size: int = 1_000  # labelled queries (val during training, test at the end)
    seed: int = 0
    min_crop_scale: float | None = None  # None = the paper's crop scale (0.08 or 0.2)
    hidden_dim: int = 512  # projector/predictor widths (papers: 2048-4096; scaled for small backbones)
    out_dim: int = 128
    temperature: float | None = None  # None = the method's paper default
    momentum: float = 0.99  # EMA base for MoCo/BYOL target networks
    queue_size: int = 4096  # MoCo v2
    prototypes: int = 100  # SwAV
    local_crops: int = 4  # SwAV
    freeze_prototypes_steps: int = 100  # SwAV
    mask_ratio: float = 0.75  # MAE
    decoder_width: int = 64  # MAE
    decoder_depth: int = 2  # MAE


class SSLMethod(nn.Module):
    name = "ssl"
    recipe = "simclr"
    sync_batchnorm = True  # convert BatchNorm to SyncBatchNorm under DDP
    needs_vit = False  # True where the method only works on a ViT backbone (MAE)
    # (optimiser, peak lr at batch 128, weight decay): `tandem train` and the benchmark start from these.
    default_optimizer: tuple[str, float, float] = ("adamw", 2e-3, 1e-4)

    def __init__(self, config: SSLConfig, dist: Dist | None = None):
        super().__init__()
        self.config, self.dist = config, dist or Dist()
        self.backbone = build_backbone(config.backbone, config.image_size, config.patch_size)
        self._eval: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._progress = (0, 1)

    @property
    def model(self) -> nn.Module:
        return self

    def temperature(self, default: float) -> float:
        return self.config.temperature if self.config.temperature is not None else default

    # -- data ------------------------------------------------------------------
    def views(self) -> Any:
        return recipe(self.recipe, self.config.image_size, self.config.min_crop_scale)

    def dataset(self) -> torch.utils.data.Dataset:
        c = self.config
        if c.data == "shapes":
            return ShapesImages("train", c.train_size, self.views(), c.seed, progress=self.dist.is_main)
        return FolderImages(Path(c.data), self.views())

    @staticmethod
    def collate(items: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        views = [torch.stack([item[0][v] for item in items]) for v in range(len(items[0][0]))]
        return views, torch.tensor([item[1] for item in items])

    def loss(self, model: nn.Module, batch: tuple[list[torch.Tensor], torch.Tensor], device: torch.device
             ) -> torch.Tensor:
        return model([v.to(device, non_blocking=True) for v in batch[0]])

    def after_step(self, step: int = 0, total: int = 1) -> dict[str, float]:
        self._progress = (step, total)
        return {}

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
        """(images, labels, second labels) of a labelled split; for shapes the second labels are the shape."""
        c = self.config
        if split in self._eval:
            return self._eval[split]
        transform = eval_transform(c.image_size)
        if c.data == "shapes":
            n = c.eval_bank_size if split == "bank" else c.eval_size
            data_split = "train" if split == "bank" else split
            shapes = ShapesImages(data_split, n, transform, c.seed)
            x, y = stack(shapes)
            self._eval[split] = (x, y, shapes.shapes)
            return self._eval[split]
        else:
            folder = FolderImages(Path(c.data), transform)
            if not folder.classes:
                return None
            x, y = stack(folder, limit=c.eval_bank_size + c.eval_size)
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(c.seed))
            cut = int(0.8 * len(x))
            part = order[:cut] if split == "bank" else order[cut:]
            self._eval[split] = (x[part], y[part], y[part])
        return self._eval[split]

    def evaluate(self, split: str) -> dict[str, float]:
        """kNN top-1 (bank: labelled training images; queries: `split`) and collapse statistics.

        On shapes, `knn_top1` scores the 56 size-colour-shape classes and
        `knn_shape_top1` the 4 shapes: colour jitter and random crops teach
        invariance to colour and size, so the shape is the label these
        methods are built to recover.
        """
        bank, queries = self._labelled("bank"), self._labelled(split)
        if bank is None or queries is None:
            return {}
        device = self.dist.device
        train_x = extract(self.backbone, bank[0], device=device)
        test_x = extract(self.backbone, queries[0], device=device)
        stats = collapse_stats(test_x)
        warning = collapse_warning(stats)
        if warning:
            log.warning("%s at step %d: %s", self.name, self._progress[0], warning)
        out = {"knn_top1": knn_accuracy(train_x, bank[1], test_x, queries[1])}
        if self.config.data == "shapes":
            out["knn_shape_top1"] = knn_accuracy(train_x, bank[2], test_x, queries[2])
        return {**out, "embedding_std": stats["std"], "effective_rank": stats["effective_rank"]}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"method": self.name, "ssl_config": asdict(self.config), "model_name": self.config.backbone}


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

    def after_step(self, step: int = 0, total: int = 1) -> dict[str, float]:
        super().after_step(step, total)
        if self.momentum_to_one:
            self.m = cosine_schedule(step, total, self.config.momentum, 1.0)
        update_momentum(self.backbone, self.target_backbone, self.m)
        update_momentum(self.projector, self.target_projector, self.m)  # type: ignore[has-type]
        return {"momentum": self.m}
