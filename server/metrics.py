"""Prometheus metrics, one place. Scraped from http://<host>:<metrics_port>/metrics.

Stages (label `stage`): decode (bytes -> RGB, per image), preprocess (resize,
crop, normalise, per image), tokenize (all texts of a request), queue (a
request's wait in the batcher), inference (one ONNX Runtime run, per batch;
for collections, label tower="search": one FAISS search per batch, model = the
collection's name).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter("tandem_requests_total", "gRPC requests by method and status code", ["method", "code"])
REQUEST_SECONDS = Histogram(
    "tandem_request_seconds", "Wall time of a gRPC request, from arrival to answer", ["method"],
    buckets=_LATENCY_BUCKETS,
)
ITEMS = Counter("tandem_items_total", "Items (images or texts) received, by method", ["method"])
STAGE_SECONDS = Histogram(
    "tandem_stage_seconds", "Time per stage: decode and preprocess per image, tokenize and queue per "
    "request, inference per batch", ["stage", "model", "tower"], buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("tandem_batch_size", "Rows per ONNX Runtime run", ["model", "tower"], buckets=_BATCH_BUCKETS)
QUEUE_ROWS = Gauge("tandem_queue_rows", "Rows waiting in the batcher", ["model", "tower"])
QUEUE_EXPIRED = Counter("tandem_queue_expired_total", "Requests failed unrun: they waited in the batcher's queue "
                        "longer than queue_timeout_ms", ["model", "tower"])
QUEUE_REJECTED = Counter("tandem_queue_rejected_total", "Requests refused because the queue was full", ["model", "tower"])
MODEL_INFO = Gauge(
    "tandem_model_info", "Loaded models (value 1) and where they run", ["model", "version", "kind", "provider"]
)
ADMISSION_REJECTED = Counter(
    "tandem_admission_rejected_total", "Requests refused before any work: reason inflight (max_inflight_items), "
    "preprocess (max_preprocess_items) or queue_timeout (queue_timeout_ms)", ["model", "tower", "reason"],
)
INFLIGHT_ITEMS = Gauge("tandem_inflight_items", "Items admitted and not yet answered", ["model", "tower"])
PREPROCESS_ITEMS = Counter(
    "tandem_preprocess_items_total", "Images decoded and text batches tokenised, by outcome: ok, invalid (the "
    "item was bad), cancelled (not started: its request had failed, was cancelled or passed its deadline), "
    "expired (not started: it waited longer than queue_timeout_ms)", ["tower", "outcome"],
)
ZERO_SHOT_CACHE = Counter("tandem_zero_shot_cache_total", "Label-embedding cache lookups", ["result"])
HIT_CACHE = Counter("tandem_hit_cache_total", "Search hits looked up in the hit cache: found there (hit) or read "
                    "from SQLite (miss)", ["result"])
HIT_CACHE_BYTES = Gauge("tandem_hit_cache_bytes", "Memory the hit cache holds, all collections (hit_cache_bytes bounds it)")


class _CollectionGauges:
    """tandem_collection_items and tandem_collection_info, read from the open collections at scrape time, so
    writes and searches pay nothing for them and they are never stale (an index trained in the background
    changes its kind)."""

    def __init__(self) -> None:
        self.collections: dict[str, Any] = {}  # name -> index.collection.Collection (count(), kind, device)

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> list[GaugeMetricFamily]:
        return list(self._families(list(self.collections.items())))

    @staticmethod
    def _families(open_: list[tuple[str, Any]] = ()) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:  # type: ignore[assignment]
        items = GaugeMetricFamily("tandem_collection_items", "Items stored per collection", labels=["collection"])
        info = GaugeMetricFamily("tandem_collection_info", "Collections (value 1): where they search and with "
                                 "which index", labels=["collection", "device", "index_kind"])
        for name, c in open_:
            items.add_metric([name], c.count())
            info.add_metric([name, c.device, c.kind], 1)
        return items, info


COLLECTIONS = _CollectionGauges()
REGISTRY.register(COLLECTIONS)


class _ModelStatus:
    """tandem_model_status{model, version, status} = 1 for every bundle of the repository (READY, LOADING,
    UNAVAILABLE, UNLOADED), read from the server's registry at scrape time."""

    def __init__(self) -> None:
        self.registry: Any = None  # server.registry.Registry, set by the server

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("tandem_model_status", "Bundles in the model repository (value 1) by status: "
                                 "READY, LOADING, UNAVAILABLE (failed to load; see ListModels for the reason) or "
                                 "UNLOADED", labels=["model", "version", "status"])

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> list[GaugeMetricFamily]:
        family = self._family()
        if self.registry is not None:
            for _ in range(3):  # the registry changes on the event loop while this runs in the scrape thread
                try:
                    entries = [e for e, _ in self.registry.listing()]
                    break
                except RuntimeError:
                    continue
            else:
                entries = []
            for e in entries:
                family.add_metric([e.name, e.version, e.status], 1)
        return [family]


MODEL_STATUS = _ModelStatus()
REGISTRY.register(MODEL_STATUS)
