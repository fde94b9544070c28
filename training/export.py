"""Export an open_clip model to a Tandem bundle (manifest + image.onnx + text.onnx).

The towers are exported separately with a dynamic batch axis through
torch.onnx (attention becomes plain MatMul/Softmax ops). Before anything is
written to the destination, ONNX Runtime runs a fixed probe batch through each
file and its outputs are compared with PyTorch's; a bundle whose minimum
cosine falls under the threshold is refused.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from bundle.files import fsync_path
from bundle.manifest import FORMAT, ImageSpec, Manifest, TextSpec, load_bundle, sha256_of
from bundle.parity import PARITY_THRESHOLD, PROBE_TEXTS, min_cosine

from .models import build_model, clip_bpe, clip_tokenizer, preprocess_config, read_checkpoint

log = logging.getLogger("tandem.export")

OPSET = 18
TOKENIZER_FILE = "tokenizer.json"
# Ops a fused attention kernel would show up as; the export must not contain them.
FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "ScaledDotProductAttention"}


class ParityError(RuntimeError):
    """The exported graph does not reproduce PyTorch closely enough."""


class _Encode(torch.nn.Module):
    """Exportable view of one tower: casts inputs to the tower's dtype and outputs to float32."""

    def __init__(self, model: torch.nn.Module, method: str, dtype: torch.dtype | None):
        super().__init__()
        self.model, self.method, self.dtype = model, method, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None:
            x = x.to(self.dtype)
        fn = self.model if self.method == "__call__" else getattr(self.model, self.method)
        return fn(x).float()


@dataclass
class Towers:
    """What a bundle is made of, before export: modules to export and fp32 references to check them."""

    image: torch.nn.Module
    image_reference: torch.nn.Module
    preprocessing: dict[str, Any]  # size, mean, std, resize_mode, interpolation
    architecture: str
    config: dict[str, Any]
    text: torch.nn.Module | None = None
    text_reference: torch.nn.Module | None = None
    context_length: int = 0
    logit_scale: float = 0.0


def clip_towers(arch: str | None, checkpoint: Path | None, precision: str, image_only: bool,
                state: dict[str, Any] | None = None) -> Towers:
    model, arch_name, cfg = build_model(arch, checkpoint, state)
    pp = preprocess_config(model)
    text_cfg = cfg.get("text_cfg", {})
    has_text = not image_only and hasattr(model, "encode_text")
    if has_text and text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"{arch_name} uses a Hugging Face tokenizer; only open_clip's CLIP BPE is supported")
    if pp.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise ValueError(f"resize_mode {pp['resize_mode']!r} is not supported by the server")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    exported = model if precision == "fp32" else copy.deepcopy(model).to(dtype).eval()
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    return Towers(
        image=_Encode(exported, "encode_image", dtype), image_reference=_Encode(model, "encode_image", None),
        preprocessing={**pp, "size": int(size)}, architecture=arch_name, config=cfg,
        text=_Encode(exported, "encode_text", None) if has_text else None,
        text_reference=_Encode(model, "encode_text", None) if has_text else None,
        context_length=int(text_cfg.get("context_length", 77)),
        logit_scale=float(model.logit_scale.exp().item()) if has_text and hasattr(model, "logit_scale") else 0.0,
    )


def ssl_towers(state: dict[str, Any], precision: str, with_projector: bool) -> Towers:
    """The encoder of a self-supervised checkpoint (backbone, optionally + projector)."""
    from training.methods import load_ssl_method

    method = load_ssl_method(state)
    config = method.config
    encoder = method.encoder(with_projector).eval()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    exported = encoder if precision == "fp32" else copy.deepcopy(encoder).to(dtype).eval()
    arch = f"{method.name}/{config.backbone}" + ("+projector" if with_projector else "")
    return Towers(image=_Encode(exported, "__call__", dtype), image_reference=_Encode(encoder, "__call__", None),
                  preprocessing=method.preprocessing(), architecture=arch, config=state["ssl_config"])


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest


def _onnx_export(module: torch.nn.Module, example: torch.Tensor, input_name: str, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=["embeddings"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    graph = onnx.load(str(path))
    fused = {n.op_type for n in graph.graph.node} & FUSED_ATTENTION_OPS
    if fused:
        raise RuntimeError(f"{path.name}: export produced fused attention ops {sorted(fused)}; expected plain ops")


def ort_session(path: Path, precision: str) -> ort.InferenceSession:
    """A CPU session for parity checks (fp16 graphs avoid ORT's layout pass, which crashes on them)."""
    options = ort.SessionOptions()
    if precision == "fp16":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probe_images(size: int, n: int = 8) -> torch.Tensor:
    """Fixed probe batch: normalised-range noise plus smooth gradients, seed 0."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n // 2, 3, size, size, generator=g)
    ramp = torch.linspace(-2, 2, size)
    smooth = (ramp[None, None, :, None] * ramp[None, None, None, :]).expand(n - n // 2, 3, size, size).clone()
    smooth *= torch.rand(n - n // 2, 3, 1, 1, generator=g) * 2 - 1
    return torch.cat([noise, smooth])


def is_ssl_checkpoint(state: dict[str, Any]) -> bool:
    return "ssl_config" in state


def export_bundle(
    arch: str | None,
    out_dir: Path,
    name: str,
    version: str = "1",
    checkpoint: Path | None = None,
    precision: str = "fp32",
    image_only: bool = False,
    force: bool = False,
    source_note: str | None = None,
    with_projector: bool = False,
) -> ExportResult:
    """Build, export, check parity, then move the bundle into out_dir/name/version.

    A CLIP model (open_clip architecture, random init or a checkpoint) gives a
    `clip` bundle (or `image` with image_only); a self-supervised checkpoint
    from `tandem train <method>` gives an `image` bundle of its backbone
    (plus projector with with_projector).
    """
    if precision not in PARITY_THRESHOLD:
        raise ValueError(f"precision must be one of {sorted(PARITY_THRESHOLD)}")
    check_component("--name", name)
    check_component("--version", version)
    dest = Path(out_dir) / name / version
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} exists; pick another --version or pass --force")
    state = read_checkpoint(checkpoint) if checkpoint else None
    if state is not None and is_ssl_checkpoint(state):
        towers = ssl_towers(state, precision, with_projector)
    elif with_projector:
        raise ValueError("--with-projector applies to self-supervised checkpoints only")
    else:
        towers = clip_towers(arch, checkpoint, precision, image_only, state)
    threshold = PARITY_THRESHOLD[precision]
    size = towers.preprocessing["size"]

    with tempfile.TemporaryDirectory(prefix="tandem-export-") as tmp:
        work = Path(tmp)
        images = probe_images(size)
        log.info("exporting image tower of %s (%s)", towers.architecture, precision)
        _onnx_export(towers.image, images[:2], "pixel_values", work / "image.onnx")
        with torch.no_grad():
            ref_img = towers.image_reference(images).numpy()
        got_img = ort_session(work / "image.onnx", precision).run(None, {"pixel_values": images.numpy()})[0]
        parity: dict[str, Any] = {
            "threshold": threshold,
            "probe": f"{len(images)} images seed 0" + (f"; {len(PROBE_TEXTS)} texts" if towers.text else ""),
            "image_min_cosine": min_cosine(got_img, ref_img),
            "image_max_abs_diff": float(np.abs(got_img - ref_img).max()),
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
        }
        text_spec = None
        if towers.text is not None and towers.text_reference is not None:
            log.info("exporting text tower of %s (%s)", towers.architecture, precision)
            clip_bpe().save(str(work / TOKENIZER_FILE))
            tokens = clip_tokenizer(towers.context_length).encode_batch(PROBE_TEXTS)[0]
            _onnx_export(towers.text, torch.from_numpy(tokens[:2]), "input_ids", work / "text.onnx")
            with torch.no_grad():
                ref_txt = towers.text_reference(torch.from_numpy(tokens)).numpy()
            got_txt = ort_session(work / "text.onnx", precision).run(None, {"input_ids": tokens})[0]
            parity["text_min_cosine"] = min_cosine(got_txt, ref_txt)
            parity["text_max_abs_diff"] = float(np.abs(got_txt - ref_txt).max())
            text_spec = TextSpec(file="text.onnx", sha256=sha256_of(work / "text.onnx"),
                                 context_length=towers.context_length, tokenizer_file=TOKENIZER_FILE,
                                 tokenizer_sha256=sha256_of(work / TOKENIZER_FILE))
        cosines = [v for k, v in parity.items() if k.endswith("min_cosine")]
        worst = float("nan") if any(np.isnan(c) for c in cosines) else min(cosines)
        parity["min_cosine"] = worst
        if not worst >= threshold:  # NaN (overflow, e.g. in fp16) fails too
            raise ParityError(
                f"parity check failed: ONNX Runtime vs PyTorch min cosine {worst:.6f} < {threshold} "
                f"({precision}); no bundle written. Details: {parity}"
            )
        pp = towers.preprocessing
        manifest = Manifest(
            name=name,
            version=version,
            kind="clip" if text_spec else "image",
            architecture=towers.architecture,
            dim=int(got_img.shape[1]),
            image=ImageSpec(
                file="image.onnx",
                sha256=sha256_of(work / "image.onnx"),
                size=int(size),
                mean=tuple(float(v) for v in pp["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in pp["std"]),  # type: ignore[arg-type]
                resize_mode=pp.get("resize_mode", "shortest"),
                interpolation=pp.get("interpolation", "bicubic"),
            ),
            text=text_spec,
            logit_scale=towers.logit_scale,
            precision=precision,
            opset=OPSET,
            source={
                "checkpoint": str(checkpoint) if checkpoint else None,
                "checkpoint_sha256": sha256_of(Path(checkpoint)) if checkpoint else None,
                "weights": "checkpoint" if checkpoint else "random-init",
                "note": source_note,
                "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "model_config": towers.config,
            },
            parity=parity,
            format=FORMAT,
        )
        (work / "manifest.json").write_text(manifest.to_json())
        install_bundle(work, dest)
    load_bundle(dest)  # what we wrote must load
    log.info("wrote %s (parity min cosine %.6f)", dest, worst)
    return ExportResult(dest, manifest)


# A name or version is one folder name: no separators, no "." or "..", nothing hidden.
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_component(what: str, value: str) -> None:
    if not _COMPONENT.fullmatch(value) or ".." in value:
        raise ValueError(f"{what} {value!r} must be one folder name: letters, digits, '.', '_' and '-', starting "
                         "with a letter or digit, at most 128 characters, no '..'")


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fsync_path(path)


def install_bundle(work: Path, dest: Path) -> None:
    """Put the finished bundle folder `work` at `dest`, replacing what is there, by renames.

    The bundle is first copied beside its destination (NAME/.staging-*/VERSION: same filesystem, and too
    deep for the server's NAME/VERSION/manifest.json discovery to pick up half a bundle) and fsynced. Then
    an existing version is renamed aside and the new one renamed into place: a reader sees the old complete
    bundle or the new complete one, never a mix (for the moment between the two renames, none). If the
    second rename fails, the old bundle is put back.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
    try:
        new = staging / dest.name
        shutil.copytree(work, new)
        new.chmod(0o755)  # the temporary folder was private
        _fsync_tree(new)
        old = staging / "replaced"
        if dest.exists():
            os.rename(dest, old)
        try:
            os.rename(new, dest)
        except OSError:
            if old.exists():
                os.rename(old, dest)
            raise
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def upgrade_bundle(path: Path) -> Manifest:
    """Bring a tandem-bundle/1 folder to the current format in place: add tokenizer.json to a CLIP bundle.

    The vocabulary is open_clip's (the one every tandem-bundle/1 CLIP bundle
    was exported with), so the ids do not change. Image-only bundles only
    get the new format string. Returns the new manifest, checked by load_bundle.
    """
    import json

    path = Path(path)
    data = json.loads((path / "manifest.json").read_text())
    if data.get("format") == FORMAT:
        return load_bundle(path).manifest
    if data.get("format") != "tandem-bundle/1":
        raise ValueError(f"{path}: format {data.get('format')!r} is not one this version can upgrade")
    if data.get("text"):
        clip_bpe().save(str(path / TOKENIZER_FILE))
        data["text"].update(tokenizer_file=TOKENIZER_FILE, tokenizer_sha256=sha256_of(path / TOKENIZER_FILE))
    data["format"] = FORMAT
    tmp = path / "manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path / "manifest.json")
    return load_bundle(path).manifest
