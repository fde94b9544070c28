"""One typed config per method is the only source of defaults: the CLI, its help and docs/ssl.md read it,
--optimizer brings its own lr and weight decay, and combinations that cannot train are refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cli import build_parser
from cli import main as tandem
from training.cli import run_config, train_loop_config
from training.config import METHODS, SimSiamConfig, SwAVConfig, defaults_table

DOCS = Path(__file__).resolve().parents[2] / "docs"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_cli_defaults_are_the_method_config() -> None:
    for name, cls in METHODS.items():
        args = parse(name.replace("_", "-"))
        assert run_config(args) == cls(), name


def test_optimizer_brings_its_own_lr_and_weight_decay() -> None:
    simsiam = run_config(parse("simsiam"))
    assert (simsiam.optimizer, simsiam.peak_lr, simsiam.decay) == ("sgd", 0.25, 1e-5)
    adamw = run_config(parse("simsiam", "--optimizer", "adamw"))
    assert (adamw.peak_lr, adamw.decay) == (SimSiamConfig.OPTIMIZERS["adamw"][0], SimSiamConfig.OPTIMIZERS["adamw"][1])
    assert adamw.peak_lr < 0.01  # not SGD's 0.25
    scaled = run_config(parse("byol", "--optimizer", "lars", "--batch-size", "256"))
    assert scaled.peak_lr == pytest.approx(2 * 0.15)  # lr at batch 128, scaled by batch / 128
    loop = train_loop_config(parse("byol", "--lr", "0.5", "--weight-decay", "0"), run_config(parse("byol")))
    assert loop.out == "runs/byol"
    assert run_config(parse("byol", "--lr", "0.5", "--weight-decay", "0")).peak_lr == 0.5


def test_swav_takes_the_local_crops_it_is_asked_for() -> None:
    from training.methods import ssl_class

    config = run_config(parse("swav", "--local-crops", "6", "--image-size", "16", "--backbone", "resnet-micro"))
    assert isinstance(config, SwAVConfig) and config.local_crops == 6
    assert len(ssl_class("swav")(config).views().views) == 2 + 6


@pytest.mark.parametrize("argv, message", [
    (["mae", "--backbone", "resnet18-small"], "MAE needs a ViT backbone"),
    (["moco-v2", "--queue-size", "64", "--batch-size", "128"], "--queue-size 64 must hold at least one batch"),
    (["swav", "--local-crops", "-1"], "--local-crops must be between 0 and 16"),
    (["simclr", "--image-size", "32", "--patch-size", "5"], "--patch-size 5 must divide --image-size 32"),
    (["byol", "--warmup-steps", "10", "--steps", "10"], "--warmup-steps must be between 0 and --steps - 1"),
    (["simclr", "--batch-size", "1"], "--batch-size must be at least 2"),
    (["mae", "--mask-ratio", "1.0"], "--mask-ratio must be in (0, 1)"),
    (["simclr", "--lr", "nan"], "--lr must be a finite number above 0"),
])
def test_invalid_settings_are_refused_with_a_message(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert tandem(["train", *argv, "--no-progress", "--out", "/nonexistent/never-written"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["simclr", "--local-crops", "6"], ["byol", "--queue-size", "10"],
                                  ["mae", "--optimizer", "sgd"], ["clip", "--backbone", "vit-micro"]])
def test_options_of_another_method_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "invalid choice" in err


def test_help_teaches_each_methods_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    top = capsys.readouterr().out
    assert defaults_table().splitlines()[2] in top  # the per-method table
    with pytest.raises(SystemExit):
        parse("simsiam", "--help")
    simsiam = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "sgd lr 0.25, weight decay 1e-05" in simsiam and "(default: sgd)" in simsiam
    assert "--temperature" not in simsiam  # SimSiam has none


def test_docs_table_is_the_configs_table() -> None:
    assert defaults_table() in (DOCS / "ssl.md").read_text(), "regenerate: python -c 'from training.config " \
        "import defaults_table; print(defaults_table())'"
