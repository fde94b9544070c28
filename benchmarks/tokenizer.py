"""Tokenizer cost: the bundle's tokenizer (open_clip's regex + Hugging Face tokenizers' BPE) vs open_clip's.

Same process, same texts, same ids (checked). Reports:
  one long word   seconds for a single word of N letters: open_clip's BPE loop is
                  quadratic in the word's length, ours about linear
  captions        texts/s on distinct short captions, a fresh open_clip tokenizer
                  (its unbounded cache starts empty, as in a server seeing new text)
  cache           words open_clip's cache holds afterwards (ours: at most 10,000)

    .venv-dev/bin/python benchmarks/tokenizer.py
"""

from __future__ import annotations

import argparse
import random
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402

from bundle.tokenizer import CACHE_WORDS, ClipTokenizer  # noqa: E402
from training.models import clip_bpe  # noqa: E402


def seconds(fn, *args) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=5000)
    args = p.parse_args()
    rng = random.Random(0)
    ours = ClipTokenizer(clip_bpe(), 77)
    print("| one word of N letters | open_clip s | ours s | speed-up |\n|---:|---:|---:|---:|")
    for n in (1024, 2048, 4096, 8192):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
        ref = SimpleTokenizer(context_length=77)
        assert (ref([word]).numpy() == ours.encode_batch([word])[0]).all()
        a, b = seconds(SimpleTokenizer(context_length=77), [word]), seconds(ours.encode_batch, [word])
        print(f"| {n:,} | {a:.3f} | {b:.4f} | {a / b:,.0f}x |")
    vocab = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(20000)]
    captions = [" ".join(rng.choice(vocab) for _ in range(rng.randint(4, 14))) for _ in range(args.captions)]
    ref = SimpleTokenizer(context_length=77)
    assert (ref(captions[:200]).numpy() == ours.encode_batch(captions[:200])[0]).all()
    ref = SimpleTokenizer(context_length=77)
    a, b = seconds(ref, captions), seconds(ours.encode_batch, captions)
    print(f"\n{len(captions):,} distinct captions: open_clip {len(captions) / a:,.0f} texts/s, ours "
          f"{len(captions) / b:,.0f} texts/s ({a / b:.1f}x)")
    print(f"open_clip's cache now holds {len(ref.cache):,} words and keeps growing; ours is capped at "
          f"{CACHE_WORDS:,}")


if __name__ == "__main__":
    main()
