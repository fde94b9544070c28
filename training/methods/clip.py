"""CLIP (Radford et al., 2021): contrastive image–text pre-training.

Loss: symmetric InfoNCE over the batch (open_clip's ClipLoss), image->text and
text->image cross-entropy of logit_scale * cosine, averaged. The temperature
is learned (logit_scale = log(1/T), initialised at log(1/0.07)) and clamped
to at most log(100) after every step, as in the paper. Under torchrun the
features of every rank are gathered (with gradients) so each rank contrasts
against the global batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.loss import ClipLoss

from training.config import ClipConfig
from training.data import procedural
from training.data.captions import FolderCaptions, ShapesCaptions
from training.data.shards import ShardCaptions, is_shards
from training.distributed import Dist
from training.evaluation import zero_shot
from training.models import build_model, clip_tokenizer, preprocess_config

MAX_LOGIT_SCALE = math.log(100)


class Clip:
    def __init__(self, config: ClipConfig, dist: Dist):
        self.config, self.dist = config, dist
        self.model, self.arch, self.model_cfg = build_model(config.model, Path(config.init) if config.init else None)
        self.model.train()
        pp = preprocess_config(self.model)
        size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
        kw = dict(mean=pp["mean"], std=pp["std"], resize_mode=pp["resize_mode"], interpolation=pp["interpolation"])
        # Procedural images go through the serving transform (they need no augmentation);
        # real photos get open_clip's training transform (random resized crop).
        self.eval_transform = open_clip.image_transform(size, is_train=False, **kw)
        self.train_transform = open_clip.image_transform(size, is_train=True, **kw)
        self.tokenizer = clip_tokenizer(self.model_cfg.get("text_cfg", {}).get("context_length", 77))
        self.loss_fn = ClipLoss(gather_with_grad=True, rank=dist.rank, world_size=dist.world_size)
        self._eval_sets: dict[str, ShapesCaptions] = {}
        self._labels = procedural.class_labels()

    # -- data ------------------------------------------------------------------
    def dataset(self) -> torch.utils.data.Dataset:
        c = self.config
        if c.data == "shapes":
            return ShapesCaptions("train", c.train_size, self.eval_transform, c.seed, progress=self.dist.is_main)
        if is_shards(c.data):
            return ShardCaptions(c.data, self.train_transform, seed=c.seed)
        return FolderCaptions(Path(c.data), self.train_transform)

    def collate(self, items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions = zip(*items)
        return torch.stack(images), torch.from_numpy(self.tokenizer.encode_batch(list(captions))[0])

    # -- step ------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
             ) -> torch.Tensor:
        images, ids = (t.to(device, non_blocking=True) for t in batch)
        image_features, text_features, logit_scale = model(images, ids)
        return self.loss_fn(image_features.float(), text_features.float(), logit_scale)

    @torch.no_grad()
    def after_step(self, step: int = 0, total: int = 1) -> dict[str, float]:
        self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {"logit_scale": self.model.logit_scale.exp().item()}

    # -- evaluation ------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        """Zero-shot top-1 over all 56 class labels (procedural data only).

        `seen` counts images of classes in training, `held_out` images of
        (colour, shape) pairs never trained on; `size`/`colour`/`shape` say
        how often the predicted label got that attribute right.
        """
        c = self.config
        if c.data != "shapes":
            return {}
        if split not in self._eval_sets:
            n = c.val_size if split == "val" else c.test_size
            self._eval_sets[split] = ShapesCaptions(split, n, self.eval_transform, c.seed, progress=False)
        data = self._eval_sets[split]
        device = self.dist.device
        label_emb = zero_shot.label_embeddings(self.model, self.tokenizer, self._labels, device=device)
        pred = zero_shot.predict(self.model, data.images, label_emb, device=device).tolist()
        truth = [self._labels.index(s.label) for s in data.samples]
        held = [procedural.is_held_out(s.label) for s in data.samples]
        ok = [p == t for p, t in zip(pred, truth)]

        def mean(xs: list[bool]) -> float:
            return sum(xs) / max(1, len(xs))

        parts = [lbl.split(" ") for lbl in self._labels]
        out = {
            "zero_shot_top1_seen": mean([o for o, h in zip(ok, held) if not h]),
            "zero_shot_top1_held_out": mean([o for o, h in zip(ok, held) if h]),
            "zero_shot_top1_all": mean(ok),
        }
        for k, attr in enumerate(("size", "colour", "shape")):
            out[f"{attr}_accuracy"] = mean([parts[p][k] == parts[t][k] for p, t in zip(pred, truth)])
        return out

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"model_name": self.arch, "model_config": self.model_cfg, "method": "clip"}
