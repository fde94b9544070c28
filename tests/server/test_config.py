"""One typed configuration: defaults < TOML file < TANDEM_* environment < flags."""

from __future__ import annotations

import argparse

import pytest

from server import config as cfg


def parse(*flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cfg.add_arguments(p)
    return p.parse_args(list(flags))


def test_precedence_file_env_flags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "t.toml"
    f.write_text("[server]\nport = 6000\nmax_batch_size = 8\nmetrics_port = 9999\nverify_hashes = false\n")
    env = {"TANDEM_MAX_BATCH_SIZE": "16", "TANDEM_METRICS_PORT": "0"}
    c = cfg.load(parse("--config", str(f), "--max-batch-size", "64"), env)
    assert c.port == 6000  # file
    assert c.metrics_port == 0  # env beats file
    assert c.max_batch_size == 64  # flag beats env
    assert c.verify_hashes is False and c.host == "127.0.0.1"  # file bool; default


def test_config_file_from_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "t.toml"
    f.write_text("device = 'cpu'\n")
    assert cfg.load(parse(), {"TANDEM_CONFIG": str(f)}).device == "cpu"


@pytest.mark.parametrize(
    "env, message",
    [({"TANDEM_PORT": "abc"}, "TANDEM_PORT: expected int"), ({"TANDEM_DEVICE": "tpu"}, "device must be"),
     ({"TANDEM_VERIFY_HASHES": "maybe"}, "expected true/false")],
)
def test_bad_values_say_where_they_came_from(env, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        cfg.load(parse(), env)


def test_unknown_file_setting_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "t.toml"
    f.write_text("max_batch = 3\n")
    with pytest.raises(ValueError, match="unknown setting 'max_batch'"):
        cfg.load(parse("--config", str(f)), {})


def test_every_field_has_help_and_a_flag() -> None:
    p = argparse.ArgumentParser()
    cfg.add_arguments(p)
    text = p.format_help()
    for f in cfg.fields(cfg.ServerConfig):
        assert f.metadata["help"]
        assert "--" + f.name.replace("_", "-") in text


def test_items_per_request_must_fit_the_queue() -> None:
    with pytest.raises(ValueError, match="must not exceed max_queue_rows"):
        cfg.load(parse("--max-items-per-request", "100", "--max-queue-rows", "50"), {})


def test_the_operations_guide_lists_every_setting_as_the_code_defines_it() -> None:
    from pathlib import Path

    from server.config import markdown_table

    docs = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    missing = [row for row in markdown_table().splitlines() if row not in docs]
    assert not missing, "docs/operations.md is out of date; regenerate its settings table:\n" + "\n".join(missing)


def test_ort_spinning_reaches_the_onnx_runtime_sessions() -> None:
    from pathlib import Path

    from server.runtime import Tower

    onnx = sorted((Path(__file__).parents[2] / "models").glob("*/*/image.onnx"))[0]
    options = Tower(onnx, ["CPUExecutionProvider"], spinning=False).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    options = Tower(onnx, ["CPUExecutionProvider"], spinning=True).session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):  # left to ONNX Runtime's default
        options.get_session_config_entry("session.intra_op.allow_spinning")


def test_usable_cores_follows_the_container_cpu_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from server.runtime import usable_cores

    mine = usable_cores(tmp_path / "absent")  # no cgroup file: the affinity mask
    assert mine >= 1
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # 1.5 CPUs: rounded up, never above the machine
    assert usable_cores(limit) == min(mine, 2)
    limit.write_text("20000 100000\n")  # a fifth of a CPU: still one thread
    assert usable_cores(limit) == 1
    limit.write_text("max 100000\n")
    assert usable_cores(limit) == mine


def test_model_runners_and_threads_are_checked() -> None:
    with pytest.raises(ValueError, match="model_runners must be at least 1"):
        cfg.load(None, {"TANDEM_MODEL_RUNNERS": "0"})
    with pytest.raises(ValueError, match="intra_op_threads"):
        cfg.load(None, {"TANDEM_INTRA_OP_THREADS": "-1"})
