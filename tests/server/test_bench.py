"""`tandem bench` end to end: the shipped default model on a real server, real gRPC, the server's real Prometheus
page, real ONNX Runtime for the raw baseline. Assertions are on what the report says, never on speed."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client import start_http_server
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from server import bench
from tests.conftest import SHIPPED_MODELS, start_server


@pytest.fixture(scope="module")
def metrics_url():  # type: ignore[no-untyped-def]
    """The in-process test server's metrics (the default registry) on a free port, as `tandem serve` exposes them."""
    httpd, _ = start_http_server(0, addr="127.0.0.1")
    yield f"http://127.0.0.1:{httpd.server_port}/metrics"
    httpd.shutdown()


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return bench.build_parser().parse_args(["bench", *argv])


def test_a_short_sweep_reports_throughput_latency_batches_stages_and_the_raw_ratio(
        default_server, metrics_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = parse("--server", default_server.target, "--metrics-url", metrics_url, "--models", str(SHIPPED_MODELS),
                 "--concurrency", "1,4", "--duration", "1.5", "--warmup", "0.3", "--mix", "text=1,image=1",
                 "--raw-seconds", "0.6", "--json", str(out), "--plot", str(png))
    assert bench.main(args) == 0
    report = json.loads(out.read_text())

    assert report["model"]["name"] == "tandem-shapes"
    for tower in ("text", "image"):
        raw = report["raw"][tower]
        assert raw["items_per_s"] == max(raw["by_batch"].values()) > 0
    assert [s["concurrency"] for s in report["steps"]] == [1, 4]
    for step in report["steps"]:
        assert step["items"] > 0 and step["errors"] == {}
        assert set(step["by_kind"]) == {"text", "image"}
        lat = step["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert step["server_over_raw"] > 0
        # The window's batches hold exactly the items the clients had answered, tower by tower: the deltas are
        # taken with nothing in flight, and warm-up requests are not in them.
        batches = step["server"]["batch_sizes"]
        for tower in ("text", "image"):
            assert batches[tower]["rows"] == step["by_kind"][tower]["items"]
            assert sum(batches[tower]["histogram"].values()) == batches[tower]["batches"] > 0
        stages = step["server"]["stages"]
        for stage in ("text/tokenize", "text/queue", "text/inference", "image/decode", "image/preprocess",
                      "image/inference"):
            assert stages[stage]["count"] > 0 and stages[stage]["mean_ms"] > 0
        assert step["server"]["requests"]["EmbedText OK"] == step["by_kind"]["text"]["requests"]
    printed = capsys.readouterr().out
    assert "| concurrency | requests/s | items/s |" in printed and "### Batch sizes" in printed
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 600


def test_search_requests_go_to_the_collection_and_its_batcher(default_server, metrics_url: str, tmp_path: Path
                                                               ) -> None:
    stub = pb_grpc.CollectionsStub(default_server.channel())
    stub.CreateCollection(pb.CreateCollectionRequest(name="bench-shapes"), timeout=30)
    stub.Upsert(pb.UpsertRequest(collection="bench-shapes", items=[
        pb.Item(id=f"t{i}", text=t) for i, t in enumerate(("a red circle", "a blue square", "a green cross"))]),
        timeout=30)
    out = tmp_path / "bench.json"
    args = parse("--server", default_server.target, "--metrics-url", metrics_url, "--no-raw", "--concurrency", "2",
                 "--duration", "0.5", "--warmup", "0", "--mix", "search", "--collection", "bench-shapes",
                 "--items", "2", "--connections", "2", "--json", str(out))  # clients spread over 2 connections
    assert bench.main(args) == 0
    step = json.loads(out.read_text())["steps"][0]
    assert step["errors"] == {} and step["by_kind"]["search"]["items"] == step["items"] > 0
    assert step["server_over_raw"] is None
    assert step["server"]["requests"]["Search OK"] == step["requests"]
    assert step["server"]["batch_sizes"]["text"]["rows"] == step["items"]  # the queries' texts, embedded


def test_no_server_at_the_address_is_a_readable_error(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nobody listens there
    assert bench.main(parse("--server", f"127.0.0.1:{port}", "--connect-timeout", "5")) == 1
    err = capsys.readouterr().err
    assert f"cannot reach a Tandem server at 127.0.0.1:{port}" in err and "tandem serve" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--server", "localhost"], "give HOST:PORT"),
    (["--mix", "text=1,video=2"], "unknown request kind 'video'"),
    (["--mix", "text=0"], "no kind a weight above 0"),
    (["--concurrency", "1,0"], "numbers >= 1"),
    (["--connections", "0"], "--connections must be at least 1"),
])
def test_bad_options_say_what_to_give(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_search_without_a_collection_is_refused_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(parse("--server", "127.0.0.1:1", "--mix", "search")) == 2
    assert "--collection" in capsys.readouterr().err


def test_a_full_queue_is_counted_as_resource_exhausted_and_the_sweep_goes_on(metrics_url: str, tmp_path: Path) -> None:
    # A queue of one request's items, held 50 ms for company: seven other clients find it full.
    server = start_server(SHIPPED_MODELS, max_queue_rows=4, max_items_per_request=4, max_queue_delay_us=50_000)
    try:
        out = tmp_path / "bench.json"
        args = parse("--server", server.target, "--metrics-url", metrics_url, "--no-raw", "--concurrency", "8",
                     "--duration", "0.5", "--warmup", "0", "--mix", "image", "--items", "4", "--image-size", "64",
                     "--json", str(out))
        assert bench.main(args) == 0
    finally:
        server.stop()
    step = json.loads(out.read_text())["steps"][0]
    assert step["errors"]["RESOURCE_EXHAUSTED"] > 0 and step["items"] > 0
    assert "max_queue_rows" in step["error_messages"]["RESOURCE_EXHAUSTED"]
    took = step["error_latency_ms"]["RESOURCE_EXHAUSTED"]  # how fast the refusals came
    assert 0 < took["p50"] <= took["p99"] <= took["max"]
    assert step["server"]["requests"]["EmbedImage RESOURCE_EXHAUSTED"] == step["errors"]["RESOURCE_EXHAUSTED"]


def test_health_checks_measure_the_floor_of_a_request_beside_texts(default_server, metrics_url: str, tmp_path: Path
                                                                   ) -> None:
    out = tmp_path / "bench.json"
    args = parse("--server", default_server.target, "--metrics-url", metrics_url, "--raw-seconds", "0.2",
                 "--raw-max-batch", "2", "--concurrency", "2", "--duration", "0.5", "--warmup", "0",
                 "--mix", "health=1,text=1", "--items", "3", "--json", str(out))
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    step = report["steps"][0]
    health, text = step["by_kind"]["health"], step["by_kind"]["text"]
    assert step["errors"] == {} and health["requests"] > 0 and text["requests"] > 0
    assert health["items"] == health["requests"] and text["items"] == 3 * text["requests"]  # no items in a check
    assert step["items"] == health["items"] + text["items"]
    assert set(report["raw"]) == {"text"}  # the raw baseline of the tower the texts use, none for health
    assert step["server_over_raw"] == pytest.approx(text["items_per_s"] / report["raw"]["text"]["items_per_s"])
    assert step["server"]["requests"].get("EmbedText OK") == text["requests"]
    # The bare model's rate under this mix: 1 + 3 items an average pair of requests, model time for the 3 only.
    assert report["raw_mix_items_per_s"] == pytest.approx(4 / (3 / report["raw"]["text"]["items_per_s"]))


def test_a_health_only_sweep_writes_well_formed_markdown(default_server, metrics_url: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("--server", default_server.target, "--metrics-url", metrics_url, "--no-raw", "--concurrency", "2",
                 "--duration", "0.3", "--warmup", "0", "--mix", "health")
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    tables = [line for line in out.splitlines() if line.startswith("|")]
    assert tables and all(line.count("|") == tables[0].count("|") for line in tables[:3])  # header, rule, row
    assert "(no ONNX Runtime runs in the measured windows)" in out


def test_steps_measured_before_the_server_died_are_kept(metrics_url: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    server = start_server(SHIPPED_MODELS)
    out = tmp_path / "bench.json"
    real = bench.run_load
    steps = 0

    async def load_then_stop(*a, **kw):  # type: ignore[no-untyped-def]
        nonlocal steps
        result = await real(*a, **kw)
        steps += 1
        if steps == 1:  # the first step is measured: the server goes away before the second
            server.stop()
        return result

    bench.run_load = load_then_stop
    try:
        args = parse("--server", server.target, "--metrics-url", "", "--no-raw", "--concurrency", "1,2",
                     "--duration", "0.3", "--warmup", "0", "--mix", "text", "--json", str(out), "--timeout", "5")
        assert bench.main(args) == 1
    finally:
        bench.run_load = real
    report = json.loads(out.read_text())
    first, second = report["steps"]
    assert first["items"] > 0 and second["requests"] == 0 and set(second["errors"]) == {"UNAVAILABLE"}
    assert "stopped answering" in report["error"]
    captured = capsys.readouterr()
    assert "stopped answering" in captured.err and "| 1 |" in captured.out


def test_raw_pixel_requests_skip_decoding(default_server, metrics_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    args = parse("--server", default_server.target, "--metrics-url", metrics_url, "--no-raw", "--concurrency", "2",
                 "--duration", "0.5", "--warmup", "0", "--mix", "pixels", "--items", "2", "--json", str(out))
    assert bench.main(args) == 0
    step = json.loads(out.read_text())["steps"][0]
    assert step["errors"] == {} and step["by_kind"]["pixels"]["items"] == step["items"] > 0
    server = step["server"]
    assert server["batch_sizes"]["image"]["rows"] == step["items"]
    assert "image/decode" not in server["stages"] or server["stages"]["image/decode"]["count"] == 0  # nothing decoded


def test_an_open_loop_sends_at_the_rate_whatever_the_answers(default_server, metrics_url: str, tmp_path: Path
                                                             ) -> None:
    out = tmp_path / "bench.json"
    args = parse("--server", default_server.target, "--metrics-url", metrics_url, "--no-raw", "--rate", "40,80",
                 "--duration", "1", "--warmup", "0", "--mix", "text", "--json", str(out))
    assert bench.main(args) == 0
    steps = json.loads(out.read_text())["steps"]
    assert [s["rate"] for s in steps] == [40, 80]
    for s in steps:
        # a request is due every 1/rate s from the start: never more than rate x duration (+ the one at t=0)
        assert 0 < s["requests"] <= s["rate"] * 1 + 1 and s["errors"] == {}
        assert s["server"]["requests"]["EmbedText OK"] == s["requests"]
        assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]

