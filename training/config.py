"""Every training default, written once: one typed config per method, plus the loop's settings.

`tandem train METHOD` builds its options from these dataclasses (each
field's default and help text), `tandem train --help` and docs/ssl.md print
:func:`defaults_table` (a test checks the docs agree), and the benchmarks
construct the same classes. A config checks itself when it is built, so an
invalid combination fails with a message before anything trains.

No torch here: the CLI imports this module in the serving install too.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar


def option(default: Any, help: str, **meta: Any) -> Any:
    """A config field that `tandem train` exposes as --NAME with this help text."""
    return field(default=default, metadata={"help": help, **meta})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


OPTIMIZER_HELP = "adamw | sgd | lars: brings its own lr and weight decay (table in `tandem train --help`)"


@dataclass
class RunConfig:
    """What every method shares: the optimiser, the schedule, the data and its splits.

    `OPTIMIZERS` maps each optimiser the method offers to (peak lr, weight
    decay); the lr is for `LR_BATCH` images per step and scales linearly with
    `batch_size` (None: it does not scale). `--lr`/`--weight-decay` override.
    """

    OPTIMIZERS: ClassVar[dict[str, tuple[float, float]]] = {}
    LR_BATCH: ClassVar[int | None] = None
    SUMMARY: ClassVar[str] = ""

    steps: int = option(500, "optimiser steps")
    batch_size: int = option(128, "images (pairs) per step per process")
    optimizer: str = option("adamw", OPTIMIZER_HELP)
    lr: float | None = option(None, "peak learning rate", none="the optimiser's")
    weight_decay: float | None = option(None, "weight decay (not on gains, biases, embeddings)",
                                        none="the optimiser's")
    warmup_steps: int | None = option(None, "linear warm-up steps, then cosine decay to 0",
                                      none="min(50, steps / 10)")
    seed: int = option(0, "seed of the weights, the procedural data and the augmentations")
    data: str = option("shapes", "'shapes' (procedural), a folder, or webdataset shards "
                       "(e.g. 'data/{00000..00099}.tar'); see docs/training.md")
    train_size: int = option(20_000, "procedural training images (--data shapes)")
    val_size: int = option(1_000, "procedural val images: evaluated during training, for choosing settings")
    test_size: int = option(2_000, "procedural test images: evaluated once at the end, for reporting")

    def __post_init__(self) -> None:
        self.check()

    # -- resolved defaults -------------------------------------------------------
    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        lr = self.OPTIMIZERS[self.optimizer][0]
        return lr * self.batch_size / self.LR_BATCH if self.LR_BATCH else lr

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else self.OPTIMIZERS[self.optimizer][1]

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(50, self.steps // 10)

    # -- checks ----------------------------------------------------------------
    def check(self) -> None:
        """Raise ValueError, naming the option, for a value or combination that cannot train."""
        if self.optimizer not in self.OPTIMIZERS:
            raise ValueError(f"{self.name()} offers --optimizer {' or '.join(self.OPTIMIZERS)}, not "
                             f"{self.optimizer!r}")
        positive = ["steps", "batch_size", "train_size", "val_size", "test_size"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0 or (name == "lr" and value == 0)):
                raise ValueError(f"{flag(name)} must be a finite number above 0, got {value}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"--warmup-steps must be between 0 and --steps - 1 ({self.steps - 1}), "
                             f"got {self.warmup_steps}")

    @classmethod
    def name(cls) -> str:
        return next((m for m, c in METHODS.items() if c is cls), cls.__name__)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """A config from a checkpoint's record; fields this version no longer has are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})


# -- self-supervised methods -----------------------------------------------------
SSL_OPTIMIZERS = {"adamw": (2e-3, 1e-4), "sgd": (0.06, 5e-4), "lars": (0.15, 1e-6)}


@dataclass
class SSLConfig(RunConfig):
    """What every self-supervised visual method shares: backbone, resolution, heads, evaluation."""

    OPTIMIZERS: ClassVar[dict[str, tuple[float, float]]] = SSL_OPTIMIZERS
    LR_BATCH: ClassVar[int | None] = 128

    method: str = "ssl"
    backbone: str = option("resnet18-small", "resnet18-small, resnet18, resnet-micro (CPU-sized), vit-micro, "
                           "vit-tiny, vit-small or timm:NAME")
    image_size: int = option(32, "training resolution in pixels")
    patch_size: int | None = option(None, "ViT patch size", none="image_size / 8")
    hidden_dim: int = option(512, "projector/predictor hidden width (papers: 2048-4096)")
    out_dim: int = option(128, "projection width")
    min_crop_scale: float | None = option(None, "lower bound of the random crops' area; raise it when objects "
                                          "are small enough to be cropped away", none="the paper's, 0.08-0.2")
    eval_bank_size: int = option(2_000, "labelled training images the kNN monitor and the online probe's "
                                 "evaluation search")

    def check(self) -> None:
        super().check()
        if self.image_size < 8:
            raise ValueError(f"--image-size must be at least 8 pixels, got {self.image_size}")
        if self.patch_size is not None and (self.patch_size < 1 or self.image_size % self.patch_size):
            raise ValueError(f"--patch-size {self.patch_size} must divide --image-size {self.image_size}")
        if self.min_crop_scale is not None and not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"--min-crop-scale must be in (0, 1], got {self.min_crop_scale}")
        for name in ("hidden_dim", "out_dim", "eval_bank_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be at least 2: the methods compare images within a batch")


def _temperature(default: float, paper: str) -> Any:
    return option(default, f"softmax temperature ({paper})")


def _momentum(help: str) -> Any:
    return option(0.99, help)


def _check_open_unit(config: Any, name: str, low_closed: bool = False) -> None:
    value = getattr(config, name)
    if not (0 <= value < 1 if low_closed else 0 < value < 1):
        raise ValueError(f"{flag(name)} must be in {'[0' if low_closed else '(0'}, 1), got {value}")


@dataclass
class SimCLRConfig(SSLConfig):
    SUMMARY: ClassVar[str] = "SimCLR: two views; the other 2N-2 views of the batch (all ranks) are negatives"
    method: str = "simclr"
    temperature: float = _temperature(0.2, "paper: 0.5 CIFAR, 0.1 ImageNet; 0.2 learned shape faster here")

    def check(self) -> None:
        super().check()
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be above 0, got {self.temperature}")


@dataclass
class MoCoV2Config(SimCLRConfig):
    SUMMARY: ClassVar[str] = "MoCo v2: query vs momentum-encoder key; a queue of past keys as negatives"
    method: str = "moco_v2"
    temperature: float = _temperature(0.2, "paper: 0.2")
    momentum: float = _momentum("EMA momentum of the key encoder (paper: 0.999 for 200 epochs)")
    queue_size: int = option(4096, "negatives queue length (keys of all ranks)")

    def check(self) -> None:
        super().check()
        _check_open_unit(self, "momentum", low_closed=True)
        if self.queue_size < self.batch_size:
            raise ValueError(f"--queue-size {self.queue_size} must hold at least one batch (--batch-size "
                             f"{self.batch_size})")


@dataclass
class MoCoV3Config(SimCLRConfig):
    SUMMARY: ClassVar[str] = "MoCo v3: symmetric, a predictor, in-batch keys of all ranks, no queue"
    method: str = "moco_v3"
    temperature: float = _temperature(0.2, "paper: 0.2")
    momentum: float = _momentum("EMA momentum at the start; rises to 1 along a cosine (paper: 0.99)")

    def check(self) -> None:
        super().check()
        _check_open_unit(self, "momentum", low_closed=True)


@dataclass
class BYOLConfig(SSLConfig):
    SUMMARY: ClassVar[str] = "BYOL: online predictor vs EMA target projection; no negatives"
    method: str = "byol"
    momentum: float = _momentum("EMA momentum at the start; rises to 1 along a cosine (paper: 0.996)")

    def check(self) -> None:
        super().check()
        _check_open_unit(self, "momentum", low_closed=True)


@dataclass
class SimSiamConfig(SSLConfig):
    SUMMARY: ClassVar[str] = "SimSiam: predictor vs stop-gradient of the other branch; no momentum"
    # SGD as in the paper. First chosen before validation and test were separated (AdamW let the effective rank
    # fall; SGD lr 0.25, wd 1e-5 gained most); lr 0.25 against 0.06 again on the val split: +0.042 against +0.009
    # linear-probe gain on shape (docs/ssl.md).
    OPTIMIZERS: ClassVar[dict[str, tuple[float, float]]] = {**SSL_OPTIMIZERS, "sgd": (0.25, 1e-5)}
    method: str = "simsiam"
    optimizer: str = option("sgd", OPTIMIZER_HELP)


@dataclass
class SwAVConfig(SSLConfig):
    SUMMARY: ClassVar[str] = "SwAV: swapped prediction of Sinkhorn codes over prototypes; multi-crop"
    method: str = "swav"
    temperature: float = _temperature(0.1, "paper: 0.1")
    prototypes: int = option(100, "number of prototypes (clusters)")
    local_crops: int = option(4, "small crops per image, besides the 2 global ones (paper: 6 at 96 px)")
    freeze_prototypes_steps: int = option(100, "steps the prototypes stay frozen at the start")

    def check(self) -> None:
        super().check()
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be above 0, got {self.temperature}")
        if self.prototypes < 2:
            raise ValueError(f"--prototypes must be at least 2, got {self.prototypes}")
        if not 0 <= self.local_crops <= 16:
            raise ValueError(f"--local-crops must be between 0 and 16, got {self.local_crops}")
        if self.freeze_prototypes_steps < 0:
            raise ValueError(f"--freeze-prototypes-steps must be 0 or more, got {self.freeze_prototypes_steps}")


@dataclass
class MAEConfig(SSLConfig):
    SUMMARY: ClassVar[str] = "MAE: reconstruct the hidden patches from the visible ones (ViT backbones only)"
    OPTIMIZERS: ClassVar[dict[str, tuple[float, float]]] = {"adamw": (1e-3, 0.05)}
    method: str = "mae"
    backbone: str = option("vit-micro", "vit-micro (CPU-sized), vit-tiny, vit-small, or timm:NAME of a ViT")
    mask_ratio: float = option(0.75, "fraction of the patches hidden from the encoder")
    decoder_width: int = option(64, "decoder width")
    decoder_depth: int = option(2, "decoder transformer blocks")

    def check(self) -> None:
        super().check()
        _check_open_unit(self, "mask_ratio")
        if self.backbone.startswith("resnet"):
            raise ValueError(f"MAE needs a ViT backbone (vit-micro, vit-tiny, vit-small), not {self.backbone}")
        if self.decoder_width < 1 or self.decoder_depth < 1:
            raise ValueError("--decoder-width and --decoder-depth must be at least 1")


# -- CLIP ----------------------------------------------------------------------
@dataclass
class ClipConfig(RunConfig):
    """CLIP: image-text pairs, procedural or yours. The lr does not scale with the batch."""

    SUMMARY: ClassVar[str] = "CLIP: contrastive image-text pre-training (open_clip architectures)"
    OPTIMIZERS: ClassVar[dict[str, tuple[float, float]]] = {"adamw": (4e-3, 0.1)}
    steps: int = option(2000, "optimiser steps")
    batch_size: int = option(256, "image-caption pairs per step per process")
    model: str = option("tandem-shapes-vit", "open_clip architecture name, one of training/configs/*.json, "
                        "or a .json config path")
    init: str | None = option(None, "start from the weights in this checkpoint file", none="random init")
    data: str = option("shapes", "'shapes' (procedural), a folder with captions.csv/.jsonl, or webdataset shards "
                       "(e.g. 'data/{00000..00099}.tar', jpg/png + txt/json); see docs/training.md")

    def check(self) -> None:
        super().check()
        if self.batch_size < 2:
            raise ValueError("--batch-size must be at least 2: CLIP contrasts the pairs of a batch")


METHODS: dict[str, type[RunConfig]] = {
    "clip": ClipConfig, "simclr": SimCLRConfig, "moco_v2": MoCoV2Config, "moco_v3": MoCoV3Config,
    "byol": BYOLConfig, "simsiam": SimSiamConfig, "swav": SwAVConfig, "mae": MAEConfig,
}
SSL_METHODS = tuple(m for m in METHODS if m != "clip")


def config_class(method: str) -> type[RunConfig]:
    key = method.replace("-", "_")
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]


def cli_name(method: str) -> str:
    return method.replace("_", "-")


def defaults_table() -> str:
    """The Markdown table of every method's run defaults, as `tandem train --help` and docs/ssl.md show it."""
    rows = ["| method | optimiser (default first): peak lr, weight decay | lr scales with | steps | batch |",
            "|---|---|---|---|---|"]
    for name, cls in METHODS.items():
        default = _default(cls, "optimizer")
        order = [default] + [o for o in cls.OPTIMIZERS if o != default]
        opts = "; ".join(f"{o} {cls.OPTIMIZERS[o][0]:g}, {cls.OPTIMIZERS[o][1]:g}" for o in order)
        scale = f"batch / {cls.LR_BATCH}" if cls.LR_BATCH else "(fixed)"
        rows.append(f"| {cli_name(name)} | {opts} | {scale} | {_default(cls, 'steps')} | "
                    f"{_default(cls, 'batch_size')} |")
    return "\n".join(rows)


def _default(cls: type, name: str) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default


def options(cls: type) -> list[tuple[str, type, Any, str]]:
    """(field name, value type, default, help) of each field `tandem train` exposes, in order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if "help" not in f.metadata or f.default is MISSING:
            continue
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if args else kind
        shown = f.metadata.get("none") if f.default is None else f.default
        out.append((f.name, kind, f.default, f"{f.metadata['help']} (default: {shown})"))
    return out


# -- the loop ------------------------------------------------------------------
@dataclass
class TrainConfig:
    """The training loop's settings. The run numbers (steps ... seed) come from a method config:
    build it with :meth:`for_run`, so they have one source."""

    steps: int
    batch_size: int  # per process
    optimizer: str
    lr: float
    weight_decay: float
    warmup_steps: int
    seed: int = 0
    out: str = "runs/train"  # `tandem train` makes it runs/METHOD
    eval_every: int = option(250, "evaluate on the val split every N steps")
    checkpoint_every: int = option(250, "write a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(3, "step checkpoints kept (older ones are deleted; latest.pt always stays)")
    workers: int = option(0, "data-loading worker processes per process (webdataset: each reads its own shards)")
    dist_timeout_min: float = option(30.0, "torchrun: minutes a rank waits in a collective before the run fails")
    resume: bool = True  # pick up out/checkpoints/latest.pt if present
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, got {self.workers}")

    @classmethod
    def for_run(cls, run: RunConfig, **loop: Any) -> TrainConfig:
        return cls(steps=run.steps, batch_size=run.batch_size, optimizer=run.optimizer, lr=run.peak_lr,
                   weight_decay=run.decay, warmup_steps=run.warmup, seed=run.seed, **loop)
