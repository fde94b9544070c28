"""Text to token ids with CLIP's byte-level BPE, without torch or open_clip.

A CLIP bundle carries ``tokenizer.json``: open_clip's vocabulary and merges as
a Hugging Face ``tokenizers`` BPE (written by :func:`build_clip_bpe` at
export). The ids are open_clip's ``SimpleTokenizer`` ids, exactly, because
every step but the merges is open_clip's own code path:

1. Cleaning, in Python: ftfy, HTML unescape twice, whitespace runs to one
   space, lower case (open_clip's ``clean='lower'``).
2. Splitting into words with open_clip's regex, run by the same ``regex``
   module, so Unicode classes (letters, digits, new code points) agree with
   open_clip's, and ``<start_of_text>`` / ``<end_of_text>`` typed in a text
   become the special ids exactly where open_clip's regex matches them.
3. Byte-level BPE merges per word in ``tokenizers`` (Rust). Its merge loop
   is a priority queue, so a word costs about n log n where open_clip's
   Python loop is quadratic (an 8,192-letter word took it 2.7 s), and its
   word cache holds at most 10,000 words where open_clip's grows without limit.
4. ``[start] + ids + [end]``, cut to the context length with the last id
   replaced by the end token, as open_clip does.

The cost of a text is bounded before the merges: only the words that can reach
the context window go to the BPE (:meth:`ClipTokenizer.window`). The merges
never cross words and give every word at least one token, and at least one per
``longest_token`` characters, so the words past the window are dropped without
changing a single id, and one long word is cut ``CUT_MARGIN_TOKENS`` tokens
past the window (a cut changes at most the last few tokens before it: 5 in a
search over 3,000 hostile words): first at 4 characters a token, and again at
``longest_token`` characters a token when that made too few tokens. Cleaning and splitting stay linear in the
text; the server bounds the characters per request (max_request_text_chars).

tests/bundle/test_tokenizer.py compares the ids with open_clip's on a corpus
of scripts, emoji, whitespace, HTML entities and long texts, and on random
Unicode text (hypothesis).
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SOT, EOT = "<start_of_text>", "<end_of_text>"
# open_clip's SimpleTokenizer pattern, flags included.
WORDS = regex.compile(SOT + "|" + EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                      regex.IGNORECASE)
CACHE_WORDS = 10_000
CACHE_WORD_CHARS = 64  # longer words (rare, and a long cut word may be thousands of characters) are not kept
CUT_MARGIN_TOKENS = 16  # tokens kept past the window when a long word is cut (see the module docstring)
FIRST_GUESS = 4  # characters a token, for the first cut of a long word (see encode_batch)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_clip_bpe(vocab_gz: Path) -> Tokenizer:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz`` as a ``tokenizers`` BPE with CLIP's ids.

    The id layout is SimpleTokenizer's: 256 byte characters, the same with
    ``</w>``, one token per merge, then ``<start_of_text>`` and ``<end_of_text>``.
    """
    with gzip.open(vocab_gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>",
                     cache_capacity=CACHE_WORDS)
    tok = Tokenizer(bpe)
    # Words arrive split by WORDS (step 2); the file only maps their bytes and merges them.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    return tok


# ASCII text without these (control characters other than tab, line feed and carriage return, and "&", which
# starts an HTML entity) is left as it is by ftfy and by HTML unescaping: ftfy's fixes all need non-ASCII
# characters, control characters or entities. Such text skips them (14 us a text, a third of tokenising it).
NEEDS_FIXING_IF_ASCII = regex.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f&]")


def clean(text: str) -> str:
    """open_clip's ``_clean_lower``: ftfy, HTML unescape twice, collapse whitespace, lower case."""
    if not (text.isascii() and NEEDS_FIXING_IF_ASCII.search(text) is None):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """A bundle's tokenizer.json -> int64 ids [n, context_length], as open_clip makes them."""

    def __init__(self, tokenizer: Path | Tokenizer, context_length: int):
        """`tokenizer`: a bundle's tokenizer.json, or a Tokenizer from :func:`build_clip_bpe`."""
        self.context_length = context_length
        self._tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(str(tokenizer))
        # The words come from WORDS; whatever splitting the file declares would only re-split them.
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self.sot, self.eot = self._tok.token_to_id(SOT), self._tok.token_to_id(EOT)
        if self.sot is None or self.eot is None:
            raise ValueError(f"{tokenizer}: not a CLIP BPE tokenizer (no {SOT} / {EOT} tokens)")
        self._special = {SOT: self.sot, EOT: self.eot}
        self._word_ids: dict[str, list[int]] = {}  # word -> its BPE ids (see _encode_words)
        # Byte-level tokens spell one byte per character, so a token covers at most this many characters.
        self.longest_token = max(len(t.removesuffix("</w>")) for t in self._tok.get_vocab() if t not in self._special)

    def window(self, text: str, chars_per_token: int | None = None) -> tuple[list[str], bool]:
        """(the words of a cleaned text that make its first context_length - 1 tokens, whether the last was cut).

        Those tokens are all the model sees, plus one that says the text was truncated: later words are not
        split off, and a long last word is cut CUT_MARGIN_TOKENS tokens past the window, counting
        `chars_per_token` characters a token (default longest_token: always enough).
        """
        need, lower, words = self.context_length - 1, 0, []  # lower: tokens the kept words make, at least
        for match in WORDS.finditer(text):
            word = match.group()
            at_least = 1 if word in self._special else -(-len(word) // self.longest_token)
            if lower + at_least >= need:
                cut = word[: (need - lower + CUT_MARGIN_TOKENS) * (chars_per_token or self.longest_token)]
                words.append(cut)
                return words, len(cut) < len(word)
            words.append(word)
            lower += at_least
        return words, False

    def encode(self, text: str) -> list[int]:
        """Ids of one text without the start and end tokens (open_clip's ``SimpleTokenizer.encode``)."""
        return self._encode_words([WORDS.findall(clean(text))])[0]

    def _encode_words(self, texts: Sequence[list[str]]) -> list[list[int]]:
        """Word lists -> ids. BPE works word by word, so each word's ids are looked up in a dict of the words
        seen before (a call into the Rust tokenizer costs ~15 us however short the text); the words not in it
        go through the BPE in one batch. Special-token words map to their ids."""
        known = {w: self._word_ids.get(w) for words in texts for w in words}
        missing = [w for w, ids in known.items() if ids is None and w not in self._special]
        if missing:
            encoded = self._tok.encode_batch_fast([[w] for w in missing], is_pretokenized=True,
                                                  add_special_tokens=False)
            fresh = {w: e.ids for w, e in zip(missing, encoded)}
            known.update(fresh)
            keep = {w: ids for w, ids in fresh.items() if len(w) <= CACHE_WORD_CHARS}
            if len(self._word_ids) + len(keep) > CACHE_WORDS:
                self._word_ids = {}  # rebinding, not clear(): other threads keep reading the old dict safely
            self._word_ids.update(keep)
        special = self._special
        out = []
        for words in texts:
            ids: list[int] = []
            for w in words:
                if w in special:
                    ids.append(special[w])
                else:
                    ids += known[w]  # type: ignore[operator]
            out.append(ids)
        return out

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(int64 ids [n, context_length] zero-padded, bool truncated [n]).

        A text that does not fit keeps its first context_length - 1 tokens and
        ends with the end-of-text token, as open_clip does.
        """
        ids = np.zeros((len(texts), self.context_length), dtype=np.int64)
        truncated = np.zeros(len(texts), dtype=bool)
        cleaned = [clean(t) for t in texts]
        # A cut at FIRST_GUESS characters a token is usually far enough past the window; a text whose cut word
        # made too few tokens for that is cut again where it certainly is.
        windows = [self.window(c, FIRST_GUESS) for c in cleaned]
        bodies = self._encode_words([words for words, _ in windows])
        short = [row for row, ((_, cut), body) in enumerate(zip(windows, bodies))
                 if cut and len(body) < self.context_length - 1 + CUT_MARGIN_TOKENS]
        for row, body in zip(short, self._encode_words([self.window(cleaned[row])[0] for row in short])):
            bodies[row] = body
        for row, body in enumerate(bodies):
            tokens = [self.sot, *body, self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot
                truncated[row] = True
            ids[row, : len(tokens)] = tokens
        return ids, truncated
