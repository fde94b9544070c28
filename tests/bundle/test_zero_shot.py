"""The zero-shot label cache is bounded in bytes: its keys hold whole label and template lists."""

from __future__ import annotations

import numpy as np

from bundle.zero_shot import LabelCache, entry_bytes


def key(label: str, n: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(f"{label}{i}" + "x" * 1000 for i in range(n)), ("a photo of a {}.",)


def test_the_cache_keeps_the_most_recent_entries_within_its_bytes() -> None:
    value = np.zeros((10, 64), np.float32)
    size = entry_bytes(key("a", 10), value)
    assert size > 10 * 1000 + value.nbytes  # the label strings count, not only the embeddings
    cache = LabelCache(max_bytes=3 * size)
    for label in "abcd":
        cache.put(key(label, 10), value)
    assert len(cache) == 3 and cache.bytes <= 3 * size
    assert cache.get(key("a", 10)) is None and cache.get(key("b", 10)) is not None
    cache.put(key("e", 10), value)  # "b" was used last: "c" goes
    assert cache.get(key("c", 10)) is None and cache.get(key("b", 10)) is not None


def test_an_entry_larger_than_the_cache_is_not_kept() -> None:
    cache = LabelCache(max_bytes=5_000)
    cache.put(key("a", 10), np.zeros((10, 64), np.float32))
    assert len(cache) == 0 and cache.bytes == 0


def test_the_entry_count_bounds_it_too() -> None:
    cache = LabelCache(max_bytes=1 << 30, max_entries=2)
    for label in "abc":
        cache.put(key(label, 1), np.zeros((1, 4), np.float32))
    assert len(cache) == 2 and cache.get(key("a", 1)) is None
