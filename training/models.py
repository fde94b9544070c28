"""Building open_clip models by name, by JSON config, or from a checkpoint file.

Architectures are open_clip configs (data, not code): any built-in name
("ViT-B-32", "RN50", "convnext_base", ...), our own configs in
training/configs/*.json (registered here, e.g. "tandem-shapes-vit"), or a path
to a JSON file in open_clip's config format. Weights come only from a local
file: nothing here downloads.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from tokenizers import Tokenizer

from bundle.tokenizer import ClipTokenizer, build_clip_bpe

# open_clip and huggingface_hub must never reach the network from Tandem.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)


def list_architectures() -> list[str]:
    return open_clip.list_models()


def resolve_config(arch: str) -> tuple[str, dict[str, Any]]:
    """(name, open_clip model config) for a config name or a JSON file path."""
    if arch.startswith("hf-hub:"):
        raise ValueError(f"{arch}: hub models would download; pass a local checkpoint file instead")
    path = Path(arch)
    if arch.endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"model config {arch} does not exist")
        open_clip.add_model_config(path)
        arch = path.stem
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(
            f"unknown architecture {arch!r}: use an open_clip name (see `tandem models`), "
            f"one of ours ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))}), or a .json config"
        )
    return arch, cfg


def register_config(name: str, cfg: dict[str, Any]) -> None:
    """Make a config stored in a checkpoint known to open_clip under `name`."""
    if open_clip.get_model_config(name) is None:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / f"{name}.json"
            file.write_text(json.dumps(cfg))
            open_clip.add_model_config(file)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file (ours or open_clip's) onto the CPU, tensors only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e


def build_model(arch: str | None, checkpoint: Path | None = None, state: dict[str, Any] | None = None
                ) -> tuple[torch.nn.Module, str, dict[str, Any]]:
    """(model in eval mode, architecture name, config).

    With a Tandem checkpoint the architecture is read from it and `arch` may be
    None; with an open_clip checkpoint `arch` names the architecture it was
    trained with. Without a checkpoint the model is randomly initialised.
    """
    if state is None and checkpoint:  # callers that already read the file pass `state`
        state = read_checkpoint(checkpoint)
    if state is not None and "model_config" in state:
        stored = state["model_name"]
        if arch not in (None, stored):
            raise ValueError(f"{checkpoint} holds a {stored!r} model, not {arch!r}")
        arch = stored
        register_config(arch, state["model_config"])
    if arch is None:
        raise ValueError("name an architecture (--model) or pass a Tandem checkpoint that records one")
    name, cfg = resolve_config(arch)
    model = open_clip.create_model(name, pretrained=None)
    if state is not None:
        weights = state.get("state_dict", state)
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # same names, other shapes
            raise ValueError(f"{checkpoint} does not fit {name}: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not fit {name}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    return model.eval(), name, cfg


@lru_cache(maxsize=1)
def clip_bpe() -> Tokenizer:
    """open_clip's CLIP BPE vocabulary (it ships in the open_clip wheel) as the tokenizer bundles carry."""
    return build_clip_bpe(Path(open_clip.tokenizer.default_bpe()))


def clip_tokenizer(context_length: int = 77) -> ClipTokenizer:
    """The tokenizer training and export use: the one the server loads from the bundle, same ids."""
    return ClipTokenizer(clip_bpe(), context_length)


def preprocess_config(model: torch.nn.Module) -> dict[str, Any]:
    """open_clip's preprocessing settings for this model (size, mean, std, ...)."""
    return dict(open_clip.get_model_preprocess_cfg(model))


def config_json(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, indent=2)
