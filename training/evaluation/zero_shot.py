"""Zero-shot top-1 accuracy of a CLIP model in PyTorch (training-time evaluation).

Mirrors the server's zero-shot path (bundle/zero_shot.py): prompt ensemble,
normalised mean of prompt embeddings, argmax of cosine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from bundle.tokenizer import ClipTokenizer
from bundle.zero_shot import DEFAULT_TEMPLATES, prompts


@torch.no_grad()
def label_embeddings(model: torch.nn.Module, tokenizer: ClipTokenizer, labels: Sequence[str],
                     templates: Sequence[str] = DEFAULT_TEMPLATES, device: str = "cpu") -> torch.Tensor:
    """[len(labels), dim] unit vectors."""
    ids = torch.from_numpy(tokenizer.encode_batch(prompts(list(labels), list(templates)))[0]).to(device)
    emb = F.normalize(model.encode_text(ids).float(), dim=-1).view(len(labels), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, label_emb: torch.Tensor, batch_size: int = 512,
            device: str = "cpu") -> torch.Tensor:
    """Index of the best label for each image ([n] int64)."""
    preds = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        preds.append((F.normalize(model.encode_image(x).float(), dim=-1) @ label_emb.T).argmax(1).cpu())
    return torch.cat(preds)
