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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "tandem-bundle/2"
READABLE_FORMATS = ("tandem-bundle/1", FORMAT)
KINDS = ("clip", "image")
RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


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


def load_bundle(path: Path, verify_hashes: bool = True) -> Bundle:
    """Read and check one bundle folder; raise BundleError saying what is wrong."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no manifest.json")
    try:
        manifest = Manifest.from_dict(json.loads(manifest_path.read_text()))
    except json.JSONDecodeError as e:
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
    for name, digest in files:
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path}: manifest names {name}, which is missing")
        if verify_hashes and sha256_of(file) != digest:
            raise BundleError(f"{file}: sha256 does not match the manifest (file changed after export?)")
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
