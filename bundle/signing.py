"""Ed25519 signatures of bundle manifests, so a server can require bundles signed by a known pipeline.

The signature covers the exact bytes of ``manifest.json``; the manifest pins the sha256 of every other
file in the bundle (ONNX files, their external data, the tokenizer), so one signature covers the bundle.
It is stored next to the manifest as ``manifest.sig``: the 64-byte signature in base64, one line.

Keys are PEM files, as ``openssl genpkey -algorithm ed25519`` writes them (or `generate_key_pair`).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from .manifest import SIGNATURE_FILE, BundleError


def generate_key_pair() -> tuple[bytes, bytes]:
    """(private key, public key), both PEM; keep the private one with the training pipeline."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _load_pem(path: Path, private: bool) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    what = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read the {what} key {path}: {e.strerror}") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path} is not a PEM {what} key without a password ({e}); make a key pair with "
                          "`openssl genpkey -algorithm ed25519 -out key.pem` and "
                          "`openssl pkey -in key.pem -pubout -out key.pub.pem`") from None
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise BundleError(f"{path} is a {type(key).__name__}, not an ed25519 {what} key")
    return key


def load_public_key(path: Path) -> Any:
    """An Ed25519PublicKey from a PEM file; BundleError saying what is wrong with the file."""
    return _load_pem(path, private=False)


def sign_bundle(bundle: Path, private_key: Path) -> Path:
    """Write ``manifest.sig`` for the bundle folder with the PEM private key; returns its path."""
    key = _load_pem(private_key, private=True)
    manifest = Path(bundle) / "manifest.json"
    if not manifest.is_file():
        raise BundleError(f"{bundle}: no manifest.json to sign")
    out = Path(bundle) / SIGNATURE_FILE
    tmp = out.with_suffix(".tmp")
    tmp.write_text(base64.b64encode(key.sign(manifest.read_bytes())).decode() + "\n")
    tmp.replace(out)
    return out


def verify_manifest(bundle: Path, manifest_bytes: bytes, public_key: Any) -> None:
    """Raise BundleError unless ``manifest.sig`` in the folder signs these manifest bytes with the key."""
    from cryptography.exceptions import InvalidSignature

    sig_path = Path(bundle) / SIGNATURE_FILE
    if not sig_path.is_file():
        raise BundleError(f"{bundle}: not signed (no {SIGNATURE_FILE}) and this server only loads bundles signed "
                          "with its bundle_public_key; sign it with `tandem bundle sign PATH --key PRIVATE.pem`")
    try:
        signature = base64.b64decode(sig_path.read_text().strip(), validate=True)
        public_key.verify(signature, manifest_bytes)
    except (binascii.Error, InvalidSignature, ValueError):
        raise BundleError(f"{sig_path}: the signature does not match manifest.json for this server's "
                          "bundle_public_key (manifest changed after signing, or signed with another key)") from None
