"""Batch-1 search latency while another client bulk-ingests: what one client's 4,096-item upserts cost everyone
else's searches.

    .venv-dev/bin/python benchmarks/search_during_ingest.py                 # ~30 s
    .venv-dev/bin/python benchmarks/search_during_ingest.py --seconds 20

`tandem serve` (the serving install when it exists) runs in a subprocess on a
temporary data folder. A Flat collection of 20,000 x 64 vectors is loaded, then
one client sends sequential 1-query vector searches (top_k 10) for --seconds
alone, and again for --seconds while a second process upserts 4,096 items per
request (vector + three metadata fields) as fast as the server takes them. It
prints the searches' p50/p99/max in both phases and the ingest rate: the
baseline is the same server with no ingest, in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "proto"), str(ROOT / "benchmarks")]

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from collections_serving import serve_python, start_server, stop_server  # noqa: E402
from tandem.v1 import tandem_pb2 as pb  # noqa: E402
from tandem.v1 import tandem_pb2_grpc as pb_grpc  # noqa: E402

from server import wire  # noqa: E402
from server.client import TandemClient  # noqa: E402

N, DIM, BULK = 20_000, 64, 4096


def ingest(target: str, stop: mp.Event, done: mp.Value) -> None:  # type: ignore[type-arg]
    x = np.random.default_rng(1).standard_normal((BULK, DIM)).astype(np.float32)
    with TandemClient(target) as c:
        k = 0
        while not stop.is_set():
            c.upsert("s", [{"id": f"w{i}-{k}", "vector": x[i], "metadata": {"i": i, "tag": "ingest",
                                                                           "caption": "a small red circle"}}
                           for i in range(BULK)])
            with done.get_lock():
                done.value += BULK
            k += 1


def searches(stub: pb_grpc.CollectionsStub, requests: list[pb.SearchRequest], seconds: float) -> np.ndarray:
    """p50, p99, max in ms."""
    times, started, n = [], time.time(), 0
    while time.time() - started < seconds:
        t = time.perf_counter()
        stub.Search(requests[n % len(requests)])
        times.append(time.perf_counter() - t)
        n += 1
    return np.percentile(times, [50, 99, 100]) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="searches per phase (alone, during the ingest)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, target = start_server(serve_python(), Path(tmp) / "data")
        try:
            x = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
            with TandemClient(target) as c:
                c.create_collection("s", index_spec="Flat")
                for s in range(0, N, BULK):
                    c.upsert("s", [{"id": f"v{i}", "vector": x[i], "metadata": {"i": i}} for i in range(s, min(N, s + BULK))])
            stub = pb_grpc.CollectionsStub(grpc.insecure_channel(target))
            requests = [pb.SearchRequest(collection="s", top_k=10, queries=[pb.Query(terms=[pb.QueryTerm(
                vector=wire.encode(x[i:i + 1] + 0.01, pb.DTYPE_FLOAT32))])]) for i in range(1000)]
            alone = searches(stub, requests, args.seconds)
            stop, done = mp.Event(), mp.Value("l", 0)
            writer = mp.Process(target=ingest, args=(target, stop, done))
            writer.start()
            time.sleep(2)  # the ingest under way
            before, started = done.value, time.time()
            during = searches(stub, requests, args.seconds)
            rate = (done.value - before) / (time.time() - started)
            stop.set()
            writer.join(60)
        finally:
            stop_server(proc)
    print("| searches | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|")
    print(f"| alone | {alone[0]:.2f} | {alone[1]:.2f} | {alone[2]:.2f} |")
    print(f"| during a {BULK:,}-item-per-request ingest ({rate:,.0f} items/s) | {during[0]:.2f} | {during[1]:.2f} | "
          f"{during[2]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
