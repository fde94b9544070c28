"""Bundle discovery and loading refuse what the server could not serve correctly."""

from __future__ import annotations

import json
import shutil

import pytest

from bundle import BundleError, discover, load_bundle, version_key


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
    [({"format": "other/9"}, "this version of Tandem reads"), ({"kind": "audio"}, "kind must be one of"),
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


def test_changed_tokenizer_file_is_refused(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "tiny-clip" / "1"
    shutil.copytree(tiny_repo / "tiny-clip" / "1", bundle)
    with open(bundle / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match="tokenizer.json: sha256 does not match"):
        load_bundle(bundle)


def as_format_1(bundle) -> None:  # type: ignore[no-untyped-def]
    """Rewrite a bundle as Tandem 0.1 wrote it: format 1, no tokenizer file."""
    data = json.loads((bundle / "manifest.json").read_text())
    data["format"] = "tandem-bundle/1"
    if data["text"]:
        for key in ("tokenizer_file", "tokenizer_sha256"):
            del data["text"][key]
        (bundle / "tokenizer.json").unlink()
    (bundle / "manifest.json").write_text(json.dumps(data))


def test_format_1_clip_bundle_is_refused_with_the_upgrade_command(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "tiny-clip" / "1"
    shutil.copytree(tiny_repo / "tiny-clip" / "1", bundle)
    as_format_1(bundle)
    with pytest.raises(BundleError, match=r"before bundles carried their tokenizer .*tandem bundle upgrade"):
        load_bundle(bundle)


def test_format_1_image_bundle_still_loads(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "tiny-image" / "1"
    shutil.copytree(tiny_repo / "tiny-image" / "1", bundle)
    as_format_1(bundle)
    assert load_bundle(bundle).manifest.kind == "image"


def test_upgrade_restores_a_format_1_bundle_with_the_same_token_ids(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bundle.tokenizer import ClipTokenizer
    from cli import main

    bundle = tmp_path / "tiny-clip" / "1"
    shutil.copytree(tiny_repo / "tiny-clip" / "1", bundle)
    as_format_1(bundle)
    assert main(["bundle", "upgrade", str(bundle)]) == 0
    upgraded = load_bundle(bundle)
    assert upgraded.manifest.format == "tandem-bundle/2"
    texts = ["a photo of a cat", "Ünïcödé 🙂 and <b>tags</b>", "word " * 40]
    original = tiny_repo / "tiny-clip" / "1" / "tokenizer.json"
    want = ClipTokenizer(original, 16).encode_batch(texts)
    got = ClipTokenizer(upgraded.tokenizer_path, 16).encode_batch(texts)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
