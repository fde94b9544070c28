"""Augmentation recipes, one per method, with the papers' defaults (torchvision transforms).

Each recipe maps a PIL image to the list of views its method trains on.
`size` is the training resolution; Gaussian blur kernels scale with it (10% of
the side, as in SimCLR). Defaults, per paper:

| recipe   | crop scale       | colour jitter (b, c, s, h), p | grey | blur p (view 1/2) | solarize p (1/2) | views            |
|----------|------------------|-------------------------------|------|-------------------|------------------|------------------|
| simclr   | 0.08-1           | 0.8, 0.8, 0.8, 0.2 @ 0.8      | 0.2  | 0.5 / 0.5         | 0 / 0            | 2                |
| moco_v2  | 0.2-1            | 0.4, 0.4, 0.4, 0.1 @ 0.8      | 0.2  | 0.5 / 0.5         | 0 / 0            | 2                |
| byol     | 0.08-1           | 0.4, 0.4, 0.2, 0.1 @ 0.8      | 0.2  | 1.0 / 0.1         | 0 / 0.2          | 2 (asymmetric)   |
| moco_v3  | 0.08-1           | as byol                       | 0.2  | 1.0 / 0.1         | 0 / 0.2          | 2 (asymmetric)   |
| simsiam  | 0.2-1            | 0.4, 0.4, 0.4, 0.1 @ 0.8      | 0.2  | 0.5 / 0.5         | 0 / 0            | 2                |
| swav     | 0.14-1 / 0.05-0.14 | 0.8, 0.8, 0.8, 0.2 @ 0.8    | 0.2  | 0.5               | 0                | 2 global + 4 local (size * 3/7) |
| mae      | 0.2-1            | none                          | 0    | 0                 | 0                | 1                |

All recipes flip horizontally with p = 0.5 and normalise with ImageNet's mean and std.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0


def view(spec: ViewSpec) -> Callable[[Image.Image], torch.Tensor]:
    steps: list[Callable] = [T.RandomResizedCrop(spec.size, scale=spec.scale, antialias=True),  # type: ignore[type-arg]
                             T.RandomHorizontalFlip()]
    if spec.jitter_p:
        steps.append(T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p))
    if spec.grey_p:
        steps.append(T.RandomGrayscale(p=spec.grey_p))
    if spec.blur_p:
        kernel = max(3, int(0.1 * spec.size) // 2 * 2 + 1)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=spec.blur_p))
    if spec.solarize_p:
        steps.append(T.RandomSolarize(threshold=128, p=spec.solarize_p))
    steps += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


class MultiView:
    """Image -> [view_1(image), view_2(image), ...]."""

    def __init__(self, views: list[Callable[[Image.Image], torch.Tensor]]):
        self.views = views

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [v(image) for v in self.views]


def recipe(method: str, size: int, min_scale: float | None = None, multiple: int = 1,
           local_crops: int = 4) -> MultiView:
    """The method's views at `size` px. `min_scale` overrides the lower bound of every crop scale
    (global crops only for SwAV): useful when objects are small and a paper's 0.08 would crop them away.
    `multiple`: SwAV's small crops are rounded to a multiple of it (a ViT's patch size).
    `local_crops`: how many small crops SwAV adds to its two global ones."""
    if min_scale is not None:
        return _with_min_scale(recipe(method, size, multiple=multiple, local_crops=local_crops), min_scale, size)
    strong = (0.8, 0.8, 0.8, 0.2)
    byol_jitter = (0.4, 0.4, 0.2, 0.1)
    if method == "simclr":
        return MultiView([view(ViewSpec(size, jitter=strong))] * 2)
    if method in ("moco_v2", "simsiam"):
        return MultiView([view(ViewSpec(size, scale=(0.2, 1.0)))] * 2)
    if method in ("byol", "moco_v3"):
        return MultiView([view(ViewSpec(size, jitter=byol_jitter, blur_p=1.0)),
                          view(ViewSpec(size, jitter=byol_jitter, blur_p=0.1, solarize_p=0.2))])
    if method == "swav":
        small = max(8, round(size * 3 / 7))  # 96 px local crops for 224 px global ones
        small = max(multiple, round(small / multiple) * multiple)
        glob = view(ViewSpec(size, scale=(0.14, 1.0), jitter=strong))
        local = view(ViewSpec(small, scale=(0.05, 0.14), jitter=strong))
        return MultiView([glob, glob] + [local] * local_crops)
    if method == "mae":
        return MultiView([view(ViewSpec(size, scale=(0.2, 1.0), jitter_p=0, grey_p=0, blur_p=0))])
    raise ValueError(f"no augmentation recipe for {method!r}")


def eval_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """What the server does for image-only bundles: resize shortest side, centre crop, normalise."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
                      T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _with_min_scale(views: MultiView, min_scale: float, size: int) -> MultiView:
    for v in views.views:
        crop = v.transforms[0]
        if isinstance(crop, T.RandomResizedCrop) and tuple(crop.size) == (size, size):
            crop.scale = (min_scale, 1.0)
    return views
