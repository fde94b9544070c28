"""The bundle's tokenizer (tokenizer.json run by Hugging Face tokenizers) gives open_clip's ids, exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.tokenizer import SimpleTokenizer

from bundle.tokenizer import CUT_MARGIN_TOKENS, WORDS, ClipTokenizer, clean
from training.models import clip_bpe

CORPUS = [
    # ASCII
    "a photo of a dog.", "A PHOTO OF A DOG!", "It's we'll I'd THEY'RE you've I'm", "x", "123 456.789 1e10",
    "snake_case and kebab-case, path/to/file.png", "email@example.com https://example.com/?q=1&r=2",
    # accents and other Latin
    "Héllo Wörld, café naïve façade", "straße İstanbul ǅemal", "Ａｂｃ full-width ＡＢＣ",
    # CJK, other scripts, mixed
    "東京タワーの写真", "猫がソファの上にいる", "一只在沙发上的猫", "고양이 사진",
    "Русский текст and العربية and हिन्दी and ไทย", "ΣΊΣΥΦΟΣ σοφός", "mixed 中文 English 日本語 한국어",
    # emoji
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵", "🐶🐱🐭", "keycap 1️⃣ and ♥️",
    # whitespace variants
    "tabs\tand\nnewlines\r\n  and  spaces", "nbsp\u00a0em\u2003thin\u2009ideographic\u3000space",
    "  leading and trailing  ", "\x1c\x1d\x1e\x1f separators", "zero\u200bwidth \ufeffbom",
    # HTML entities (open_clip unescapes twice) and mojibake (ftfy fixes it)
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;s &#x1F600;", "&amp;amp;lt; twice", "â€œmojibakeâ€\x9d Ã©",
    # the special tokens typed in text: matched or not exactly where open_clip's regex matches them
    "<start_of_text>", "<end_of_text> at start", "a <end_of_text><start_of_text> b", "x.<start_of_text>",
    "word<end_of_text>word", "&lt;end_of_text&gt;", "<START_OF_TEXT>", "<start_of_text<end_of_text>>",
    # empty after cleaning, and long texts at and past the context length
    "", "   ", "word " * 75, "word " * 76, "word " * 200, "a" * 2000, "supercalifragilisticexpialidocious " * 20,
]


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=77)


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer(clip_bpe(), 77)


def open_clip_ids(ref: SimpleTokenizer, texts: list[str], context_length: int) -> np.ndarray:
    return ref(texts, context_length=context_length).numpy()


@pytest.mark.parametrize("context_length", [77, 16])
def test_corpus_ids_equal_open_clip(reference, context_length: int) -> None:  # type: ignore[no-untyped-def]
    ours = ClipTokenizer(clip_bpe(), context_length)
    ids, truncated = ours.encode_batch(CORPUS)
    want = open_clip_ids(reference, CORPUS, context_length)
    for i, text in enumerate(CORPUS):
        assert ids[i].tolist() == want[i].tolist(), f"CORPUS[{i}] {text[:40]!r}"
    assert truncated.tolist() == [len(reference.encode(t)) + 2 > context_length for t in CORPUS]


def test_a_text_past_the_context_length_keeps_its_head_and_ends_with_the_end_token(ours) -> None:  # type: ignore[no-untyped-def]
    ids, truncated = ours.encode_batch(["word " * 200])
    assert truncated[0] and ids[0, -1] == ours.eot and ids[0, 0] == ours.sot
    assert ids[0, 1:-1].tolist() == ours.encode("word " * 75)


# Text from every part of Unicode a caption might use, plus the characters cleaning and splitting care about.
PIECE = st.one_of(
    st.characters(codec="utf-8", exclude_categories=("Cs",)),
    st.sampled_from(list(" \t\n'&;#<>_.!?-0123456789aeiouAEIOU") + ["'s", "'LL", "&amp;", "&lt;", "<end_of_text>"]),
)
TEXT = st.lists(PIECE, max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4))
def test_random_unicode_ids_equal_open_clip(reference, ours, texts: list[str]) -> None:  # type: ignore[no-untyped-def]
    ids, _ = ours.encode_batch(texts)
    assert ids.tolist() == open_clip_ids(reference, texts, 77).tolist()


# Long words from small alphabets are where BPE merges interact most; emoji runs make the longest tokens.
LONG_WORD = st.builds(lambda unit, n: (unit * n)[: n * 3],
                      st.text(st.sampled_from("abcdeiostn的是🙂😂!?"), min_size=1, max_size=5),
                      st.integers(100, 900))


@settings(max_examples=60, deadline=None)
@given(words=st.lists(LONG_WORD, min_size=1, max_size=3), head=st.text(st.sampled_from("ab .,"), max_size=40))
def test_long_words_cut_before_the_merges_keep_open_clips_ids(reference, ours, words, head) -> None:  # type: ignore[no-untyped-def]
    text = head + " ".join(words)
    ids, truncated = ours.encode_batch([text])
    assert ids.tolist() == open_clip_ids(reference, [text], 77).tolist()
    assert truncated[0] == (len(reference.encode(text)) + 2 > 77)


def test_only_the_words_that_reach_the_window_go_to_the_merges(ours) -> None:  # type: ignore[no-untyped-def]
    many, cut = ours.window(clean("word " * 2000))
    assert many == ["word"] * 76 and not cut  # each word makes at least one token: 76 of them fill the window
    one, cut = ours.window("a" * 100_000)
    assert cut and len(one) == 1 and len(one[0]) == (76 + CUT_MARGIN_TOKENS) * ours.longest_token
    short = "a photo of a dog."
    assert ours.window(clean(short)) == (WORDS.findall(clean(short)), False)


# ASCII text skips ftfy and HTML unescaping unless it has a control character or "&" (bundle.tokenizer.clean):
# every ASCII character, runs of the ones that matter, and the entities.
ASCII_TEXT = st.lists(st.one_of(st.characters(max_codepoint=127), st.sampled_from(
    ["&amp;", "&lt;", "&#39;", "\r\n", "\x1b[31m", "\x00", "\x0c", "\x7f", "  ", "<end_of_text>", "'S"])),
    max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(ASCII_TEXT, min_size=1, max_size=4))
def test_ascii_fast_path_ids_equal_open_clip(reference, ours, texts: list[str]) -> None:  # type: ignore[no-untyped-def]
    ids, _ = ours.encode_batch(texts)
    assert ids.tolist() == open_clip_ids(reference, texts, 77).tolist()


def test_repeated_words_come_from_the_word_cache_and_keep_their_ids(ours) -> None:  # type: ignore[no-untyped-def]
    text = "a photo of a large red circle"
    first, _ = ours.encode_batch([text])
    assert {"photo", "circle"} <= set(ours._word_ids)  # the words were kept ...
    ours._word_ids["circle"] = [ours.eot]  # ... and are read from there: a planted entry shows up
    planted, _ = ours.encode_batch([text])
    assert planted[0].tolist().count(ours.eot) == 2
    ours._word_ids.clear()
    again, _ = ours.encode_batch([text])
    assert again.tolist() == first.tolist()
