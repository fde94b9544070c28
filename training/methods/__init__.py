"""Training methods: CLIP (image-text) and the self-supervised visual methods, one module each."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import SSLMethod

SSL_METHODS = ("simclr", "moco_v2", "moco_v3", "byol", "simsiam", "swav", "mae")


def ssl_class(name: str) -> type[SSLMethod]:
    """The class of a self-supervised method by name (moco-v2 and moco_v2 both work)."""
    from .byol import BYOL
    from .mae import MAE
    from .moco import MoCoV2, MoCoV3
    from .simclr import SimCLR
    from .simsiam import SimSiam
    from .swav import SwAV

    classes = {c.name: c for c in (SimCLR, MoCoV2, MoCoV3, BYOL, SimSiam, SwAV, MAE)}
    key = name.replace("-", "_")
    if key not in classes:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(SSL_METHODS)}")
    return classes[key]
