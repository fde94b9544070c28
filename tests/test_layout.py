"""Imports run one way, and the server runs without torch.

    bundle/    numpy, Pillow, tokenizers, ftfy, regex, protobuf (ONNX external-data references), cryptography
               (bundle signatures) and the standard library only
    server/    bundle, index, the proto stubs, serving libraries; never training or torch
    index/     bundle and serving libraries; never server, training or torch
    training/  bundle and the training libraries; never server
    cli/       the dispatcher on top: may import any of them

The static check reads every import statement (lazy ones inside functions
too). The live check starts `tandem serve` from the serving install (.venv,
passed in by `make test` as TANDEM_SERVE_PYTHON) and reads the process's
memory map: no libtorch may be mapped.
"""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client import TandemClient
from tests.conftest import ROOT, SHIPPED_MODELS

TORCH = {"torch", "torchvision", "open_clip", "timm", "onnx", "onnxscript", "tensorboard", "matplotlib"}
ALLOWED = {
    "bundle": {"bundle", "numpy", "PIL", "tokenizers", "ftfy", "regex", "google", "cryptography"},
    "server": {"server", "bundle", "index", "tandem", "numpy", "PIL", "grpc", "grpc_health", "grpc_reflection",
               "google", "prometheus_client", "onnxruntime", "faiss", "tqdm", "uvloop",
               "onnx"},  # only inside server/runtime.py's to_fp16 (precision fp16; the gpu extra installs it)
    "index": {"index", "bundle", "numpy", "faiss"},
}
FORBIDDEN = {"training": {"server"}}


def imports_of(package: str) -> dict[str, set[str]]:
    """{file: top-level modules it imports} for every .py file of a package (relative imports count as itself)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(package if node.level else (node.module or "").split(".")[0])
        found[str(path.relative_to(ROOT))] = names - set(sys.stdlib_module_names) - {"__future__"}
    return found


# The one exception: JPEG decoding with torchvision (nvJPEG), imported only when the image_decoder setting asks
# for it (the serving install has no torch; test_server_from_the_serving_install_has_no_torch... proves it).
ALSO = {"server/torch_images.py": {"torch", "torchvision"}}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_serving_packages_import_only_what_they_may(package: str) -> None:
    for file, names in imports_of(package).items():
        names = names - ALSO.get(file, set())
        assert names <= ALLOWED[package], f"{file} imports {sorted(names - ALLOWED[package])}"
        assert not names & (TORCH - ALLOWED[package])  # onnx: allowed in server/runtime.py (above)


def test_training_never_imports_the_server() -> None:
    for file, names in imports_of("training").items():
        assert not names & FORBIDDEN["training"], f"{file} imports {sorted(names & FORBIDDEN['training'])}"


def test_the_import_check_sees_lazy_imports(tmp_path: Path) -> None:
    """The static check must catch an import hidden inside a function, or it proves nothing."""
    pkg = ROOT / "server" / "_layout_probe.py"
    pkg.write_text("def f():\n    import torch\n    from training import cli\n")
    try:
        names = imports_of("server")["server/_layout_probe.py"]
    finally:
        pkg.unlink()
    assert {"torch", "training"} <= names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mapped_libtorch(pid: int) -> list[str]:
    """Shared libraries of torch mapped into a live process (Linux /proc/PID/maps)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if "libtorch" in line or "libc10" in line})


def wait_serving(target: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:  # type: ignore[type-arg]
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{target} not SERVING after {timeout_s} s")


def serve_python() -> str:
    return os.environ.get("TANDEM_SERVE_PYTHON") or sys.executable


def test_mapped_libtorch_detects_torch() -> None:
    """The memory-map check below must see torch when a process has imported it."""
    proc = subprocess.Popen([sys.executable, "-c", "import torch, sys; print('ready', flush=True); sys.stdin.read()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        assert mapped_libtorch(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_server_from_the_serving_install_has_no_torch_and_counts_its_requests() -> None:
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([serve_python(), "-m", "cli", "serve", "--models", str(SHIPPED_MODELS), "--port", str(port),
                             "--metrics-port", str(metrics_port), "--log-level", "WARNING"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        with TandemClient(f"127.0.0.1:{port}") as c:
            text = c.embed_text(["a small red circle"]).embeddings
            assert text.shape == (1, c.get_model().dim)
        assert mapped_libtorch(proc.pid) == []
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "uvloop/loop." in maps  # the serving install runs its event loop on uvloop (config: uvloop)
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        # A fresh process: exactly the one request above (and the warm-up run, which is no request).
        assert 'tandem_requests_total{code="OK",method="EmbedText"} 1.0' in body
        assert 'tandem_requests_total{code="OK",method="GetModel"} 1.0' in body
        assert 'tandem_batch_size_count{model="tandem-shapes",tower="text"} 2.0' in body  # warm-up + request
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, "the server did not shut down cleanly on SIGTERM"
