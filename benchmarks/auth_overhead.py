"""What access control costs per call: bearer tokens (and TLS, for scale) against a plaintext server without
tokens, measured in the same run.

    .venv-dev/bin/python benchmarks/auth_overhead.py             # 20 rounds x 500 calls per server
    .venv-dev/bin/python benchmarks/auth_overhead.py --quick     # 4 rounds x 400

(i) The check alone, in process: TokenStore.authorize (find the authorization
    metadata, sha256 the token, one dict lookup, the scope test, the 1 s gate
    on the file's mtime) for an allowed call, with 10 and with 1000 tokens,
    and TokenAuth.intercept_service around it on an event loop.

(ii) Over gRPC: four `tandem serve` subprocesses (the shipped default model,
    metrics off) on free localhost ports: plaintext, plaintext + tokens (a
    file of 10 tokens), TLS, TLS + tokens (certificates from trustme). One
    client, sequential blocking calls of Models/GetModel (a small answer that
    goes through the token check; the token has scope infer, the call needs
    any valid token). The servers take turns, --calls calls each per round,
    --rounds rounds, so drift in the host's load hits all of them alike.
    Reported per server: the median over rounds of each round's median latency
    ("added": the median of the per-round differences to plaintext without
    tokens, which cancels drift that spans rounds) and the server's CPU time
    per call over all rounds (utime + stime from /proc, measured calls only). On a busy
    host the end-to-end figures move by tens of microseconds from run to run:
    (i) is the precise number.

(iii) Where it goes: the same rounds against four echo servers (a method that
    returns its 1-byte request; no Tandem code): no interceptor, without and
    with the authorization metadata sent; an interceptor that only passes;
    TokenAuth with the token sent. This splits the cost of (ii) into carrying
    the metadata, grpc.aio's interceptor chain, and the check itself.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import SimpleNamespace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server import auth  # noqa: E402

TOKEN = "benchmark-token-" + "x" * 27  # 43 characters, as secrets.token_urlsafe(32) makes


def token_lines(n: int) -> str:
    lines = [f"client infer {TOKEN}"]
    lines += [f"other-{i} read,write sha256:{hashlib.sha256(f'other-{i}'.encode()).hexdigest()}" for i in range(n - 1)]
    return "\n".join(lines) + "\n"


def check_alone() -> None:
    md = (("user-agent", "grpc-python/1.x"), ("authorization", f"Bearer {TOKEN}"))
    for n in (10, 1000):
        store = auth.TokenStore(text=token_lines(n))
        assert store.authorize(md, "infer", "/tandem.v1.Inference/EmbedText") is None
        runs = 200_000
        t = min(timeit.repeat(lambda store=store: store.authorize(md, "infer", "/tandem.v1.Inference/EmbedText"),
                              number=runs, repeat=5))
        print(f"TokenStore.authorize, {n:4} tokens: {t / runs * 1e9:6.0f} ns per allowed call")

    store = auth.TokenStore(text=token_lines(10))
    interceptor = auth.TokenAuth(store)
    details = SimpleNamespace(method="/tandem.v1.Inference/EmbedText", invocation_metadata=md)
    handler = object()

    async def continuation(_details: object) -> object:
        return handler

    async def loop(runs: int) -> float:
        started = time.perf_counter()
        for _ in range(runs):
            await interceptor.intercept_service(continuation, details)  # type: ignore[arg-type]
        return time.perf_counter() - started

    async def bare(runs: int) -> float:
        started = time.perf_counter()
        for _ in range(runs):
            await continuation(details)
        return time.perf_counter() - started

    runs = 200_000
    with_check = min(asyncio.run(loop(runs)) for _ in range(3))
    without = min(asyncio.run(bare(runs)) for _ in range(3))
    print(f"TokenAuth.intercept_service, 10 tokens: {(with_check - without) / runs * 1e9:6.0f} ns per allowed call "
          "more than awaiting the continuation directly")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, name: str, folder: Path, tls: bool, tokens: bool, pki: dict[str, Path]):
        self.name, self.port = name, free_port()
        python = ROOT / ".venv" / "bin" / "python"
        cmd = [str(python if python.exists() else sys.executable), "-m", "cli", "serve", "--port", str(self.port),
               "--metrics-port", "0", "--data-dir", str(folder / name), "--log-level", "WARNING"]
        if tls:
            cmd += ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])]
        if tokens:
            cmd += ["--tokens-file", str(pki["tokens"])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        target = f"127.0.0.1:{self.port}"
        self.channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(pki["ca"].read_bytes()))
                        if tls else grpc.insecure_channel(target))
        self.metadata = (("authorization", f"Bearer {TOKEN}"),) if tokens else ()
        self.stub = pb_grpc.ModelsStub(self.channel)
        self.p50s: list[float] = []  # per round
        self.cpu = 0.0  # server CPU seconds over the measured calls (summed: /proc counts in 10 ms ticks)
        self.calls = 0

    def wait_serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the server exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: not SERVING after 120 s")

    def run(self, calls: int, warmup: int = 50) -> None:
        request = pb.GetModelRequest()
        for _ in range(warmup):
            self.stub.GetModel(request, metadata=self.metadata)
        latencies = []
        cpu = cpu_seconds(self.proc.pid)
        for _ in range(calls):
            started = time.perf_counter()
            self.stub.GetModel(request, metadata=self.metadata)
            latencies.append(time.perf_counter() - started)
        self.cpu += cpu_seconds(self.proc.pid) - cpu
        self.calls += calls
        self.p50s.append(statistics.median(latencies))

    def close(self) -> None:
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def over_grpc(rounds: int, calls: int) -> None:
    import trustme

    with tempfile.TemporaryDirectory(prefix="tandem-auth-bench-") as tmp:
        folder = Path(tmp)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        pki = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem",
               "tokens": folder / "tokens"}
        ca.cert_pem.write_to_path(str(pki["ca"]))
        cert.cert_chain_pems[0].write_to_path(str(pki["cert"]))
        cert.private_key_pem.write_to_path(str(pki["key"]))
        pki["tokens"].write_text(token_lines(10))
        servers = [Server(name, folder, tls, tokens, pki) for name, tls, tokens in (
            ("plaintext", False, False), ("plaintext + tokens", False, True), ("TLS", True, False),
            ("TLS + tokens", True, True))]
        try:
            for s in servers:
                s.wait_serving()
            for _ in range(rounds):
                for s in servers:
                    s.run(calls)
        finally:
            for s in servers:
                s.close()
    base = servers[0]

    def paired(mine: list[float], theirs: list[float]) -> float:
        return statistics.median(a - b for a, b in zip(mine, theirs))

    print(f"\nModels/GetModel over localhost gRPC, {rounds} rounds x {calls} calls per server, one client")
    print("(p50: median over the rounds of each round's median; its 'added': median of the per-round differences "
          "to plaintext; server CPU: over all rounds)")
    print(f"{'server':20} {'p50 us':>8} {'added':>8} {'server CPU us/call':>19} {'added':>8}")
    for s in servers:
        print(f"{s.name:20} {statistics.median(s.p50s) * 1e6:8.1f} {paired(s.p50s, base.p50s) * 1e6:+8.1f} "
              f"{s.cpu / s.calls * 1e6:19.1f} {(s.cpu / s.calls - base.cpu / base.calls) * 1e6:+8.1f}")


ECHO_VARIANTS = {"none": "no interceptor", "pass": "interceptor that passes", "token": "TokenAuth"}


def echo_server(variant: str, port: int) -> None:
    """An aio server whose one method /bench.Echo/Call returns its request bytes, with ECHO_VARIANTS[variant]."""

    class Pass(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
            return await continuation(details)

    async def echo(request: bytes, _context: object) -> bytes:
        return request

    auth.METHOD_SCOPES["/bench.Echo/Call"] = "infer"
    interceptors = {"none": [], "pass": [Pass()],
                    "token": [auth.TokenAuth(auth.TokenStore(text=token_lines(10)))]}[variant]

    async def run() -> None:
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)})])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def where_it_goes(rounds: int, calls: int) -> None:
    """The same comparison on an echo method, to split the cost: metadata on the wire, interceptor, check."""
    cases = [("none", False), ("none", True), ("pass", False), ("token", True)]
    procs, stubs = [], []
    for variant, _ in cases:
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, __file__, "--echo-server", variant, str(port)]))
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        stubs.append(channel.unary_unary("/bench.Echo/Call"))
    p50s: list[list[float]] = [[] for _ in cases]
    cpus = [0.0] * len(cases)
    try:
        for _ in range(rounds):
            for i, ((_, send_token), call) in enumerate(zip(cases, stubs)):
                metadata = (("authorization", f"Bearer {TOKEN}"),) if send_token else ()
                for _ in range(50):
                    call(b"x", metadata=metadata)
                latencies = []
                cpu = cpu_seconds(procs[i].pid)
                for _ in range(calls):
                    started = time.perf_counter()
                    call(b"x", metadata=metadata)
                    latencies.append(time.perf_counter() - started)
                cpus[i] += cpu_seconds(procs[i].pid) - cpu
                p50s[i].append(statistics.median(latencies))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    n = rounds * calls
    print(f"\nAn echo method (1-byte request), {rounds} rounds x {calls} calls per server, one client")
    print(f"{'server':24} {'token sent':>10} {'p50 us':>8} {'added':>8} {'server CPU us/call':>19} {'added':>8}")
    for i, (variant, send_token) in enumerate(cases):
        added = statistics.median(a - b for a, b in zip(p50s[i], p50s[0]))
        print(f"{ECHO_VARIANTS[variant]:24} {'yes' if send_token else 'no':>10} {statistics.median(p50s[i]) * 1e6:8.1f} "
              f"{added * 1e6:+8.1f} {cpus[i] / n * 1e6:19.1f} {(cpus[i] - cpus[0]) / n * 1e6:+8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=500, help="calls per server per round")
    p.add_argument("--quick", action="store_true", help="4 rounds x 400 calls")
    p.add_argument("--echo-server", nargs=2, metavar=("VARIANT", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.echo_server:
        return echo_server(args.echo_server[0], int(args.echo_server[1]))
    if args.quick:
        args.rounds, args.calls = 4, 400
    print(f"python {sys.version.split()[0]}, grpcio {grpc.__version__}, {os.cpu_count()} cores")
    check_alone()
    over_grpc(args.rounds, args.calls)
    where_it_goes(args.rounds, args.calls)


if __name__ == "__main__":
    main()
