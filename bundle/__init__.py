"""The model bundle: the contract between training (which writes bundles) and serving (which reads them).

    manifest   the manifest schema; load, validate and discover bundle folders
    tokenizer  CLIP's BPE from the bundle's tokenizer.json, same ids as open_clip
    image      decode and preprocess images exactly as the model was trained
    zero_shot  prompt templates and the label-embedding math of zero-shot classification

A leaf package: numpy, Pillow, tokenizers, ftfy and regex only (no torch, no grpc,
no prometheus), so the serving install stays small and training and serving
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
