"""End to end against open_clip: a real ViT-B-32 (random init, seed 0) exported with `tandem export`
and served over gRPC gives the embeddings open_clip's own preprocess + model give in PyTorch.

Images: real photos as JPEG, PNG, WebP, grayscale, RGBA, 17.6 megapixels and 1 pixel (tests/photos.py).
Texts: every script, emoji, whitespace and HTML-entity case of the tokenizer corpus, at and past the
context length: token ids identical, embeddings at cosine >= 0.9999 (the export parity gate).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from bundle import load_bundle
from bundle.tokenizer import ClipTokenizer
from cli import main as tandem
from server.client import TandemClient
from tests.bundle.test_tokenizer import CORPUS
from tests.conftest import RunningServer, start_server
from tests.photos import photo_cases

pytestmark = pytest.mark.slow
PHOTOS = photo_cases()


@pytest.fixture(scope="module")
def vit_b_32(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[torch.nn.Module, object, Path, RunningServer]]:
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    work = tmp_path_factory.mktemp("vit-b-32")
    torch.save(model.state_dict(), work / "random-init.pt")  # an open_clip state dict, as users bring
    assert tandem(["export", "--model", "ViT-B-32", "--checkpoint", str(work / "random-init.pt"),
                   "--name", "vit-b-32", "--out", str(work / "models")]) == 0
    server = start_server(work / "models")
    yield model, preprocess, work / "models" / "vit-b-32" / "1", server
    server.stop()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_served_image_embeddings_match_open_clip(vit_b_32) -> None:  # type: ignore[no-untyped-def]
    model, preprocess, _, server = vit_b_32
    names = sorted(PHOTOS)
    with TandemClient(server.target, timeout_s=120) as c:
        served = c.embed_image([PHOTOS[n] for n in names], normalize=False).embeddings
    with torch.no_grad():
        want = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(PHOTOS[n]))) for n in names]))
    cos = cosines(served, want.numpy())
    assert cos.min() >= 0.9999, dict(zip(names, cos.round(6)))


def test_served_text_has_open_clips_token_ids_and_embeddings(vit_b_32) -> None:  # type: ignore[no-untyped-def]
    model, _, bundle_path, server = vit_b_32
    texts = [t for t in CORPUS if t.strip()]  # the server refuses blank texts (INVALID_ARGUMENT)
    bundle = load_bundle(bundle_path)
    ids, _ = ClipTokenizer(bundle.tokenizer_path, bundle.manifest.text.context_length).encode_batch(texts)
    want_ids = open_clip.get_tokenizer("ViT-B-32")(texts)
    assert ids.tolist() == want_ids.tolist()
    with TandemClient(server.target, timeout_s=120) as c:
        served = c.embed_text(texts, normalize=False).embeddings
    with torch.no_grad():
        want = model.encode_text(want_ids).numpy()
    assert cosines(served, want).min() >= 0.9999
