"""The model bundle: the contract between training (which writes bundles) and serving (which reads them).

    manifest   the manifest schema; load, validate and discover bundle folders
    tokenizer  CLIP's BPE from the bundle's tokenizer.json, same ids as open_clip
    image      decode and preprocess images exactly as the model was trained
    files      crash-safe writes (fsync, atomic replace) for snapshots, checkpoints and bundles
    captions   the caption index format (CSV or JSONL) of training data and `tandem index ingest`
    zero_shot  prompt templates, the label-embedding math of zero-shot classification, the label cache
    signing    ed25519 signatures of manifests (docs/models.md)
    external_data  the external-data files an ONNX model reads, for the manifest's hashes

A leaf package: numpy, Pillow, tokenizers, ftfy, regex, protobuf and cryptography only (no torch,
no grpc, no prometheus), so the serving install stays small and training and serving
share one definition of every step between raw input and model input.
"""

from .manifest import (
    FORMAT,
    Bundle,
    BundleError,
    ImageSpec,
    Manifest,
    TextSpec,
    discover,
    load_bundle,
    sha256_of,
    version_key,
)

__all__ = ["FORMAT", "Bundle", "BundleError", "ImageSpec", "Manifest", "TextSpec", "discover", "load_bundle",
           "sha256_of", "version_key"]
