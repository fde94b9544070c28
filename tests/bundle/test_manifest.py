"""Bundle discovery and loading refuse what the server could not serve correctly."""

from __future__ import annotations

import json
import shutil

import pytest

from bundle import BundleError, discover, load_bundle, sha256_of, version_key


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


# -- integrity: paths, external data, signatures ---------------------------------------------------


def _copy(tiny_repo, tmp_path, name: str = "tiny-image"):  # type: ignore[no-untyped-def]
    bundle = tmp_path / name / "1"
    shutil.copytree(tiny_repo / name / "1", bundle)
    return bundle


def _edit(bundle, **image) -> None:  # type: ignore[no-untyped-def]
    data = json.loads((bundle / "manifest.json").read_text())
    data["image"].update(image)
    (bundle / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["../tiny-clip/1/image.onnx", "/etc/hostname", "sub/../../x.onnx"])
def test_manifest_paths_outside_the_bundle_are_refused(tiny_repo, tmp_path, name) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(tiny_repo, tmp_path)
    _edit(bundle, file=name)
    with pytest.raises(BundleError, match="relative to the bundle folder, without '..'"):
        load_bundle(bundle, verify_hashes=False)


def test_a_link_out_of_the_bundle_is_refused(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bundle = _copy(tiny_repo, tmp_path)
    outside = tmp_path / "elsewhere.onnx"
    (bundle / "image.onnx").rename(outside)
    (bundle / "image.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="is a link to .*outside the bundle folder"):
        load_bundle(bundle)


def _with_external_data(tiny_repo, tmp_path, listed: bool = True):  # type: ignore[no-untyped-def]
    """tiny-image with its weights moved to image.onnx.data, as ONNX does for models over 2 GB."""
    import onnx

    bundle = _copy(tiny_repo, tmp_path)
    model = onnx.load(str(bundle / "image.onnx"))
    onnx.save_model(model, str(bundle / "image.onnx"), save_as_external_data=True, location="image.onnx.data",
                    size_threshold=0)
    _edit(bundle, sha256=sha256_of(bundle / "image.onnx"),
          external_data={"image.onnx.data": sha256_of(bundle / "image.onnx.data")} if listed else {})
    return bundle


def test_external_data_is_hashed_too(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bundle = _with_external_data(tiny_repo, tmp_path)
    assert load_bundle(bundle).manifest.image.external_data  # loads as is
    with open(bundle / "image.onnx.data", "r+b") as f:  # one weight changed
        f.seek(100)
        f.write(b"\x7f")
    with pytest.raises(BundleError, match="image.onnx.data: sha256 does not match the manifest"):
        load_bundle(bundle)


def test_external_data_the_manifest_does_not_list_is_refused(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bundle = _with_external_data(tiny_repo, tmp_path, listed=False)
    with pytest.raises(BundleError, match="reads weights from image.onnx.data, which the manifest does not list"):
        load_bundle(bundle)


def test_external_data_outside_the_bundle_is_refused(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bundle = _with_external_data(tiny_repo, tmp_path)
    _edit(bundle, external_data={"../image.onnx.data": "0" * 64})
    with pytest.raises(BundleError, match="without '..'"):
        load_bundle(bundle)


def _keys(tmp_path, name: str = "key"):  # type: ignore[no-untyped-def]
    from bundle.signing import generate_key_pair

    private, public = generate_key_pair()
    (tmp_path / f"{name}.pem").write_bytes(private)
    (tmp_path / f"{name}.pub.pem").write_bytes(public)
    return tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"


def test_a_signed_bundle_loads_and_any_change_to_its_manifest_is_refused(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bundle.signing import load_public_key, sign_bundle

    private, public = _keys(tmp_path)
    key = load_public_key(public)
    bundle = _copy(tiny_repo, tmp_path)
    with pytest.raises(BundleError, match=r"not signed \(no manifest.sig\).*tandem bundle sign"):
        load_bundle(bundle, public_key=key)
    sign_bundle(bundle, private)
    assert load_bundle(bundle, public_key=key).manifest.name == "tiny-image"
    _edit(bundle, size=64)
    with pytest.raises(BundleError, match="signature does not match manifest.json"):
        load_bundle(bundle, public_key=key)


def test_a_signature_by_another_key_is_refused(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bundle.signing import load_public_key, sign_bundle

    _, public = _keys(tmp_path, "operator")
    other_private, _ = _keys(tmp_path, "other")
    bundle = _copy(tiny_repo, tmp_path)
    sign_bundle(bundle, other_private)
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(bundle, public_key=load_public_key(public))


def test_a_signed_manifest_still_pins_the_onnx_files(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """verify_hashes=False cannot switch off what the signature covers."""
    from bundle.signing import load_public_key, sign_bundle

    private, public = _keys(tmp_path)
    bundle = _copy(tiny_repo, tmp_path)
    sign_bundle(bundle, private)
    with open(bundle / "image.onnx", "ab") as f:
        f.write(b" ")
    with pytest.raises(BundleError, match="image.onnx: sha256 does not match"):
        load_bundle(bundle, verify_hashes=False, public_key=load_public_key(public))


def test_a_key_file_that_is_not_an_ed25519_public_key_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bundle.signing import load_public_key

    private, _ = _keys(tmp_path)
    with pytest.raises(BundleError, match="not a PEM public key"):
        load_public_key(private)
    with pytest.raises(BundleError, match="cannot read the public key"):
        load_public_key(tmp_path / "missing.pem")


def test_tandem_bundle_sign_signs_with_the_key_given(tiny_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bundle.signing import load_public_key
    from cli import main

    private, public = _keys(tmp_path)
    bundle = _copy(tiny_repo, tmp_path)
    assert main(["bundle", "sign", str(bundle), "--key", str(private)]) == 0
    assert load_bundle(bundle, public_key=load_public_key(public)).manifest.name == "tiny-image"
