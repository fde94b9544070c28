"""One typed configuration: defaults < TOML file < TANDEM_* environment < flags."""

from __future__ import annotations

import argparse
import re

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
        # every field but the per-model tables, which only the TOML file holds
        assert ("--" + f.name.replace("_", "-") in text) != bool(f.metadata.get("toml_only")), f.name


def test_a_negative_hit_cache_is_refused() -> None:
    with pytest.raises(ValueError, match="hit_cache_bytes must be 0"):
        cfg.load(parse("--hit-cache-bytes", "-1"), {})


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


def test_a_model_may_have_its_own_batching_and_threads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    toml = tmp_path / "server.toml"
    toml.write_text('[server]\nmax_batch_size = 16\n\n[server.model."vit-b-32"]\nmax_batch_size = 64\n'
                    'model_runners = 2\nintra_op_threads = 8\n')
    config = cfg.load(argparse.Namespace(config=str(toml)), {})
    big, other = config.for_model("vit-b-32"), config.for_model("tandem-shapes")
    assert (big.max_batch_size, big.model_runners, big.intra_op_threads) == (64, 2, 8)
    assert (other.max_batch_size, other.model_runners, other.intra_op_threads) == (16, 1, 0)
    assert "model-settings" not in " ".join(_flags())  # the tables are the TOML file's only


def _flags() -> list[str]:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser)
    return [a for action in parser._actions for a in action.option_strings]


@pytest.mark.parametrize(("table", "message"), [
    ('[server.model."m"]\nport = 1\n', 'sets port; a model may set only max_batch_size'),
    ('[server.model."m"]\nmodel_runners = 0\n', 'model_runners must be at least 1, got 0 (model "m")'),
    ('[server.model."m"]\nmax_batch_size = "big"\n', "max_batch_size: expected int, got 'big'"),
    ('[server]\nmodel = 3\n', 'must hold tables, one per model'),
])
def test_bad_model_tables_are_refused_with_the_reason(tmp_path, table: str, message: str) -> None:  # type: ignore[no-untyped-def]
    toml = tmp_path / "server.toml"
    toml.write_text(table)
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.load(argparse.Namespace(config=str(toml)), {})
