"""Embedding throughput of the server against raw ONNX Runtime on the same bundle.

    python benchmarks/embed_throughput.py                       # the shipped default model
    python benchmarks/embed_throughput.py --vit-b-32            # also an open_clip ViT-B-32 (random init)

For each model and tower, in this process and on this machine:
  raw ORT        session.run on ready tensors, batch = the server's max_batch_size (no decode, no gRPC)
  raw ORT + prep the same, plus decoding and preprocessing each image in one thread
  server         `tandem serve` in a subprocess, CONCURRENCY clients each sending 1-item requests
                 over localhost gRPC; the batcher merges them
and prints items/s and the ratio server / baseline. The client load runs on the
same cores as the server, so CPU ratios are a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tandem.v1 import tandem_pb2 as pb  # noqa: E402
from tandem.v1 import tandem_pb2_grpc as pb_grpc  # noqa: E402

from bundle import discover, load_bundle  # noqa: E402
from bundle.image import preprocess  # noqa: E402
from bundle.tokenizer import ClipTokenizer  # noqa: E402


def sample_images(n: int) -> list[bytes]:
    """Real photographs (scikit-image) as JPEG, varied crops."""
    import skimage.data
    from PIL import Image

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    out = []
    for i in range(n):
        arr = photos[i % 3][(i * 7) % 40 :, (i * 11) % 60 :]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


TEXTS = [f"a photo of a {c} {s} number {i}" for i, (c, s) in
         enumerate((c, s) for c in ("red", "green", "blue", "small", "large") for s in ("dog", "cat", "car", "tree"))]


def timed(fn, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Items per second of fn() (which returns the items it did), run for about `seconds`."""
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += fn()
    return done / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, port: int, batch: int, delay_us: int) -> subprocess.Popen:  # type: ignore[type-arg]
    cmd = [sys.executable, "-m", "cli", "serve", "--models", str(repo), "--port", str(port),
           "--metrics-port", "0", "--max-batch-size", str(batch), "--max-queue-delay-us", str(delay_us),
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    for _ in range(600):
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return proc
        except grpc.RpcError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        time.sleep(0.5)
    raise RuntimeError("server did not become SERVING")


async def server_rate(target: str, model: str, make_request, concurrency: int, seconds: float) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(items/s with `concurrency` clients, p50 latency ms of single requests at concurrency 1)."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.InferenceStub(ch)
        latencies = []
        for i in range(20):
            t = time.perf_counter()
            await make_request(stub, model, i)
            latencies.append(time.perf_counter() - t)
        done = 0
        stop_at = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while time.perf_counter() < stop_at:
                await make_request(stub, model, i)
                done += 1
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done / (time.perf_counter() - start), float(np.median(latencies) * 1000)


async def embed_image(stub, model: str, i: int) -> None:  # type: ignore[no-untyped-def]
    await stub.EmbedImage(pb.EmbedImageRequest(model=model, images=[IMAGES[i % len(IMAGES)]]))


async def embed_text(stub, model: str, i: int) -> None:  # type: ignore[no-untyped-def]
    await stub.EmbedText(pb.EmbedTextRequest(model=model, texts=[TEXTS[i % len(TEXTS)]]))


IMAGES: list[bytes] = []


def bench_bundle(path: Path, args: argparse.Namespace, target: str) -> list[tuple[str, ...]]:
    bundle = load_bundle(path)
    m = bundle.manifest
    rows = []
    opts = ort.SessionOptions()
    image = ort.InferenceSession(str(bundle.image_path), opts, providers=["CPUExecutionProvider"])
    x = np.stack([preprocess(b, m.image, 10**9) for b in IMAGES[: args.batch]])
    raw = timed(lambda: (image.run(None, {"pixel_values": x}), len(x))[1], args.seconds)

    def prep_and_run() -> int:
        batch = np.stack([preprocess(b, m.image, 10**9) for b in IMAGES[: args.batch]])
        image.run(None, {"pixel_values": batch})
        return len(batch)

    raw_prep = timed(prep_and_run, args.seconds)
    srv, p50 = asyncio.run(server_rate(target, m.name, embed_image, args.concurrency, args.seconds))
    rows.append((m.name, "image", f"{raw:,.0f}", f"{raw_prep:,.0f}", f"{srv:,.0f}", f"{srv / raw:.2f}",
                 f"{srv / raw_prep:.2f}", f"{p50:.1f}"))
    if bundle.text_path:
        text = ort.InferenceSession(str(bundle.text_path), opts, providers=["CPUExecutionProvider"])
        tok = ClipTokenizer(bundle.tokenizer_path, m.text.context_length)
        ids = tok.encode_batch((TEXTS * 10)[: args.batch])[0]
        raw = timed(lambda: (text.run(None, {"input_ids": ids}), len(ids))[1], args.seconds)

        def tok_and_run() -> int:
            batch = tok.encode_batch((TEXTS * 10)[: args.batch])[0]
            text.run(None, {"input_ids": batch})
            return len(batch)

        raw_prep = timed(tok_and_run, args.seconds)
        srv, p50 = asyncio.run(server_rate(target, m.name, embed_text, args.concurrency, args.seconds))
        rows.append((m.name, "text", f"{raw:,.0f}", f"{raw_prep:,.0f}", f"{srv:,.0f}", f"{srv / raw:.2f}",
                     f"{srv / raw_prep:.2f}", f"{p50:.1f}"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=str(ROOT / "models"), help="model repository with the bundles to measure")
    p.add_argument("--vit-b-32", action="store_true", help="also export and measure open_clip ViT-B-32 (random init)")
    p.add_argument("--batch", type=int, default=32, help="raw ORT batch = server max_batch_size")
    p.add_argument("--delay-us", type=int, default=2000, help="server max_queue_delay_us")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent 1-item requests")
    p.add_argument("--seconds", type=float, default=8.0, help="measuring time per figure")
    args = p.parse_args()
    IMAGES.extend(sample_images(64))
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for bundle in discover(Path(args.models)):
            dest = repo / bundle.parent.name / bundle.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(bundle.resolve(), dest)
        if args.vit_b_32:
            from training.export import export_bundle

            print("exporting ViT-B-32 (random init) ...", flush=True)
            t = time.perf_counter()
            r = export_bundle("ViT-B-32", repo, "vit-b-32", "1")
            print(f"  {time.perf_counter() - t:.0f} s, parity min cosine {r.manifest.parity['min_cosine']:.6f}")
        port = free_port()
        server = start_server(repo, port, args.batch, args.delay_us)
        try:
            rows = [row for b in discover(repo) for row in bench_bundle(b, args, f"127.0.0.1:{port}")]
        finally:
            server.terminate()
            server.wait(30)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; onnxruntime {ort.__version__} CPU; "
          f"batch {args.batch}, queue delay {args.delay_us} us, {args.concurrency} concurrent 1-item requests")
    head = ("model", "tower", "raw ORT/s", "raw ORT+prep/s", "server/s", "server/raw", "server/raw+prep", "p50 ms (1 req)")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for r in (head, *rows):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
