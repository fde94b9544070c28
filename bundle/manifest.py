"""Model bundles: the unit between training and serving.

A bundle is a folder ``<repository>/<name>/<version>/`` holding
``manifest.json``, ``image.onnx`` and, for CLIP models, ``text.onnx``. The
manifest tells the server everything it needs (preprocessing, tokenizer,
logit scale, file hashes, export parity) so nothing is guessed at load time.
Export writes it (training/export.py); the server reads it through this package.

Format history: ``tandem-bundle/2`` adds the tokenizer file (``tokenizer.json``,
hashed like the ONNX files) to CLIP bundles. A ``tandem-bundle/1`` bundle still
loads when it is image-only; with a text tower it is refused with the command
that upgrades it (``tandem bundle upgrade``), since the serving install has no
open_clip to take the vocabulary from.

Integrity: every file a manifest names (ONNX files, their external-data files, the tokenizer) must lie
inside the bundle folder and match its sha256; a tower's ``external_data`` lists ``{file: sha256}`` for
the files its ONNX model keeps weights in, and an ONNX model that reads an unlisted file is refused.
A server given a public key also requires ``manifest.sig`` (bundle/signing.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .external_data import external_data_files

FORMAT = "tandem-bundle/2"
READABLE_FORMATS = ("tandem-bundle/1", FORMAT)
KINDS = ("clip", "image")
RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
SIGNATURE_FILE = "manifest.sig"


class BundleError(ValueError):
    """A bundle folder that cannot be served, with the reason."""


@dataclass(frozen=True)
class ImageSpec:
    """The image tower's ONNX file and the preprocessing it was trained with."""

    file: str
    sha256: str
    size: int  # square input side, pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"  # shortest side -> size, then centre crop | squash
    interpolation: str = "bicubic"
    input: str = "pixel_values"  # float32 [batch, 3, size, size]
    output: str = "embeddings"  # float32 [batch, dim], not normalised
    external_data: dict[str, str] = field(default_factory=dict)  # {file: sha256} the ONNX model reads weights from


@dataclass(frozen=True)
class TextSpec:
    """The text tower's ONNX file and its tokenizer."""

    file: str
    sha256: str
    context_length: int
    tokenizer: str = "clip-bpe"  # open_clip's CLIP BPE, as the Hugging Face tokenizers file below
    input: str = "input_ids"  # int64 [batch, context_length]
    output: str = "embeddings"
    tokenizer_file: str = ""  # tokenizer.json in the bundle (empty only in tandem-bundle/1)
    tokenizer_sha256: str = ""
    external_data: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    kind: str
    architecture: str
    dim: int
    image: ImageSpec
    text: TextSpec | None = None
    logit_scale: float = 0.0
    precision: str = "fp32"
    opset: int = 18
    source: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Manifest:
        data = dict(data)
        if data.get("format") not in READABLE_FORMATS:
            raise BundleError(f"format is {data.get('format')!r}; this version of Tandem reads {READABLE_FORMATS}")
        try:
            image = data.pop("image")
            image["mean"], image["std"] = tuple(image["mean"]), tuple(image["std"])
            text = data.pop("text", None)
            return Manifest(image=ImageSpec(**image), text=TextSpec(**text) if text else None, **data)
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest.json is malformed: {e}") from e

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise BundleError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "clip" and self.text is None:
            raise BundleError("kind 'clip' needs a text tower")
        if self.image.resize_mode not in RESIZE_MODES:
            raise BundleError(f"image.resize_mode must be one of {RESIZE_MODES}")
        if self.image.interpolation not in INTERPOLATIONS:
            raise BundleError(f"image.interpolation must be one of {INTERPOLATIONS}")
        if self.precision not in ("fp32", "fp16"):
            raise BundleError(f"precision must be fp32 or fp16, got {self.precision!r}")
        for tower, spec in (("image", self.image), ("text", self.text)):
            external = getattr(spec, "external_data", {})
            if not isinstance(external, dict) or not all(isinstance(v, str) for v in (*external, *external.values())):
                raise BundleError(f"{tower}.external_data must map file names to sha256 hex digests, "
                                  'e.g. {"image.onnx.data": "9f86d0..."}')
        if self.text is not None and self.text.tokenizer != "clip-bpe":
            raise BundleError(f"tokenizer {self.text.tokenizer!r} is not supported (only 'clip-bpe')")
        if self.text is not None and not self.text.tokenizer_file:
            raise BundleError(
                f"{self.name}/{self.version} was exported before bundles carried their tokenizer ({self.format}). "
                "Upgrade it in place with `tandem bundle upgrade PATH` (needs the training extra, "
                "`pip install -e '.[train]'`, for open_clip's vocabulary), or export it again with `tandem export`"
            )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def image_path(self) -> Path:
        return self.path / self.manifest.image.file

    @property
    def text_path(self) -> Path | None:
        return self.path / self.manifest.text.file if self.manifest.text else None

    @property
    def tokenizer_path(self) -> Path | None:
        return self.path / self.manifest.text.tokenizer_file if self.manifest.text else None


def inside(folder: Path, name: str) -> Path:
    """folder/name, or BundleError when a manifest path could reach outside the bundle folder."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise BundleError(f"{folder}: the manifest names the file {name!r}; files must be named relative to the "
                          "bundle folder, without '..'")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise BundleError(f"{folder}: {name} is a link to {path.resolve()}, outside the bundle folder")
    return path


def _onnx_files(manifest: Manifest) -> list[tuple[str, dict[str, str]]]:
    towers: list[ImageSpec | TextSpec] = [manifest.image] + ([manifest.text] if manifest.text else [])
    return [(t.file, t.external_data) for t in towers]


def load_bundle(path: Path, verify_hashes: bool = True, public_key: Any = None) -> Bundle:
    """Read and check one bundle folder; raise BundleError saying what is wrong.

    With verify_hashes, every file's sha256 is checked and each ONNX model may read external data only
    from files its tower lists. With a public key (bundle.signing.load_public_key), manifest.sig must sign
    manifest.json, and hashes are checked whatever verify_hashes says (the signature covers them).
    """
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no manifest.json")
    raw = manifest_path.read_bytes()
    if public_key is not None:
        from .signing import verify_manifest

        verify_manifest(path, raw, public_key)
        verify_hashes = True
    try:
        manifest = Manifest.from_dict(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_path}: not JSON ({e})") from e
    manifest.validate()
    if (path.parent.name, path.name) != (manifest.name, manifest.version):
        raise BundleError(
            f"{path}: folder is {path.parent.name}/{path.name} but the manifest says "
            f"{manifest.name}/{manifest.version}; they must match"
        )
    files = [(manifest.image.file, manifest.image.sha256)]
    if manifest.text:
        files.append((manifest.text.file, manifest.text.sha256))
        files.append((manifest.text.tokenizer_file, manifest.text.tokenizer_sha256))
    for _, external in _onnx_files(manifest):
        files.extend(external.items())
    for name, digest in files:
        file = inside(path, name)
        if not file.is_file():
            raise BundleError(f"{path}: manifest names {name}, which is missing")
        if verify_hashes and sha256_of(file) != digest:
            raise BundleError(f"{file}: sha256 does not match the manifest (file changed after export?)")
    if verify_hashes:
        for onnx_file, external in _onnx_files(manifest):
            listed = {str(Path(f)) for f in external}
            if unlisted := sorted(str(Path(f)) for f in external_data_files(path / onnx_file) if str(Path(f)) not in listed):
                raise BundleError(
                    f"{path / onnx_file} reads weights from {', '.join(unlisted)}, which the manifest does not list "
                    "with a sha256; list each under the tower's external_data as {\"FILE\": \"SHA256\"}"
                )
    return Bundle(path, manifest)


def version_key(version: str) -> tuple[int, int | str]:
    """Order versions: named ones ("beta") below numbered ones, numbers numerically."""
    return (1, int(version)) if version.isdigit() else (0, version)


def discover(repository: Path) -> list[Path]:
    """Every ``<name>/<version>/manifest.json`` folder under the repository."""
    repository = Path(repository)
    if not repository.is_dir():
        raise BundleError(f"model repository {repository} is not a folder")
    found = [m.parent for m in repository.glob("*/*/manifest.json")]
    return sorted(found, key=lambda p: (p.parent.name, version_key(p.name)))
