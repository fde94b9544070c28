"""Recall and speed of a collection's default "auto" index against exact search, in process.

    .venv-dev/bin/python benchmarks/collections_recall.py            # (a) 200k x 512 synthetic, (b) 60k shapes
    .venv-dev/bin/python benchmarks/collections_recall.py --quick    # (a) 100k x 512, (b) 60k shapes
    .venv-dev/bin/python benchmarks/collections_recall.py --synthetic 0 --shapes 100000   # (b) at 100k

Two data sets, each loaded into a real collection (index/collection.py with its
SQLite store in a temporary folder; no gRPC) the way a client streams it in:
sequential writes of --write-batch items. "auto" answers exactly from a Flat
index until AUTO_MIN_VECTORS items, then trains IVF(nlist from the count at
that moment),Flat in its background thread, tunes nprobe, and swaps it in.

  (a) synthetic: a mixture of 1000 Gaussians in a random 24-dimensional
      subspace of R^512 (centres ~ N(0, I), per-axis spread 0.75, so clusters
      overlap: about 83% of a query's true top-10 share its centre), plus
      isotropic noise, unit-normalised. Queries: 1000 fresh draws from the
      same mixture (not stored).
  (b) shapes: the shipped default model's image tower (models/tandem-shapes/1,
      64-d) on procedural renders (training.data.procedural, "train" split,
      encoded as PNG and preprocessed by bundle.image.preprocess), run by
      onnxruntime in --workers processes. Queries: 1000 renders of the "test"
      split. The default is 60k images, not 100k: embedding runs at about
      500-850 images/s on the 2-core machine, and 100k would take the run past
      4 minutes. Embeddings are cached under runs/bench-cache/ (the time it
      took to make them is printed either way); --no-cache recomputes.

Each data set is measured twice: the index as the streaming load left it, and
after Collection.rebuild() with no writes going on (what the Rebuild RPC does).
In the same process:
  exact truth     faiss.IndexFlatIP over the same vectors
  raw Flat        faiss.IndexFlatIP: batched q/s (all queries in one call), batch-1 p50/p99
  raw IVF         faiss IVF<nlist>,Flat trained here on a random sample, the collection's nprobe
  raw IVF, same   the collection's own trained index searched directly with FAISS (the overhead baseline)
  collection      Collection.search (auto index), and Collection.search(exact=True) (a scan of the store)
with recall@10 of each against the exact truth (the index as loaded: on the
first --queries-loaded queries, since it may scan every list); batch-1
p50/p99 over --batch1 queries (calls slower than ~20 ms: at least 50, then
3 s); the held-out recall and q/s of the collection's index at nprobe/4 ..
2*nprobe; batch-1 latency again with one OpenMP thread; load, train and
rebuild times; resident memory per stored vector: VmRSS of a fresh process
before and after Collection.open() of the folder (the serving footprint),
and the in-process VmRSS growth from just before creating the collection to
after it is loaded and trained (raw, and after malloc_trim); and disk bytes
per vector.
"""


from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index import collection as collection_mod  # noqa: E402
from index.collection import Collection, Spec  # noqa: E402
from index.store import Put  # noqa: E402

K = 10


# -- measuring helpers ----------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def trimmed_rss_bytes() -> int:
    """VmRSS after gc and glibc's malloc_trim: memory still in use, not what the allocator keeps for reuse."""
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def recall_at_k(truth: np.ndarray, got: np.ndarray) -> float:
    """Mean |top-k found ∩ true top-k| / k over the queries (ids; -1 never counts)."""
    return float(np.mean([len(set(t.tolist()) & set(g[g >= 0].tolist())) / truth.shape[1]
                          for t, g in zip(truth, got)]))


Fn = Callable[[np.ndarray], np.ndarray]


def batched(fns: dict[str, Fn], q: np.ndarray, reps: int, slow_s: float = 2.0
            ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(ids of each fn(q), queries/s of each fn(q) with all queries in one call): best of `reps` runs, the fns
    interleaved; a fn whose call took over `slow_s` is not repeated."""
    out, best = {}, {}
    for rep in range(reps):
        for name, fn in fns.items():
            if rep and best[name] > slow_s:
                continue
            t = time.perf_counter()
            ids = fn(q)
            took = time.perf_counter() - t
            out.setdefault(name, ids)
            best[name] = min(best.get(name, float("inf")), took)
    return out, {name: len(q) / s for name, s in best.items()}


def batch1_ms(fns: dict[str, Fn], q: np.ndarray, n: int, budget_s: float = 3.0, at_least: int = 50
              ) -> dict[str, tuple[float, float]]:
    """(p50, p99) ms of fn(one query) over n queries, the fns interleaved query by query (same load for all);
    a fn stops being timed once it has used `budget_s` and has `at_least` samples (the slow exact ones)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn(q[:1])  # warm-up
    for i in range(n):
        row = q[i % len(q)][None]
        for name, fn in fns.items():
            if len(times[name]) >= at_least and sum(times[name]) > budget_s:
                continue
            t = time.perf_counter()
            fn(row)
            times[name].append(time.perf_counter() - t)
    return {name: (float(np.percentile(t, 50) * 1e3), float(np.percentile(t, 99) * 1e3)) for name, t in times.items()}


# -- data ----------------------------------------------------------------------------------
def synthetic(n: int, n_queries: int, dim: int, centres: int = 1000, latent: int = 24, spread: float = 0.75,
              noise: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, their centre, queries, their centre): see the module docstring."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].astype(np.float32)  # dim x latent, orthonormal
    mu = rng.standard_normal((centres, latent)).astype(np.float32)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty((m, dim), np.float32)
        labels = rng.integers(0, centres, m)
        for s in range(0, m, 50_000):
            lab = labels[s : s + 50_000]
            z = mu[lab] + spread * rng.standard_normal((len(lab), latent), np.float32)
            x = z @ basis.T + (noise * np.sqrt(latent / dim)) * rng.standard_normal((len(lab), dim), np.float32)
            out[s : s + len(lab)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out, labels

    x, xl = draw(n)
    q, ql = draw(n_queries)
    return x, xl, q, ql


_SHAPES: dict[str, object] = {}


def _embed_chunk(task: tuple[str, int, int, int]) -> np.ndarray:
    """Worker: render, preprocess (bundle.image.preprocess on PNG bytes) and embed images [start, stop)."""
    import io

    import onnxruntime as ort

    from bundle import load_bundle
    from bundle.image import preprocess
    from training.data import procedural

    split, seed, start, stop = task
    if "session" not in _SHAPES:
        bundle = load_bundle(ROOT / "models" / "tandem-shapes" / "1")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        _SHAPES["bundle"] = bundle
        _SHAPES["session"] = ort.InferenceSession(str(bundle.image_path), opts, providers=["CPUExecutionProvider"])
    bundle, session = _SHAPES["bundle"], _SHAPES["session"]
    spec = bundle.manifest.image  # type: ignore[attr-defined]
    tensors = []
    for i in range(start, stop):
        buf = io.BytesIO()
        procedural.render(procedural.sample(seed, split, i)).save(buf, "PNG")
        tensors.append(preprocess(buf.getvalue(), spec, 1 << 31))
    return session.run(None, {spec.input: np.stack(tensors)})[0].astype(np.float32)  # type: ignore[attr-defined]


def shapes_embeddings(split: str, n: int, seed: int, workers: int, cache: Path | None) -> tuple[np.ndarray, float, bool]:
    """(float32 [n, 64] embeddings, seconds it took to make them, from cache?)."""
    sha = json.loads((ROOT / "models/tandem-shapes/1/manifest.json").read_text())["image"]["sha256"][:12]
    path = cache / f"shapes-{sha}-{split}-{seed}-{n}.npy" if cache else None
    if path is not None and path.exists():
        meta = json.loads(path.with_suffix(".json").read_text())
        return np.load(path), float(meta["seconds"]), True
    from concurrent.futures import ProcessPoolExecutor

    started = time.perf_counter()
    chunks = [(split, seed, s, min(n, s + 500)) for s in range(0, n, 500)]
    with ProcessPoolExecutor(workers) as pool:
        x = np.concatenate(list(pool.map(_embed_chunk, chunks)))
    seconds = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, x)
        path.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "workers": workers, "n": n,
                                                         "loadavg": loadavg()}))
    return x, seconds, False


# -- the collection --------------------------------------------------------------------------
class _Built(logging.Handler):
    """Picks up the collection's "built IVF... over N items in S s, nprobe P" log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if " built " in msg:
            self.lines.append(msg)


@dataclass
class Loaded:
    c: Collection
    folder: Path
    write_s: float  # writing all items (acknowledged = durable)
    ready_s: float  # from the first write until the trained index is swapped in and snapshotted
    built: list[str] = field(default_factory=list)


def load(name: str, x: np.ndarray, root: Path, write_batch: int, index_spec: str = "auto") -> Loaded:
    handler = _Built()
    logging.getLogger("tandem.index").addHandler(handler)
    logging.getLogger("tandem.index").setLevel(logging.INFO)
    folder = root / name
    spec = Spec.new(name, "bench", "1", "-", x.shape[1], "cosine", index_spec)
    c = Collection.create(folder, spec)
    started = time.perf_counter()
    for s in range(0, len(x), write_batch):
        puts = [Put(f"{name}-{i}", x[i], "{}") for i in range(s, min(len(x), s + write_batch))]
        c.store.write(puts).result()
    write_s = time.perf_counter() - started
    while c._background is not None and c._background.is_alive():  # training, then any snapshot it starts
        c._background.join()
    ready_s = time.perf_counter() - started
    logging.getLogger("tandem.index").removeHandler(handler)
    return Loaded(c, folder, write_s, ready_s, handler.lines)


def open_footprint(folder: Path) -> dict[str, float]:
    """In a fresh process: VmRSS before and after Collection.open(folder), and the open time."""
    out = subprocess.run([sys.executable, __file__, "--measure-open", str(folder)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_open(folder: str) -> None:
    import faiss as _faiss  # noqa: F401  (imports count as "before")

    before = trimmed_rss_bytes()
    t = time.perf_counter()
    c = Collection.open(Path(folder))
    opened = time.perf_counter() - t
    after = trimmed_rss_bytes()
    d = c.describe()
    c.close(snapshot=False)
    print(json.dumps({"before": before, "after": after, "open_s": opened, "count": d["count"],
                      "kind": d["index_kind"]}))


# -- one data set ---------------------------------------------------------------------------
_TUNED: list[tuple[int, int]] = []  # (items in the index being tuned, items in the store) per nprobe tuning


def _watch_tuning() -> None:
    """Record what Collection._tune_nprobe sees (observation only: it calls the original)."""
    original = Collection._tune_nprobe
    if getattr(original, "_watched", False):
        return

    def watched(self: Collection, index: faiss.Index, *args: object) -> int:
        _TUNED.append((int(index.ntotal), self.store.count()))
        return original(self, index, *args)

    watched._watched = True  # type: ignore[attr-defined]
    Collection._tune_nprobe = watched  # type: ignore[method-assign]


def table(rows: list[tuple], n_queries: int) -> list[str]:
    out = [f"| search | recall@10 | batched q/s ({n_queries} queries in one call) | vs raw Flat | batch-1 p50 ms | "
           "batch-1 p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for name, r, qs, ratio, p50, p99 in rows:
        out.append(f"| {name} | {r:.3f} | {qs:,.0f} | {ratio:.1f}x | {p50:.2f} | {p99:.2f} |")
    return out


def bench(name: str, title: str, x: np.ndarray, q: np.ndarray, args: argparse.Namespace, root: Path,
          summary: list[str]) -> list[str]:
    n, dim = x.shape
    print(f"\n## {title}: {n:,} x {dim}, {len(q)} queries, k={K}  (load average {loadavg()})", flush=True)
    _watch_tuning()
    _TUNED.clear()
    rss0 = trimmed_rss_bytes()
    loaded = load(name, x, root, args.write_batch)
    gc.collect()
    rss1 = rss_bytes()
    rss1_trimmed = trimmed_rss_bytes()
    c = loaded.c
    kind, nprobe_streamed = c.kind, c.nprobe
    ivf = faiss.try_extract_index_ivf(c.index.index)
    nlist = ivf.nlist if ivf is not None else 0
    print(f"  written in {loaded.write_s:.1f} s ({n / loaded.write_s:,.0f} items/s, sequential writes of "
          f"{args.write_batch}); trained index in place {loaded.ready_s:.1f} s after the first write: {kind}, "
          f"nprobe {nprobe_streamed}", flush=True)
    for held, stored in _TUNED:
        print(f"  nprobe was tuned on an index holding {held:,} items while the store held {stored:,}", flush=True)
    # rowids are 1..n in write order, so FAISS position i is rowid i + 1
    check = c.store.rows_by_rowid([1, n // 2, n])
    assert all(np.allclose(check[r], x[r - 1], atol=1e-6) for r in (1, n // 2, n)), "rowids are not 1..n"

    qn = c.prepare(q)
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    _, truth = flat.search(qn, K)
    truth = truth + 1

    def raw_flat(qq: np.ndarray) -> np.ndarray:
        return flat.search(qq, K)[1] + 1

    def coll(qq: np.ndarray) -> np.ndarray:
        return c.search(qq, K)[1]

    def measure(fns: dict[str, Fn], batch1: int, n_queries: int | None = None) -> list[tuple]:
        qq = qn[:n_queries] if n_queries else qn
        ids, qps = batched(fns, qq, args.reps)
        lat = batch1_ms(fns, qq, batch1)
        base = qps["raw FAISS Flat (IndexFlatIP)"]
        return [(k, recall_at_k(truth[: len(qq)], ids[k]), qps[k], qps[k] / base, *lat[k]) for k in fns]

    rows = []
    if nlist:  # phase 1: the index as streaming writes left it
        streamed = f"collection, auto as loaded ({kind}, nprobe {nprobe_streamed}; first {args.queries_loaded} queries)"
        rows += measure({"raw FAISS Flat (IndexFlatIP)": raw_flat, streamed: coll}, args.batch1 // 2,
                        args.queries_loaded)[1:]
        t = time.perf_counter()
        c.rebuild()  # nothing is written meanwhile
        rebuild_s = time.perf_counter() - t
        ivf = faiss.extract_index_ivf(c.index.index)
        print(f"  Collection.rebuild() with no writes going on: {c.kind}, nprobe {c.nprobe}, {rebuild_s:.1f} s",
              flush=True)
    nprobe = c.nprobe
    label = f"collection, auto after rebuild ({c.kind}, nprobe {nprobe})" if nlist else f"collection, auto ({c.kind})"
    fns: dict[str, Fn] = {"raw FAISS Flat (IndexFlatIP)": raw_flat, label: coll}
    if nlist:
        own = c.index  # the collection's own IDMap(IVF), called directly: no collection code

        def raw_same(qq: np.ndarray) -> np.ndarray:
            return own.search(qq, K)[1]

        rng = np.random.default_rng(1)
        n_train = min(n, max(100_000, 64 * nlist))  # what the collection trains on
        raw = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        raw.train(x[np.sort(rng.choice(n, n_train, replace=False))])
        raw.add(x)
        print(f"  raw IVF{nlist},Flat trained on {n_train:,} random vectors and filled in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        faiss.extract_index_ivf(raw).nprobe = nprobe

        def raw_ivf(qq: np.ndarray) -> np.ndarray:
            return raw.search(qq, K)[1] + 1

        fns[f"raw FAISS IVF{nlist},Flat trained here, nprobe {nprobe}"] = raw_ivf
        fns["raw FAISS on the collection's own index"] = raw_same
    measured = measure(fns, args.batch1)
    rows = measured[:1] + rows + measured[1:]
    # The same batch-1 calls with one OpenMP thread: no parallel region to wake a second thread for.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    one = batch1_ms({k: fns[k] for k in list(fns)[1:]}, qn, args.batch1)
    faiss.omp_set_num_threads(threads)
    one_line = "; ".join(f"{k}: p50 {a:.2f} / p99 {b:.2f} ms" for k, (a, b) in one.items())
    print(f"  batch-1 with faiss.omp_set_num_threads(1): {one_line}", flush=True)

    def coll_exact(qq: np.ndarray) -> np.ndarray:
        return c.search(qq, K, exact=True)[1]

    t = time.perf_counter()
    exact_ids = coll_exact(qn)
    exact_qps = len(q) / (time.perf_counter() - t)
    exact_lat = batch1_ms({"x": coll_exact}, qn, 5)["x"]
    rows.append(("collection, exact=True (scans the store)", recall_at_k(truth, exact_ids), exact_qps,
                 exact_qps / rows[0][2], *exact_lat))
    sweep = []
    if nlist:  # how sharp the tuned nprobe is on held-out queries
        for p in sorted({max(1, nprobe // 4), max(1, nprobe // 2), nprobe, min(nlist, nprobe * 2)}):
            ivf.nprobe = p
            t = time.perf_counter()
            got = c.index.search(qn, K)[1]
            sweep.append(f"{p}: {recall_at_k(truth, got):.3f} ({len(qn) / (time.perf_counter() - t):,.0f} q/s)")
        ivf.nprobe = nprobe
        print("  recall@10 of the collection's index on the held-out queries by nprobe: " + ", ".join(sweep),
              flush=True)
    c.close()
    fp = open_footprint(loaded.folder)
    store_b = (loaded.folder / "store.sqlite").stat().st_size / n
    snap_b = sum(f.stat().st_size for f in loaded.folder.glob("index-*.faiss")) / n
    per_open, per_load, per_trim = (fp["after"] - fp["before"]) / n, (rss1 - rss0) / n, (rss1_trimmed - rss0) / n
    floor = dim * 4 + 16  # the vector, its FAISS id and the IDMap's copy of it
    print(f"  memory: {per_open:,.0f} B/vector resident after Collection.open in a fresh process ({fp['open_s']:.1f} s "
          f"to open, {fp['kind']}); VmRSS growth while loading in process {per_load:,.0f} B/vector, {per_trim:,.0f} "
          f"after malloc_trim; floor {floor} B "
          f"(vector + ids). Disk: store.sqlite {store_b:,.0f} B/vector, index snapshot {snap_b:,.0f} B/vector",
          flush=True)
    lines = table(rows, len(q))
    print("\n" + "\n".join(lines), flush=True)
    if nlist:
        first = rows[1]
        after = measured[1]
        for what, r in (("as loaded", first), ("after rebuild", after)):
            met = r[1] >= 0.95 and r[3] >= 10
            summary.append(f"{title}, auto {what}: recall@10 {r[1]:.3f} at {r[3]:.1f}x raw Flat's batched q/s "
                           f"(target >= 0.95 at >= 10x: {'MET' if met else 'MISSED'})")
        same = measured[3]
        summary.append(f"{title}: collection / FAISS on the same index: batched q/s {after[2] / same[2]:.2f}x, "
                       f"batch-1 p50 {after[4] / same[4]:.2f}x the time; held-out recall by nprobe: "
                       + ", ".join(sweep))
        summary.append(f"{title}: batch-1 with 1 OpenMP thread instead of {threads}: {one_line}")
    else:
        summary.append(f"{title}: auto stayed {c.kind} (under {collection_mod.AUTO_MIN_VECTORS:,} items)")
    summary.append(f"{title}: {per_open:,.0f} B/vector resident after open (floor {floor}), {per_load:,.0f} "
                   f"B/vector growth while loading ({per_trim:,.0f} after malloc_trim); disk: store {store_b:,.0f} + snapshot {snap_b:,.0f} B/vector; "
                   f"writes {n / loaded.write_s:,.0f} items/s")
    shutil.rmtree(loaded.folder, ignore_errors=True)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=int, default=200_000, help="synthetic vectors (0 skips)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--shapes", type=int, default=60_000, help="default-model embeddings of procedural images (0 skips)")
    p.add_argument("--quick", action="store_true", help="--synthetic 100000 --shapes 60000")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch1", type=int, default=200, help="queries timed one at a time (half that for the index "
                   "as loaded; at least 50, then 3 s, for slow calls)")
    p.add_argument("--queries-loaded", type=int, default=250, help="queries for the index as loaded (it may scan "
                   "every list)")
    p.add_argument("--reps", type=int, default=3, help="batched runs per index (best counts)")
    p.add_argument("--write-batch", type=int, default=1000, help="items per write while loading")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes embedding the shapes")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench-cache"), help="shapes embedding cache folder")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--measure-open", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure_open:
        measure_open(args.measure_open)
        return 0
    if args.quick:
        args.synthetic, args.shapes = min(args.synthetic, 100_000), min(args.shapes, 60_000)
    cache = None if args.no_cache else Path(args.cache)
    started = time.perf_counter()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, faiss "
          f"{faiss.__version__}, numpy {np.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; "
          f"load average {loadavg()}; AUTO_MIN_VECTORS {collection_mod.AUTO_MIN_VECTORS:,}, "
          f"TARGET_RECALL {collection_mod.TARGET_RECALL}", flush=True)
    summary: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tandem-recall-") as tmp:
        root = Path(tmp)
        if args.synthetic:
            t = time.perf_counter()
            x, xl, q, ql = synthetic(args.synthetic, args.queries, args.dim)
            flat = faiss.IndexFlatIP(args.dim)
            flat.add(x)
            _, nn = flat.search(q, K)
            same = float((xl[nn] == ql[:, None]).mean())
            del flat
            print(f"synthetic data made in {time.perf_counter() - t:.1f} s; {same:.0%} of the queries' true top-10 "
                  "share the query's centre", flush=True)
            bench("synthetic", "(a) synthetic", x, q, args, root, summary)
            del x, q
        if args.shapes:
            x, secs, cached = shapes_embeddings("train", args.shapes, 0, args.workers, cache)
            q, qsecs, _ = shapes_embeddings("test", args.queries, 1, args.workers, cache)
            print(f"\nshapes: {args.shapes:,} embeddings {'from the cache; they took' if cached else 'took'} "
                  f"{secs:.0f} s to make ({args.shapes / secs:,.0f} images/s render + preprocess + ONNX, "
                  f"{args.workers} processes)", flush=True)
            bench("shapes", "(b) shapes", x, q, args, root, summary)
    print("\n" + "\n".join(summary))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
