"""`tandem bench`: a load generator for a running server, in the spirit of Triton's perf_analyzer.

For each concurrency of a sweep, N closed-loop clients (coroutines sharing one
grpc.aio channel) send requests drawn from a mix (EmbedText, EmbedImage,
Classify, Search) for a fixed time after a warm-up, and the step reports
requests/s, items/s, p50/p95/p99 latency of the successful requests, errors by
status code, and, read as deltas of the server's Prometheus /metrics over the
measured window, the batch-size histogram and the time per stage. In the same
run, and never while the server is under load, it times the same bundle's
ONNX files with ONNX Runtime in this process at its best batch size, and
prints server items/s over raw items/s. docs/bench.md explains every number.

Inputs are generated here (no files): captions from a small vocabulary of
sizes, colours and shapes, and PNGs of coloured shapes drawn with Pillow,
since the serving install has no torch for training.data.procedural.
Requests are built before the sweep and drawn at random per request, so the
client spends its time on gRPC, not on drawing images.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import random
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("text", "image", "pixels", "classify", "search", "health")
# The tower that embeds the items (health: none, it is the empty call that shows the floor of one gRPC request).
TOWER = {"text": "text", "image": "image", "pixels": "image", "classify": "image", "search": "text", "health": None}
METHOD = {"text": "EmbedText", "image": "EmbedImage", "pixels": "EmbedImage", "classify": "Classify", "search": "Search",
          "health": "grpc.health.v1.Health/Check"}
STAGES = ("decode", "preprocess", "tokenize", "queue", "inference")
DEFAULT_CONCURRENCY = "1,4,16,32"

COLOURS = {"red": (220, 30, 30), "orange": (250, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 50),
           "cyan": (30, 200, 220), "blue": (30, 60, 230), "purple": (150, 50, 200)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
OPENINGS = ("a photo of a", "a picture of a", "an image of a", "a", "there is a")
ENDINGS = ("", "", " on a black background", " on a white background", " in the top left corner", " in the middle")
LABELS = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")]  # Classify

TEXT_POOL = 512  # distinct prebuilt requests per kind (texts and search queries)
IMAGE_POOL = 64  # distinct images (image requests draw their items from these)
RAW_ROUNDS = 3  # the raw baseline times every batch size this many times, interleaved, and keeps the best


class BenchError(Exception):
    """A failure the user can act on (no server, unknown model, missing bundle ...): printed, exit status 1."""


# -- inputs -------------------------------------------------------------------------------------------------------

def random_text(rng: random.Random) -> str:
    """A caption such as "a picture of a small red circle on a white background"."""
    return (f"{rng.choice(OPENINGS)} {rng.choice(SIZES)} {rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"
            f"{rng.choice(ENDINGS)}")


def draw_png(rng: random.Random, side: int) -> bytes:
    """PNG bytes of one coloured shape on a plain or noisy background, side x side pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    background = rng.choice(("black", "white", "gray", "noisy"))
    if background == "noisy":
        pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (side, side, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
    else:
        img = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(img)
    r = side * (rng.uniform(0.10, 0.18) if rng.random() < 0.5 else rng.uniform(0.25, 0.40))
    cx, cy = rng.uniform(r, side - r), rng.uniform(r, side - r)
    colour = rng.choice(list(COLOURS.values()))
    shape = rng.choice(SHAPES)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy, r), 3, rotation=rng.uniform(0, 120), fill=colour)
    else:
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# -- the plan: what to send ---------------------------------------------------------------------------------------

def parse_mix(text: str) -> dict[str, float]:
    """"text=3,image=1" -> {"text": 3.0, "image": 1.0} (a bare kind weighs 1; zero weights are dropped)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown request kind {kind!r} in --mix; kinds: {', '.join(KINDS)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix {part!r}: the weight must be a number, e.g. {kind}=2") from None
        if w < 0 or not math.isfinite(w):
            raise argparse.ArgumentTypeError(f"--mix {part!r}: the weight must be a number >= 0")
        if w > 0:
            mix[kind] = w
    if not mix:
        raise argparse.ArgumentTypeError("--mix gives no kind a weight above 0, e.g. --mix text=1,image=1")
    return mix


def parse_concurrency(text: str) -> list[int]:
    try:
        levels = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--concurrency {text!r}: give whole numbers, e.g. 1,4,16,32") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency {text!r}: give numbers >= 1, e.g. 1,4,16,32")
    return levels


def parse_connections(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--connections must be at least 1, got {text!r}")
    return int(text)


def parse_rate(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate {text!r}: give requests per second, e.g. 500,1000,2000") from None
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--rate {text!r}: give numbers above 0, e.g. 500,1000,2000")
    return rates


def parse_server(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--server {text!r}: give HOST:PORT, e.g. 127.0.0.1:50051")
    return text


@dataclass
class Plan:
    """Prebuilt requests per kind, and the weights to draw kinds with."""

    mix: dict[str, float]
    items: int
    requests: dict[str, list[Any]] = field(default_factory=dict)
    images: list[bytes] = field(default_factory=list)  # the distinct PNGs (also the raw baseline's inputs)
    texts: list[str] = field(default_factory=list)


def build_plan(mix: dict[str, float], items: int, model: Any, collection: str, image_size: int, seed: int) -> Plan:
    from tandem.v1 import tandem_pb2 as pb

    rng = random.Random(seed)
    plan = Plan(mix, items)
    plan.texts = [random_text(rng) for _ in range(TEXT_POOL)]
    plan.images = [draw_png(rng, image_size) for _ in range(IMAGE_POOL)]
    name, version = model.model.name, model.model.version

    def some_texts() -> list[str]:
        return [rng.choice(plan.texts) for _ in range(items)]

    def some_images() -> list[bytes]:
        return [rng.choice(plan.images) for _ in range(items)]

    for kind in mix:
        if kind == "text":
            reqs = [pb.EmbedTextRequest(model=name, version=version, texts=some_texts()) for _ in range(TEXT_POOL)]
        elif kind == "image":
            reqs = [pb.EmbedImageRequest(model=name, version=version, images=some_images())
                    for _ in range(IMAGE_POOL)]
        elif kind == "classify":
            reqs = [pb.ClassifyRequest(model=name, version=version, images=some_images(), labels=LABELS, top_k=1)
                    for _ in range(IMAGE_POOL)]
        elif kind == "pixels":  # the same shapes, decoded and resized to the model's size: nothing left to do
            import io

            import numpy as np
            from PIL import Image

            side = model.image_size
            rgb = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((side, side)))
                            for png in plan.images])
            reqs = []
            for _ in range(IMAGE_POOL):
                x = rgb[[rng.randrange(len(rgb)) for _ in range(items)]]
                reqs.append(pb.EmbedImageRequest(model=name, version=version, pixels=pb.Pixels(
                    count=items, height=side, width=side, data=x.tobytes())))
        elif kind == "health":
            from grpc_health.v1 import health_pb2

            reqs = [health_pb2.HealthCheckRequest()]
        else:
            reqs = [pb.SearchRequest(collection=collection, top_k=10, without_metadata=True,
                                     queries=[pb.Query(terms=[pb.QueryTerm(text=t)]) for t in some_texts()])
                    for _ in range(TEXT_POOL)]
        plan.requests[kind] = reqs
    return plan


# -- load ---------------------------------------------------------------------------------------------------------

@dataclass
class Calls:
    """One bound stub method per request kind."""

    by_kind: dict[str, Any]


def make_calls(channel: Any) -> Calls:
    from grpc_health.v1 import health_pb2_grpc
    from tandem.v1 import tandem_pb2_grpc as pb_grpc

    inference, collections = pb_grpc.InferenceStub(channel), pb_grpc.CollectionsStub(channel)
    return Calls({"text": inference.EmbedText, "image": inference.EmbedImage, "pixels": inference.EmbedImage,
                  "classify": inference.Classify, "search": collections.Search,
                  "health": health_pb2_grpc.HealthStub(channel).Check})


@dataclass
class Load:
    """What one timed run of the clients saw: (kind, seconds, status code name) per request, and the wall time."""

    samples: list[tuple[str, float, str]]
    elapsed_s: float
    messages: dict[str, str]  # the first message of each error code
    cpu_s: float  # CPU time of this process (the clients, gRPC's threads included) during the run
    machine_cpu_s: float | None  # CPU time of every process on this machine during the run (Linux), else None


def machine_busy_s() -> float | None:
    """Seconds of CPU time every core of this machine has spent busy since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is counted in user already


async def run_load(calls: Calls | list[Calls], plan: Plan, concurrency: int, seconds: float, timeout_s: float,
                   rng: random.Random, rate: float | None = None) -> Load:
    """`concurrency` closed-loop clients, each sending its next request as soon as the last one is answered,
    until `seconds` have passed; requests in flight then are waited for and counted. With a list of Calls
    (one per connection), client i sends on connection i mod len(calls).

    With `rate`, an open loop instead (perf_analyzer's --request-rate-range): a request is sent every 1/rate
    seconds whether or not the earlier ones were answered, and its latency counts from when it was due, so a
    server that falls behind is charged for the wait (no coordinated omission)."""
    import grpc

    kinds, weights = list(plan.mix), list(plan.mix.values())
    samples: list[tuple[str, float, str]] = []
    messages: dict[str, str] = {}
    clock = time.perf_counter
    stop_at = clock() + seconds

    per_connection = calls if isinstance(calls, list) else [calls]

    async def one(by_kind: dict[str, Any], kind: str, request: Any, due: float) -> None:
        """Send one request; its latency counts from `due` (when it was sent, or when it should have been)."""
        try:
            await by_kind[kind](request, timeout=timeout_s)
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
            messages.setdefault(code, e.details() or "")
        samples.append((kind, clock() - due, code))

    async def client(i: int, seed: int) -> None:
        by_kind = per_connection[i % len(per_connection)].by_kind
        r = random.Random(seed)
        while clock() < stop_at:
            kind = r.choices(kinds, weights)[0] if len(kinds) > 1 else kinds[0]
            await one(by_kind, kind, r.choice(plan.requests[kind]), clock())

    async def open_loop(rate: float) -> None:
        r, in_flight, sent = random.Random(rng.getrandbits(32)), set(), 0
        begin = clock()
        while (now := clock()) < stop_at:
            while (due := begin + sent / rate) <= now:  # everything due by now (the loop's timer has ~1 ms steps)
                kind = r.choices(kinds, weights)[0] if len(kinds) > 1 else kinds[0]
                by_kind = per_connection[sent % len(per_connection)].by_kind
                task = asyncio.create_task(one(by_kind, kind, r.choice(plan.requests[kind]), due))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            await asyncio.sleep(max(0.0, begin + sent / rate - clock()))
        await asyncio.gather(*in_flight)

    started, cpu, busy = clock(), time.process_time(), machine_busy_s()
    if rate:
        await open_loop(rate)
    else:
        await asyncio.gather(*(client(i, rng.getrandbits(32)) for i in range(concurrency)))
    busy_after = machine_busy_s()
    return Load(samples, clock() - started, messages, time.process_time() - cpu,
                busy_after - busy if busy is not None and busy_after is not None else None)


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    import numpy as np

    if not seconds:
        return {}
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(np.mean(seconds) * 1e3),
            "max": float(max(seconds) * 1e3)}


def summarise(load: Load, items_per_request: int) -> dict[str, Any]:
    """Client-side figures of one step: successful requests and items per second, latency, errors by code."""
    ok = [(kind, s) for kind, s, code in load.samples if code == "OK"]
    by_kind = {}
    for kind in sorted({k for k, _ in ok}):
        lat = [s for k, s in ok if k == kind]
        per = items_per_request if TOWER[kind] else 1  # a call that runs no model (health) counts one item
        by_kind[kind] = {"requests": len(lat), "items": len(lat) * per,
                         "items_per_s": len(lat) * per / load.elapsed_s, "latency_ms": percentiles_ms(lat)}
    errors = Counter(code for _, _, code in load.samples if code != "OK")
    error_latency = {code: percentiles_ms([s for _, s, c in load.samples if c == code]) for code in errors}
    return {
        "elapsed_s": load.elapsed_s,
        "client_cpu_cores": load.cpu_s / load.elapsed_s,
        "machine_cpu_cores": load.machine_cpu_s / load.elapsed_s if load.machine_cpu_s is not None else None,
        "requests": len(ok),
        "items": sum(k["items"] for k in by_kind.values()),
        "requests_per_s": len(ok) / load.elapsed_s,
        "items_per_s": sum(k["items"] for k in by_kind.values()) / load.elapsed_s,
        "latency_ms": percentiles_ms([s for _, s in ok]),
        "errors": dict(errors),
        "error_messages": {code: load.messages[code] for code in errors},
        "error_latency_ms": error_latency,  # how long each refusal took to arrive (RESOURCE_EXHAUSTED: how fast)
        "by_kind": by_kind,
    }


# -- the server's metrics -----------------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a Prometheus text page: {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _bucket_range(previous: float, le: float) -> str:
    if math.isinf(le):
        return f">{previous:g}"
    low = math.floor(previous) + 1
    return f"{le:g}" if low >= le else f"{low:g}-{le:g}"


def server_delta(before: Samples, after: Samples, models: set[str]) -> dict[str, Any]:
    """What the server did between two scrapes, for the labels model in `models`: batch sizes per tower
    (batches per size range), time per stage (count, mean ms, total s), requests by method and code, server-side
    mean request time per method, requests refused by a full queue."""
    # Zeros are kept: a histogram's empty buckets still bound the next one's range.
    delta = {key: value - before.get(key, 0.0) for key, value in after.items()}

    def ours(labels: dict[str, str]) -> bool:
        return labels.get("model") in models

    buckets: dict[str, list[tuple[float, float]]] = {}
    rows: dict[str, float] = {}
    stages: dict[str, dict[str, float]] = {}
    methods: dict[str, dict[str, float]] = {}
    codes: Counter[str] = Counter()
    rejected = cpu_s = 0.0
    for (name, label_items), value in delta.items():
        labels = dict(label_items)
        if name == "tandem_batch_size_bucket" and ours(labels):
            buckets.setdefault(labels["tower"], []).append((float(labels["le"]), value))
        elif name == "tandem_batch_size_sum" and ours(labels):
            rows[labels["tower"]] = value
        elif name in ("tandem_stage_seconds_sum", "tandem_stage_seconds_count") and ours(labels):
            key = f"{labels['tower']}/{labels['stage']}"
            stages.setdefault(key, {})[name.rsplit("_", 1)[1]] = value
        elif name in ("tandem_request_seconds_sum", "tandem_request_seconds_count"):
            methods.setdefault(labels["method"], {})[name.rsplit("_", 1)[1]] = value
        elif name == "tandem_requests_total" and value:
            codes[f"{labels['method']} {labels['code']}"] += int(value)
        elif name == "tandem_queue_rejected_total" and ours(labels):
            rejected += value
        elif name == "process_cpu_seconds_total":  # prometheus_client's process collector (Linux)
            cpu_s = value

    batch_sizes = {}
    for tower, cumulative in sorted(buckets.items()):
        cumulative.sort()
        histogram, previous_le, previous_count = {}, 0.0, 0.0
        for le, count in cumulative:
            histogram[_bucket_range(previous_le, le)] = int(round(count - previous_count))
            previous_le, previous_count = le, count
        batches = int(round(previous_count))
        if batches:
            batch_sizes[tower] = {"batches": batches, "rows": int(round(rows[tower])), "mean": rows[tower] / batches,
                                  "histogram": histogram}
    return {
        "batch_sizes": batch_sizes,
        "stages": {key: {"count": int(v.get("count", 0)), "total_s": v.get("sum", 0.0),
                         "mean_ms": 1e3 * v.get("sum", 0.0) / v["count"] if v.get("count") else 0.0}
                   for key, v in sorted(stages.items()) if v.get("count")},
        "request_ms": {m: 1e3 * v.get("sum", 0.0) / v["count"] for m, v in sorted(methods.items()) if v.get("count")},
        "requests": dict(sorted(codes.items())),
        "queue_rejected": int(rejected),
        "cpu_s": cpu_s,
    }


# -- raw ONNX Runtime ---------------------------------------------------------------------------------------------

def find_bundle(models: Path, model: Any) -> Any:
    """The bundle folder the server answered with, under the local model repository `models`."""
    from bundle import BundleError, load_bundle

    path = Path(models) / model.model.name / model.model.version
    if not (path / "manifest.json").is_file():
        raise BenchError(f"the server serves {model.model.name}/{model.model.version}, but {path} has no "
                         "manifest.json; give the server's model repository with --models FOLDER (the raw ONNX "
                         "Runtime baseline reads the same files), or skip the baseline with --no-raw")
    try:
        bundle = load_bundle(path)
    except BundleError as e:
        raise BenchError(f"{path}: {e}") from e
    m = bundle.manifest
    if (m.dim, m.image.size, m.text.context_length if m.text else 0) != (model.dim, model.image_size,
                                                                          model.context_length):
        raise BenchError(f"{path} is not the bundle the server runs (dim, image size or context length differ); "
                         "point --models at the server's model repository")
    return bundle


def batch_sizes(largest: int) -> list[int]:
    """1, 2, 4, ... up to and including `largest`."""
    sizes = [1 << i for i in range(largest.bit_length()) if 1 << i < largest]
    return sizes + [largest]


def raw_throughput(bundle: Any, towers: list[str], plan: Plan, largest: int, seconds_per_tower: float
                   ) -> dict[str, Any]:
    """Per tower: items/s of ONNX Runtime (CPU, its default threads: all cores) on ready inputs (token ids,
    preprocessed image tensors) at each batch size 1, 2, 4 ... `largest` (each size's best of RAW_ROUNDS timings),
    and the best size."""
    import numpy as np

    from bundle.image import preprocess
    from bundle.tokenizer import ClipTokenizer

    from .runtime import Tower

    m = bundle.manifest
    out: dict[str, Any] = {}
    for tower in towers:
        if tower == "text":
            session = Tower(bundle.text_path, ["CPUExecutionProvider"], m.precision)
            tokenizer = ClipTokenizer(bundle.tokenizer_path, m.text.context_length)
            inputs = tokenizer.encode_batch([plan.texts[i % len(plan.texts)] for i in range(largest)])[0]
        else:
            session = Tower(bundle.image_path, ["CPUExecutionProvider"], m.precision)
            inputs = np.stack([preprocess(plan.images[i % len(plan.images)], m.image, 1 << 31)
                               for i in range(largest)])
        sizes = batch_sizes(largest)
        for b in sizes:
            session(inputs[:b])  # warm-up: first-run allocations
        # Rounds over all sizes, keeping each size's best round: a burst of other work on the machine then
        # spoils one round of one size, not the size's figure.
        by_batch: dict[int, float] = {}
        budget = seconds_per_tower / (RAW_ROUNDS * len(sizes))
        wall, cpu, busy = time.perf_counter(), time.process_time(), machine_busy_s()
        for _ in range(RAW_ROUNDS):
            for b in sizes:
                x = inputs[:b]
                runs, started = 0, time.perf_counter()
                while runs < 2 or time.perf_counter() - started < budget:
                    session(x)
                    runs += 1
                by_batch[b] = max(by_batch.get(b, 0.0), runs * b / (time.perf_counter() - started))
        best = max(by_batch, key=by_batch.__getitem__)
        wall, busy_after = time.perf_counter() - wall, machine_busy_s()
        out[tower] = {"best_batch": best, "items_per_s": by_batch[best],
                      "by_batch": {str(b): v for b, v in by_batch.items()},
                      "cpu_cores": (time.process_time() - cpu) / wall,
                      "machine_cpu_cores": (busy_after - busy) / wall if busy is not None and busy_after else None}
    return out


def tower_shares(mix: dict[str, float]) -> dict[str, float]:
    """Expected fraction of items per tower under the mix (every kind sends the same items per request)."""
    total = sum(mix.values())
    shares: dict[str, float] = {}
    for kind, w in mix.items():
        if (tower := TOWER[kind]) is not None:
            shares[tower] = shares.get(tower, 0.0) + w / total
    return shares


def raw_mix(mix: dict[str, float], items: int, raw: dict[str, Any]) -> float:
    """Items/s the bare model would deliver under the mix: the items of an average request over the model time
    it takes. A model kind sends `items` items, a health check counts one item and takes no model time."""
    total = sum(mix.values())
    per_request = sum(w / total * (items if TOWER[k] else 1) for k, w in mix.items())
    seconds = sum(w / total * items / raw[TOWER[k]]["items_per_s"] for k, w in mix.items() if TOWER[k])
    return per_request / seconds


def server_over_raw(step: dict[str, Any], raw: dict[str, Any]) -> float | None:
    """The share of the model's raw capacity the server delivered: sum over towers of server items/s of that
    tower / raw best-batch items/s of that tower (for one tower, plainly server/raw)."""
    if not raw:
        return None
    used = 0.0
    for kind, k in step["by_kind"].items():
        if TOWER[kind] is None:
            continue  # health checks use no model
        if TOWER[kind] not in raw:
            return None
        used += k["items_per_s"] / raw[TOWER[kind]]["items_per_s"]
    if all(TOWER[kind] is None for kind in step["by_kind"]):
        return None
    return used


# -- the run ------------------------------------------------------------------------------------------------------

def metrics_url_for(server: str) -> str:
    return f"http://{server.rpartition(':')[0]}:9100/metrics"


def _say(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


async def _connect(args: argparse.Namespace, channel: Any) -> Any:
    """The server's ModelInfo for --model/--version, or a BenchError saying what is wrong."""
    import grpc
    from tandem.v1 import tandem_pb2 as pb
    from tandem.v1 import tandem_pb2_grpc as pb_grpc

    try:
        model = await pb_grpc.ModelsStub(channel).GetModel(pb.GetModelRequest(model=args.model, version=args.version),
                                                           timeout=args.connect_timeout)
    except grpc.aio.AioRpcError as e:
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise BenchError(f"cannot reach a Tandem server at {args.server} ({e.code().name}: {e.details()}). "
                             "Is `tandem serve` running there? Start one with `tandem serve --models models`, or "
                             "give its address with --server HOST:PORT") from None
        raise BenchError(f"{args.server} answered GetModel with {e.code().name}: {e.details()}") from None
    wanted_towers = {TOWER[k] for k in args.mix} - {None}
    if not wanted_towers <= set(model.towers):
        raise BenchError(f"model {model.model.name}/{model.model.version} has the towers {list(model.towers)}; "
                         f"--mix {','.join(args.mix)} needs {sorted(wanted_towers)}")
    if "search" in args.mix:
        try:
            info = await pb_grpc.CollectionsStub(channel).GetCollection(
                pb.GetCollectionRequest(name=args.collection), timeout=args.connect_timeout)
        except grpc.aio.AioRpcError as e:
            raise BenchError(f"--collection {args.collection}: {e.code().name}: {e.details()}") from None
        if (info.model.name, info.model.version) != (model.model.name, model.model.version):
            raise BenchError(f"collection {args.collection} is bound to {info.model.name}/{info.model.version}, "
                             f"not {model.model.name}/{model.model.version}: pass --model {info.model.name} "
                             f"--version {info.model.version}")
    return model


async def _probe(calls: Calls, plan: Plan, timeout_s: float) -> None:
    """One request of each kind, so that a kind the server refuses stops the run with its reason."""
    import grpc

    for kind, requests in plan.requests.items():
        try:
            await calls.by_kind[kind](requests[0], timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise BenchError(f"a {kind} request ({METHOD[kind]}) failed: {e.code().name}: {e.details()}") from None


def _scrape_or_warn(url: str, warned: list[bool]) -> Samples | None:
    if not url:
        return None
    try:
        return scrape(url)
    except (urllib.error.URLError, OSError, ValueError) as e:
        if not warned:
            _say(f"warning: no server metrics (batch sizes, stages): cannot read {url}: {getattr(e, 'reason', e)}. "
                 "Give the server's metrics address with --metrics-url, or --metrics-url '' to skip them")
            warned.append(True)
        return None


async def _sweep(args: argparse.Namespace, report: dict[str, Any]) -> None:
    import grpc
    from tqdm import tqdm

    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 256 << 20),
               ("grpc.use_local_subchannel_pool", 1)]  # each channel its own TCP connection
    # The extra connections: load balancers and proxies spread connections, not requests.
    extra = [grpc.aio.insecure_channel(args.server, options=options) for _ in range(args.connections - 1)]
    async with grpc.aio.insecure_channel(args.server, options=options) as channel:
        model = await _connect(args, channel)
        name = f"{model.model.name}/{model.model.version}"
        report["model"] = {"name": model.model.name, "version": model.model.version, "kind": model.kind,
                           "dim": model.dim, "image_size": model.image_size, "precision": model.precision,
                           "execution_provider": model.execution_provider}
        plan = build_plan(args.mix, args.items, model, args.collection or "", args.image_size, args.seed)
        calls = [make_calls(channel)] + [make_calls(c) for c in extra]
        for c in calls:
            await _probe(c, plan, args.timeout)

        towers = sorted(tower_shares(args.mix))
        if not args.no_raw and towers:
            bundle = find_bundle(Path(args.models), model)
            _say(f"raw ONNX Runtime on {name} ({', '.join(towers)}), batches up to {args.raw_max_batch}, "
                 f"{args.raw_seconds:g} s per tower ...")
            report["raw"] = raw_throughput(bundle, towers, plan, args.raw_max_batch, args.raw_seconds)
            report["raw_mix_items_per_s"] = raw_mix(args.mix, args.items, report["raw"])
            for t in towers:
                r = report["raw"][t]
                _say(f"  raw {t}: {r['items_per_s']:,.0f} items/s at batch {r['best_batch']}")

        models = {model.model.name} | ({args.collection} if args.collection else set())
        rng, warned = random.Random(args.seed), []
        levels = args.rate or args.concurrency
        bar = tqdm(levels, unit="step", desc="sweep", file=sys.stderr, disable=None, leave=False)
        for level in bar:
            concurrency, rate = (0, level) if args.rate else (level, None)
            bar.set_description(f"rate {level:g}/s" if rate else f"concurrency {level}")
            if args.warmup > 0:
                await run_load(calls, plan, concurrency, args.warmup, args.timeout, rng, rate)
            before = _scrape_or_warn(args.metrics_url, warned)
            load = await run_load(calls, plan, concurrency, args.duration, args.timeout, rng, rate)
            after = _scrape_or_warn(args.metrics_url, warned) if before is not None else None
            step = {"concurrency": concurrency, "rate": rate, **summarise(load, args.items)}
            step["server"] = server_delta(before, after, models) if before is not None and after is not None else None
            if step["server"]:
                step["server"]["cpu_cores"] = step["server"]["cpu_s"] / load.elapsed_s
                if load.samples and not step["server"]["requests"] and set(args.mix) != {"health"} and not warned:
                    _say(f"warning: {args.metrics_url} counted none of this step's requests: is it the metrics "
                         f"page of the server at {args.server}? (--metrics-url)")
                    warned.append(True)
            step["server_over_raw"] = server_over_raw(step, report.get("raw", {}))
            report["steps"].append(step)
            _say(step_line(step))
            if step["requests"] == 0 and set(step["errors"]) == {"UNAVAILABLE"}:
                raise BenchError(f"the server at {args.server} stopped answering: "
                                 f"{step['error_messages']['UNAVAILABLE']}")
        bar.close()
    for c in extra:
        await c.close()


def level(step: dict[str, Any]) -> str:
    """A step's load: its concurrency, or for an open loop the requests/s sent."""
    return f"{step['rate']:,.0f}/s" if step.get("rate") else str(step["concurrency"])


def step_line(step: dict[str, Any]) -> str:
    lat = step["latency_ms"]
    line = (f"{'rate' if step.get('rate') else 'concurrency'} {level(step):>4}: {step['items_per_s']:9,.1f} items/s "
            f"{step['requests_per_s']:9,.1f} requests/s")
    if lat:
        line += f"  p50 {lat['p50']:.1f} p95 {lat['p95']:.1f} p99 {lat['p99']:.1f} ms"
    if step["server_over_raw"] is not None:
        line += f"  server/raw {step['server_over_raw']:.2f}"
    for code, n in step["errors"].items():
        took = step.get("error_latency_ms", {}).get(code, {})
        line += f"  {code} {n}" + (f" (p99 {took['p99']:.1f} ms)" if took else "")
        line += f" ({step['error_messages'][code][:120]})"
    return line


def run(args: argparse.Namespace, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole benchmark; returns the report (what --json writes). Given `report`, fills it in place, so that
    a caller keeps the steps measured before an error."""
    import onnxruntime

    if args.metrics_url is None:
        args.metrics_url = metrics_url_for(args.server)
    report = {} if report is None else report
    report.update({
        "server": args.server,
        "mix": args.mix,
        "items_per_request": args.items,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "image_size": args.image_size,
        "collection": args.collection or None,
        "metrics_url": args.metrics_url or None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__,
                    "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "raw": {},
        "steps": [],
    })
    asyncio.run(_sweep(args, report))
    return report


# -- output -------------------------------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables: the sweep, then the server's batch sizes and time per stage per step."""
    m, steps = report["model"], report["steps"]
    head = "rate sent" if any(st.get("rate") for st in steps) else "concurrency"  # open loop, or closed
    mix = ",".join(f"{k}={v:g}" for k, v in report["mix"].items())
    lines = [f"## tandem bench: {m['name']}/{m['version']} at {report['server']}", "",
             f"mix {mix}, {report['items_per_request']} item(s) per request, {report['duration_s']:g} s per step "
             f"after {report['warmup_s']:g} s of warm-up; {report['machine']['cpus']} CPUs, "
             f"model on {m['execution_provider']}."]
    if report["raw"]:
        raw = "; ".join(f"{t} {r['items_per_s']:,.0f} items/s (batch {r['best_batch']}; CPU cores: this process "
                        f"{r['cpu_cores']:.2f} / machine {_fmt(r['machine_cpu_cores'], 2)})"
                        for t, r in report["raw"].items())
        lines.append(f"raw ONNX Runtime, best batch, in this process: {raw}.")
    lines += ["", f"| {head} | requests/s | items/s | p50 ms | p95 ms | p99 ms | errors | mean batch | server/raw "
              "| CPU cores: client / server / machine |",
              "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for s in steps:
        lat = s["latency_ms"]
        errors = ", ".join(f"{c} {n}" for c, n in s["errors"].items()) or "0"
        batches = (s["server"] or {}).get("batch_sizes", {})
        mean_batch = " / ".join(f"{t} {b['mean']:.1f}" for t, b in batches.items()) or "-"
        lines.append(f"| {level(s)} | {_fmt(s['requests_per_s'])} | {_fmt(s['items_per_s'])} | "
                     f"{_fmt(lat.get('p50'), 2)} | {_fmt(lat.get('p95'), 2)} | {_fmt(lat.get('p99'), 2)} | {errors} | "
                     f"{mean_batch} | {_fmt(s['server_over_raw'], 2)} | {s['client_cpu_cores']:.2f} / "
                     f"{_fmt((s['server'] or {}).get('cpu_cores'), 2)} / {_fmt(s['machine_cpu_cores'], 2)} |")
    with_server = [s for s in steps if s["server"]]
    if not with_server:
        lines += ["", "(no server metrics: batch sizes and stage times need --metrics-url)"]
        return "\n".join(lines) + "\n"

    ranges: list[str] = []
    for s in with_server:
        for b in s["server"]["batch_sizes"].values():
            ranges += [r for r, n in b["histogram"].items() if r not in ranges and n]
    lines += ["", "### Batch sizes (server: ONNX Runtime runs per batch size, during the measured window)", ""]
    if not ranges:  # health checks only, or no model run finished in the window
        lines.append("(no ONNX Runtime runs in the measured windows)")
    else:
        lines += [f"| {head} | tower | batches | " + " | ".join(ranges) + " | mean |",
                  "|---:|---|---:|" + "---:|" * len(ranges) + "---:|"]
        for s in with_server:
            for tower, b in s["server"]["batch_sizes"].items():
                counts = " | ".join(str(b["histogram"].get(r, 0)) for r in ranges)
                lines.append(f"| {level(s)} | {tower} | {b['batches']} | {counts} | {b['mean']:.1f} |")

    stage_keys = sorted({k for s in with_server for k in s["server"]["stages"]},
                        key=lambda k: (k.split("/")[0], STAGES.index(k.split("/")[1]) if k.split("/")[1] in STAGES
                                       else len(STAGES)))
    methods = sorted({mt for s in with_server for mt in s["server"]["request_ms"]})
    lines += ["", "### Time per stage (server: mean ms per observation; see docs/bench.md for what each counts)", "",
              f"| {head} | " + " | ".join(stage_keys + [f"{mt} (server)" for mt in methods]) + " | client p50 |",
              "|---:|" + "---:|" * (len(stage_keys) + len(methods) + 1)]
    for s in with_server:
        st = s["server"]["stages"]
        cells = [_fmt(st[k]["mean_ms"], 3) if k in st else "-" for k in stage_keys]
        cells += [_fmt(s["server"]["request_ms"].get(mt), 3) for mt in methods]
        lines.append(f"| {level(s)} | " + " | ".join(cells) + f" | {_fmt(s['latency_ms'].get('p50'), 3)} |")
    return "\n".join(lines) + "\n"


def _ticks(top: float) -> list[float]:
    """0 and round steps (1, 2 or 5 x 10^k) up to at least `top`: at most 6 ticks."""
    top = top if top > 0 else 1.0
    step = 10 ** math.floor(math.log10(top / 5))
    for mult in (1, 2, 5, 10):
        if top / (step * mult) <= 5:
            step *= mult
            break
    return [i * step for i in range(int(math.ceil(top / step)) + 1)]


def write_plot(report: dict[str, Any], path: Path) -> None:
    """A PNG of items/s and p99 latency against concurrency (log scale), drawn with Pillow, so that it works in the
    serving install (no matplotlib). The throughput panel has the raw ONNX Runtime best batch as a dashed line."""
    from PIL import Image, ImageDraw, ImageFont

    steps = [s for s in report["steps"] if s["latency_ms"]]
    if not steps:
        raise BenchError("nothing to plot: no step had a successful request")
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    pw, ph, left, top, gap = 460, 300, 70, 60, 40
    img = Image.new("RGB", (2 * (left + pw) + gap + 20, top + ph + 60), "white")
    d = ImageDraw.Draw(img)
    m = report["model"]
    mix = ",".join(f"{k}={v:g}" for k, v in report["mix"].items())
    d.text((left, 10), f"tandem bench: {m['name']}/{m['version']}, mix {mix}, {report['items_per_request']} item(s) "
           "per request", fill="black", font=font)
    xs = [s.get("rate") or s["concurrency"] for s in steps]
    lo, hi = math.log2(min(xs)), math.log2(max(xs))
    raw = report.get("raw_mix_items_per_s")
    panels = [("items/s", [s["items_per_s"] for s in steps], raw), ("p99 latency (ms)",
                                                                   [s["latency_ms"]["p99"] for s in steps], None)]
    y0 = top
    for i, (title, ys, reference) in enumerate(panels):
        x0 = left + i * (left + pw + gap)
        ticks = _ticks(max(ys + ([reference] if reference else [])) * 1.05)

        def px(c: float, x0: int = x0) -> float:
            return x0 + 20 + (pw - 40) * ((math.log2(c) - lo) / (hi - lo) if hi > lo else 0.5)

        def py(v: float, ticks: list[float] = ticks) -> float:
            return y0 + ph - ph * v / ticks[-1]

        d.text((x0, y0 - 22), title, fill="black", font=font)
        for t in ticks:
            d.line((x0, py(t), x0 + pw, py(t)), fill=(225, 225, 225))
            d.text((x0 - 6, py(t)), f"{t:,.{0 if t >= 10 or t == 0 else 2}f}", fill="black", font=small, anchor="rm")
        for c in xs:
            d.text((px(c), y0 + ph + 6), str(c), fill="black", font=small, anchor="mt")
        d.text((x0 + pw / 2, y0 + ph + 24), "requests/s sent" if steps[0].get("rate") else "concurrency (clients)",
               fill="black", font=small, anchor="mt")
        d.rectangle((x0, y0, x0 + pw, y0 + ph), outline="black")
        if reference:
            for x in range(x0, x0 + pw, 12):
                d.line((x, py(reference), min(x + 6, x0 + pw), py(reference)), fill=(200, 60, 40), width=2)
            what = "raw ONNX Runtime best batch" + (" (this mix)" if len(report["raw"]) > 1 else "")
            d.text((x0 + pw - 4, py(reference) - 4), f"{what} {reference:,.0f}/s",
                   fill=(200, 60, 40), font=small, anchor="rb")
        points = [(px(c), py(v)) for c, v in zip(xs, ys)]
        if len(points) > 1:
            d.line(points, fill=(30, 80, 200), width=2)
        for x, y in points:
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(30, 80, 200))
    img.save(path)


# -- command line -------------------------------------------------------------------------------------------------

DESCRIPTION = """Measure a running Tandem server under load, as Triton's perf_analyzer does: for each
concurrency of the sweep, that many clients send requests back to back over gRPC (each sends its next
request as soon as the last is answered) for --duration seconds after --warmup seconds that are not
counted. Per step it reports requests/s and items/s (successful ones), p50/p95/p99 latency as the
client sees it, errors by gRPC status code (RESOURCE_EXHAUSTED from a full server is counted, not
fatal), and from the server's Prometheus metrics over the same window: how many rows each ONNX Runtime
run had (the batch-size histogram: what the dynamic batcher made of the load) and the mean time of each
stage (decode, preprocess, tokenize, queue, inference).

Before the sweep, unless --no-raw, it runs the same model's ONNX files with ONNX Runtime in this
process at batch sizes 1, 2, 4 ... --raw-max-batch (ready inputs: no decoding, no gRPC) and prints
server/raw: the share of the bare model's best throughput the server delivers. The server must run on
this machine (or one like it) for that ratio to mean anything, and the clients share its cores.

Inputs are generated: captions of coloured shapes and PNGs of coloured shapes (--image-size pixels).
docs/bench.md explains each number and how to read the histogram."""

EPILOG = """examples:
  tandem bench                                            # text, 1 item per request, concurrency 1,4,16,32
  tandem bench --mix image --image-size 224 --concurrency 1,8,32
  tandem bench --mix text=3,image=1 --items 8 --duration 20 --json bench.json --plot bench.png
  tandem bench --mix search --collection photos --items 4
  tandem bench --mix classify --no-raw --server 10.0.0.5:50051 --metrics-url http://10.0.0.5:9100/metrics

request kinds for --mix (KIND=WEIGHT, comma separated; each request picks a kind at random by weight):
  text      EmbedText, --items captions
  image     EmbedImage, --items PNGs
  pixels    EmbedImage, --items raw RGB images at the model's image size (Pixels: nothing to decode or resize)
  classify  Classify, --items PNGs against 8 labels (label embeddings are cached by the server)
  search    Search on --collection, --items text queries, top 10
  health    grpc.health.v1 Check, counted as one item a request (whatever --items): the floor of one request
            through this server's gRPC stack on this machine (no model, no handler of ours); text at 1 item
            can at most reach its requests/s

exit status: 0 when the sweep ran (even with errors counted in it), 1 when it could not run (no server,
unknown model, missing bundle ...), 2 for bad options."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register `bench` on the `tandem` subcommands (server/cli.py)."""
    import textwrap

    description = "\n\n".join(textwrap.fill(" ".join(para.split()), 100) for para in DESCRIPTION.split("\n\n"))
    p = subparsers.add_parser("bench", description=description, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", type=parse_server, default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="host:port of a running `tandem serve` (default 127.0.0.1:50051)")
    p.add_argument("--model", default="", help="model name (default: the server's default model)")
    p.add_argument("--version", default="", help="model version (default: the latest the server loaded)")
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=parse_concurrency, default=parse_concurrency(DEFAULT_CONCURRENCY),
                   metavar="N,N,...", help=f"clients per step of the sweep (default {DEFAULT_CONCURRENCY})")
    g.add_argument("--mix", type=parse_mix, default=parse_mix("text"), metavar="KIND=W,...",
                   help="request kinds and their weights, e.g. text=3,image=1 (default text; kinds below)")
    g.add_argument("--items", type=int, default=1, metavar="N", help="items (texts, images, queries) per request (default 1)")
    g.add_argument("--rate", type=parse_rate, default=None, metavar="R,R,...",
                   help="open loop instead of --concurrency: send R requests/s per step whatever the answers "
                   "(latency counted from when each was due); for latency at a given load and for overload")
    g.add_argument("--connections", type=parse_connections, default=1, metavar="N",
                   help="gRPC connections the clients are spread over (default 1: one channel, as one client app "
                   "has); a load balancer in front of several servers spreads connections, not requests")
    g.add_argument("--duration", type=float, default=10.0, metavar="S", help="measured seconds per step (default 10)")
    g.add_argument("--warmup", type=float, default=2.0, metavar="S",
                   help="seconds of load before each step's measurement, not counted (default 2)")
    g.add_argument("--collection", default="", metavar="NAME", help="the collection `search` requests query (needed for search)")
    g.add_argument("--image-size", type=int, default=224, metavar="PX", help="side of the generated PNGs in pixels (default 224)")
    g.add_argument("--timeout", type=float, default=30.0, metavar="S", help="deadline of each request in seconds (default 30)")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the server's first answer (default 10)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the inputs and of the request order")
    g = p.add_argument_group("server metrics and raw baseline")
    g.add_argument("--metrics-url", default=None, metavar="URL",
                   help="the server's Prometheus page (default http://HOST:9100/metrics, HOST from --server; "
                   "'' to skip batch sizes and stage times)")
    g.add_argument("--models", default="models", metavar="FOLDER",
                   help="the server's model repository, for the raw ONNX Runtime baseline (default models)")
    g.add_argument("--no-raw", action="store_true", help="skip the raw ONNX Runtime baseline (and server/raw)")
    g.add_argument("--raw-seconds", type=float, default=4.0, metavar="S",
                   help="seconds of raw ONNX Runtime timing per tower, over all batch sizes (default 4)")
    g.add_argument("--raw-max-batch", type=int, default=32, metavar="N",
                   help="largest raw batch tried (default 32, the server's default max_batch_size)")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="also write the whole report as JSON")
    g.add_argument("--plot", metavar="FILE.png", help="also draw items/s and p99 latency against concurrency")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    if "search" in args.mix and not args.collection:
        print("error: --mix search needs --collection NAME (a collection bound to the model)", file=sys.stderr)
        return 2
    for name in ("items", "image_size", "raw_max_batch"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0:
        print("error: --duration and --timeout must be above 0, --warmup at least 0", file=sys.stderr)
        return 2
    report: dict[str, Any] = {}
    try:
        run(args, report)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        if report.get("steps"):  # the steps measured before it failed are kept
            report["error"] = str(e)
            print(f"(the {len(report['steps'])} step(s) measured, the last one up to the error:)", file=sys.stderr)
            _write(report, args)
        return 1
    try:
        _write(report, args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _write(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(markdown(report), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        write_plot(report, Path(args.plot))


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone `bench` parser (python -m server.bench ...), for use before it is registered on `tandem`."""
    parser = argparse.ArgumentParser(prog="tandem")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args(["bench", *sys.argv[1:]])))
