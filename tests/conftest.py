"""Shared fixtures: tiny real open_clip models exported to real bundles, and a
real Tandem server on a free localhost port (grpc.aio in a background thread)."""

from __future__ import annotations

import asyncio
import io
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from PIL import Image

from server.app import TandemServer
from server.config import ServerConfig
from training.export import export_bundle
from training.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).parent / "configs"
SHIPPED_MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Tandem-format checkpoint of a tiny random-init CLIP ViT (seed 0)."""
    torch.manual_seed(0)
    model, name, cfg = build_model(str(CONFIGS / "tiny-vit.json"))
    path = tmp_path_factory.mktemp("ckpt") / "tiny-vit.pt"
    torch.save({"state_dict": model.state_dict(), "model_name": name, "model_config": cfg}, path)
    return path


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A model repository with a tiny CLIP (ViT) and an image-only bundle of the same weights."""
    repo = tmp_path_factory.mktemp("models")
    export_bundle(None, repo, "tiny-clip", "1", checkpoint=tiny_checkpoint)
    export_bundle(None, repo, "tiny-image", "1", checkpoint=tiny_checkpoint, image_only=True)
    return repo


class RunningServer:
    """A TandemServer on its own event loop thread."""

    def __init__(self, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: TandemServer = self._call(self._make(config))
        self._call(self.server.start())
        self.target = f"127.0.0.1:{self.server.port}"

    async def _make(self, config: ServerConfig) -> TandemServer:
        return TandemServer(config)

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stop(self) -> None:
        self._call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def start_server(models: Path, **overrides: object) -> RunningServer:
    """A server on a free port; collections in a fresh temporary folder unless data_dir is given."""
    overrides.setdefault("data_dir", tempfile.mkdtemp(prefix="tandem-data-"))
    config = ServerConfig(models=str(models), port=0, metrics_port=0, **overrides)  # type: ignore[arg-type]
    return RunningServer(config)


@pytest.fixture(scope="session")
def default_server() -> Iterator[RunningServer]:
    """The shipped default model, as `make serve` serves it."""
    server = start_server(SHIPPED_MODELS)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_repo: Path) -> Iterator[RunningServer]:
    """Tiny models with small limits, for the bad-input tests."""
    server = start_server(tiny_repo, default_model="tiny-clip", max_items_per_request=8, max_labels=5,
                          max_text_chars=200, max_image_pixels=100 * 100, max_message_bytes=1 << 20)
    yield server
    server.stop()


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def copy_repo(tmp_path: Path):  # type: ignore[no-untyped-def]
    def copy(src: Path) -> Path:
        dst = tmp_path / "repo"
        shutil.copytree(src, dst)
        return dst

    return copy
