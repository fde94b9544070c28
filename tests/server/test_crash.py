"""A write acknowledged is a write kept: SIGKILL the server at random moments while clients write.

The loop of Qdrant's crasher, short form (30 kills, about a minute); set
TANDEM_CRASH_ROUNDS for a longer run (e.g. 300). Each
round starts `tandem serve` on the same data folder, checks everything
acknowledged so far, lets four clients upsert, replace, delete and search
at once, and kills the server with SIGKILL at a random moment. Each client
owns its own ids, so it knows the order of its writes; a write in flight at
the kill may or may not have landed, and the check accepts either outcome
for that one write only.

After every restart:
- every acknowledged upsert is there with its whole metadata and its vector,
  and a search with its vector finds it first;
- every acknowledged delete is gone;
- nothing is duplicated: the collection's count is the number of live ids.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from server.client import TandemClient, TandemError
from tests.conftest import ROOT, SHIPPED_MODELS
from tests.test_layout import free_port, serve_python, wait_serving

pytestmark = pytest.mark.slow
ROUNDS = int(os.environ.get("TANDEM_CRASH_ROUNDS", "30"))
CLIENTS, IDS_PER_CLIENT, DIM = 4, 60, 64
State = tuple[np.ndarray, dict] | None  # (unit vector, metadata) or deleted / never written


@dataclass
class Client:
    """One writer's acknowledged view of its own ids, plus the write that was in flight when the server died."""

    name: str
    rng: random.Random
    known: dict[str, State] = field(default_factory=dict)
    in_flight: dict[str, State] = field(default_factory=dict)  # id -> state if the unacknowledged write landed
    writes: int = 0
    failures: list[str] = field(default_factory=list)  # what went wrong in the thread, checked by the test

    def run(self, target: str, stop: threading.Event) -> None:
        with TandemClient(target, timeout_s=10) as c:
            while not stop.is_set():
                ids = [f"{self.name}-{self.rng.randrange(IDS_PER_CLIENT)}" for _ in range(self.rng.randint(1, 4))]
                ids = list(dict.fromkeys(ids))
                if self.rng.random() < 0.75:
                    new = {}
                    for i in ids:
                        v = np.asarray([self.rng.gauss(0, 1) for _ in range(DIM)], np.float32)
                        self.writes += 1
                        new[i] = (v / np.linalg.norm(v), {"writer": self.name, "write": self.writes, "tags": [i, "x"]})
                    self.in_flight = new
                    try:
                        r = c.upsert("crash", [{"id": i, "vector": s[0], "metadata": s[1]} for i, s in new.items()])
                    except TandemError:
                        return  # the server is gone; in_flight may or may not have landed
                    if r.upserted != len(new):
                        self.failures.append(f"upsert refused items: {[x.message for x in r.results]}")
                        return
                    self.known.update(new)
                else:
                    self.in_flight = dict.fromkeys(ids)
                    try:
                        c.delete("crash", ids)
                    except TandemError:
                        return
                    self.known.update(self.in_flight)
                self.in_flight = {}
                try:
                    c.search("crash", np.ones(DIM, np.float32), top_k=5)
                except TandemError:
                    return

    def settle(self, actual: dict[str, State]) -> None:
        """After a restart: take the in-flight write's outcome from what the server kept (either is allowed)."""
        for i, landed in self.in_flight.items():
            before = self.known.get(i)
            now = actual.get(i)
            assert same(now, before) or same(now, landed), f"{i}: neither its state before nor after the last write"
            self.known[i] = now
        self.in_flight = {}


def same(a: State, b: State) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a[1] == b[1] and np.allclose(a[0], b[0], atol=1e-6)


def read_back(c: TandemClient, ids: list[str]) -> dict[str, State]:
    got = c.get("crash", ids, with_vectors=True)
    return {i: (got.vectors[n], meta) for n, (i, meta) in enumerate(got.items.items())}


def start(data: Path) -> tuple[subprocess.Popen, str]:  # type: ignore[type-arg]
    port = free_port()
    proc = subprocess.Popen([serve_python(), "-m", "cli", "serve", "--models", str(SHIPPED_MODELS), "--data-dir",
                             str(data), "--port", str(port), "--metrics-port", "0", "--log-level", "WARNING",
                             "--snapshot-every-changes", "40"],  # snapshots (and kills during them) every round
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = f"127.0.0.1:{port}"
    wait_serving(target, proc)
    return proc, target


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    rng = random.Random(1234)
    clients = [Client(f"c{n}", random.Random(rng.random())) for n in range(CLIENTS)]
    all_ids = [f"{cl.name}-{i}" for cl in clients for i in range(IDS_PER_CLIENT)]
    proc, target = start(tmp_path)
    with TandemClient(target) as c:
        c.create_collection("crash", metric="cosine")
    proc.kill()
    proc.wait()
    for round_no in range(ROUNDS):
        proc, target = start(tmp_path)
        try:
            with TandemClient(target, timeout_s=30) as c:
                actual = read_back(c, all_ids)
                for cl in clients:
                    cl.settle(actual)
                expected = {i: s for cl in clients for i, s in cl.known.items() if s is not None}
                assert set(actual) == set(expected), f"round {round_no}: stored ids differ from acknowledged ones"
                for i, s in expected.items():
                    assert same(actual[i], s), f"round {round_no}: {i} lost its vector or metadata"
                assert c.get_collection("crash").count == len(expected), f"round {round_no}: duplicates"
                ids = sorted(expected)
                for start_at in range(0, len(ids), 64):
                    chunk = ids[start_at : start_at + 64]
                    hits = c.search("crash", *[expected[i][0] for i in chunk], top_k=1)
                    assert [h[0].id for h in hits] == chunk, f"round {round_no}: not searchable"
            stop = threading.Event()
            threads = [threading.Thread(target=cl.run, args=(target, stop)) for cl in clients]
            for t in threads:
                t.start()
            threading.Event().wait(rng.uniform(0.05, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not [f for cl in clients for f in cl.failures]
    assert sum(cl.writes for cl in clients) > ROUNDS * 5, "the clients hardly wrote: the test proved little"
