"""Zero-shot classification: compare an image with label prompts, as CLIP does.

Each label becomes one prompt per template ("a photo of a {}."); the label's
embedding is the normalised mean of its prompts' normalised embeddings (the
prompt ensemble of Radford et al., 2021). Probabilities are the softmax over
labels of logit_scale * cosine, with the logit scale the model learned.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

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


LabelKey = tuple[tuple[str, ...], tuple[str, ...]]


def entry_bytes(key: LabelKey, value: np.ndarray) -> int:
    """Memory one cache entry holds: its label and template strings (Python's size of each) and embeddings."""
    return sum(sys.getsizeof(s) for part in key for s in part) + value.nbytes + 200  # + the tuples and the slot


class LabelCache:
    """LRU of label embeddings keyed by (labels, templates), bounded in bytes (:func:`entry_bytes`), and in
    entries. Its keys hold whole label and template lists, so a count of entries alone bounds nothing: 256
    entries of 1,000 labels x 4,096 characters would be a gigabyte. An entry larger than max_bytes is not kept."""

    def __init__(self, max_bytes: int, max_entries: int | None = None):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.bytes = 0
        self._items: OrderedDict[LabelKey, tuple[np.ndarray, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: LabelKey) -> np.ndarray | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: LabelKey, value: np.ndarray) -> None:
        size = entry_bytes(key, value)
        if (old := self._items.pop(key, None)) is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes or (self.max_entries is not None and len(self._items) > self.max_entries):
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped
