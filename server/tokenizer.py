"""Text to token ids with open_clip's CLIP BPE tokenizer (vocabulary ships in the wheel).

Same ids as ``open_clip.tokenizer.SimpleTokenizer(context_length)(texts)``,
but as numpy and with a per-text flag saying whether it was cut to fit.
"""

from __future__ import annotations

import numpy as np
from open_clip.tokenizer import SimpleTokenizer


class ClipTokenizer:
    def __init__(self, context_length: int):
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.sot, self.eot = self._bpe.sot_token_id, self._bpe.eot_token_id

    def count(self, text: str) -> int:
        """Tokens the text needs, start and end tokens included."""
        return len(self._bpe.encode(text)) + 2

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(int64 ids [n, context_length] zero-padded, bool truncated [n]).

        A text that does not fit keeps its first context_length - 1 tokens and
        ends with the end-of-text token, as open_clip does.
        """
        ids = np.zeros((len(texts), self.context_length), dtype=np.int64)
        truncated = np.zeros(len(texts), dtype=bool)
        for row, text in enumerate(texts):
            tokens = [self.sot, *self._bpe.encode(text), self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot
                truncated[row] = True
            ids[row, : len(tokens)] = tokens
        return ids, truncated
