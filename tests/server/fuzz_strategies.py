"""Hypothesis strategies for fuzzing the Tandem gRPC API, and the properties every answer must have.

Shared by the short run in `make test` (tests/server/test_fuzz.py) and the long
run (benchmarks/fuzz.py); docs/fuzzing.md says what is checked and why.

Every strategy takes a :class:`Bounds`: the short run keeps hostile-but-legal
sizes small (a few items, words of a few thousand letters, images of at most
four megapixels when decoded), the long run goes up to the server's limits.
Images are made with Pillow and then mutated: truncated, bytes flipped,
inserted or cut, and their declared width and height rewritten (PNG, GIF, BMP).
Texts mix random Unicode with characters that break naive code: NUL, the
neighbours of the surrogate range, right-to-left marks, joiners, BOMs,
CLIP's own special tokens, and very long words.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import grpc
import numpy as np
from google.protobuf import struct_pb2
from hypothesis import strategies as st
from PIL import Image
from tandem.v1 import tandem_pb2 as pb

C = grpc.StatusCode
MODEL, VERSION = "tandem-shapes", "1"  # the shipped default model (models/tandem-shapes/1)
DIM = 64
COLLECTION = "fuzz"  # made by the runner before fuzzing, with a few items; never dropped by the fuzzer
ITEM_IDS = ("red", "blue", "circle", "square")  # stored in COLLECTION by the runner
CREATED_PREFIX = "fuzz-made-"  # CreateCollection names the runner drops after each example


@dataclass(frozen=True)
class Bounds:
    """How large hostile-but-legal inputs may get (all well under what a message may carry)."""

    max_items: int = 6  # texts, images, labels, items, ids or queries in one request (the server allows 256)
    max_text_chars: int = 300  # random texts (the server allows 4096; longer ones are refused, and also sent)
    max_word_chars: int = 6000  # one repeated character: over max_text_chars sometimes, on purpose
    max_templates: int = 4
    max_slots: int = 8  # "{}" in one template
    max_decoded_pixels: int = 2_000 * 2_000  # declared image sizes under the pixel limit stay below this
    max_blob_bytes: int = 4096  # random image bytes and vector data


SHORT = Bounds()
LONG = Bounds(max_items=32, max_text_chars=4200, max_word_chars=9000, max_templates=16, max_slots=64,
              max_decoded_pixels=6_000 * 6_000, max_blob_bytes=64 * 1024)


# ------------------------------------------------------------------------------------------------ properties --
# The codes each method may answer, besides OK. INTERNAL and UNKNOWN mean the server failed, never the client.
# RESOURCE_EXHAUSTED is a full queue, a message over max_message_bytes or a request over a cost budget.
COMMON = frozenset({C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED})
UNPARSABLE = frozenset({C.INVALID_ARGUMENT})  # fieldless requests: only bytes that are no such message are wrong
ALLOWED: dict[str, frozenset[grpc.StatusCode]] = {
    "EmbedText": COMMON, "EmbedImage": COMMON, "Classify": COMMON,
    "ListModels": UNPARSABLE, "GetModel": COMMON, "LoadModel": COMMON, "UnloadModel": COMMON,
    "CreateCollection": COMMON | {C.ALREADY_EXISTS}, "ListCollections": UNPARSABLE, "GetCollection": COMMON,
    "DropCollection": COMMON, "Upsert": COMMON, "Delete": COMMON, "Get": COMMON, "Search": COMMON, "Rebuild": COMMON,
}
SERVICE = {"EmbedText": "Inference", "EmbedImage": "Inference", "Classify": "Inference", "ListModels": "Models",
           "GetModel": "Models", "LoadModel": "Models", "UnloadModel": "Models"} | {m: "Collections" for m in ("CreateCollection", "ListCollections",
                                                                "GetCollection", "DropCollection", "Upsert",
                                                                "Delete", "Get", "Search", "Rebuild")}


def path(method: str) -> str:
    return f"/tandem.v1.{SERVICE[method]}/{method}"


def answer_problem(method: str, code: grpc.StatusCode, details: str | None) -> str | None:
    """Why a status is wrong for a fuzzed request (None: it is fine)."""
    if code == C.OK:
        return None
    if code not in ALLOWED[method]:
        allowed = ", ".join(sorted(c.name for c in ALLOWED[method])) or "only OK"
        return f"{method} answered {code.name} ({details!r}); allowed: {allowed}"
    if not (details or "").strip():
        return f"{method} answered {code.name} with an empty message"
    return None


def response_problem(method: str, request: Any, response: Any) -> str | None:
    """Why an OK answer is inconsistent with its request (None: it is fine)."""
    if method in ("EmbedText", "EmbedImage"):
        n = len(request.texts if method == "EmbedText" else request.images)
        m = response.embeddings
        x = np.asarray(m.values, np.float32) if m.values else np.frombuffer(
            m.data, "<f2" if m.dtype == pb.DTYPE_FLOAT16 else "<f4")
        if m.rows != n or m.dim != DIM or x.size != n * DIM:
            return f"{method}: {n} inputs gave a {m.rows} x {m.dim} matrix of {x.size} numbers"
        if not np.isfinite(x).all():
            return f"{method}: non-finite numbers in the embeddings"
    if method == "Classify":
        if len(response.results) != len(request.images):
            return f"Classify: {len(request.images)} images gave {len(response.results)} results"
        want = min(request.top_k or 5, len(request.labels))
        if any(len(r.top) != want for r in response.results):
            return f"Classify: results are not top_k={want} long"
    if method == "Upsert":
        if len(response.results) != len(request.items):
            return f"Upsert: {len(request.items)} items gave {len(response.results)} results"
        if any(r.code != 0 and not r.message for r in response.results):
            return "Upsert: a refused item has no message"
        if response.upserted != sum(r.code == 0 for r in response.results):
            return "Upsert: upserted does not count the stored items"
    if method == "Search" and len(response.results) != len(request.queries):
        return f"Search: {len(request.queries)} queries gave {len(response.results)} results"
    return None


# --------------------------------------------------------------------------------------------------- unicode --
SPECIAL_CHARS = (
    "\x00", "\x01", "\x7f", "\x85", "\t", "\n", "\r", "\x0b", "\x0c",
    "\ud7ff", "\ue000", "\uf8ff", "\ufffd", "\ufffe", "\uffff", "\U00010000", "\U0010ffff",  # around the surrogates
    "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2069",  # bidi
    "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u034f",  # zero width, BOM, soft hyphen
    "\u00a0", "\u2028", "\u2029", "\u3000", "\u1680",  # unusual spaces and line breaks
    "\u0301", "\u0308", "\u20dd",  # combining marks
    "\u0130", "\u00df", "\ufb03", "\u0149", "\u1e9e",  # case mapping that changes length
    "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f3f3\ufe0f\u200d\U0001f308", "\U0001f1fa\U0001f1f8",
    "\u0e01\u0e34", "\u05d0", "\u0627\u0644", "\u4e2d", "\ud55c", "\u0915\u094d\u0937",
)
SPECIAL_WORDS = (
    "<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "&lt;end_of_text&gt;", "&amp;amp;", "&#0;", "&#x110000;",
    "{}", "{", "}", "{0}", "{label}", "%s", "%(x)s", "\\", "\\u0000", "'", '"', "`", "--", ";", "a photo of a {}.",
)
WORDS = ("a", "small", "large", "red", "blue", "green", "circle", "square", "photo", "of", "the", "dog", "cat")
_chars = st.characters(codec="utf-8")


@st.composite
def _weighted(draw: st.DrawFn, choices: tuple[tuple[int, st.SearchStrategy[Any]], ...]) -> Any:
    pick = draw(st.integers(0, sum(w for w, _ in choices) - 1))
    for w, strategy in choices:
        if pick < w:
            return draw(strategy)
        pick -= w
    raise AssertionError("unreachable")


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, chosen in proportion to its weight (st.one_of picks them evenly)."""
    return _weighted(choices)


@st.composite
def long_word(draw: st.DrawFn, bounds: Bounds) -> str:
    unit = draw(st.sampled_from(("a", "z", "\u0e01", "\u4e2d", "\U0001f600", "\u0301", "ab", "1", ".")) | _chars)
    return unit * draw(st.integers(1, max(1, bounds.max_word_chars // len(unit))))


def texts(bounds: Bounds = SHORT) -> st.SearchStrategy[str]:
    """One text: random Unicode, a mix of nasty characters and words, a very long word, or blank."""
    pieces = st.sampled_from(SPECIAL_CHARS) | st.sampled_from(SPECIAL_WORDS) | st.text(_chars, max_size=8) | st.just(" ")
    return weighted(
        (4, st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)),
        (3, st.lists(pieces, max_size=40).map("".join)),
        (2, st.text(_chars, max_size=bounds.max_text_chars)),
        (1, long_word(bounds)),
        (1, st.sampled_from(("", " ", "\t\n", "\u3000", "\x00", "a", "a small red circle"))),
    )


def names() -> st.SearchStrategy[str]:
    """A model, version, collection name or id: the real ones, near misses and random text."""
    return weighted((3, st.sampled_from(("", MODEL, VERSION, "2", "0", "01", "latest", MODEL.upper(), f"{MODEL}/1", COLLECTION,
                         "fuzz ", "nope", "..", "../models", "/etc/passwd", "a" * 65, "a" * 300) + ITEM_IDS)),
                    (1, st.text(_chars, max_size=20)))


# ---------------------------------------------------------------------------------------------------- images --
def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
                           .astype(np.uint8), "RGB")


@cache
def seed_images() -> dict[str, bytes]:
    """Small real images in every mode and format the server accepts, and a few it refuses (made with Pillow)."""
    rgb = _gradient(40, 30)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(40 * 30).reshape(30, 40) % 256).astype(np.uint8)))
    palette = rgb.quantize(16)
    sixteen = Image.frombytes("I;16", (40, 30), (np.arange(40 * 30, dtype="<u2") * 50).tobytes())
    frames = [_gradient(24, 24).rotate(a) for a in (0, 90, 180)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    return {
        "png": _encode(rgb, "PNG"),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg-progressive": _encode(rgb, "JPEG", progressive=True),
        "jpeg-exif-rotated": _encode(rgb, "JPEG", exif=exif),
        "jpeg-cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg-gray": _encode(rgb.convert("L"), "JPEG"),
        "png-gray": _encode(rgb.convert("L"), "PNG"),
        "png-gray-alpha": _encode(rgba.convert("LA"), "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-palette": _encode(palette, "PNG"),
        "png-palette-transparent": _encode(palette, "PNG", transparency=3),
        "png-16bit": _encode(sixteen, "PNG"),
        "png-1bit": _encode(rgb.convert("1"), "PNG"),
        "png-1x1": _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "png-strip-1x500": _encode(Image.new("L", (1, 500), 128), "PNG"),
        "gif-animated": gif.getvalue(),
        "bmp": _encode(rgb, "BMP"),
        "webp": _encode(rgb, "WEBP", quality=70),
        "webp-lossless-alpha": _encode(rgba, "WEBP", lossless=True),
        "tiff": _encode(rgb, "TIFF"),  # refused: not an accepted format
        "ico": _encode(rgb, "ICO"),  # refused
    }


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def declare_size(data: bytes, width: int, height: int) -> bytes:
    """The same bytes claiming another width and height in their header (valid checksums), where the
    format has one we know: PNG IHDR, GIF logical screen and first image, BMP info header."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        body = struct.pack(">II", min(width, 2**31 - 1), min(height, 2**31 - 1)) + data[24:29]
        return data[:8] + _png_chunk(b"IHDR", body) + data[33:]
    if data[:6] in (b"GIF87a", b"GIF89a"):
        w, h = min(width, 65535), min(height, 65535)
        out = bytearray(data[:6] + struct.pack("<HH", w, h) + data[10:])
        at = out.find(b"\x2c", 13)  # image descriptor: separator, left, top, width, height
        if at > 0 and at + 9 <= len(out):
            out[at + 5:at + 9] = struct.pack("<HH", w, h)
        return bytes(out)
    if data[:2] == b"BM" and len(data) >= 26:
        return data[:18] + struct.pack("<ii", min(width, 2**31 - 1), min(height, 2**31 - 1)) + data[26:]
    return data


def png_header_only(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG that claims width x height and carries one tiny compressed row (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


@st.composite
def mutated(draw: st.DrawFn, data: bytes, bounds: Bounds) -> bytes:
    """`data` after a few random edits: truncation, overwritten, inserted, deleted or repeated bytes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        n = len(out)
        op = draw(st.sampled_from(("truncate", "flip", "set", "insert", "delete", "repeat")))
        at = draw(st.integers(0, max(n - 1, 0)))
        if op == "truncate":
            del out[at:]
        elif op == "flip" and n:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            out[at] = draw(st.sampled_from((0x00, 0xFF, 0x7F, 0x80, 0x01)) | st.integers(0, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(max_size=64))
        elif op == "delete":
            del out[at:at + draw(st.integers(1, 64))]
        elif op == "repeat":
            out[at:at] = out[at:at + draw(st.integers(1, 64))] * draw(st.integers(1, 8))
    return bytes(out[:max(bounds.max_blob_bytes * 4, len(data))])


@st.composite
def sizes(draw: st.DrawFn, bounds: Bounds) -> tuple[int, int]:
    """A width and height either cheap to decode (under the bounds) or far over the pixel limit."""
    if draw(st.booleans()):
        w = draw(st.integers(1, bounds.max_decoded_pixels))
        return w, draw(st.integers(1, max(1, bounds.max_decoded_pixels // w)))
    w = draw(st.integers(1, 2**31 - 1))
    return w, draw(st.integers(max(1, 40_000_001 // w + 1), 2**31 - 1))


@st.composite
def images(draw: st.DrawFn, bounds: Bounds = SHORT) -> bytes:
    """Encoded image bytes: a real image, a mutated one, one with a rewritten size, or random bytes."""
    seeds = seed_images()
    seed = seeds[draw(st.sampled_from(sorted(seeds)))]
    kind = draw(st.sampled_from(("real",) * 6 + ("mutated",) * 3 + ("resized",) * 3 + ("bomb",) * 2
                                + ("random", "magic")))
    if kind == "real":
        return seed
    if kind == "mutated":
        return draw(mutated(seed, bounds))
    if kind == "resized":
        out = declare_size(seed, *draw(sizes(bounds)))
        return draw(mutated(out, bounds)) if draw(st.booleans()) else out
    if kind == "bomb":
        return png_header_only(*draw(sizes(bounds)), *draw(st.sampled_from(((8, 2), (16, 2), (16, 0), (8, 6),
                                                                           (1, 0), (8, 3), (16, 6), (7, 2)))))
    if kind == "magic":
        magic = draw(st.sampled_from((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP")))
        return magic + draw(st.binary(max_size=bounds.max_blob_bytes))
    return draw(st.binary(max_size=bounds.max_blob_bytes))


# ---------------------------------------------------------------------------------------------------- values --
numbers = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from((0.0, -0.0, 1.0, 1e38, 3.5e38, -1e-45))
dtypes = st.sampled_from((0, 1, 0, 1, 2, 7, -1, 2**31 - 1, -(2**31)))
uint32s = st.sampled_from((0, 1, 2, 5, 10, 1000, 1001, 2**31, 2**32 - 1)) | st.integers(0, 2**32 - 1)


@st.composite
def matrices(draw: st.DrawFn, bounds: Bounds = SHORT) -> pb.Matrix:
    """A Matrix: one good row of the model's dim, or any mix of wrong shapes, types, sizes and values."""
    if draw(st.booleans()):
        dtype = draw(st.sampled_from((0, 1)))
        row = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(DIM) * draw(
            st.sampled_from((1.0, 1e-30, 1e3, 0.0)))  # a seed, not 64 drawn floats: much faster to generate
        if draw(st.integers(0, 3)) == 0:
            return pb.Matrix(rows=1, dim=DIM, values=row.tolist())
        return pb.Matrix(rows=1, dim=DIM, dtype=dtype, data=row.astype("<f2" if dtype else "<f4").tobytes())
    rows = draw(st.sampled_from((1, 1, 0, 2)) | uint32s)
    dim = draw(st.sampled_from((DIM, DIM, 0, 1, DIM + 1, DIM // 2)) | uint32s)
    dtype = draw(dtypes)
    m = pb.Matrix(rows=rows, dim=dim, dtype=dtype)
    how = draw(st.sampled_from(("data", "data", "values", "bytes", "both", "none")))
    n = min(rows * dim, bounds.max_blob_bytes // 4) if draw(st.booleans()) else draw(st.integers(0, 200))
    if how in ("data", "both"):
        x = np.array(draw(st.lists(numbers, min_size=min(n, 3), max_size=min(n, 3))) + [0.5] * (n - min(n, 3)))
        with np.errstate(over="ignore"):  # values beyond float16 or float32 become infinities, on purpose
            m.data = x.astype("<f2" if dtype == 1 else "<f4").tobytes()
    if how in ("values", "both"):
        m.values.extend(draw(st.lists(numbers, max_size=min(n, 8))) + [0.25] * max(0, n - 8))
    if how == "bytes":
        m.data = draw(st.binary(max_size=bounds.max_blob_bytes))
    return m


JSON_SCALARS = (st.none() | st.booleans() | numbers | st.integers(-(2**70), 2**70).map(float)
                | st.text(_chars, max_size=20) | st.sampled_from(SPECIAL_CHARS))


@st.composite
def metadata(draw: st.DrawFn, bounds: Bounds = SHORT) -> struct_pb2.Struct:
    """A Struct: legal flat metadata, or nested objects, nulls, NaN, NUL keys, huge strings."""
    values = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(_chars, max_size=6), inner, max_size=3), max_leaves=8)
    keys = st.text(_chars, max_size=10) | st.sampled_from(("", "\x00", "a.b", "`", "color", "n", "k" * 300))
    d = draw(st.dictionaries(keys, values, max_size=5))
    if draw(st.integers(0, 9)) == 9:
        d["big"] = "x" * draw(st.integers(16_000, 17_000))  # around max_metadata_bytes
    s = struct_pb2.Struct()
    s.update(d)
    return s


# --------------------------------------------------------------------------------------------------- filters --
_keys = st.sampled_from(("color", "n", "tags", "flag", "size.w", "_id", "`file name`", "`in`", "`a``b`", "`\x00`",
                         "in", "1a", "`" + "k" * 300 + "`")) | st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.-]{0,8}\Z")
_values = st.sampled_from(('"red"', "'red'", "3", "-2.5", "1e308", "1e999", "-1e999", str(2**64), "true", "false",
                           '"\\u0000"', '"\\ud83d\\ude00"', '"\\ud800"', '"\\x"', '"unterminated', "null", "NaN",
                           ".5", "1e", "--1")) | st.text(_chars, max_size=6).map(lambda s: '"' + s.replace('"', "") + '"')
_ops = st.sampled_from(("=", "==", "!=", "<", "<=", ">", ">=", "<>", "=>", "!", "~"))


@st.composite
def _condition(draw: st.DrawFn) -> str:
    key = draw(_keys)
    form = draw(st.integers(0, 3))
    if form == 0:
        return f"exists {key}"
    if form in (1, 2):
        return f"{key} {draw(_ops)} {draw(_values)}"
    neg = "not " if draw(st.booleans()) else ""
    return f"{key} {neg}in [{', '.join(draw(st.lists(_values, max_size=4)))}]"


def _combine(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return (st.tuples(inner, st.sampled_from((" and ", " or ", " AND ", " Or ")), inner).map("".join)
            | inner.map(lambda s: f"not {s}") | inner.map(lambda s: f"({s})"))


@st.composite
def filters(draw: st.DrawFn, bounds: Bounds = SHORT) -> str:
    """A filter: grammatical, mutated, deeply nested, very long, or random text."""
    good = st.recursive(_condition(), _combine, max_leaves=6)
    kind = draw(st.sampled_from(("good", "good", "mutated", "nested", "long", "random", "blank")))
    if kind == "good":
        return draw(good)
    if kind == "mutated":
        text = draw(good)
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.sampled_from(("(", ")", "[", "]", '"', "'", "`", "\\", " and", "not ", ",", "")))\
            + text[at + draw(st.integers(0, 3)):]
    if kind == "nested":
        depth = draw(st.integers(1, 3000))
        opener = draw(st.sampled_from(("(", "not ", "not (")))
        closer = ")" if "(" in opener else ""
        return opener * depth + "color = 'red'" + closer * depth
    if kind == "long":
        return " or ".join([draw(_condition())] * draw(st.integers(1, 400)))
    if kind == "blank":
        return draw(st.sampled_from(("", " ", "\t\n")))
    return draw(texts(bounds))


# -------------------------------------------------------------------------------------------------- requests --
def _few(strategy: st.SearchStrategy[Any], bounds: Bounds) -> st.SearchStrategy[list[Any]]:
    """Mostly 1 to 3 elements; sometimes none, sometimes up to bounds.max_items."""
    return weighted((8, st.lists(strategy, min_size=1, max_size=3)), (1, st.just([])),
                    (1, st.lists(strategy, max_size=bounds.max_items)))


@st.composite
def _embed_text(draw: st.DrawFn, b: Bounds) -> pb.EmbedTextRequest:
    return pb.EmbedTextRequest(model=draw(names()), version=draw(names()), texts=draw(_few(texts(b), b)),
                               unnormalized=draw(st.booleans()), reject_truncated=draw(st.booleans()),
                               dtype=draw(dtypes), float_list=draw(st.booleans()))


def _default_model(request: Any, draw: st.DrawFn) -> Any:
    """Most requests name the real model (or none), so they get past the model check to the interesting part."""
    if draw(st.integers(0, 3)) != 3:
        request.model, request.version = draw(st.sampled_from(((MODEL, VERSION), ("", ""), (MODEL, ""))))
    return request


@st.composite
def _embed_image(draw: st.DrawFn, b: Bounds) -> pb.EmbedImageRequest:
    return pb.EmbedImageRequest(model=draw(names()), version=draw(names()), images=draw(_few(images(b), b)),
                                unnormalized=draw(st.booleans()), dtype=draw(dtypes), float_list=draw(st.booleans()))


@st.composite
def _template(draw: st.DrawFn, b: Bounds) -> str:
    parts = draw(st.lists(texts(b).map(lambda s: s[:80]), min_size=1, max_size=b.max_slots + 1))
    return "{}".join(parts) if draw(st.integers(0, 4)) else parts[0]


@st.composite
def _classify(draw: st.DrawFn, b: Bounds) -> pb.ClassifyRequest:
    labels = draw(_few(texts(b).map(lambda s: s[:200]) | st.sampled_from(("dog", "cat", "red circle")), b))
    templates = weighted((2, st.just([])), (1, st.lists(_template(b), max_size=b.max_templates)))
    return pb.ClassifyRequest(model=draw(names()), version=draw(names()), images=draw(_few(images(b), b)),
                              labels=labels, templates=draw(templates),
                              top_k=draw(weighted((3, st.integers(0, 10)), (1, uint32s))))


@st.composite
def _get_model(draw: st.DrawFn, b: Bounds) -> pb.GetModelRequest:
    return pb.GetModelRequest(model=draw(names()), version=draw(names()))


@st.composite
def _model_ref(draw: st.DrawFn, b: Bounds, message: Callable[..., Any]) -> Any:
    """LoadModel, UnloadModel: the runner loads MODEL again after a successful UnloadModel."""
    return message(model=draw(names() | st.sampled_from((MODEL, "..", f"../{MODEL}", f"{MODEL}/../{MODEL}", "."))),
                   version=draw(names() | st.sampled_from((VERSION, "../1", "1/..", "."))))


@st.composite
def _create(draw: st.DrawFn, b: Bounds) -> pb.CreateCollectionRequest:
    name = draw(st.sampled_from(("", COLLECTION, "a" * 65, "bad name", "ünï", "../x")) | st.from_regex(
        rf"\A{CREATED_PREFIX}[a-z0-9_-]{{1,10}}\Z") | st.text(_chars, max_size=12))
    spec = draw(st.sampled_from(("", "auto", "Flat", "HNSW32", "IVF16,Flat", "IVF1024,PQ8", "PQ8", "PQ64x16",
                                 "IDMap,Flat", "IVF0,Flat", "HNSW0", "HNSW100000", "PCA32,Flat", "OPQ8,IVF8,PQ8",
                                 "LSH", "SQ8", "SQfp16", "RFlat", "Flat,Flat", "IVF-1,Flat", "IVF99999999999,Flat",
                                 "NSG32", "IVF16_HNSW32,Flat", "Residual2x8,Flat", "PQ3", "IVF16,PQ7")) | texts(b))
    metric = draw(st.sampled_from(("", "cosine", "ip", "l2", "L2", "hamming", "cosine ")) | st.text(_chars, max_size=8))
    return pb.CreateCollectionRequest(name=name, model=draw(names()), version=draw(names()),
                                      index_spec=spec, metric=metric)


def _collection_name() -> st.SearchStrategy[str]:
    return weighted((3, st.just(COLLECTION)), (1, names()))


def _named(message: Callable[..., Any]) -> Callable[[Bounds], st.SearchStrategy[Any]]:
    """GetCollection, Rebuild: a name. DropCollection never gets COLLECTION (the fuzzer needs it)."""
    @st.composite
    def build(draw: st.DrawFn, b: Bounds) -> Any:
        name = draw(_collection_name())
        if message is pb.DropCollectionRequest and name == COLLECTION:
            name += "-not-this-one"
        return message(name=name)

    return build


@st.composite
def _item(draw: st.DrawFn, b: Bounds) -> pb.Item:
    item = pb.Item(id=draw(st.sampled_from(ITEM_IDS + ("", "x" * 256, "x" * 257)) | st.text(_chars, max_size=12)))
    kind = draw(st.sampled_from(("text", "image", "vector", "vector", "none")))
    if kind == "text":
        item.text = draw(texts(b))
    elif kind == "image":
        item.image = draw(images(b))
    elif kind == "vector":
        item.vector.CopyFrom(draw(matrices(b)))
    if draw(st.booleans()):
        item.metadata.CopyFrom(draw(metadata(b)))
    return item


@st.composite
def _upsert(draw: st.DrawFn, b: Bounds) -> pb.UpsertRequest:
    return pb.UpsertRequest(collection=draw(_collection_name()), items=draw(_few(_item(b), b)))


def _ids(b: Bounds) -> st.SearchStrategy[list[str]]:
    return _few(st.sampled_from(ITEM_IDS + ("ghost", "")) | st.text(_chars, max_size=300), b)


@st.composite
def _delete(draw: st.DrawFn, b: Bounds) -> pb.DeleteRequest:
    if draw(st.booleans()):
        return pb.DeleteRequest(collection=draw(_collection_name()), ids=draw(_ids(b)))
    return pb.DeleteRequest(collection=draw(_collection_name()), filter=draw(filters(b)),
                            ids=draw(st.lists(st.just("red"), max_size=1)))


@st.composite
def _get(draw: st.DrawFn, b: Bounds) -> pb.GetRequest:
    return pb.GetRequest(collection=draw(_collection_name()), ids=draw(_ids(b)), with_vectors=draw(st.booleans()),
                         dtype=draw(dtypes))


def _float32(x: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(x))


@st.composite
def _term(draw: st.DrawFn, b: Bounds) -> pb.QueryTerm:
    t = pb.QueryTerm(weight=draw(st.sampled_from((0.0, 1.0, -1.0, 0.5)) | numbers.map(_float32)))
    kind = draw(st.sampled_from(("text", "text", "image", "vector", "vector", "id", "id", "none")))
    if kind == "text":
        t.text = draw(texts(b))
    elif kind == "image":
        t.image = draw(images(b))
    elif kind == "vector":
        t.vector.CopyFrom(draw(matrices(b)))
    elif kind == "id":
        t.id = draw(st.sampled_from(ITEM_IDS + ("ghost",)) | st.text(_chars, max_size=10))
    return t


@st.composite
def _search(draw: st.DrawFn, b: Bounds) -> pb.SearchRequest:
    terms = weighted((6, st.lists(_term(b), min_size=1, max_size=2)), (1, st.lists(_term(b), max_size=17)))
    queries = draw(_few(st.builds(pb.Query, terms=terms), b))
    return pb.SearchRequest(collection=draw(_collection_name()), queries=queries,
                            top_k=draw(weighted((3, st.integers(0, 20)), (1, uint32s))),
                            filter=draw(filters(b)) if draw(st.booleans()) else "", exact=draw(st.booleans()),
                            without_metadata=draw(st.booleans()))


@st.composite
def _with_model(draw: st.DrawFn, b: Bounds, inner: Callable[[Bounds], st.SearchStrategy[Any]]) -> Any:
    return _default_model(draw(inner(b)), draw)


def _empty(message: Callable[[], Any]) -> Callable[[Bounds], st.SearchStrategy[Any]]:
    return lambda b: st.just(message())


_BUILDERS: dict[str, Callable[[Bounds], st.SearchStrategy[Any]]] = {
    "EmbedText": _embed_text, "EmbedImage": _embed_image, "Classify": _classify,
    "ListModels": _empty(pb.ListModelsRequest), "GetModel": _get_model,
    "LoadModel": lambda b: _model_ref(b, pb.LoadModelRequest), "UnloadModel": lambda b: _model_ref(b, pb.UnloadModelRequest),
    "CreateCollection": _create, "ListCollections": _empty(pb.ListCollectionsRequest),
    "GetCollection": _named(pb.GetCollectionRequest), "DropCollection": _named(pb.DropCollectionRequest),
    "Upsert": _upsert, "Delete": _delete, "Get": _get, "Search": _search,
    "Rebuild": _named(pb.RebuildRequest),
}
METHODS = tuple(_BUILDERS)


def requests(method: str, bounds: Bounds = SHORT) -> st.SearchStrategy[Any]:
    """Random requests for one method (a tandem_pb2 message)."""
    if method in ("EmbedText", "EmbedImage", "Classify", "GetModel", "CreateCollection"):
        return _with_model(bounds, _BUILDERS[method])
    return _BUILDERS[method](bounds)


# ----------------------------------------------------------------------------------------------- raw bytes --
@st.composite
def raw_requests(draw: st.DrawFn, method: str, bounds: Bounds = SHORT) -> bytes:
    """Bytes sent as a request: random, or a serialized random request mutated (bad tags, cut lengths,
    invalid UTF-8 in strings, unknown fields)."""
    kind = draw(st.sampled_from(("random", "mutated", "mutated", "unknown-field", "bad-utf8")))
    if kind == "random":
        return draw(st.binary(max_size=256))
    data = draw(requests(method, bounds)).SerializeToString()[:bounds.max_blob_bytes * 4]
    if kind == "mutated":
        return draw(mutated(data, bounds))
    if kind == "unknown-field":  # field 99, each wire type
        return data + draw(st.sampled_from((b"\x98\x06\x01", b"\x9a\x06\x03abc", b"\x9d\x06\x00\x00\x80\x3f",
                                            b"\x99\x06" + bytes(8), b"\x9b\x06\x9c\x06")))
    return data + b"\x1a\x02\xff\xfe"  # field 3 (a string or bytes field in most requests) with invalid UTF-8


# --------------------------------------------------------------------------------------------------- session --
@dataclass(frozen=True)
class KnownIssue:
    """A failure found by fuzzing and not fixed yet: answers that match it are counted, not reported.
    Each one is pinned by a strict xfail in test_fuzz.py (KNOWN_FAILURES): the day it is fixed, that test
    fails, and the entry here must go."""

    name: str
    codes: frozenset[grpc.StatusCode]
    fragment: str  # in the status message or in the server's error log

    def matches(self, code: grpc.StatusCode, details: str, log: str) -> bool:
        return code in self.codes and (self.fragment in details or self.fragment in log)


# Answers the fuzzer has found wrong and that are not fixed yet, counted apart in the long runs (each also gets a
# strict-xfail case in tests/server/test_fuzz.py FOUND). The four found so far are fixed (docs/fuzzing.md).
KNOWN_ISSUES: tuple[KnownIssue, ...] = ()


def known_issue(code: grpc.StatusCode, details: str, log: str = "") -> KnownIssue | None:
    return next((k for k in KNOWN_ISSUES if k.matches(code, details, log)), None)


@dataclass
class Outcome:
    method: str
    code: grpc.StatusCode
    details: str
    seconds: float
    problems: list[str]
    known: str | None = None  # the name of the KNOWN_ISSUES entry this answer matched (not a problem)


class FuzzSession:
    """Sends fuzzed requests over one channel and checks every answer, then the server's health.

    `server_errors` returns the error lines the server logged since it was last called (tracebacks of
    failures that never reached a status, e.g. in a background task).
    """

    def __init__(self, channel: grpc.Channel, timeout_s: float = 30.0, health_timeout_s: float = 5.0,
                 server_errors: Callable[[], list[str]] = list):
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # the serving install has it; keep imports light

        self.timeout_s, self.health_timeout_s, self.server_errors = timeout_s, health_timeout_s, server_errors
        self._health_request, self._serving = health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse.SERVING
        self._health = health_pb2_grpc.HealthStub(channel)
        self._typed = {m: channel.unary_unary(path(m), request_serializer=lambda r: r.SerializeToString(),
                                              response_deserializer=_response_type(m).FromString) for m in METHODS}
        self._raw = {m: channel.unary_unary(path(m)) for m in METHODS}  # bytes in, bytes out

    def setup(self) -> None:
        """The collection the fuzzer writes to and searches, with ITEM_IDS in it."""
        try:
            self._typed["CreateCollection"](pb.CreateCollectionRequest(name=COLLECTION, model=MODEL, version=VERSION),
                                            timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() != C.ALREADY_EXISTS:
                raise
        self.restore_items()

    def restore_items(self) -> None:
        rng = np.random.default_rng(0)
        items = [pb.Item(id=i, vector=pb.Matrix(rows=1, dim=DIM, data=rng.standard_normal(DIM).astype("<f4").tobytes()))
                 for i in ITEM_IDS]
        for item, (color, n) in zip(items, (("red", 1), ("blue", 2.5), ("red", 3), ("green", -1))):
            item.metadata.update({"color": color, "n": n, "tags": ["cat", color], "flag": n > 1})
        self._typed["Upsert"](pb.UpsertRequest(collection=COLLECTION, items=items), timeout=self.timeout_s)

    def check(self, method: str, request: Any) -> Outcome:
        """Send a tandem_pb2 request and check the answer, the server's log and its health."""
        return self._send(method, request, self._typed[method], request)

    def check_raw(self, method: str, data: bytes) -> Outcome:
        """Send raw bytes as `method`'s request (no client-side serialization) and check the same way."""
        return self._send(method, data, self._raw[method], None)

    def _send(self, method: str, payload: Any, call: Any, request: Any) -> Outcome:
        started = time.perf_counter()
        response = None
        try:
            response = call(payload, timeout=self.timeout_s)
            code, details = C.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        seconds = time.perf_counter() - started
        problems = []
        logged = self.server_errors()
        known = known_issue(code, details, "\n".join(logged))
        if known is None and (p := answer_problem(method, code, details)):
            problems.append(p)
        if code == C.OK and request is not None and (p := response_problem(method, request, response)):
            problems.append(p)
        problems += [f"server logged: {line}" for line in logged if known is None or known.fragment not in line]
        self._clean_up(method, request, code)
        if method in ("LoadModel", "UnloadModel") and (p := self._reload(method, code)):
            problems.append(p)
        # After the reload: with its only model unloaded the server is rightly NOT_SERVING until it is back
        if (p := self.health_problem()) is not None:
            problems.append(p)
        return Outcome(method, code, details, seconds, problems, known and known.name)

    def health_problem(self) -> str | None:
        try:
            status = self._health.Check(self._health_request, timeout=self.health_timeout_s).status
        except grpc.RpcError as e:
            return f"health Check failed afterwards: {e.code().name} {e.details()!r}"
        return None if status == self._serving else f"health Check answered {status} afterwards, not SERVING"

    def _clean_up(self, method: str, request: Any, code: grpc.StatusCode) -> None:
        """Drop collections the fuzzer made; put the seed items back after a successful Delete."""
        if code != C.OK or request is None:
            return
        if method == "CreateCollection" and request.name != COLLECTION:
            self._typed["DropCollection"](pb.DropCollectionRequest(name=request.name), timeout=self.timeout_s)
        if method == "Delete" and request.collection == COLLECTION:
            self.restore_items()



    def _reload(self, method: str, code: grpc.StatusCode) -> str | None:
        """Load MODEL again if it is not READY; a problem unless a successful UnloadModel unloaded it."""
        try:
            status = self._typed["GetModel"](pb.GetModelRequest(model=MODEL, version=VERSION),
                                              timeout=self.timeout_s).status
        except grpc.RpcError as e:
            status = e.code()
        if status == pb.MODEL_STATUS_READY:
            return None
        self._typed["LoadModel"](pb.LoadModelRequest(model=MODEL, version=VERSION), timeout=self.timeout_s)
        if method == "UnloadModel" and code == C.OK:
            return None
        return f"{method} answered {code.name}, and {MODEL}/{VERSION} was not READY afterwards ({status})"


def _response_type(method: str) -> Any:
    service = pb.DESCRIPTOR.services_by_name[SERVICE[method]]
    return getattr(pb, service.methods_by_name[method].output_type.name)
