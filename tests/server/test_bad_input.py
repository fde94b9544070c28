"""Every kind of bad input gets a precise status and a message naming the item,
and the server keeps answering good requests afterwards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from PIL import Image
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from server.admission import PREPROCESS_ITEMS
from server.wire import decode as matrix
from tests.conftest import png_bytes, start_server

GOOD = png_bytes(Image.new("RGB", (40, 30), (200, 30, 30)))
C = grpc.StatusCode


@pytest.fixture(scope="module")
def stub(tiny_server):  # type: ignore[no-untyped-def]
    channel = tiny_server.channel()
    yield pb_grpc.InferenceStub(channel)
    channel.close()


def expect(call, code: grpc.StatusCode, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for f in fragments:
        assert f in info.value.details(), info.value.details()


def still_serving(stub) -> None:  # type: ignore[no-untyped-def]
    r = stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD]), timeout=30)
    assert matrix(r.embeddings).shape == (1, r.dim)
    r = stub.EmbedText(pb.EmbedTextRequest(texts=["ok"]), timeout=30)
    assert matrix(r.embeddings).shape == (1, r.dim)


IMAGE_CASES = {
    "empty bytes": (b"", "images[1] is empty"),
    "corrupt": (b"\x89PNG\r\n\x1a\n garbage garbage", "images[1]"),
    "truncated jpeg": (png_bytes(Image.new("RGB", (64, 64)), "JPEG")[:300], "images[1]"),
    "unsupported format": (png_bytes(Image.new("RGB", (8, 8)), "TIFF"), "images[1] is TIFF"),
    "over pixel limit": (png_bytes(Image.new("L", (101, 100))), "images[1] is 101x100 = 10,100 pixels"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_image_is_invalid_argument_naming_the_item(stub, case: str) -> None:  # type: ignore[no-untyped-def]
    data, fragment = IMAGE_CASES[case]
    expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD, data]), timeout=30),
           C.INVALID_ARGUMENT, fragment)
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD, data], labels=["a", "b"]), timeout=30),
           C.INVALID_ARGUMENT, fragment)
    still_serving(stub)


def test_empty_text_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(texts=["fine", "   "]), timeout=30),
           C.INVALID_ARGUMENT, "texts[1] is empty")


def test_text_over_char_limit_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(texts=["x" * 201]), timeout=30),
           C.INVALID_ARGUMENT, "texts[0] has 201 characters", "max_text_chars=200")


def test_overlong_text_is_truncated_and_flagged(stub) -> None:  # type: ignore[no-untyped-def]
    long = "word " * 30  # > 16 tokens, < 200 characters
    r = stub.EmbedText(pb.EmbedTextRequest(texts=["short", long]), timeout=30)
    assert list(r.truncated) == [False, True]
    # Truncation keeps the first tokens: the same as embedding the first 14 words.
    cut = stub.EmbedText(pb.EmbedTextRequest(texts=["word " * 14]), timeout=30)
    np.testing.assert_allclose(matrix(r.embeddings)[1], matrix(cut.embeddings)[0], atol=1e-6)


def test_overlong_text_with_reject_truncated_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(texts=["ok", "word " * 30], reject_truncated=True),
                                  timeout=30),
           C.INVALID_ARGUMENT, "texts[1]", "context length of 16 tokens")


def test_unknown_model_and_version_are_not_found(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(model="nope", texts=["a"]), timeout=30),
           C.NOT_FOUND, "model 'nope' is not loaded", "tiny-clip")
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(model="tiny-clip", version="9", texts=["a"]), timeout=30),
           C.NOT_FOUND, "no version '9'")


def test_empty_requests_are_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(), timeout=30), C.INVALID_ARGUMENT, "texts is empty")
    expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(), timeout=30), C.INVALID_ARGUMENT, "images is empty")


def test_empty_and_bad_label_lists_are_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD]), timeout=30),
           C.INVALID_ARGUMENT, "labels is empty")
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD], labels=["a", "b", "a"]), timeout=30),
           C.INVALID_ARGUMENT, "labels[2] 'a' repeats labels[0]")
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD], labels=list("abcdef")), timeout=30),
           C.INVALID_ARGUMENT, "max_labels=5")
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD], labels=["a"], templates=["no slot"]),
                                 timeout=30),
           C.INVALID_ARGUMENT, "templates[0]")
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD], labels=["a", ""]), timeout=30),
           C.INVALID_ARGUMENT, "labels[1] is empty")


def test_too_many_items_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(texts=["a"] * 9), timeout=30),
           C.INVALID_ARGUMENT, "9 items", "max_items_per_request=8")
    expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD] * 9), timeout=30),
           C.INVALID_ARGUMENT, "9 items")


def test_message_over_size_limit_is_resource_exhausted(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[b"\0" * (2 << 20)]), timeout=30),
           C.RESOURCE_EXHAUSTED)
    still_serving(stub)


def test_zero_shot_and_text_on_image_only_model_fail_precondition(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.Classify(pb.ClassifyRequest(model="tiny-image", images=[GOOD], labels=["a"]), timeout=30),
           C.FAILED_PRECONDITION, "image-only", "needs a text tower")
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(model="tiny-image", texts=["a"]), timeout=30),
           C.FAILED_PRECONDITION, "image-only")
    r = stub.EmbedImage(pb.EmbedImageRequest(model="tiny-image", images=[GOOD]), timeout=30)
    assert r.model.name == "tiny-image" and matrix(r.embeddings).shape == (1, r.dim)


def test_bad_client_does_not_disturb_concurrent_good_clients(tiny_server) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    channel = tiny_server.channel()
    stub = pb_grpc.InferenceStub(channel)

    def good(_: int) -> int:
        return stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD, GOOD]), timeout=30).embeddings.rows

    def bad(_: int) -> grpc.StatusCode:
        try:
            stub.EmbedImage(pb.EmbedImageRequest(images=[b"junk"]), timeout=30)
        except grpc.RpcError as e:
            return e.code()
        return C.OK

    with ThreadPoolExecutor(8) as pool:
        goods = pool.map(good, range(20))
        bads = pool.map(bad, range(20))
        assert list(goods) == [2] * 20
        assert set(bads) == {C.INVALID_ARGUMENT}
    channel.close()


def test_more_templates_than_allowed_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    templates = [f"{{}} {i}" for i in range(820)]
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD], labels=list("abcde"), templates=templates),
                                 timeout=30),
           C.INVALID_ARGUMENT, "templates has 820 entries", "max_templates=100")


def test_unknown_dtype_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(texts=["ok"], dtype=7), timeout=30),
           C.INVALID_ARGUMENT, "dtype 7 is unknown", "DTYPE_FLOAT16")


def test_float_list_with_float16_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD], dtype=pb.DTYPE_FLOAT16, float_list=True),
                                   timeout=30),
           C.INVALID_ARGUMENT, "float_list answers float32")
    still_serving(stub)


# -- budgets for hostile requests: each is refused from the request alone, before any work ------------------------
BUDGETS = dict(default_model="tiny-clip", max_items_per_request=8, max_labels=5, max_text_chars=200,
               max_request_text_chars=500, max_templates=3, max_template_chars=40, max_template_slots=2,
               max_image_pixels=100 * 100, max_image_decode_bytes=25_000, max_message_bytes=1 << 20)


@pytest.fixture(scope="module")
def budget_stub(tiny_repo):  # type: ignore[no-untyped-def]
    server = start_server(tiny_repo, **BUDGETS)
    channel = server.channel()
    yield pb_grpc.InferenceStub(channel)
    channel.close()
    server.stop()


def classify(labels: list[str], templates: list[str]) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=[GOOD], labels=labels, templates=templates)


BUDGET_CASES = {
    "texts over the characters per request": (
        lambda s: s.EmbedText(pb.EmbedTextRequest(texts=["x" * 150] * 4), timeout=30),
        ("texts have 600 characters in all", "max_request_text_chars=500")),
    "labels over the characters per request": (
        lambda s: s.Classify(classify(["x" * 150, "y" * 150, "z" * 150, "w" * 150], ["{}"]), timeout=30),
        ("labels have 600 characters in all", "max_request_text_chars=500")),
    "too many templates": (
        lambda s: s.Classify(classify(["a"], ["{}", "a {}", "the {}", "one {}"]), timeout=30),
        ("templates has 4 entries", "max_templates=3")),
    "template too long": (
        lambda s: s.Classify(classify(["a"], ["{}" + "x" * 40]), timeout=30),
        ("templates[0] has 42 characters", "max_template_chars=40")),
    "too many slots in a template": (
        lambda s: s.Classify(classify(["a"], ["{} {} {}"]), timeout=30),
        ("templates[0] has 3 '{}' label slots", "max_template_slots=2")),
    "a prompt over the text limit": (
        lambda s: s.Classify(classify(["a", "x" * 110], ["{} and {}"]), timeout=30),
        ("labels[1] (110 characters) in templates[0] makes a prompt of 225 characters", "max_text_chars=200")),
    "a prompt over the text limit with the default templates": (  # the message names no template not sent
        lambda s: s.Classify(pb.ClassifyRequest(images=[GOOD], labels=["x" * 195]), timeout=30),
        ("labels[0] (195 characters) in the default template 'a photo of a {}.' makes a prompt of",
         "max_text_chars=200; send shorter labels")),
    "prompts over the characters per request": (  # 5 x 2 + 2 x 500: the amplification of a 54 KB request
        lambda s: s.Classify(classify([c * 100 for c in "abcde"], ["{}", "a {}"]), timeout=30),
        ("5 labels x 2 templates make 10 prompts of 1,010 characters", "max_request_text_chars=500")),
    "16-bit image over the decode memory": (
        lambda s: s.EmbedImage(pb.EmbedImageRequest(images=[GOOD, png_bytes(Image.fromarray(
            np.zeros((95, 95), np.uint16)))]), timeout=30),
        ("images[1] is 95x95 I;16 and would take 27,075 bytes to decode", "max_image_decode_bytes")),
    "RGB image over the decode memory": (  # under the pixel limit: 6,400 pixels stored as 4 bytes each
        lambda s: s.EmbedImage(pb.EmbedImageRequest(images=[png_bytes(Image.new("RGB", (80, 80)))]), timeout=30),
        ("images[0] is 80x80 RGB and would take 25,600 bytes", "limit of 25,000 bytes")),
}


@pytest.mark.parametrize("case", sorted(BUDGET_CASES))
def test_request_over_a_budget_is_invalid_before_any_work(budget_stub, case: str) -> None:  # type: ignore[no-untyped-def]
    call, fragments = BUDGET_CASES[case]
    tokenised = PREPROCESS_ITEMS.labels("text", "ok")._value.get()
    expect(lambda: call(budget_stub), C.INVALID_ARGUMENT, *fragments)
    assert PREPROCESS_ITEMS.labels("text", "ok")._value.get() == tokenised  # nothing was tokenised
    still_serving(budget_stub)


def test_a_16_bit_image_within_the_decode_memory_is_embedded(budget_stub) -> None:  # type: ignore[no-untyped-def]
    grey = png_bytes(Image.fromarray(np.full((90, 90), 30000, np.uint16)))  # 8,100 x 3 = 24,300 bytes
    r = budget_stub.EmbedImage(pb.EmbedImageRequest(images=[grey]), timeout=30)
    assert matrix(r.embeddings).shape == (1, r.dim)


def _pixels(count: int, h: int, w: int, extra: int = 0) -> pb.Pixels:
    return pb.Pixels(count=count, height=h, width=w, data=bytes(count * h * w * 3 + extra))


PIXEL_CASES = {  # tiny_server: max_items_per_request 8, max_image_pixels 100 x 100
    "both": (pb.EmbedImageRequest(images=[GOOD], pixels=_pixels(1, 4, 4)), "both images", "send one of them"),
    "short data": (pb.EmbedImageRequest(pixels=_pixels(2, 4, 5, extra=-1)), "pixels.data has 119 bytes",
                   "2 x 4 x 5 x 3 = 120"),
    "long data": (pb.EmbedImageRequest(pixels=_pixels(1, 4, 5, extra=7)), "67 bytes", "= 60"),
    "no height": (pb.EmbedImageRequest(pixels=_pixels(1, 0, 5)), "pixels are 0 x 5"),
    "no images": (pb.EmbedImageRequest(pixels=_pixels(0, 4, 4)), "pixels.count is empty"),
    "too many": (pb.EmbedImageRequest(pixels=_pixels(9, 2, 2)), "pixels.count has 9 items"),
    "too large": (pb.EmbedImageRequest(pixels=_pixels(1, 101, 100)), "10,100 pixels", "max_image_pixels=10,000"),
}


@pytest.mark.parametrize("case", sorted(PIXEL_CASES))
def test_bad_raw_pixels_are_invalid_argument(stub, case: str) -> None:  # type: ignore[no-untyped-def]
    request, *fragments = PIXEL_CASES[case]
    expect(lambda: stub.EmbedImage(request, timeout=30), C.INVALID_ARGUMENT, *fragments)
    classify = pb.ClassifyRequest(labels=["red", "blue"])
    classify.images.extend(request.images)
    classify.pixels.CopyFrom(request.pixels)
    expect(lambda: stub.Classify(classify, timeout=30), C.INVALID_ARGUMENT, *fragments)
    still_serving(stub)


def test_an_answer_over_the_message_limit_is_refused_and_counted_as_such(tiny_repo) -> None:  # type: ignore[no-untyped-def]
    """A small Classify request can ask for an answer larger than max_message_bytes (images x labels x label
    length): RESOURCE_EXHAUSTED saying what to ask for instead, counted as that code, not OK; the server goes
    on serving."""
    from server.client import InvalidArgument, MessageTooLarge, TandemClient
    from server.metrics import REQUESTS

    server = start_server(tiny_repo, default_model="tiny-clip", max_message_bytes=8192)
    try:
        stub = pb_grpc.InferenceStub(server.channel())
        labels = [f"{i} " + "a long label " * 15 for i in range(8)]  # ~200 characters each
        request = pb.ClassifyRequest(images=[GOOD] * 8, labels=labels, top_k=8, templates=["{}"])
        assert request.ByteSize() < 8192 / 2
        ok, exhausted = (REQUESTS.labels("Classify", c)._value.get() for c in ("OK", "RESOURCE_EXHAUSTED"))
        expect(lambda: stub.Classify(request, timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED,
               "larger than max message size max_message_bytes=8,192", "smaller top_k")
        assert REQUESTS.labels("Classify", "OK")._value.get() == ok
        assert REQUESTS.labels("Classify", "RESOURCE_EXHAUSTED")._value.get() == exhausted + 1
        small = pb.ClassifyRequest(images=[GOOD] * 8, labels=labels, top_k=1, templates=["{}"])
        assert len(stub.Classify(small, timeout=30).results) == 8  # the same request asking for less is served
        with TandemClient(server.target) as client, pytest.raises(MessageTooLarge) as info:
            client.classify([GOOD] * 8, labels, top_k=8, templates=["{}"])
        assert isinstance(info.value, InvalidArgument) and not info.value.retryable
        still_serving(stub)
    finally:
        server.stop()


def test_a_models_own_queue_bounds_its_classify_prompts_up_front(tiny_repo) -> None:  # type: ignore[no-untyped-def]
    """The up-front check used the server-wide max_queue_rows: with a smaller one for the model, every such
    Classify was refused as overload (RESOURCE_EXHAUSTED, retryable) instead of as too large."""
    server = start_server(tiny_repo, default_model="tiny-clip", model_settings={"tiny-clip": {"max_queue_rows": 16}},
                          max_items_per_request=8)
    try:
        stub = pb_grpc.InferenceStub(server.channel())
        labels = [f"label {i}" for i in range(5)]  # x 4 default templates = 20 prompts > 16
        expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD], labels=labels), timeout=30),
               grpc.StatusCode.INVALID_ARGUMENT, "20 prompts", "max_queue_rows=16")
        assert len(stub.Classify(pb.ClassifyRequest(images=[GOOD], labels=labels[:4]), timeout=30).results) == 1
    finally:
        server.stop()


def test_messages_quoting_long_input_are_cut_not_lost(tiny_server) -> None:  # type: ignore[no-untyped-def]
    """A 100,000-character model name or metric was quoted whole in the status message: the client refused the
    trailers ("metadata size exceeds hard limit", RESOURCE_EXHAUSTED) and never saw the real error."""
    long = "m" * 100_000
    channel = tiny_server.channel()
    for call in (lambda: pb_grpc.InferenceStub(channel).EmbedText(pb.EmbedTextRequest(model=long, texts=["a"]),
                                                                   timeout=30),
                 lambda: pb_grpc.CollectionsStub(channel).CreateCollection(
                     pb.CreateCollectionRequest(name="x", metric=long), timeout=30)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert "(message cut: " in info.value.details() and len(info.value.details()) < 2200
