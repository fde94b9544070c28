"""A real `tandem serve` process (the shipped default model, a temporary data_dir) for the deployment tests:
the healthcheck script talks to it and the metrics test scrapes it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHIPPED_MODELS
from tests.test_layout import free_port, serve_python, wait_serving

# Small queues, so that a search with more text terms than this is refused (INVALID_ARGUMENT: it could never be
# queued). tandem_queue_rejected_total is exported from each batcher's start.
MAX_QUEUE_ROWS = 8


@dataclass
class Served:
    target: str
    metrics_url: str
    proc: subprocess.Popen  # type: ignore[type-arg]


@pytest.fixture(scope="package")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port, metrics_port = free_port(), free_port()
    data_dir: Path = tmp_path_factory.mktemp("data")
    proc = subprocess.Popen([serve_python(), "-m", "cli", "serve", "--models", str(SHIPPED_MODELS),
                             "--port", str(port), "--metrics-port", str(metrics_port), "--data-dir", str(data_dir),
                             "--max-queue-rows", str(MAX_QUEUE_ROWS), "--max-items-per-request", str(MAX_QUEUE_ROWS),
                             "--log-level", "WARNING"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        yield Served(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc)
    finally:
        proc.terminate()
        proc.wait(30)
