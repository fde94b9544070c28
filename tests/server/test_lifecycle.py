"""Model lifecycle over real gRPC: a broken bundle does not stop the others, per-bundle status in ListModels
and health, LoadModel/UnloadModel, polling, a failed reload keeps the old copy, unloading drains requests in
flight, signed bundles, and SIGTERM while loading."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from bundle import BundleError
from server.app import TandemServer
from server.config import ServerConfig
from server.service import Models
from tests.conftest import ROOT, RunningServer, png_bytes, start_server

RED = png_bytes(Image.new("RGB", (40, 40), (220, 30, 30)))
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Wait for an event the test cannot be told of directly; fails after timeout_s (never decides an outcome)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def add_bundle(repo: Path, src: Path, name: str, version: str) -> Path:
    """A copy of bundle src as <name>/<version>, its manifest renamed to match."""
    dst = repo / name / version
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data.update(name=name, version=version)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def corrupt(bundle: Path) -> None:
    with open(bundle / "image.onnx", "ab") as f:
        f.write(b"changed after export")


@pytest.fixture
def repo(tiny_repo: Path, tmp_path: Path) -> Path:
    out = tmp_path / "models"
    shutil.copytree(tiny_repo, out)
    return out


@pytest.fixture
def server(repo: Path):  # type: ignore[no-untyped-def]
    running = start_server(repo, default_model="tiny-clip")
    yield running
    running.stop()


class Stubs:
    def __init__(self, running: RunningServer):
        self.channel = running.channel()
        self.models = pb_grpc.ModelsStub(self.channel)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.collections = pb_grpc.CollectionsStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def statuses(self) -> dict[str, tuple[str, str]]:
        listing = self.models.ListModels(pb.ListModelsRequest(), timeout=10).models
        return {f"{m.model.name}/{m.model.version}": (pb.ModelStatus.Name(m.status), m.reason) for m in listing}

    def health_of(self, name: str) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=f"tandem.model/{name}"), timeout=10).status

    def embed_image(self, model: str, version: str = "") -> pb.EmbedResponse:
        return self.inference.EmbedImage(pb.EmbedImageRequest(model=model, version=version, images=[RED]), timeout=30)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_a_broken_bundle_is_listed_unavailable_with_its_reason_and_the_others_serve(repo) -> None:  # type: ignore[no-untyped-def]
    corrupt(add_bundle(repo, repo / "tiny-image" / "1", "broken", "1"))
    running = start_server(repo)
    try:
        s = Stubs(running)
        status, reason = s.statuses()["broken/1"]
        assert status == "MODEL_STATUS_UNAVAILABLE"
        assert reason == "broken/1/image.onnx: sha256 does not match the manifest (file changed after export?)"
        assert s.statuses()["tiny-clip/1"] == ("MODEL_STATUS_READY", "")
        assert s.health_of("broken/1") == NOT_SERVING
        assert s.health_of("tiny-clip/1") == SERVING
        assert s.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == SERVING
        assert s.embed_image("tiny-image").dim == 32
        code, details = code_of(lambda: s.embed_image("broken"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "broken/1 is UNAVAILABLE" in details
        got = s.models.GetModel(pb.GetModelRequest(model="broken"), timeout=10)
        assert got.status == pb.MODEL_STATUS_UNAVAILABLE and got.reason == reason
        info = s.models.GetModel(pb.GetModelRequest(model="tiny-clip"), timeout=10)
        assert info.source.startswith("checkpoint sha256:") and "/" not in info.source  # no local paths
        from prometheus_client import REGISTRY  # the in-process server's registry, read at scrape time

        status = {(lbl["model"], lbl["status"]) for family in REGISTRY.collect() if family.name == "tandem_model_status"
                  for lbl in (sample.labels for sample in family.samples)}
        assert {("broken", "UNAVAILABLE"), ("tiny-clip", "READY")} <= status
    finally:
        running.stop()


def test_start_up_is_refused_with_every_reason_when_no_bundle_loads(repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    corrupt(repo / "tiny-clip" / "1")
    corrupt(repo / "tiny-image" / "1")
    config = ServerConfig(models=str(repo), port=0, metrics_port=0, data_dir=str(tmp_path / "data"))

    async def start() -> None:
        server = TandemServer(config)
        try:
            await server.start()
        finally:
            await server.stop(0)

    with pytest.raises(BundleError, match=r"(?s)none of the 2 bundle\(s\).*tiny-clip/1: tiny-clip/1/image.onnx: "
                                          r"sha256 does not match.*tiny-image/1: "):
        asyncio.run(start())


def test_source_shows_the_checkpoint_path_only_when_configured() -> None:
    source = {"checkpoint": "/home/me/runs/a.pt", "checkpoint_sha256": "ab" * 32, "weights": "checkpoint"}
    assert Models.source(source, reveal_paths=False) == "checkpoint sha256:abababababab"
    assert Models.source(source, reveal_paths=True) == "/home/me/runs/a.pt"
    assert Models.source({"checkpoint": None, "weights": "random-init"}, reveal_paths=False) == "random-init"


def test_unload_and_load_by_rpc_without_restart(server, repo) -> None:  # type: ignore[no-untyped-def]
    s = Stubs(server)
    created = s.collections.CreateCollection(pb.CreateCollectionRequest(name="pics", model="tiny-image"), timeout=30)
    assert created.model.name == "tiny-image"
    r = s.models.UnloadModel(pb.UnloadModelRequest(model="tiny-image"), timeout=30)
    assert [(m.name, m.version) for m in r.unloaded] == [("tiny-image", "1")]
    assert s.statuses()["tiny-image/1"][0] == "MODEL_STATUS_UNLOADED"
    assert s.health_of("tiny-image/1") == NOT_SERVING
    code, details = code_of(lambda: s.embed_image("tiny-image"))
    assert code == grpc.StatusCode.NOT_FOUND and "tiny-image/1 was unloaded" in details
    code, details = code_of(lambda: s.collections.Search(
        pb.SearchRequest(collection="pics", queries=[pb.Query(terms=[pb.QueryTerm(image=RED)])]), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "tiny-image/1" in details
    assert s.embed_image("tiny-clip").model.name == "tiny-clip"  # the others are untouched

    loaded = s.models.LoadModel(pb.LoadModelRequest(model="tiny-image"), timeout=60)
    assert [(m.model.name, m.status) for m in loaded.models] == [("tiny-image", pb.MODEL_STATUS_READY)]
    assert s.health_of("tiny-image/1") == SERVING
    assert s.embed_image("tiny-image").model.version == "1"

    add_bundle(repo, repo / "tiny-image" / "1", "tiny-image", "2")  # a new version, loaded on request
    s.models.LoadModel(pb.LoadModelRequest(model="tiny-image", version="2"), timeout=60)
    assert s.embed_image("tiny-image").model.version == "2"  # the highest version now
    assert s.embed_image("tiny-image", "1").model.version == "1"


def test_a_server_with_no_model_ready_is_not_serving(server) -> None:  # type: ignore[no-untyped-def]
    """With every bundle unloaded, "" and tandem.v1.Inference said SERVING while every request failed: a load
    balancer kept sending traffic to a replica that could answer none of it."""
    s = Stubs(server)
    overall = lambda name="": s.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status  # noqa: E731
    s.models.UnloadModel(pb.UnloadModelRequest(model="tiny-image"), timeout=30)
    assert overall() == SERVING  # tiny-clip is still READY
    s.models.UnloadModel(pb.UnloadModelRequest(model="tiny-clip"), timeout=30)
    assert overall() == NOT_SERVING and overall("tandem.v1.Inference") == NOT_SERVING
    assert overall("tandem.v1.Models") == SERVING  # it answers: LoadModel brings a model back
    code, details = code_of(lambda: s.inference.EmbedText(pb.EmbedTextRequest(texts=["a"]), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "tiny-clip/1 was unloaded" in details  # the default model
    s.models.LoadModel(pb.LoadModelRequest(model="tiny-clip"), timeout=60)
    assert overall() == SERVING and overall("tandem.v1.Inference") == SERVING


def test_load_and_unload_name_what_is_wrong(server) -> None:  # type: ignore[no-untyped-def]
    s = Stubs(server)
    code, details = code_of(lambda: s.models.LoadModel(pb.LoadModelRequest(model="nope"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "has no bundle nope/*" in details and "tiny-clip/1" in details
    code, details = code_of(lambda: s.models.LoadModel(pb.LoadModelRequest(model="../tiny-clip"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = code_of(lambda: s.models.UnloadModel(pb.UnloadModelRequest(), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs `model`" in details
    code, details = code_of(lambda: s.models.UnloadModel(pb.UnloadModelRequest(model="tiny-clip", version="7"),
                                                         timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND and "not loaded, so there is nothing to unload" in details


def test_a_failed_reload_keeps_the_old_copy_serving(server, repo) -> None:  # type: ignore[no-untyped-def]
    s = Stubs(server)
    before = s.embed_image("tiny-image").embeddings.data
    corrupt(repo / "tiny-image" / "1")
    code, details = code_of(lambda: s.models.LoadModel(pb.LoadModelRequest(model="tiny-image", version="1"),
                                                       timeout=60))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "sha256 does not match" in details
    status, reason = s.statuses()["tiny-image/1"]
    assert status == "MODEL_STATUS_READY" and reason.startswith("reloading failed, the copy loaded before keeps serving")
    assert s.health_of("tiny-image/1") == SERVING
    assert s.embed_image("tiny-image").embeddings.data == before


def test_unloading_lets_the_requests_in_flight_finish(server) -> None:  # type: ignore[no-untyped-def]
    """The request's ONNX Runtime run is held back by filling the inference threads; UnloadModel must wait
    for it, new requests are refused at once, and the request gets its answer."""
    s = Stubs(server)
    registry = server.server.registry
    model = registry.models["tiny-image"]["1"]
    gate = threading.Event()
    blockers = [registry.inference_pool.submit(gate.wait) for _ in range(registry.inference_pool._max_workers)]
    try:
        in_flight = s.inference.EmbedImage.future(pb.EmbedImageRequest(model="tiny-image", images=[RED]), timeout=60)
        wait_for(lambda: not model.image.idle, "the request to reach the batcher")
        unloading = s.models.UnloadModel.future(pb.UnloadModelRequest(model="tiny-image"), timeout=60)
        wait_for(lambda: "tiny-image" not in registry.models, "the model to leave the registry")
        code, _ = code_of(lambda: s.embed_image("tiny-image"))
        assert code == grpc.StatusCode.NOT_FOUND  # new requests: refused at once
        assert not in_flight.done() and not unloading.done()  # the drain waits for the request
    finally:
        gate.set()
    assert in_flight.result().dim == 32 and in_flight.result().model.name == "tiny-image"
    assert [m.name for m in unloading.result().unloaded] == ["tiny-image"]
    assert model.image.idle and model.image._task is None  # its batcher stopped after the request
    for b in blockers:
        b.result()


def test_shutdown_lets_calls_in_progress_finish_within_the_grace(repo) -> None:  # type: ignore[no-untyped-def]
    running = start_server(repo, shutdown_grace_seconds=60)
    s = Stubs(running)
    pool = running.server.registry.inference_pool
    gate = threading.Event()
    blockers = [pool.submit(gate.wait) for _ in range(pool._max_workers)]
    try:
        in_flight = s.inference.EmbedImage.future(pb.EmbedImageRequest(model="tiny-image", images=[RED]), timeout=60)
        wait_for(lambda: not running.server.registry.models["tiny-image"]["1"].image.idle, "the request to queue")
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(), running.loop)  # as on SIGTERM
        def refused() -> bool:
            try:
                s.models.ListModels(pb.ListModelsRequest(), timeout=5)
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.UNAVAILABLE
            return False

        wait_for(refused, "new calls to be refused")
        assert not in_flight.done()
    finally:
        gate.set()
    assert in_flight.result().dim == 32  # finished within the grace, not cancelled
    stopping.result(timeout=60)
    for b in blockers:
        b.result()
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(timeout=10)


def test_tandem_models_shows_status_filters_and_prints_json(repo, capsys) -> None:  # type: ignore[no-untyped-def]
    from cli import main

    corrupt(add_bundle(repo, repo / "tiny-image" / "1", "broken", "1"))
    running = start_server(repo, default_model="tiny-clip")
    try:
        assert main(["models", "--server", running.target]) == 0
        table = capsys.readouterr().out.splitlines()
        assert "broken/1: UNAVAILABLE: broken/1/image.onnx: sha256 does not match the manifest" in table[0]
        assert table[1].startswith("tiny-clip/1 (default): clip,") and len(table) == 3
        assert main(["models", "--server", running.target, "--model", "tiny-image", "--json"]) == 0
        [line] = capsys.readouterr().out.splitlines()
        got = json.loads(line)
        assert got["model"] == {"name": "tiny-image", "version": "1"} and got["dim"] == 32 and not got["default"]
        assert main(["models", "--server", running.target, "--model", "nope"]) == 1
        assert "no model nope/* on" in capsys.readouterr().err
    finally:
        running.stop()


def test_a_bundle_whose_towers_do_not_answer_its_manifest_dim_is_unavailable(repo) -> None:  # type: ignore[no-untyped-def]
    """It loaded as READY and reported the manifest's dim: a collection bound to it stored vectors of another
    size and failed its searches."""
    lying = add_bundle(repo, repo / "tiny-clip" / "1", "lying", "1")
    manifest = json.loads((lying / "manifest.json").read_text())
    (lying / "manifest.json").write_text(json.dumps({**manifest, "dim": 128}))
    running = start_server(repo)
    try:
        status, reason = Stubs(running).statuses()["lying/1"]
        assert status == "MODEL_STATUS_UNAVAILABLE"
        assert "answers embeddings of shape [1, 32], but the manifest says dim 128" in reason
    finally:
        running.stop()


def test_open_health_watches_end_with_not_serving_when_shutdown_begins(repo) -> None:  # type: ignore[no-untyped-def]
    """A Watch stream gets NOT_SERVING and then ends normally when shutdown begins, so that an idle server
    stops at once: before, grpc.aio waited the whole grace period for the stream and then cut it (UNAVAILABLE)."""
    running = start_server(repo, shutdown_grace_seconds=60)
    s = Stubs(running)
    watches = [s.health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=120)
               for name in ("", "tandem.model/tiny-clip/1", "no-such-service")]
    firsts = [next(w).status for w in watches]
    assert firsts == [SERVING, SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]
    stopping = asyncio.run_coroutine_threadsafe(running.server.stop(), running.loop)
    rest = [[r.status for r in w] for w in watches]  # raises if a stream ends with an error status
    assert rest == [[NOT_SERVING], [NOT_SERVING], []]
    stopping.result(timeout=60)
    assert all(w.code() == grpc.StatusCode.OK for w in watches)
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(timeout=10)


def test_polling_loads_added_and_changed_bundles_and_unloads_removed_ones(repo) -> None:  # type: ignore[no-untyped-def]
    running = start_server(repo, model_poll_seconds=1)
    try:
        s = Stubs(running)
        added = add_bundle(repo, repo / "tiny-image" / "1", "late", "1")
        wait_for(lambda: s.statuses().get("late/1", ("",))[0] == "MODEL_STATUS_READY", "late/1 to load")
        assert s.embed_image("late").model.name == "late"
        corrupt(added)  # a changed bundle that fails: the loaded copy keeps serving
        wait_for(lambda: s.statuses()["late/1"][1].startswith("reloading failed"), "the reload to fail")
        assert s.embed_image("late").model.name == "late"
        shutil.rmtree(added.parent)
        wait_for(lambda: "late/1" not in s.statuses(), "late/1 to be unloaded")
        assert code_of(lambda: s.embed_image("late"))[0] == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop()


def test_signed_bundles_are_required_when_the_server_has_a_public_key(repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bundle.signing import generate_key_pair, sign_bundle

    private, public = generate_key_pair()
    (tmp_path / "key.pem").write_bytes(private)
    (tmp_path / "key.pub.pem").write_bytes(public)
    sign_bundle(repo / "tiny-clip" / "1", tmp_path / "key.pem")
    (repo / "tiny-image" / "1" / "manifest.sig").write_text("bm90IGEgc2lnbmF0dXJl\n")
    add_bundle(repo, repo / "tiny-image" / "1", "unsigned", "1").joinpath("manifest.sig").unlink()
    running = start_server(repo, bundle_public_key=str(tmp_path / "key.pub.pem"))
    try:
        statuses = Stubs(running).statuses()
        assert statuses["tiny-clip/1"] == ("MODEL_STATUS_READY", "")
        assert statuses["tiny-image/1"][0] == "MODEL_STATUS_UNAVAILABLE"
        assert "signature does not match manifest.json" in statuses["tiny-image/1"][1]
        assert statuses["unsigned/1"][0] == "MODEL_STATUS_UNAVAILABLE"
        assert "not signed (no manifest.sig)" in statuses["unsigned/1"][1]
    finally:
        running.stop()


# The server as in production (`tandem serve`), with the first file hash of the start-up held until the
# test lets it go (it never does): loading is in progress when SIGTERM arrives.
HELD_LOAD = """
import sys
import bundle.manifest
hash_file = bundle.manifest.sha256_of
def held(path):
    print("LOADING", flush=True)
    sys.stdin.readline()
    return hash_file(path)
bundle.manifest.sha256_of = held
from cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_loading_exits_cleanly(repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_LOAD, "serve", "--models", str(repo), "--port", "0", "--metrics-port", "0",
         "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}"},
    )
    try:
        output = []
        for line in proc.stdout:  # type: ignore[union-attr]
            output.append(line)
            if line.startswith("LOADING"):
                break
        proc.send_signal(signal.SIGTERM)
        # stdin stays open: the load is still held when the process ends. Closing it let the loader run into
        # ONNX Runtime while the interpreter was torn down, which aborted the process now and then (SIGABRT).
        proc.wait(timeout=30)  # its few lines of output fit the pipe
        output.extend(proc.stdout)  # type: ignore[arg-type]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(output)
    assert proc.returncode == 0, log
    assert "stopping during start-up" in log and "Traceback" not in log and "Tandem is serving" not in log
    assert "a model that was still loading is abandoned" in log


def _second_serve(*flags: str) -> subprocess.CompletedProcess[str]:
    """`tandem serve` as a user starts it, expected to refuse to start."""
    return subprocess.run([sys.executable, "-m", "cli", "serve", "--models", str(ROOT / "models"), "--metrics-port",
                           "0", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_second_server_on_the_same_data_dir_or_port_refuses_to_start(tmp_path: Path) -> None:
    first = start_server(ROOT / "models", data_dir=str(tmp_path / "data"))
    try:
        shared_dir = _second_serve("--port", "0", "--data-dir", str(tmp_path / "data"))
        assert shared_dir.returncode == 1, shared_dir.stderr[-2000:]
        assert f"data_dir {tmp_path / 'data'} is in use by another Tandem server (pid {os.getpid()})" in \
            shared_dir.stderr and "Traceback" not in shared_dir.stderr
        # grpc would let a second server share the port (SO_REUSEPORT) and take some of the connections
        shared_port = _second_serve("--port", str(first.server.port), "--data-dir", str(tmp_path / "other"))
        assert shared_port.returncode == 1, shared_port.stderr[-2000:]
        assert f"could not listen on 127.0.0.1:{first.server.port}: the port is in use" in shared_port.stderr
        with first.channel() as channel:  # the first one never noticed
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        first.stop()
    # stopped, the folder is free again
    again = start_server(ROOT / "models", data_dir=str(tmp_path / "data"))
    again.stop()
