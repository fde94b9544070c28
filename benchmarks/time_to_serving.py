"""Seconds from starting `tandem serve` to gRPC health SERVING (models loaded and warmed).

Starts the server from the given Python (default: the serving install, .venv)
RUNS times on a free port, polls grpc.health.v1 every 20 ms, and prints each
time with the minimum, median and maximum.

    .venv-dev/bin/python benchmarks/time_to_serving.py --python .venv/bin/python --models models
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def once(python: str, models: str) -> float:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "cli", "serve", "--models", models, "--port", str(port),
                             "--metrics-port", "0", "--log-level", "WARNING"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            if proc.poll() is not None:
                sys.exit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), help="interpreter of the install to test")
    p.add_argument("--models", default="models", help="model repository")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    times = [once(args.python, args.models) for _ in range(args.runs)]
    print("SERVING after " + ", ".join(f"{t:.2f}" for t in times) + " s")
    print(f"min {min(times):.2f} s, median {statistics.median(times):.2f} s, max {max(times):.2f} s")


if __name__ == "__main__":
    main()
