"""Export writes loadable bundles whose ONNX graphs reproduce PyTorch, or nothing at all."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from bundle import BundleError, load_bundle
from bundle.tokenizer import ClipTokenizer
from tests.conftest import CONFIGS
from training import export as export_mod
from training.export import FUSED_ATTENTION_OPS, ParityError, export_bundle
from training.models import build_model


def run_onnx(path, x: np.ndarray, precision: str = "fp32") -> np.ndarray:  # type: ignore[no-untyped-def]
    s = export_mod.ort_session(path, precision)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("config", ["tiny-vit", "tiny-rn"])
def test_export_matches_pytorch_on_fresh_inputs(tmp_path, config: str) -> None:  # type: ignore[no-untyped-def]
    """A ViT and a convolutional (ModifiedResNet) open_clip architecture, random init."""
    torch.manual_seed(1)
    model, name, cfg = build_model(str(CONFIGS / f"{config}.json"))
    ckpt = tmp_path / "w.pt"
    torch.save({"state_dict": model.state_dict(), "model_name": name, "model_config": cfg}, ckpt)
    result = export_bundle(None, tmp_path / "repo", config, "1", checkpoint=ckpt)
    bundle = load_bundle(result.path)
    m = bundle.manifest
    assert m.kind == "clip" and m.architecture == config and m.parity["min_cosine"] >= 0.9999
    assert m.source["checkpoint_sha256"] and m.source["weights"] == "checkpoint"

    # Batch sizes the probe never used: the batch axis is dynamic.
    size = m.image.size
    for n in (1, 5):
        x = torch.randn(n, 3, size, size)
        with torch.no_grad():
            want = model.encode_image(x).numpy()
        assert cosines(run_onnx(bundle.image_path, x.numpy()), want).min() >= 0.9999
    ids, _ = ClipTokenizer(bundle.tokenizer_path, m.text.context_length).encode_batch(["a cat", "two dogs on grass", "z"])
    with torch.no_grad():
        want = model.encode_text(torch.from_numpy(ids)).numpy()
    assert cosines(run_onnx(bundle.text_path, ids), want).min() >= 0.9999


def test_attention_exports_as_plain_onnx_ops(tiny_repo) -> None:  # type: ignore[no-untyped-def]
    for tower in ("image", "text"):
        ops = {n.op_type for n in onnx.load(str(tiny_repo / "tiny-clip" / "1" / f"{tower}.onnx")).graph.node}
        assert "MatMul" in ops and "Softmax" in ops
        assert not ops & FUSED_ATTENTION_OPS
        assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(tiny_repo / "tiny-clip" / "1" /
                                                                        f"{tower}.onnx")).graph.node)


def test_manifest_records_what_the_server_needs(tiny_repo) -> None:  # type: ignore[no-untyped-def]
    data = json.loads((tiny_repo / "tiny-clip" / "1" / "manifest.json").read_text())
    assert data["format"] == "tandem-bundle/2"
    assert data["text"]["tokenizer_file"] == "tokenizer.json" and len(data["text"]["tokenizer_sha256"]) == 64
    assert data["image"]["size"] == 32 and data["image"]["resize_mode"] == "shortest"
    assert data["image"]["interpolation"] == "bicubic" and len(data["image"]["mean"]) == 3
    assert data["text"]["context_length"] == 16 and data["text"]["tokenizer"] == "clip-bpe"
    assert data["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-4)
    assert data["opset"] == 18 and data["precision"] == "fp32"
    assert len(data["image"]["sha256"]) == 64


def test_fp16_export_passes_its_own_gate(tmp_path, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    result = export_bundle(None, tmp_path, "half", "1", checkpoint=tiny_checkpoint, precision="fp16")
    m = result.manifest
    assert m.precision == "fp16" and m.parity["min_cosine"] >= 0.999
    graph = onnx.load(str(result.path / "image.onnx")).graph
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    # The server's CPU session options run it.
    from server.runtime import Tower

    out = Tower(result.path / "image.onnx", ["CPUExecutionProvider"], "fp16")(
        np.zeros((2, 3, 32, 32), np.float32))
    assert out.shape == (2, 32) and out.dtype == np.float32


def test_failed_parity_writes_no_bundle(tmp_path, tiny_checkpoint, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(export_mod.PARITY_THRESHOLD, "fp32", 1.5)  # unreachable: cosine <= 1
    with pytest.raises(ParityError, match="parity check failed"):
        export_bundle(None, tmp_path, "bad", "1", checkpoint=tiny_checkpoint)
    assert not (tmp_path / "bad").exists()


def test_existing_version_is_not_overwritten_without_force(tmp_path, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    export_bundle(None, tmp_path, "m", "1", checkpoint=tiny_checkpoint, image_only=True)
    with pytest.raises(FileExistsError, match="--force"):
        export_bundle(None, tmp_path, "m", "1", checkpoint=tiny_checkpoint, image_only=True)


def test_open_clip_state_dict_checkpoint_with_named_architecture(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A plain open_clip-style file (state_dict only, 'module.' prefixes from DDP) plus --model."""
    model, _, _ = build_model(str(CONFIGS / "tiny-vit.json"))
    ckpt = tmp_path / "openclip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    result = export_bundle(str(CONFIGS / "tiny-vit.json"), tmp_path, "oc", "1", checkpoint=ckpt, image_only=True)
    assert result.manifest.kind == "image"


def test_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    state = torch.load(tiny_checkpoint, weights_only=True)
    plain = tmp_path / "plain.pt"
    torch.save(state["state_dict"], plain)
    with pytest.raises(ValueError, match="does not fit"):
        build_model(str(CONFIGS / "tiny-rn.json"), plain)


def test_tampered_bundle_is_refused_at_load(tmp_path, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    result = export_bundle(None, tmp_path, "t", "1", checkpoint=tiny_checkpoint, image_only=True)
    with open(result.path / "image.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256 does not match"):
        load_bundle(result.path)


def test_non_finite_outputs_fail_the_gate(tmp_path, tiny_checkpoint, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An overflow (inf/NaN) must not slip through: NaN compares false with every threshold."""
    real = export_mod.ort_session

    class Poisoned:
        def __init__(self, session):  # type: ignore[no-untyped-def]
            self.session = session

        def run(self, names, feeds):  # type: ignore[no-untyped-def]
            out = self.session.run(names, feeds)
            out[0][0, 0] = np.nan
            return out

    monkeypatch.setattr(export_mod, "ort_session", lambda path, precision: Poisoned(real(path, precision)))
    with pytest.raises(ParityError, match="nan"):
        export_bundle(None, tmp_path, "nan", "1", checkpoint=tiny_checkpoint)
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize("name, version", [("../escape", "1"), ("m", "1/../../x"), (".hidden", "1"), ("m", ".."),
                                           ("a b", "1"), ("m", "")])
def test_names_and_versions_must_be_one_folder_name(tmp_path, tiny_checkpoint, name: str, version: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="must be one folder name"):
        export_bundle(None, tmp_path / "repo", name, version, checkpoint=tiny_checkpoint, image_only=True)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "x").exists()


def test_force_replaces_a_bundle_by_renames_and_a_failed_export_keeps_the_old_one(  # type: ignore[no-untyped-def]
        tmp_path, tiny_checkpoint, monkeypatch) -> None:
    first = export_bundle(None, tmp_path, "m", "1", checkpoint=tiny_checkpoint, image_only=True, source_note="old")
    inode = (first.path / "image.onnx").stat().st_ino
    monkeypatch.setitem(export_mod.PARITY_THRESHOLD, "fp32", 1.5)  # this export fails its gate
    with pytest.raises(ParityError):
        export_bundle(None, tmp_path, "m", "1", checkpoint=tiny_checkpoint, image_only=True, force=True)
    assert load_bundle(first.path).manifest.source["note"] == "old"  # untouched
    monkeypatch.setitem(export_mod.PARITY_THRESHOLD, "fp32", 0.9999)
    export_bundle(None, tmp_path, "m", "1", checkpoint=tiny_checkpoint, image_only=True, force=True,
                  source_note="new")
    assert load_bundle(first.path).manifest.source["note"] == "new"
    assert (first.path / "image.onnx").stat().st_ino != inode  # a new folder renamed in, not rewritten in place
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["1"]  # no staging folder left behind
