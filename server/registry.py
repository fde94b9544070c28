"""Loaded models: ONNX sessions, tokenizers and one batcher per (model, tower)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bundle import Bundle, discover, load_bundle, version_key
from bundle.tokenizer import ClipTokenizer

from . import metrics
from .batcher import Batcher
from .config import ServerConfig
from .errors import not_found, unavailable
from .runtime import Tower, choose_providers

log = logging.getLogger("tandem.registry")


class LabelCache:
    """LRU of zero-shot label embeddings keyed by (labels, templates)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], np.ndarray] = OrderedDict()

    def get(self, key: tuple[tuple[str, ...], tuple[str, ...]]) -> np.ndarray | None:
        value = self._items.get(key)
        metrics.ZERO_SHOT_CACHE.labels("hit" if value is not None else "miss").inc()
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple[tuple[str, ...], tuple[str, ...]], value: np.ndarray) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


@dataclass
class LoadedModel:
    bundle: Bundle
    image: Batcher
    text: Batcher | None
    tokenizer: ClipTokenizer | None
    provider: str
    labels: LabelCache = field(default_factory=lambda: LabelCache(256))

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version


class Registry:
    """Every bundle in the model repository, by name and version."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.models: dict[str, dict[str, LoadedModel]] = {}
        self.default: tuple[str, str] | None = None
        self.inference_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ort")
        self.preprocess_pool = ThreadPoolExecutor(max_workers=config.preprocess_threads, thread_name_prefix="pre")

    def load(self) -> None:
        """Load every bundle under config.models (runs in a thread at start-up)."""
        providers = choose_providers(self.config.device)
        folders = discover(Path(self.config.models))
        if not folders:
            raise RuntimeError(f"no bundles under {self.config.models} (expected <name>/<version>/manifest.json)")
        for folder in folders:
            bundle = load_bundle(folder, verify_hashes=self.config.verify_hashes)
            m = bundle.manifest
            towers = {}
            for tower, path in (("image", bundle.image_path), ("text", bundle.text_path)):
                if path is not None:
                    towers[tower] = Tower(path, providers, m.precision,
                                          self.config.intra_op_threads, self.config.inter_op_threads)
            provider = towers["image"].provider
            loaded = LoadedModel(
                bundle=bundle,
                image=self._batcher(towers["image"], m.name, "image"),
                text=self._batcher(towers["text"], m.name, "text") if "text" in towers else None,
                tokenizer=ClipTokenizer(bundle.tokenizer_path, m.text.context_length) if m.text else None,
                provider=provider,
                labels=LabelCache(self.config.label_cache_size),
            )
            self.models.setdefault(m.name, {})[m.version] = loaded
            metrics.MODEL_INFO.labels(m.name, m.version, m.kind, provider).set(1)
            log.info("loaded %s/%s (%s, dim %d) on %s", m.name, m.version, m.kind, m.dim, provider)
        names = list(self.models)
        default = self.config.default_model or names[0]
        if default not in self.models:
            raise RuntimeError(f"default_model {default!r} is not in {self.config.models} (found {names})")
        self.default = (default, self._latest(default))

    def _batcher(self, tower: Tower, name: str, kind: str) -> Batcher:
        c = self.config
        return Batcher(tower, self.inference_pool, c.max_batch_size, c.max_queue_delay_us, c.max_queue_rows,
                       labels=(name, kind))

    def _latest(self, name: str) -> str:
        return max(self.models[name], key=version_key)

    def get(self, name: str, version: str) -> LoadedModel:
        if self.default is None:
            raise unavailable("the server is still loading its models; retry shortly")
        name = name or self.default[0]
        versions = self.models.get(name)
        if versions is None:
            raise not_found(f"model {name!r} is not loaded; loaded models: {', '.join(sorted(self.models))}")
        version = version or self._latest(name)
        if version not in versions:
            raise not_found(f"model {name!r} has no version {version!r}; loaded versions: {', '.join(versions)}")
        return versions[version]

    def all(self) -> list[LoadedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    async def warm_up(self) -> None:
        """One run per tower so the first real request does not pay ONNX Runtime's set-up."""
        for m in self.all():
            size = m.bundle.manifest.image.size
            await m.image.submit(np.zeros((1, 3, size, size), np.float32))
            if m.text is not None and m.tokenizer is not None:
                await m.text.submit(m.tokenizer.encode_batch(["warm up"])[0])

    async def close(self) -> None:
        await asyncio.gather(*(b.stop() for m in self.all() for b in (m.image, m.text) if b is not None))
        self.inference_pool.shutdown(wait=False, cancel_futures=True)
        self.preprocess_pool.shutdown(wait=False, cancel_futures=True)
