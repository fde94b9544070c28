"""Training methods: CLIP (image-text) and the self-supervised visual methods, one module each.
Their settings and defaults are the config classes of training/config.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from training.config import SSL_METHODS, SSLConfig, config_class

if TYPE_CHECKING:
    from .base import SSLMethod

__all__ = ["SSL_METHODS", "load_ssl_method", "ssl_class", "ssl_config"]


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


def ssl_config(name: str, **values: Any) -> SSLConfig:
    """The config of method `name` with `values` instead of its defaults (a name it has not: TypeError)."""
    cls = config_class(name)
    if not issubclass(cls, SSLConfig):
        raise ValueError(f"{name} is not a self-supervised method")
    return cls(**values)


def load_ssl_method(state: dict) -> SSLMethod:  # type: ignore[type-arg]
    """Rebuild a self-supervised method, weights included, from its checkpoint dict."""
    name = state["method"]
    config = config_class(name).from_dict(state["ssl_config"])
    method = ssl_class(name)(config, None, state.get("probe_classes", 0))  # type: ignore[arg-type]
    method.load_state_dict(state["state_dict"])
    return method.eval()
