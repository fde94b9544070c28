"""Soak: mixed load against a real `tandem serve` for a long time, with the server's resident memory over time.

    .venv-dev/bin/python benchmarks/soak.py                       # 10 minutes (the issue's soak)
    .venv-dev/bin/python benchmarks/soak.py --duration-s 150      # a short run

Starts `tandem serve` (the serving install .venv/bin/python when it exists) on a free port with the shipped
model and a fresh temporary data_dir, creates one collection, then runs --clients threads for --duration-s
seconds. Each thread cycles through five calls:

    EmbedText    1-16 texts of 1-40 random words
    EmbedImage   1-4 PNG images, 48-320 px (a fixed pool of 32, made at start)
    Classify     1-2 images against 5 of 40 labels (so the label cache keeps missing and evicting)
    Upsert       8 items, text or image, ids drawn from a fixed space of --ids (items are replaced, so the
                 collection stops growing once every id is in it; replacing leaves tombstones in the index)
    Search       a text, an image, or an item id, top 10 (early on an id may not be stored yet: NOT_FOUND)

--calls picks a subset (e.g. --calls EmbedText,EmbedImage,Classify to leave collections out).

The server's resident set size (VmRSS from /proc/PID/status, Linux; with its anonymous, file and shared
parts) is sampled every --sample-s seconds.
Verdict: after the warm-up (--warmup-s, default a fifth of the run), memory is "flat" when the largest
sample stays within --tolerance (10%) of the median of the first post-warm-up minute (or tenth of the run,
if shorter). Also reported: the median of the last minute against that baseline, and a least-squares
slope in MB per minute.

Writes <out>/soak.json (settings, calls and errors by kind and status code, throughput, every RSS sample,
the verdict) and <out>/soak.png (RSS over time, warm-up shaded, baseline and +10% lines). Exit status 0
when memory is flat, 1 when not.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from server.client import ById, TandemClient, TandemError  # noqa: E402

WORDS = (
    "red", "green", "blue", "yellow", "purple", "orange", "small", "large", "tiny", "huge", "circle",
    "square", "triangle", "star", "ring", "cross", "striped", "dotted", "plain", "bright", "dark", "shape",
    "on", "a", "the", "with", "of", "and", "picture", "photo", "drawing", "of", "two", "three",
)
LABELS = [f"{size} {colour} {shape}" for size in ("small", "large") for colour in ("red", "green", "blue", "yellow")
          for shape in ("circle", "square", "triangle", "star", "ring")]
COLLECTION = "soak"
KINDS = ("EmbedText", "EmbedImage", "Classify", "Upsert", "Search")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int) -> dict[str, int]:
    """Resident bytes of a process: VmRSS, and its parts RssAnon (heap, stacks), RssFile (mapped files: shared
    libraries, ONNX and SQLite files) and RssShmem."""
    fields = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            found[name] = int(value.split()[0]) * 1024
    return found


def image_pool(rng: random.Random, n: int = 32) -> list[bytes]:
    pool = []
    for _ in range(n):
        side = rng.randint(48, 320)
        img = Image.new("RGB", (side, side), tuple(rng.randint(0, 255) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 4)):
            x, y, r = rng.randint(0, side), rng.randint(0, side), rng.randint(4, side // 2)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pool.append(buf.getvalue())
    return pool


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))


class Load:
    """--clients threads, each cycling through the five calls until stopped; counts calls by (kind, code)."""

    def __init__(self, target: str, clients: int, ids: int, images: list[bytes], seed: int, kinds: list[str]):
        self.target, self.ids, self.images, self.kinds = target, ids, images, kinds
        self.calls: Counter[tuple[str, str]] = Counter()
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(seed + i,), daemon=True) for i in range(clients)]

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        with TandemClient(self.target, timeout_s=60) as c:
            calls = [("EmbedText", lambda: c.embed_text([text(rng) for _ in range(rng.randint(1, 16))])),
                     ("EmbedImage", lambda: c.embed_image(rng.sample(self.images, rng.randint(1, 4)))),
                     ("Classify", lambda: c.classify(rng.sample(self.images, rng.randint(1, 2)), rng.sample(LABELS, 5))),
                     ("Upsert", lambda: c.upsert(COLLECTION, [self.item(rng) for _ in range(8)])),
                     ("Search", lambda: c.search(COLLECTION, self.query(rng), top_k=10))]
            calls = [(kind, call) for kind, call in calls if kind in self.kinds]
            while not self.stop.is_set():
                for kind, call in calls:
                    try:
                        call()
                        code = "OK"
                    except TandemError as e:
                        code = e.code.name
                    with self.lock:
                        self.calls[kind, code] += 1

    def item(self, rng: random.Random) -> dict[str, object]:
        n = rng.randrange(self.ids)
        what = {"text": text(rng)} if n % 2 else {"image": rng.choice(self.images)}
        return {"id": f"item-{n}", "metadata": {"n": n, "note": text(rng)[:60]}, **what}

    def query(self, rng: random.Random) -> object:
        pick = rng.randrange(3)
        if pick == 0:
            return text(rng)
        if pick == 1:
            return rng.choice(self.images)
        return ById(f"item-{rng.randrange(self.ids)}")

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def start_server(python: str, models: str, data_dir: str) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    port = free_port()
    proc = subprocess.Popen([python, "-m", "cli", "serve", "--models", models, "--port", str(port),
                             "--metrics-port", "0", "--data-dir", data_dir, "--log-level", "WARNING"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = f"127.0.0.1:{port}"
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return proc, target
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"{target} not SERVING after 300 s")


def verdict(samples: list[tuple[float, int]], warmup_s: float, duration_s: float, tolerance: float) -> dict:
    window_s = min(60.0, (duration_s - warmup_s) / 10)
    post = [(t, r) for t, r in samples if t >= warmup_s]
    if len(post) < 3:
        raise SystemExit("too few samples after the warm-up: run longer or sample more often")
    first = [r for t, r in post if t < warmup_s + window_s] or [post[0][1]]
    last = [r for t, r in post if t >= post[-1][0] - window_s]
    baseline, peak = statistics.median(first), max(r for _, r in post)
    slope = np.polyfit([t / 60 for t, _ in post], [r / 2**20 for _, r in post], 1)[0]
    return {"warmup_s": warmup_s, "window_s": window_s, "baseline_mb": baseline / 2**20, "peak_mb": peak / 2**20,
            "last_mb": statistics.median(last) / 2**20, "min_mb": min(r for _, r in post) / 2**20,
            "peak_over_baseline": peak / baseline - 1, "last_over_baseline": statistics.median(last) / baseline - 1,
            "slope_mb_per_min": float(slope), "tolerance": tolerance, "flat": peak <= baseline * (1 + tolerance)}


def plot(path: Path, samples: list[tuple[float, int]], anon: list[int], v: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot([t / 60 for t, _ in samples], [r / 2**20 for _, r in samples], lw=1.2, label="server RSS")
    ax.plot([t / 60 for t, _ in samples], [a / 2**20 for a in anon], lw=1, ls="-.", label="of which anonymous")
    ax.axvspan(0, v["warmup_s"] / 60, color="grey", alpha=0.15, label="warm-up")
    ax.axhline(v["baseline_mb"], color="green", ls="--", lw=1, label=f"baseline {v['baseline_mb']:.0f} MB")
    ax.axhline(v["baseline_mb"] * (1 + v["tolerance"]), color="red", ls=":", lw=1,
               label=f"+{v['tolerance']:.0%}")
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident memory (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    venv = ROOT / ".venv" / "bin" / "python"
    p.add_argument("--duration-s", type=float, default=600, help="how long the load runs (default 600)")
    p.add_argument("--warmup-s", type=float, help="seconds not judged at the start (default: a fifth of the run)")
    p.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    p.add_argument("--ids", type=int, default=2000, help="distinct item ids that upserts draw from (default 2000)")
    p.add_argument("--sample-s", type=float, default=1.0, help="seconds between RSS samples (default 1)")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed growth over the baseline (default 0.10)")
    p.add_argument("--python", default=str(venv if venv.exists() else sys.executable),
                   help="interpreter of the install that serves (default: .venv, the serving install)")
    p.add_argument("--models", default=str(ROOT / "models"), help="model repository (default: the shipped one)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "soak", help="folder for soak.json and soak.png")
    p.add_argument("--calls", default=",".join(KINDS),
                   help=f"the calls to cycle through, comma-separated (default all: {','.join(KINDS)})")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    kinds = args.calls.split(",")
    if unknown := set(kinds) - set(KINDS):
        p.error(f"--calls: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")
    warmup_s = args.warmup_s if args.warmup_s is not None else args.duration_s / 5
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="tandem-soak-") as data_dir:
        proc, target = start_server(args.python, args.models, data_dir)
        try:
            with TandemClient(target) as c:
                c.create_collection(COLLECTION)
                model = c.get_model()
            load = Load(target, args.clients, args.ids, image_pool(random.Random(args.seed)), args.seed,
                        kinds)
            samples: list[tuple[float, int]] = []
            parts: list[dict[str, int]] = []
            started = time.monotonic()
            load.start()
            while (now := time.monotonic() - started) < args.duration_s:
                parts.append(memory(proc.pid))
                samples.append((now, parts[-1]["VmRSS"]))
                if len(samples) % max(1, int(30 / args.sample_s)) == 0:
                    done = sum(load.calls.values())
                    print(f"{now / 60:5.1f} min  RSS {samples[-1][1] / 2**20:7.1f} MB  calls {done}", flush=True)
                time.sleep(args.sample_s)
            load.join()
            elapsed = time.monotonic() - started
            with TandemClient(target) as c:
                info = c.get_collection(COLLECTION)
        finally:
            proc.terminate()
            proc.wait(60)

    v = verdict(samples, warmup_s, args.duration_s, args.tolerance)
    by_kind: dict[str, dict[str, int]] = {}
    for (kind, code), n in sorted(load.calls.items()):
        by_kind.setdefault(kind, {})[code] = n
    total = sum(load.calls.values())
    report = {"settings": {k: str(val) if isinstance(val, Path) else val for k, val in vars(args).items()},
              "model": f"{model.model.name}/{model.model.version}", "cpu_count": os.cpu_count(), "elapsed_s": elapsed,
              "calls": by_kind, "calls_per_s": total / elapsed, "collection": {"items": info.count, "deleted_pending": info.deleted_pending,
                             "index_kind": info.index_kind, "dim": info.dim}, "verdict": v,
              "memory_samples": {"columns": ["t_s", "VmRSS", "RssAnon", "RssFile", "RssShmem"],
                                 "rows": [[round(t, 2)] + [m.get(k, 0) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")]
                                          for (t, _), m in zip(samples, parts)]}}
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(args.out / "soak.png", samples, [m.get("RssAnon", 0) for m in parts], v, f"tandem serve, {args.clients} clients, "
         f"{'mixed load' if len(kinds) == len(KINDS) else '+'.join(kinds)}, "
         f"{args.duration_s / 60:.1f} min ({total / elapsed:.0f} calls/s)")

    print(f"\n{total} calls in {elapsed:.0f} s ({total / elapsed:.1f}/s), {args.clients} clients; "
          f"collection holds {info.count} items, {info.deleted_pending} deleted vectors still in its "
          f"{info.index_kind} index (dim {info.dim})")
    for kind, codes in by_kind.items():
        print(f"  {kind:11} " + ", ".join(f"{code} {n}" for code, n in codes.items()))
    print(f"RSS after {v['warmup_s']:.0f} s warm-up: baseline {v['baseline_mb']:.1f} MB (median of the first "
          f"{v['window_s']:.0f} s), peak {v['peak_mb']:.1f} MB ({v['peak_over_baseline']:+.1%}), last "
          f"{v['last_mb']:.1f} MB ({v['last_over_baseline']:+.1%}), slope {v['slope_mb_per_min']:+.2f} MB/min")
    first, last = parts[next(i for i, (t, _) in enumerate(samples) if t >= warmup_s)], parts[-1]
    print("  from the end of the warm-up to the end: " + ", ".join(
        f"{k} {(last.get(k, 0) - first.get(k, 0)) / 2**20:+.1f} MB" for k in ("RssAnon", "RssFile", "RssShmem")))
    print(("FLAT" if v["flat"] else "NOT FLAT") + f": peak within {v['tolerance']:.0%} of the baseline"
          + ("" if v["flat"] else " is false") + f"\nwrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    return 0 if v["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
