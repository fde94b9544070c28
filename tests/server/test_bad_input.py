"""Every kind of bad input gets a precise status and a message naming the item,
and the server keeps answering good requests afterwards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from PIL import Image
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from server.wire import decode as matrix
from tests.conftest import png_bytes

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


def test_more_prompts_than_the_queue_holds_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    templates = [f"{{}} {i}" for i in range(820)]  # 5 labels x 820 templates = 4100 > max_queue_rows 4096
    expect(lambda: stub.Classify(pb.ClassifyRequest(images=[GOOD], labels=list("abcde"), templates=templates),
                                 timeout=30),
           C.INVALID_ARGUMENT, "4100 prompts", "max_queue_rows=4096")


def test_unknown_dtype_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedText(pb.EmbedTextRequest(texts=["ok"], dtype=7), timeout=30),
           C.INVALID_ARGUMENT, "dtype 7 is unknown", "DTYPE_FLOAT16")


def test_float_list_with_float16_is_invalid(stub) -> None:  # type: ignore[no-untyped-def]
    expect(lambda: stub.EmbedImage(pb.EmbedImageRequest(images=[GOOD], dtype=pb.DTYPE_FLOAT16, float_list=True),
                                   timeout=30),
           C.INVALID_ARGUMENT, "float_list answers float32")
    still_serving(stub)
