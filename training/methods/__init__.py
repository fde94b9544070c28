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


def load_ssl_method(state: dict) -> SSLMethod:  # type: ignore[type-arg]
    """Rebuild a self-supervised method, weights included, from its checkpoint dict."""
    from .base import SSLConfig

    method = ssl_class(state["method"])(SSLConfig(**state["ssl_config"]))
    method.load_state_dict(state["state_dict"])
    return method.eval()
