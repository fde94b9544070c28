"""Zero-shot classification: compare an image with label prompts, as CLIP does.

Each label becomes one prompt per template ("a photo of a {}."); the label's
embedding is the normalised mean of its prompts' normalised embeddings (the
prompt ensemble of Radford et al., 2021). Probabilities are the softmax over
labels of logit_scale * cosine, with the logit scale the model learned.
"""

from __future__ import annotations

import numpy as np

# A small ensemble in the style of CLIP's ImageNet prompts.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


def prompts(labels: list[str], templates: list[str]) -> list[str]:
    """Label-major: prompts[l * len(templates) + t]."""
    return [t.replace("{}", label) for label in labels for t in templates]


def label_embeddings(text_out: np.ndarray, n_labels: int, n_templates: int) -> np.ndarray:
    """[n_labels * n_templates, dim] raw prompt embeddings -> [n_labels, dim] unit vectors."""
    e = text_out.reshape(n_labels, n_templates, -1)
    e = e / np.maximum(np.linalg.norm(e, axis=2, keepdims=True), 1e-12)
    mean = e.mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def classify(images: np.ndarray, labels: np.ndarray, logit_scale: float, top_k: int
             ) -> list[list[tuple[int, float, float]]]:
    """Per image, the top_k (label index, probability, cosine), best first.

    images: float32 [n, dim] unit vectors; labels: float32 [L, dim] unit vectors.
    """
    cos = images @ labels.T
    logits = (logit_scale or 100.0) * cos
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [[(int(j), float(probs[i, j]), float(cos[i, j])) for j in order[i]] for i in range(len(images))]
