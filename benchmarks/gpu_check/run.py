"""The prepared GPU check: every GPU path of Tandem in one run, one JSON file.

    python3 benchmarks/gpu_check/run.py                     # on the GPU machine (README.md: how to get there)
    python3 benchmarks/gpu_check/run.py --quick             # about half the time: fp16 export only, shorter loops
    python3 benchmarks/gpu_check/run.py --sections faiss,train
    .venv-dev/bin/python benchmarks/gpu_check/run.py --cpu-smoke   # here, on the CPU: every code path, tiny sizes

Sections (each runs in its own processes, so a crash, a hang or a missing
package in one never loses the others; each records its error and time):
  ort     ONNX Runtime CUDA EP: ViT-B-32 exported by training/export.py (random init,
          fp16 and fp32) and the shipped default model, image and text towers:
          items/s by batch size with numpy in/out, with IO binding on device
          buffers, and with IO binding plus a host-to-device copy per batch;
          batch-1 latency; CUDA vs CPU EP parity (max abs diff, min cosine)
  server  `python -m cli serve --device cuda` on those bundles, driven over grpc.aio by
          client processes: concurrency 1 and 64, 1-item and 32-item requests,
          JPEG bytes and texts; items/s, latency, and the ratio to the raw ORT best
  faiss   faiss GpuIndexFlatIP 1M x 512 (fp32 and fp16 storage; 100k if 1M fails):
          batch 1024 q/s, batch 1 latency, recall@10 against the CPU index; the
          same search as a torch fp16 matmul + top-k; a Collection (index/) on the GPU
  train   one training step as the trainer runs it (bf16 autocast), CLIP and each
          self-supervised method, at 224 px and 32 px, against a bare backbone step

Time: every loop is sized by time and every worker has a budget (--budget-s sets
their total, 390 s by default; --max-s, 480 s, stops the whole run). The JSON is
written after every worker; a summary is printed at the end. README.md beside
this file: the device calls, and what every number means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# The repository and its generated stubs (proto/tandem), for this process and the ones it starts: the GPU
# machine has no editable install of Tandem.
REPO_PATHS = [str(ROOT), str(ROOT / "proto")]
sys.path[:0] = [p for p in REPO_PATHS if p not in sys.path]


def repo_env(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([*REPO_PATHS, *filter(None, [env.get("PYTHONPATH")])])
    return env
SCHEMA = "tandem-gpu-check/1"
SECTIONS = ("ort", "server", "faiss", "train")
# Seconds of each worker at --budget-s 1 x (the default). A section's workers run one after the other.
# Seconds of each worker in the default run; --quick halves them, --budget-s sets their total (the export's
# 90 s are never cut: ViT-B-32's export is a fixed cost that the ort and server sections need).
WORKERS: dict[str, list[tuple[str, float]]] = {
    "ort": [("export", 100.0), ("ort", 70.0)],
    "server": [("server", 85.0)],
    "faiss": [("faiss", 50.0), ("topk", 15.0)],
    "train": [("train", 70.0)],
}
DEFAULT_TOTAL_S = sum(b for workers in WORKERS.values() for _, b in workers)
EXPORT_MIN_S = 100.0
MAX_S = 480.0  # the whole run, environment probes included: no worker starts past it
SMOKE_BUDGET_S = 300.0
GRACE_S = 20.0  # past its budget a worker is killed; what it had saved is kept
PACKAGES = ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "open_clip_torch", "timm",
            "faiss-cpu", "faiss-gpu", "grpcio", "protobuf", "numpy", "tokenizers", "pillow")
CAPTIONS = [f"a photo of a {size} {colour} {thing}" for size in ("small", "large")
            for colour in ("red", "green", "blue", "yellow") for thing in ("dog", "cat", "car", "circle")]


# -- sizes --------------------------------------------------------------------------------------------------------
class Sizes:
    """Every size the check uses, for the GPU run and for --cpu-smoke (tiny, but the same code)."""

    def __init__(self, smoke: bool, quick: bool):
        self.smoke, self.quick = smoke, quick
        self.point_s = 0.03 if smoke else 0.15 if quick else 0.3  # one throughput figure
        self.warmups, self.min_calls = (1, 1) if smoke else (2, 3)
        self.batches = [1, 4, 8] if smoke else [1, 8, 32, 128, 256, 512, 1024]
        self.export_arch = "tandem-shapes-vit" if smoke else "ViT-B-32"
        self.export_precisions = ["fp16"] if smoke or quick else ["fp16", "fp32"]
        self.concurrency = [1, 4] if smoke else [1, 64]
        self.items = [1, 4] if smoke else [1, 32]
        self.load_s = 0.4 if smoke else 2.0 if quick else 4.0
        self.client_procs = 1 if smoke else max(1, min(8, (os.cpu_count() or 2) // 2))
        self.max_batch_size = 32 if smoke else 256
        self.faiss_n = [2_000] if smoke else [1_000_000, 100_000]
        self.dim, self.k, self.recall_queries = 512, 10, (16 if smoke else 256)
        self.collection_n = 1_500 if smoke else 100_000
        # (label, image size, SSL backbone, MAE backbone and patch, batch, SSL methods (None: all); CLIP model, size)
        self.train = ([("64px", 64, "resnet-micro", ("vit-micro", None), 4, ["simclr"], "tandem-shapes-vit", 48),
                       ("32px", 32, "resnet-micro", ("vit-micro", None), 4, None, "tandem-shapes-vit", 32)] if smoke
                      else [("224px", 224, "resnet18", ("vit-small", 16), 256, None, "ViT-B-32", 224),
                            ("32px", 32, "resnet18-small", ("vit-tiny", None), 512, None, "ViT-B-32", 32)])


# -- small helpers --------------------------------------------------------------------------------------------------
def rate(run: Callable[[], Any], items: int, seconds: float, sync: Callable[[], None] = lambda: None,
         min_calls: int = 3, warmups: int = 2) -> float:
    """Items per second of run(), which does `items` items per call; run for about `seconds` after the warm-ups."""
    for _ in range(warmups):
        run()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        run()
        calls += 1
        if calls % 8 == 0:
            sync()  # let GPU work catch up now and then, so the clock check means something
    sync()
    return items * calls / (time.perf_counter() - start)


def latency_ms(run: Callable[[], Any], seconds: float, sync: Callable[[], None] = lambda: None,
               min_calls: int = 5) -> dict[str, float]:
    """p50 and p99 milliseconds of single calls, each synchronised, for about `seconds`."""
    run()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"p50_ms": 1000 * times[len(times) // 2], "p99_ms": 1000 * times[min(len(times) - 1, int(len(times) * 0.99))],
            "calls": len(times)}


def cosine_min(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return float(cos.min())


def recall_at_k(found: Any, truth: Any) -> float:
    """Mean share of each query's true top-k ids that `found` has too."""
    k = truth.shape[1]
    return float(sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)) / (k * len(truth)))


def unit_vectors(n: int, dim: int, seed: int) -> Any:
    """float32 [n, dim], rows of unit length (random Gaussian: fine for exact search, meaningless for ANN recall)."""
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):  # in place, a block at a time: no second copy of 1M x 512
        block = x[start:start + 65536]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return x


def error_text(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {e}".strip()[:2000]


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Worker:
    """What a worker process gets: its sizes, its deadline, and a result tree saved after every part."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sizes = Sizes(args.cpu_smoke, args.quick)
        self.deadline = args.deadline
        self.out = Path(args.worker_out)
        self.work = Path(args.work_dir)
        self.results: dict[str, Any] = {}
        self.errors: list[str] = []

    def left(self) -> float:
        return self.deadline - time.time()

    def set(self, keys: tuple[str, ...], value: Any) -> None:
        node = self.results
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        self.save()

    def part(self, keys: tuple[str, ...], fn: Callable[[], Any], need_s: float = 1.0) -> Any:
        """results[keys] = fn(), or "skipped: ..." when the budget is spent, or "error: ..." (kept going)."""
        if self.left() < need_s:
            self.set(keys, f"skipped: the section's time budget was spent ({self.left():.0f} s left, "
                           f"{need_s:.0f} s needed)")
            return None
        try:
            value = fn()
        except Exception as e:  # one broken part must not lose the others
            self.errors.append(f"{'/'.join(keys)}: {error_text(e)}\n{traceback.format_exc(limit=6)}")
            self.set(keys, error_text(e))
            return None
        self.set(keys, value)
        return value

    def save(self) -> None:
        write_json(self.out, {"results": self.results, "errors": self.errors})


# -- environment -------------------------------------------------------------------------------------------------
def worker_env(w: Worker) -> None:
    """Versions, execution providers and GPUs as this process's environment sees them (no torch import)."""
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    w.set(("packages",), versions)
    w.set(("python",), platform.python_version())
    w.set(("platform",), f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores")

    def ort_info() -> dict[str, Any]:
        import onnxruntime as ort

        return {"version": ort.__version__, "providers": ort.get_available_providers(), "file": ort.__file__}

    def faiss_info() -> dict[str, Any]:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        return {"version": faiss.__version__, "gpus": gpus, "file": faiss.__file__}

    w.part(("onnxruntime",), ort_info)
    w.part(("faiss",), faiss_info)

    def gpu() -> Any:
        if not shutil.which("nvidia-smi"):
            return "skipped: no nvidia-smi on this machine"
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or f"error: nvidia-smi: {out.stderr.strip()[:300]}"

    w.part(("gpu",), gpu)


# -- section ort -------------------------------------------------------------------------------------------------------
def export_one(arch: str, models: str, name: str, precision: str, threads: int) -> dict[str, Any]:
    """Export one bundle with the project's exporter (in a process of its own); reuse one already there."""
    from bundle import load_bundle

    dest = Path(models) / name / "1"
    if (dest / "manifest.json").exists():
        with contextlib.suppress(Exception):
            m = load_bundle(dest).manifest
            return {"reused": str(dest), "parity_min_cosine": m.parity.get("min_cosine")}
    import torch

    torch.set_num_threads(max(1, threads))
    from training.export import export_bundle

    started = time.perf_counter()
    result = export_bundle(arch, Path(models), name, "1", precision=precision,
                           source_note="benchmarks/gpu_check: random init")
    p = result.manifest.parity
    return {"seconds": time.perf_counter() - started, "architecture": arch, "precision": precision,
            "parity_min_cosine": p.get("min_cosine"), "image_max_abs_diff": p.get("image_max_abs_diff"),
            "text_max_abs_diff": p.get("text_max_abs_diff")}


EXPORT_CALL = (4, {"precision", "source_note"})  # export_one passes 4 positional arguments and these keywords


def check_export_call() -> None:
    """export_one's call fits export_bundle's signature, read from the source: an export takes ~40 s on two cores
    even for a tiny model, and importing training.export (torch, onnx) ~10 s, too long for --cpu-smoke."""
    import ast

    tree = ast.parse((ROOT / "training" / "export.py").read_text())
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "export_bundle"), None)
    if fn is None:
        raise RuntimeError("training/export.py has no export_bundle function any more: update export_one")
    positional = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    required = len(positional) - len(fn.args.defaults)
    names = set(positional) | {a.arg for a in fn.args.kwonlyargs}
    count, keywords = EXPORT_CALL
    if count < required or count > len(positional) or not keywords <= names:
        raise RuntimeError(f"export_bundle{ast.unparse(fn.args)} no longer takes export_one's call "
                           f"({count} positional, keywords {sorted(keywords)}): update export_one")


def worker_export(w: Worker) -> None:
    s = w.sizes
    models = w.work / "models"
    models.mkdir(parents=True, exist_ok=True)
    if s.smoke and not w.args.smoke_export:
        check_export_call()
        w.set(("export",), "skipped: --cpu-smoke measures the shipped bundle only (export_one's call of "
                           "training.export.export_bundle was checked against its signature; --smoke-export runs it)")
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    slug = s.export_arch.lower()
    threads = max(1, (os.cpu_count() or 2) // len(s.export_precisions))
    with ProcessPoolExecutor(len(s.export_precisions), mp_context=get_context("spawn")) as pool:
        futures = {p: pool.submit(export_one, s.export_arch, str(models), f"{slug}-{p}", p, threads)
                   for p in s.export_precisions}
        for p, future in futures.items():
            w.part(("export", f"{slug}-{p}"), lambda f=future: f.result(timeout=max(1.0, w.left())), need_s=0)


def bundle_paths(w: Worker) -> list[Path]:
    """The exported bundles of this run's work folder, then the shipped default model(s)."""
    from bundle import discover

    exported = discover(w.work / "models") if (w.work / "models").is_dir() else []
    # fp16 first: the bundle the GPU targets are about, measured before time can run out
    return [*sorted(exported, key=lambda p: "fp16" not in p.parent.name), *discover(ROOT / "models")]


def tower_inputs(bundle: Any, tower: str) -> Callable[[int], Any]:
    """batch -> model input: normal noise images [b, 3, S, S] float32, or token ids [b, L] int64."""
    import numpy as np

    m = bundle.manifest
    if tower == "image":
        size = m.image.size
        pool = np.random.default_rng(0).standard_normal((64, 3, size, size), dtype=np.float32)
        return lambda b: np.ascontiguousarray(np.resize(pool, (b, 3, size, size)))
    from bundle.tokenizer import ClipTokenizer

    ids = ClipTokenizer(bundle.tokenizer_path, m.text.context_length).encode_batch(CAPTIONS)[0]
    return lambda b: np.ascontiguousarray(np.resize(ids, (b, ids.shape[1])))


def sweep(make_run: Callable[[int], Callable[[], Any]], batches: list[int], seconds: float, w: Worker
          ) -> dict[str, Any]:
    """items/s at each batch size until it falls 10% below the best twice, or time runs out."""
    rates: dict[str, Any] = {}
    worse = 0
    for b in batches:
        if w.left() < 2 * seconds + 1:
            rates[str(b)] = "skipped: out of section time"
            break
        try:
            rates[str(b)] = rate(make_run(b), b, seconds)
        except Exception as e:  # e.g. out of memory at the largest batch: the smaller ones still count
            rates[str(b)] = error_text(e)
            break
        numbers = [v for v in rates.values() if isinstance(v, float)]
        worse = worse + 1 if rates[str(b)] < 0.9 * max(numbers) else 0
        if worse >= 2:
            break
    numbers = {k: v for k, v in rates.items() if isinstance(v, float)}
    best = max(numbers, key=numbers.__getitem__) if numbers else None
    return {"items_per_s_by_batch": rates, "best_batch": int(best) if best else None,
            "best_items_per_s": numbers[best] if best else None}


def measure_tower(w: Worker, bundle: Any, tower: str, providers: list[str], device: str) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from server.runtime import Tower

    m = bundle.manifest
    path = bundle.image_path if tower == "image" else bundle.text_path
    if path is None:
        return {"skipped": "image-only bundle"}
    s = w.sizes
    started = time.perf_counter()
    session = Tower(path, providers, m.precision).session
    out: dict[str, Any] = {"provider": session.get_providers()[0], "session_s": time.perf_counter() - started}
    x_of = tower_inputs(bundle, tower)
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name

    def numpy_run(b: int) -> Callable[[], Any]:
        x = x_of(b)
        return lambda: session.run([name_out], {name_in: x})

    def binding(b: int, copy_in: bool) -> Callable[[], Any]:
        x = x_of(b)
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
        y_dev = ort.OrtValue.ortvalue_from_shape_and_type([b, m.dim], np.float32, device, 0)
        io_binding = session.io_binding()
        io_binding.bind_ortvalue_input(name_in, x_dev)
        io_binding.bind_ortvalue_output(name_out, y_dev)

        def run() -> None:
            if copy_in:  # what a server with a preallocated device buffer pays: one host-to-device copy a batch
                x_dev.update_inplace(x)
            session.run_with_iobinding(io_binding)

        return run

    out["numpy"] = sweep(numpy_run, s.batches, s.point_s, w)
    out["iobinding"] = sweep(lambda b: binding(b, False), s.batches, s.point_s, w)
    out["iobinding_h2d"] = sweep(lambda b: binding(b, True), s.batches, s.point_s, w)
    bests = {k: out[k]["best_items_per_s"] for k in ("numpy", "iobinding", "iobinding_h2d") if out[k]["best_items_per_s"]}
    if bests:
        out["best_mode"] = max(bests, key=bests.__getitem__)
        out["best_items_per_s"] = bests[out["best_mode"]]
    out["batch1_latency"] = {"numpy": latency_ms(numpy_run(1), s.point_s),
                             "iobinding": latency_ms(binding(1, False), s.point_s)}
    x = x_of(8)
    got = session.run([name_out], {name_in: x})[0]
    reference = Tower(path, ["CPUExecutionProvider"], m.precision).session.run([name_out], {name_in: x})[0]
    out["parity_vs_cpu_ep"] = {"inputs": len(x), "max_abs_diff": float(np.abs(got - reference).max()),
                               "min_cosine": cosine_min(got, reference)}
    return out


def worker_ort(w: Worker) -> None:
    import onnxruntime as ort

    from bundle import load_bundle

    if w.sizes.smoke:
        providers, device = ["CPUExecutionProvider"], "cpu"
        w.set(("note",), "--cpu-smoke: the CPU EP stands in for CUDA (same code: numpy, IO binding, parity)")
    else:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels torch brought (DEVICE.md)
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime {ort.__version__} at {ort.__file__} has no CUDAExecutionProvider "
                               f"({ort.get_available_providers()}): install the carried onnxruntime-gpu wheel "
                               "(benchmarks/gpu_check/README.md)")
        providers, device = ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"
    w.set(("onnxruntime",), ort.__version__)
    for path in bundle_paths(w):
        bundle = load_bundle(path)
        key = bundle.manifest.name
        w.set(("bundles", key, "precision"), bundle.manifest.precision)
        for tower in ("image", "text"):
            w.part(("bundles", key, tower), lambda b=bundle, t=tower: measure_tower(w, b, t, providers, device),
                   need_s=3)


# -- section server ------------------------------------------------------------------------------------------------
def sample_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (smooth colour fields, shapes, a little noise), 320 x 240, quality 90."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    for _ in range(n):
        a, b, c = rng.uniform(0, 1, 3)
        base = np.stack([(xx / 320) * 255 * a, (yy / 240) * 255 * b, ((xx + yy) / 560) * 255 * c], -1)
        base += rng.normal(0, 8, base.shape)
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = rng.integers(0, 260), rng.integers(0, 180)
            draw.ellipse((x0, y0, x0 + rng.integers(20, 60), y0 + rng.integers(20, 60)),
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def client_load(target: str, kind: str, model: str, items: int, concurrency: int, start_at: float, stop_at: float,
                seed: int, side: int = 224) -> dict[str, Any]:
    """One client process: `concurrency` closed-loop coroutines on one grpc.aio channel; counts what completes
    between start_at and stop_at (wall clock). kind: image (JPEG bytes), pixels (uint8 RGB side x side), text."""
    return asyncio.run(_client_load(target, kind, model, items, concurrency, start_at, stop_at, seed, side))


async def _client_load(target: str, kind: str, model: str, items: int, concurrency: int, start_at: float,
                       stop_at: float, seed: int, side: int) -> dict[str, Any]:
    import grpc
    from tandem.v1 import tandem_pb2 as pb
    from tandem.v1 import tandem_pb2_grpc as pb_grpc

    if kind == "image":
        jpegs = sample_jpegs(16, seed)
        requests = [pb.EmbedImageRequest(model=model, images=[jpegs[(i + j) % 16] for j in range(items)])
                    for i in range(16)]
    elif kind == "pixels":
        import numpy as np

        rng = np.random.default_rng(seed)
        requests = [pb.EmbedImageRequest(model=model, pixels=pb.Pixels(
            count=items, height=side, width=side,
            data=rng.integers(0, 256, (items, side, side, 3), dtype=np.uint8).tobytes())) for _ in range(16)]
    else:
        requests = [pb.EmbedTextRequest(model=model, texts=[f"{CAPTIONS[(i + j) % len(CAPTIONS)]} {seed} {i} {j}"
                                                            for j in range(items)]) for i in range(16)]
    done, latencies, errors = 0, [], Counter()
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=opts) as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.EmbedText if kind == "text" else stub.EmbedImage
        await asyncio.gather(*(call(requests[k % 16], timeout=120) for k in range(concurrency)))  # warm-up

        async def loop(k: int) -> None:
            nonlocal done
            i = k
            await asyncio.sleep(max(0.0, start_at - time.time()))
            while time.time() < stop_at:
                t = time.perf_counter()
                try:
                    await call(requests[i % 16], timeout=60)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] += 1
                else:
                    if time.time() <= stop_at:
                        done += items
                        latencies.append(time.perf_counter() - t)
                i += concurrency

        await asyncio.gather(*(loop(k) for k in range(concurrency)))
    return {"items": done, "latencies": latencies, "errors": dict(errors)}


def jpeg_decode(w: Worker) -> dict[str, Any] | str:
    """The server's torchvision JPEG path (server/torch_images.py: nvJPEG on CUDA) against Pillow's
    bundle/image.py on the same JPEGs at 224 px: largest difference in 8-bit levels, and images/s of one batch."""
    import dataclasses

    from bundle import load_bundle
    from bundle.image import preprocess
    from server.torch_images import TorchImages, available

    if not available():
        return "skipped: torchvision is not importable here (the server decodes with Pillow)"
    import torch

    device = "cuda" if torch.cuda.is_available() and not w.sizes.smoke else "cpu"
    spec = dataclasses.replace(load_bundle(ROOT / "models" / "tandem-shapes" / "1").manifest.image, size=224)
    jpegs = sample_jpegs(16 if w.sizes.smoke else 256, 1)
    images = TorchImages(spec, device)
    images.batch(jpegs[:4], 1 << 26, None)  # warm-up: CUDA context, nvJPEG handles
    out, seconds = images.batch(jpegs, 1 << 26, None)
    diffs = [float(abs(o - preprocess(j, spec, 1 << 26)).max()) for o, j in zip(out, jpegs) if o is not None]
    return {"device": device, "taken": len(diffs), "of": len(jpegs), "batch_images_per_s": len(jpegs) / seconds,
            "max_abs_diff": max(diffs), "max_diff_8bit_levels": max(diffs) * 255 * min(spec.std)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(w: Worker, repo: Path, device: str) -> tuple[subprocess.Popen, str, dict[str, Any], Path]:  # type: ignore[type-arg]
    from dataclasses import fields

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from server.config import ServerConfig

    known = {f.name for f in fields(ServerConfig)}
    wanted = {"device": device, "max_batch_size": w.sizes.max_batch_size, "max_queue_delay_us": 2000,
              "preprocess_threads": os.cpu_count() or 4, "max_items_per_request": 256,
              "data_dir": str(w.work / "server-data"), "metrics_port": 0, "log_level": "WARNING"}
    flags = {k: v for k, v in wanted.items() if k in known}  # a setting this version lacks is left out
    port = free_port()
    cmd = [sys.executable, "-m", "cli", "serve", "--models", str(repo), "--port", str(port)]
    for k, v in flags.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    log_path = w.work / f"server-{port}.log"
    log = open(log_path, "w")  # noqa: SIM115 (the server writes it until it stops)
    # In the worker's process group: killing a worker that ran out of time stops its server too.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=repo_env())
    target = f"127.0.0.1:{port}"
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    while w.left() > 5:
        with contextlib.suppress(grpc.RpcError):
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return proc, target, flags, log_path
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited during start-up (code {proc.returncode}): "
                               f"{log_path.read_text()[-1500:]}")
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"the server was not SERVING before the section's time ran out: {log_path.read_text()[-1500:]}")


def stop_server(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def raw_best(w: Worker, model: str, tower: str) -> tuple[float | None, str]:
    """This run's raw ORT best for (model, tower), from section ort's results, and which mode it was."""
    prior = Path(w.args.prior) if w.args.prior else None
    if prior is None or not prior.exists():
        return None, "skipped: section ort did not run in this invocation"
    ort_results = json.loads(prior.read_text()).get("sections", {}).get("ort", {}).get("results", {})
    entry = ort_results.get("bundles", {}).get(model, {}).get(tower)
    if not isinstance(entry, dict) or not entry.get("best_items_per_s"):
        return None, f"skipped: section ort has no figure for {model} {tower}"
    return float(entry["best_items_per_s"]), entry.get("best_mode", "?")


def worker_server(w: Worker) -> None:
    import grpc
    from tandem.v1 import tandem_pb2 as pb
    from tandem.v1 import tandem_pb2_grpc as pb_grpc

    from bundle import load_bundle

    s = w.sizes
    repo = w.work / "serve-models"
    shutil.rmtree(repo, ignore_errors=True)
    towers: dict[str, list[str]] = {}  # model name -> input kinds, in the order they are measured
    sides: dict[str, int] = {}  # model name -> image size
    for path in bundle_paths(w):
        bundle = load_bundle(path)
        if bundle.manifest.name in towers or bundle.manifest.name.endswith("-fp32"):
            continue  # fp32 ViT-B-32: section ort has its raw figures; the server's time goes to fp16
        # pixels: raw uint8 RGB at the model's size (EmbedImageRequest.pixels), nothing to decode or resize
        towers[bundle.manifest.name] = ["image", "pixels", "text"] if bundle.text_path else ["image", "pixels"]
        sides[bundle.manifest.name] = bundle.manifest.image.size
        dest = repo / bundle.manifest.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), dest)
    w.part(("jpeg_decode",), lambda: jpeg_decode(w), need_s=5)
    started = time.perf_counter()
    proc, target, flags, log_path = start_server(w, repo, "cpu" if s.smoke else "cuda")
    w.set(("server_flags",), flags)
    w.set(("start_s",), time.perf_counter() - started)
    try:
        with grpc.insecure_channel(target) as ch:
            listed = pb_grpc.ModelsStub(ch).ListModels(pb.ListModelsRequest(), timeout=30)
        w.set(("providers",), {m.model.name: m.execution_provider for m in listed.models})
        w.set(("precisions",), {m.model.name: m.precision for m in listed.models})  # fp16 when converted on CUDA
        _drive(w, target, towers, sides)
    finally:
        stop_server(proc)
        w.set(("server_log_tail",), log_path.read_text()[-800:])
    for name, kinds in towers.items():
        for kind in kinds:
            key = LOAD_KEYS[kind]
            node = w.results.get(name, {}).get(key)
            if not isinstance(node, dict):
                continue
            best = max((v["items_per_s"] for v in node.values() if isinstance(v, dict)), default=None)
            raw, mode = raw_best(w, name, "text" if kind == "text" else "image")
            w.set((name, key, "best_items_per_s"), best)
            w.set((name, key, "ratio_to_raw_ort"), best / raw if best and raw else mode)
            if raw:
                w.set((name, key, "raw_ort_best"), {"items_per_s": raw, "mode": mode})


def _warm(_: int) -> None:
    import grpc  # noqa: F401 (a spawned client process pays its imports before the first measurement)
    from tandem.v1 import tandem_pb2_grpc  # noqa: F401

    time.sleep(0.5)


LOAD_KEYS = {"image": "image_jpeg", "pixels": "image_pixels", "text": "text"}


def _drive(w: Worker, target: str, towers: dict[str, list[str]], sides: dict[str, int]) -> None:
    """Every (model, tower, concurrency, items per request), each for the same share of the time left."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    s = w.sizes
    combos = [(n, t, c, i) for n, kinds in towers.items() for t in kinds for c in s.concurrency for i in s.items]
    with ProcessPoolExecutor(s.client_procs, mp_context=get_context("spawn")) as pool:
        list(pool.map(_warm, range(s.client_procs)))
        for n, (name, tower, conc, items) in enumerate(combos):
            keys = (name, LOAD_KEYS[tower], f"c{conc}_n{items}")
            seconds = min(s.load_s, max(0.2, (w.left() - 5) / (len(combos) - n) - 1.5))
            w.part(keys, lambda a=(pool, s.client_procs, target, name, tower, conc, items, seconds, sides[name]):
                   _one_load(*a), need_s=seconds + 2)


def _one_load(pool: Any, procs: int, target: str, model: str, kind: str, concurrency: int, items: int,
              seconds: float, side: int) -> dict[str, Any]:
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if p < concurrency % procs else 0) for p in range(procs)]
    start_at = time.time() + 1.0  # client processes build their requests and warm up first
    stop_at = start_at + seconds
    futures = [pool.submit(client_load, target, kind, model, items, c, start_at, stop_at, p, side)
               for p, c in enumerate(shares)]
    parts = [f.result(timeout=seconds + 120) for f in futures]
    lat = sorted(x for p in parts for x in p["latencies"])
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
    done = sum(p["items"] for p in parts)
    return {"items_per_s": done / seconds, "requests": len(lat),
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "errors": dict(errors), "seconds": seconds, "client_processes": procs}


# -- section faiss ------------------------------------------------------------------------------------------------
def worker_faiss(w: Worker) -> None:
    import faiss

    s = w.sizes
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    w.set(("faiss",), {"version": faiss.__version__, "gpus": gpus, "file": faiss.__file__})
    if gpus == 0 and not s.smoke:
        w.set(("flat",), f"skipped: faiss {faiss.__version__} at {faiss.__file__} sees no GPU (carry faiss-gpu: "
                         "benchmarks/gpu_check/README.md)")
    else:
        for n in s.faiss_n:
            if w.part(("flat", str(n)), lambda n=n: faiss_flat(w, n, gpus > 0), need_s=10) is not None:
                break  # the fallback size only when the larger one failed
    w.part(("collection",), lambda: collection_search(w, gpus > 0), need_s=10)


def faiss_flat(w: Worker, n: int, gpu: bool) -> dict[str, Any]:
    import faiss

    s = w.sizes
    started = time.perf_counter()
    xb = unit_vectors(n, s.dim, 1)
    xq = unit_vectors(1024, s.dim, 2)
    out: dict[str, Any] = {"n": n, "dim": s.dim, "k": s.k, "data_s": time.perf_counter() - started}
    cpu = faiss.IndexFlatIP(s.dim)
    cpu.add(xb)
    few = xq[: s.recall_queries]
    t = time.perf_counter()
    truth = cpu.search(few, s.k)[1]
    out["cpu_flat"] = {"threads": faiss.omp_get_max_threads(),
                       f"batch{len(few)}_q_per_s": len(few) / (time.perf_counter() - t),
                       "batch1": latency_ms(lambda: cpu.search(xq[:1], s.k), min(1.0, s.point_s * 2), min_calls=3)}
    res = faiss.StandardGpuResources() if gpu else None
    for storage in ("fp32", "fp16"):
        if w.left() < 5:
            out[storage] = "skipped: out of section time"
            continue
        if gpu:
            cfg = faiss.GpuIndexFlatConfig()
            cfg.useFloat16 = storage == "fp16"
            index = faiss.GpuIndexFlatIP(res, s.dim, cfg)
            kind = f"GpuIndexFlatIP ({storage} storage)"
        else:  # --cpu-smoke: the CPU flat index (fp16: scalar-quantised fp16) through the same measuring code
            index = faiss.IndexFlatIP(s.dim) if storage == "fp32" else faiss.index_factory(
                s.dim, "SQfp16", faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:
                index.train(xb[:1000])
            kind = f"{type(index).__name__} (cpu stand-in: --cpu-smoke)"
        t = time.perf_counter()
        index.add(xb)
        out[storage] = {"index": kind, "add_s": time.perf_counter() - t,
                        "batch1024_q_per_s": rate(lambda i=index: i.search(xq, s.k), len(xq), s.point_s),
                        "batch1": latency_ms(lambda i=index: i.search(xq[:1], s.k), s.point_s),
                        f"recall_at_{s.k}_vs_cpu_flat": recall_at_k(index.search(few, s.k)[1], truth)}
        del index
    return out


def collection_search(w: Worker, gpu: bool) -> dict[str, Any]:
    """index.collection.Collection (what the server searches) at collection_n x 512, against the raw index."""
    import numpy as np

    from index.collection import Collection, Spec
    from index.store import Put

    s = w.sizes
    folder = Path(tempfile.mkdtemp(prefix="collection-", dir=w.work))
    xb = unit_vectors(s.collection_n, s.dim, 3)
    xq = unit_vectors(64, s.dim, 4)
    c = Collection.create(folder / "c", Spec.new("gpucheck", "none", "1", "0" * 64, s.dim, "ip", "Flat"))
    try:
        write = getattr(c, "write", c.store.write)
        started = time.perf_counter()
        first = min(1000, s.collection_n)
        write([Put(f"i{j}", xb[j], "{}") for j in range(first)]).result()
        c.search(xq[:1], s.k)
        device = getattr(c, "device", "unknown")
        if gpu and device == "cpu":
            return {"device": device, "note": "skipped: the collection searches on the CPU although faiss sees a "
                                              "GPU (no GPU search in index/collection.py in this version)"}
        for start in range(first, s.collection_n, 10_000):
            stop = min(s.collection_n, start + 10_000)
            write([Put(f"i{j}", xb[j], "{}") for j in range(start, stop)]).result()
        load_s = time.perf_counter() - started
        c.search(xq, s.k)
        out = {"n": s.collection_n, "device": getattr(c, "device", "unknown"), "kind": getattr(c, "kind", "?"),
               "load_s": load_s,
               "batch64_q_per_s": rate(lambda: c.search(xq, s.k), len(xq), s.point_s),
               "batch1": latency_ms(lambda: c.search(xq[:1], s.k), s.point_s)}
        raw = _raw_flat(xb, gpu)
        out["raw_faiss"] = {"index": type(raw).__name__,
                            "batch64_q_per_s": rate(lambda: raw.search(xq, s.k), len(xq), s.point_s),
                            "batch1": latency_ms(lambda: raw.search(xq[:1], s.k), s.point_s)}
        out["batch1_p50_vs_raw"] = out["batch1"]["p50_ms"] / out["raw_faiss"]["batch1"]["p50_ms"]
        rowids = c.search(xq, s.k)[1]
        names = c.store.by_rowids(sorted({int(r) for r in rowids.ravel() if r >= 0}))
        got = np.array([[int(names[int(r)][0][1:]) if r >= 0 else -1 for r in row] for row in rowids])
        out[f"recall_at_{s.k}_vs_raw"] = recall_at_k(got, raw.search(xq, s.k)[1])
        return out
    finally:
        with contextlib.suppress(Exception):
            c.close(snapshot=False)
        shutil.rmtree(folder, ignore_errors=True)


def _raw_flat(xb: Any, gpu: bool) -> Any:
    import faiss

    if gpu:
        index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), xb.shape[1], faiss.GpuIndexFlatConfig())
    else:
        index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index


def worker_topk(w: Worker) -> None:
    """Exact search as one fp16 matmul + top-k in torch, on the same vectors as section faiss."""
    import torch

    s = w.sizes
    device = torch.device("cpu" if s.smoke else "cuda")
    dtype = torch.float32 if s.smoke else torch.float16
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is exact fp32
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    w.set(("device",), torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    for n in s.faiss_n:
        def one(n: int = n) -> dict[str, Any]:
            xb = torch.from_numpy(unit_vectors(n, s.dim, 1)).to(device)
            xq = torch.from_numpy(unit_vectors(1024, s.dim, 2)).to(device)
            xb_low, xq_low = xb.to(dtype), xq.to(dtype)
            few = xq[: s.recall_queries]
            truth = (few @ xb.T).topk(s.k).indices.cpu().numpy()
            del xb
            return {"n": n, "dim": s.dim, "dtype": str(dtype).removeprefix("torch."),
                    "batch1024_q_per_s": rate(lambda: (xq_low @ xb_low.T).topk(s.k), len(xq), s.point_s, sync),
                    "batch1": latency_ms(lambda: (xq_low[:1] @ xb_low.T).topk(s.k), s.point_s, sync),
                    f"recall_at_{s.k}_vs_fp32": recall_at_k(
                        (xq_low[: s.recall_queries] @ xb_low.T).topk(s.k).indices.cpu().numpy(), truth)}

        if w.part(("matmul_topk", str(n)), one, need_s=5) is not None:
            break


# -- section train ----------------------------------------------------------------------------------------------------
def worker_train(w: Worker) -> None:
    import torch

    from training.methods import SSL_METHODS, ssl_class

    device = torch.device("cpu" if w.sizes.smoke else "cuda")
    w.set(("device",), torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    w.set(("autocast",), "bf16" if device.type == "cuda" else "off (CPU, as the trainer runs it)")
    for label, size, backbone, vit, batch, methods, clip_model, clip_size in w.sizes.train:
        w.part(("clip", label), lambda m=clip_model, cs=clip_size, b=batch: clip_steps(w, m, cs, min(b, 256), device),
               need_s=8)
        _free(device)  # what a step left on the GPU (its closure is gone now) goes before the next model
        names = methods or list(SSL_METHODS)
        backbones = {vit if ssl_class(n).needs_vit else (backbone, None) for n in names}
        for bb, patch in sorted(backbones, key=str):  # the baseline of each backbone the methods use
            w.part(("ssl", label, "bare", bb), lambda b=bb, p=patch, sz=size, n=batch:
                   bare_step(w, b, sz, p, n, device), need_s=4)
            _free(device)
        for name in names:
            w.part(("ssl", label, name), lambda n=name, sz=size, b=backbone, v=vit, bt=batch:
                   ssl_step(w, n, sz, b, v, bt, device), need_s=4)
            _free(device)
        results = w.results.get("ssl", {}).get(label, {})
        for name in names:
            entry, bare = results.get(name), results.get("bare", {}).get(str(results.get(name, {}).get("backbone")))
            if isinstance(entry, dict) and isinstance(bare, dict):
                w.set(("ssl", label, name, "fraction_of_bare"), entry["images_per_s"] / bare["images_per_s"])


def _timed_steps(w: Worker, step: Callable[[], None], batch: int, device: Any) -> float:
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return rate(step, batch, w.sizes.point_s * 2, sync, w.sizes.min_calls, w.sizes.warmups)


def _free(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _optimizer(model: Any, run_config: Any = None) -> Any:
    """The optimiser `tandem train` builds for `run_config` (a method's config); None: AdamW, lr 1e-3."""
    from training.config import TrainConfig
    from training.trainer import make_optimizer

    config = (TrainConfig.for_run(run_config) if run_config is not None else
              TrainConfig(steps=1, batch_size=1, optimizer="adamw", lr=1e-3, weight_decay=1e-4, warmup_steps=0))
    return make_optimizer(model, config)


def _train_step(model: Any, loss_of: Callable[[], Any], optimizer: Any, device: Any, after_backward: Any = None,
                after_step: Any = None) -> Callable[[], None]:
    """One step as training/trainer.py runs it: bf16 autocast on GPU, zero_grad, backward, step, after_step."""
    import torch

    count = [0]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(count[0])
        optimizer.step()
        count[0] += 1
        if after_step is not None:
            after_step(count[0], 10**6)

    return step


def _shapes(n: int) -> list[Any]:
    from training.data import procedural

    data = procedural.ShapesDataset("train", n)
    return [data[i][0] for i in range(n)]


def _tile(t: Any, batch: int) -> Any:
    """A batch of `batch` rows from fewer distinct ones (augmenting every image on the CPU would cost more than
    the steps being timed)."""
    reps = math.ceil(batch / len(t))
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].contiguous()


def ssl_step(w: Worker, name: str, size: int, backbone: str, vit: tuple[str, int | None], batch: int, device: Any
             ) -> dict[str, Any]:
    from training.methods import ssl_class, ssl_config

    cls = ssl_class(name)
    bb, patch = vit if cls.needs_vit else (backbone, None)
    config = ssl_config(name, backbone=bb, image_size=size, patch_size=patch, batch_size=batch)
    method = cls(config, None).to(device).train()  # with its online linear probe, as `tandem train` runs it
    optimizer = _optimizer(method, config)  # the method's default optimiser
    views = method.views()
    views_batch, labels = method.collate([(views(img), 0) for img in _shapes(min(batch, 32))])
    on_device = ([_tile(v, batch).to(device) for v in views_batch], _tile(labels, batch).to(device))
    step = _train_step(method, lambda: method.loss(method, on_device, device), optimizer, device,
                       getattr(method, "after_backward", None), method.after_step)
    out = {"backbone": bb, "batch": batch, "views": len(on_device[0]),
           "view_sizes": sorted({int(v.shape[-1]) for v in on_device[0]}),
           "images_per_s": _timed_steps(w, step, batch, device)}
    return out


def bare_step(w: Worker, backbone: str, size: int, patch: int | None, batch: int, device: Any) -> dict[str, Any]:
    """The backbone alone: forward + backward + AdamW on one view, a linear classifier on top."""
    import torch
    import torch.nn.functional as F

    from training.backbones import build_backbone
    from training.transforms import eval_transform

    net = build_backbone(backbone, size, patch)
    model = torch.nn.Sequential(net, torch.nn.Linear(net.dim, 56)).to(device).train()
    transform = eval_transform(size)
    x = _tile(torch.stack([transform(img) for img in _shapes(min(batch, 32))]), batch).to(device)
    y = torch.randint(0, 56, (batch,), device=device)
    step = _train_step(model, lambda: F.cross_entropy(model(x), y), _optimizer(model), device)
    out = {"backbone": backbone, "batch": batch, "images_per_s": _timed_steps(w, step, batch, device)}
    return out


def clip_config(w: Worker, model: str, size: int) -> str:
    """`model` as is, or a JSON copy of its config at `size` px (patch size so that the grid stays 8 x 8 or more)."""
    import open_clip

    import training.models  # noqa: F401 (registers training/configs)

    cfg = open_clip.get_model_config(model)
    if cfg["vision_cfg"]["image_size"] == size:
        return model
    cfg = json.loads(json.dumps(cfg))
    cfg["vision_cfg"].update(image_size=size, patch_size=max(1, min(cfg["vision_cfg"]["patch_size"], size // 8)))
    path = w.work / f"{model}-{size}px.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def clip_steps(w: Worker, model_name: str, size: int, batch: int, device: Any) -> dict[str, Any]:
    import torch

    from training.config import ClipConfig
    from training.distributed import Dist
    from training.methods.clip import Clip

    arch = clip_config(w, model_name, size)
    config = ClipConfig(model=arch, batch_size=batch)
    method = Clip(config, Dist(device=device))
    model = method.model.to(device).train()
    images = torch.randn(batch, 3, size, size, device=device)
    ids = torch.from_numpy(method.tokenizer.encode_batch((CAPTIONS * (batch // len(CAPTIONS) + 1))[:batch])[0])
    ids = ids.to(device)
    ours = _train_step(model, lambda: method.loss(model, (images, ids), device), _optimizer(model, config), device,
                       None, method.after_step)
    ours_rate = _timed_steps(w, ours, batch, device)

    def bare_loss() -> Any:  # the same two towers, forward and backward, without the contrastive loss
        image_features, text_features, _ = model(images, ids)
        return image_features.float().square().mean() + text_features.float().square().mean()

    bare_rate = _timed_steps(w, _train_step(model, bare_loss, _optimizer(model, config), device), batch, device)
    out = {"model": model_name, "image_size": size, "config": Path(arch).name, "batch": batch,
           "images_per_s": ours_rate, "bare_towers_images_per_s": bare_rate, "fraction_of_bare": ours_rate / bare_rate}
    return out


WORKER_FNS: dict[str, Callable[[Worker], None]] = {
    "env": worker_env, "export": worker_export, "ort": worker_ort, "server": worker_server, "faiss": worker_faiss,
    "topk": worker_topk, "train": worker_train,
}


def run_worker(args: argparse.Namespace) -> int:
    w = Worker(args)
    w.save()
    try:
        WORKER_FNS[args.worker](w)
    except Exception as e:
        w.errors.append(f"{args.worker}: {error_text(e)}\n{traceback.format_exc(limit=8)}")
        w.results.setdefault("error", error_text(e))
        w.save()
        return 1
    w.save()
    return 0


# -- the orchestrator ------------------------------------------------------------------------------------------------
def faiss_env(site: str | None) -> dict[str, str] | None:
    """The environment of the faiss-gpu worker: its own site folder first, its CUDA 12 libraries on the path
    (DEVICE.md: faiss-gpu from the package index is a CUDA 12 build; the machine has CUDA 13)."""
    if not site or not Path(site).is_dir():
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    libs = [str(p) for p in sorted(Path(site).glob("nvidia/*/lib"))]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*libs, env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def spawn_worker(name: str, args: argparse.Namespace, budget_s: float, out_json: Path, work: Path,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one worker in its own process; its results, its error (crash, timeout) and its wall time."""
    wout = work / f"worker-{name}.json"
    wout.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(wout),
           "--work-dir", str(work), "--deadline", str(time.time() + budget_s), "--prior", str(out_json)]
    cmd += ["--quick"] * args.quick + ["--cpu-smoke"] * args.cpu_smoke + ["--smoke-export"] * args.smoke_export
    if args.cpu_smoke:
        # One thread per op: on two busy cores a second torch/OpenMP thread makes every small op wait for a
        # scheduler slot (a tiny training step took 1-4 s with two threads, 0.15 s with one).
        env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    log_path = work / f"worker-{name}.log"
    with open(log_path, "w") as log:
        # A process group of its own (not a session: the device machine ends what a call leaves running,
        # except new sessions), so that a worker past its budget goes with everything it started.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=repo_env(env),
                                process_group=0)
        try:
            code: int | str = proc.wait(budget_s + GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started (exports, a server)
            proc.wait()
            code = f"killed after {budget_s + GRACE_S:.0f} s (budget {budget_s:.0f} s)"
    entry: dict[str, Any] = {"seconds": time.perf_counter() - started, "budget_s": budget_s}
    data = json.loads(wout.read_text()) if wout.exists() else {"results": {}, "errors": []}
    entry["results"] = data["results"]
    if data["errors"]:
        entry["errors"] = data["errors"]
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        entry.setdefault("errors", []).append(f"worker {name}: exit {code}; log tail:\n{tail}")
    return entry


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    scale = args.budget_s / DEFAULT_TOTAL_S if args.budget_s else (0.5 if args.quick else 1.0)
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    sections = [s for s in SECTIONS if s in wanted]
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise SystemExit(f"error: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    fenv = faiss_env(args.faiss_site)
    report: dict[str, Any] = {
        "schema": SCHEMA, "mode": "cpu-smoke" if args.cpu_smoke else "gpu", "quick": args.quick,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": sys.argv,
        "faiss_site": args.faiss_site if fenv else None, "sections": {},
    }
    run_started = time.monotonic()
    env_started = time.perf_counter()
    report["environment"] = spawn_worker("env", args, 60, out_path, work)["results"]
    if fenv:
        report["environment"]["faiss_worker"] = spawn_worker("env", args, 60, out_path, work, fenv)["results"]
    report["environment"]["seconds"] = time.perf_counter() - env_started
    for section in SECTIONS:
        report["sections"][section] = {"status": "skipped: not in --sections" if section not in sections else
                                       "not run yet", "seconds": 0.0}
    write_json(out_path, report)
    lock = threading.Lock()
    run_ends = run_started + args.max_s

    def run_section(section: str) -> None:
        started = time.perf_counter()
        entry: dict[str, Any] = {"status": "running", "results": {}, "workers": {}}
        with lock:
            report["sections"][section] = entry  # the next worker (server: ratios to raw ORT) reads it
        for name, budget in WORKERS[section]:
            budget = max(EXPORT_MIN_S, budget * scale) if name == "export" else budget * scale
            if args.cpu_smoke:
                budget = SMOKE_BUDGET_S  # tiny sizes: a worker ends when its work is done
            elif run_ends - time.monotonic() - GRACE_S < budget:
                budget = run_ends - time.monotonic() - GRACE_S
                why = f"the run's --max-s {args.max_s:.0f} was spent"
            else:
                why = "its budget was under 10 s: raise --budget-s"
            if budget < 10:
                with lock:
                    entry["results"][name] = f"skipped: {why}"
                    entry.setdefault("errors", []).append(f"worker {name} not run: {why}")
                continue
            print(f"[gpu_check] {section}/{name} (budget {budget:.0f} s) ...", flush=True)
            got = spawn_worker(name, args, budget, out_path, work, fenv if name == "faiss" else None)
            with lock:
                entry["results"].update(got.pop("results"))
                if got.get("errors"):
                    entry.setdefault("errors", []).extend(got.pop("errors"))
                entry["workers"][name] = got
                write_json(out_path, report)
        with lock:
            entry["seconds"] = time.perf_counter() - started
            entry["status"] = "ok" if not entry.get("errors") else "errors (see errors)"
            write_json(out_path, report)

    # On the GPU one section at a time (each has the machine to itself). --cpu-smoke times nothing, so its
    # independent chains run side by side: it is then about as long as its longest chain.
    chains = [[s for s in chain if s in sections] for chain in (("ort", "server"), ("faiss",), ("train",))]
    if args.cpu_smoke:
        threads = [threading.Thread(target=lambda c=chain: [run_section(s) for s in c]) for chain in chains]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for section in sections:
            run_section(section)
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_json(out_path, report)
    return report


def summary(report: dict[str, Any]) -> list[str]:
    """Headline figures, one per line, for the device call's output tail."""
    lines = [f"mode {report['mode']}; " + str(report.get("environment", {}).get("gpu", ""))]
    sec = report["sections"]

    def num(v: Any, unit: str = "") -> str:
        return f"{v:,.0f}{unit}" if isinstance(v, (int, float)) and v >= 100 else (
            f"{v:.3g}{unit}" if isinstance(v, (int, float)) else str(v)[:60])

    for name, b in sec.get("ort", {}).get("results", {}).get("bundles", {}).items():
        for tower in ("image", "text"):
            t = b.get(tower)
            if isinstance(t, dict) and "numpy" in t:
                lines.append(f"ort {name} {tower}: numpy {num(t['numpy']['best_items_per_s'])}/s, iobinding "
                             f"{num(t['iobinding']['best_items_per_s'])}/s, +h2d {num(t['iobinding_h2d']['best_items_per_s'])}"
                             f"/s, batch-1 {num(t['batch1_latency']['iobinding']['p50_ms'])} ms, parity max diff "
                             f"{num(t['parity_vs_cpu_ep']['max_abs_diff'])}")
            elif t is not None:
                lines.append(f"ort {name} {tower}: {num(t)}")
    for name, b in sec.get("server", {}).get("results", {}).items():
        if isinstance(b, dict):
            for key in LOAD_KEYS.values():
                t = b.get(key)
                if isinstance(t, dict):
                    lines.append(f"server {name} {key}: best {num(t.get('best_items_per_s'))}/s, ratio to raw ORT "
                                 f"{num(t.get('ratio_to_raw_ort'))}")
    fa = sec.get("faiss", {}).get("results", {})
    for n, r in (fa.get("flat") or {}).items() if isinstance(fa.get("flat"), dict) else []:
        for storage in ("fp32", "fp16"):
            if isinstance(r, dict) and isinstance(r.get(storage), dict):
                x = r[storage]
                lines.append(f"faiss {n} {storage}: {num(x['batch1024_q_per_s'])} q/s, batch-1 "
                             f"{num(x['batch1']['p50_ms'])} ms")
    for n, r in (fa.get("matmul_topk") or {}).items():
        if isinstance(r, dict):
            lines.append(f"torch matmul+topk {n} {r['dtype']}: {num(r['batch1024_q_per_s'])} q/s, batch-1 "
                         f"{num(r['batch1']['p50_ms'])} ms")
    tr = sec.get("train", {}).get("results", {})
    for label, c in (tr.get("clip") or {}).items():
        if isinstance(c, dict):
            lines.append(f"train clip {label}: {num(c['images_per_s'])} img/s ({num(c['fraction_of_bare'])} of bare)")
    for label, methods in (tr.get("ssl") or {}).items():
        parts = [f"bare {k} {num(v['images_per_s'])}" for k, v in methods.get("bare", {}).items()
                 if isinstance(v, dict)]
        parts += [f"{k} {num(v['images_per_s'])} ({num(v.get('fraction_of_bare'))})" for k, v in methods.items()
                  if isinstance(v, dict) and "images_per_s" in v]
        lines.append(f"train ssl {label} img/s: " + ", ".join(parts))
    for name, s in sec.items():
        lines.append(f"section {name}: {s.get('status')}, {num(s.get('seconds', 0))} s"
                     + (f", {len(s['errors'])} error(s)" if s.get("errors") else ""))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "runs" / "gpu_check.json"
    p.add_argument("--out", default=str(default_out), help=f"the JSON file to write (default {default_out})")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="half the time: fp16 export only, shorter loops and budgets")
    p.add_argument("--budget-s", type=float, help=f"the workers' time budgets together, in seconds (default "
                   f"{DEFAULT_TOTAL_S:.0f}, with --quick half; the export keeps at least {EXPORT_MIN_S:.0f})")
    p.add_argument("--max-s", type=float, default=MAX_S, help="no worker starts, and none runs, past this many "
                   f"seconds from the start (default {MAX_S:.0f}: a device call may last 600 s, the install included)")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: every code path at tiny sizes on the CPU "
                   "(the CPU EP, faiss-cpu, a CPU server and CPU training steps stand in); about a minute")
    p.add_argument("--smoke-export", action="store_true", help="with --cpu-smoke: also run the export (tiny model; "
                   "about 40 s per precision on two cores)")
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "tandem-gpu-check"),
                   help="exported bundles, server data and worker logs (kept: a rerun reuses the exports)")
    p.add_argument("--faiss-site", default=os.environ.get("TANDEM_FAISS_SITE", "/tmp/fsite"),
                   help="folder with faiss-gpu and its CUDA 12 libraries (pip --target), used by the faiss worker "
                   "only (default $TANDEM_FAISS_SITE or /tmp/fsite; ignored when missing)")
    # Internal: one worker process.
    p.add_argument("--worker", choices=sorted(WORKER_FNS), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--prior", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    started = time.perf_counter()
    report = run_all(args)
    try:
        print("\n".join(summary(report)))
    except Exception as e:  # the JSON is written; a summary that trips on an odd entry must not hide that
        print(f"[gpu_check] no summary ({error_text(e)}); the JSON has everything")
    print(f"[gpu_check] wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
