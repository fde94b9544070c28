"""Bundle discovery and loading refuse what the server could not serve correctly."""

from __future__ import annotations

import json
import shutil

import pytest

from server.bundle import BundleError, discover, load_bundle, version_key


def test_numbered_versions_order_numerically_and_above_named_ones() -> None:
    assert sorted(["10", "beta", "2", "1"], key=version_key) == ["beta", "1", "2", "10"]


def test_discover_finds_name_version_folders(tiny_repo) -> None:  # type: ignore[no-untyped-def]
    assert [(p.parent.name, p.name) for p in discover(tiny_repo)] == [("tiny-clip", "1"), ("tiny-image", "1")]


def test_folder_must_match_manifest(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    moved = tmp_path / "other-name" / "1"
    shutil.copytree(tiny_repo / "tiny-clip" / "1", moved)
    with pytest.raises(BundleError, match="manifest says tiny-clip/1"):
        load_bundle(moved)


@pytest.mark.parametrize(
    "change, message",
    [({"format": "other/9"}, "this server reads"), ({"kind": "audio"}, "kind must be one of"),
     ({"text": None}, "needs a text tower"), ({"precision": "int4"}, "precision must be")],
)
def test_bad_manifest_fields_are_named(tiny_repo, tmp_path, change, message) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "tiny-clip" / "1"
    shutil.copytree(tiny_repo / "tiny-clip" / "1", bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    data.update(change)
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_missing_onnx_file_is_named(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "tiny-clip" / "1"
    shutil.copytree(tiny_repo / "tiny-clip" / "1", bundle)
    (bundle / "text.onnx").unlink()
    with pytest.raises(BundleError, match="text.onnx, which is missing"):
        load_bundle(bundle)
