"""Fuzzing, long run: the strategies of `make test`'s short run (tests/server/test_fuzz.py), many more examples.

    .venv-dev/bin/python benchmarks/fuzz.py                     # 10 minutes, larger inputs (--bounds long)
    .venv-dev/bin/python benchmarks/fuzz.py --minutes 1 --bounds short
    .venv-dev/bin/python benchmarks/fuzz.py --server 127.0.0.1:50051 --methods Search,Upsert

Starts `tandem serve` (the serving install .venv/bin/python when it exists) with the shipped model on a free
port and a fresh data_dir, its log in <out>/server.log, or fuzzes a running server (--server; its log is then
yours to read). Then, round after round until the time is up, for every method: --examples typed requests and
--raw-examples raw byte strings (hypothesis, seed --seed + round), each checked as in the short run:
- the status is OK or one the method documents, never INTERNAL or UNKNOWN, and has a message;
- an OK answer fits its request; the server logged no error; a health Check answers SERVING within 5 s.
Answers matching a known issue (fuzz_strategies.KNOWN_ISSUES) are counted apart, not reported.

A failing example is shrunk by hypothesis to a small one and printed with the problem and the server's log
lines of that moment; the run goes on with the next method. If the server process dies, the example that
killed it is printed as sent (not shrunk) and the server is started again.

Prints and writes <out>/fuzz.json: requests per method and status code, known issues, the slowest request of each method,
failures. Exit status 1 when anything failed. docs/fuzzing.md says more.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import HypothesisException

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "proto"))
from tests.server.fuzz_strategies import (  # noqa: E402
    LONG,
    METHODS,
    SHORT,
    FuzzSession,
    Outcome,
    raw_requests,
    requests,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tandem serve` in a child process, its log in a file, read incrementally for error entries."""

    def __init__(self, python: str, models: str, log_path: Path):
        self.python, self.models, self.log_path = python, models, log_path
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self.offset = 0

    def start(self) -> str:
        port = free_port()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [self.python, "-m", "cli", "serve", "--models", self.models, "--port", str(port), "--metrics-port", "0",
             "--data-dir", tempfile.mkdtemp(prefix="tandem-fuzz-"), "--log-level", "WARNING"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        target = f"127.0.0.1:{port}"
        session = FuzzSession(grpc.insecure_channel(target))
        deadline = time.monotonic() + 300
        while session.health_problem() is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start; see {self.log_path}")
            time.sleep(0.1)
        self.offset = self.log_path.stat().st_size
        return target

    def errors(self) -> list[str]:
        """Error entries (the ERROR or CRITICAL line and the traceback under it) logged since the last call,
        and a line if the process has exited."""
        with self.log_path.open("rb") as f:
            f.seek(self.offset)
            new = f.read().decode(errors="replace")
        self.offset += len(new.encode(errors="replace"))
        entries: list[str] = []
        for line in new.splitlines():
            if " ERROR " in line or " CRITICAL " in line or line.startswith(("Fatal Python error", "Segmentation")):
                entries.append(line)
            elif entries and not line[:4].isdigit():  # continuation (a traceback), not a new timestamped line
                entries[-1] += "\n" + line
        if self.proc is not None and self.proc.poll() is not None:
            entries.append(f"the server process exited with code {self.proc.returncode}")
        return entries

    @property
    def dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Stats:
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (method or method+" raw", code) -> n
    known: Counter[str] = field(default_factory=Counter)
    slowest: dict[str, tuple[float, str, str]] = field(default_factory=dict)  # method -> (seconds, code, request)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def record(self, label: str, outcome: Outcome, example: Any) -> None:
        self.codes[label, outcome.code.name] += 1
        if outcome.known:
            self.known[outcome.known] += 1
        if outcome.seconds > self.slowest.get(label, (0.0,))[0]:
            self.slowest[label] = (outcome.seconds, outcome.code.name, describe(example, 300))


def describe(example: Any, limit: int = 4000) -> str:
    text = repr(example) if isinstance(example, bytes) else f"{type(example).__name__}({str(example).strip()})"
    text = " ".join(text.split()) if not isinstance(example, bytes) else text
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def serialized(example: Any) -> str:
    return base64.b64encode(example if isinstance(example, bytes) else example.SerializeToString()).decode()


def fuzz_one_method(session: FuzzSession, server: Server | None, method: str, raw: bool, bounds: Any, run_seed: int,
                    examples: int, stats: Stats) -> dict[str, Any] | None:
    """Run `examples` examples; on failure, the shrunk (or, for a crash, the first) failing example."""
    label = method + (" raw" if raw else "")
    failing: dict[str, Any] = {}

    @seed(run_seed)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=False, report_multiple_bugs=False,
              phases=(Phase.generate, Phase.shrink),
              suppress_health_check=list(HealthCheck))
    @given(example=raw_requests(method, bounds) if raw else requests(method, bounds))
    def one(example: Any) -> None:
        if server is not None and server.dead:
            raise AssertionError("the server is down")  # shrinking after a crash: stop quickly
        outcome = session.check_raw(method, example) if raw else session.check(method, example)
        stats.record(label, outcome, example)
        if outcome.problems:
            if not (server is not None and server.dead and failing.get("crash")):
                failing.update(method=label, code=outcome.code.name, details=outcome.details,
                               problems=outcome.problems, request=describe(example),
                               request_base64=serialized(example), seed=run_seed,
                               crash=server is not None and server.dead)
            raise AssertionError("\n".join(outcome.problems))

    try:
        one()
    except (AssertionError, HypothesisException):
        return failing or None
    return None


def report(stats: Stats, seconds: float) -> str:
    methods = sorted({m for m, _ in stats.codes}, key=lambda m: (METHODS.index(m.split()[0]), m))
    codes = sorted({c for _, c in stats.codes})
    width = max(len(m) for m in methods) if methods else 10
    lines = [f"{sum(stats.codes.values()):,} requests in {seconds / 60:.1f} min", "",
             f"{'method':<{width}}  " + "  ".join(f"{c:>18}" for c in codes)]
    for m in methods:
        lines.append(f"{m:<{width}}  " + "  ".join(f"{stats.codes[m, c]:>18,}" for c in codes))
    lines += ["", "known issues (not counted as failures): "
              + (", ".join(f"{k}: {n:,}" for k, n in stats.known.items()) or "none")]
    lines += ["", "slowest request per method:"] + [
        f"  {s:7.3f} s  {m}  {c}  {r}" for m, (s, c, r) in sorted(stats.slowest.items(), key=lambda x: -x[1][0])]
    lines += ["", f"failures: {len(stats.failures)}"]
    for f in stats.failures:
        lines += [f"- {f['method']} (seed {f['seed']}){' CRASHED THE SERVER' if f['crash'] else ''}: "
                  f"{f['code']} {f['details']!r}", *("    " + p.replace("\n", "\n    ") for p in f["problems"]),
                  f"    request: {f['request']}"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    p.add_argument("--bounds", choices=("short", "long"), default="long",
                   help="input sizes: short = as in make test, long = up to the server's limits (default)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first round (round r uses seed + r)")
    p.add_argument("--examples", type=int, default=100, help="typed requests per method per round (default 100)")
    p.add_argument("--raw-examples", type=int, default=25, help="raw byte requests per method per round (default 25)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--server", help="fuzz this running server (host:port) instead of starting one")
    p.add_argument("--models", default=str(ROOT / "models"), help="model repository of the started server")
    p.add_argument("--out", default=str(ROOT / "runs" / "fuzz"), help="folder for fuzz.json and server.log")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bounds = LONG if args.bounds == "long" else SHORT

    server = None
    if args.server:
        target = args.server
    else:
        python = str(ROOT / ".venv" / "bin" / "python")
        server = Server(python if os.path.exists(python) else sys.executable, args.models, out / "server.log")
        target = server.start()
    session = FuzzSession(grpc.insecure_channel(target), server_errors=server.errors if server else list)
    session.setup()
    print(f"fuzzing {target} for {args.minutes} min ({args.bounds} bounds, seed {args.seed}); "
          f"server log: {server.log_path if server else 'not ours'}", flush=True)

    stats, started = Stats(), time.monotonic()
    end = started + args.minutes * 60
    rounds = 0
    while time.monotonic() < end:
        for method in methods:
            for raw in (False, True):
                if time.monotonic() >= end:
                    break
                failure = fuzz_one_method(session, server, method, raw, bounds, args.seed + rounds,
                                          args.raw_examples if raw else args.examples, stats)
                if failure:
                    stats.failures.append(failure)
                    print(f"FAILED {failure['method']}: {failure['problems'][0][:300]}", flush=True)
                if server is not None and server.dead:
                    target = server.start()
                    session = FuzzSession(grpc.insecure_channel(target), server_errors=server.errors)
                    session.setup()
        rounds += 1
        print(f"round {rounds}: {sum(stats.codes.values()):,} requests, {len(stats.failures)} failures, "
              f"{(time.monotonic() - started) / 60:.1f} min", flush=True)
    seconds = time.monotonic() - started
    if server is not None:
        server.stop()
    text = report(stats, seconds)
    print("\n" + text)
    (out / "fuzz.json").write_text(json.dumps({
        "target": target, "bounds": args.bounds, "seed": args.seed, "rounds": rounds, "seconds": round(seconds, 1),
        "requests": {f"{m} {c}": n for (m, c), n in sorted(stats.codes.items())},
        "known_issues": dict(stats.known), "slowest": stats.slowest, "failures": stats.failures,
    }, indent=2))
    print(f"\nwrote {out / 'fuzz.json'}")
    return 1 if stats.failures else 0


if __name__ == "__main__":
    sys.exit(main())
