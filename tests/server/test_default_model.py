"""The shipped default model, served as `make serve` serves it.

A client that knows nothing of Tandem (no stubs, no .proto: only gRPC server
reflection) can embed texts and images and classify; and the model really
classifies the procedural shapes zero-shot.
"""

from __future__ import annotations

import grpc
import numpy as np
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from server.client import TandemClient
from tests.conftest import png_bytes
from training.data import procedural


class ReflectionClient:
    """Calls any method by its full name with messages built from reflected descriptors."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))

    def services(self) -> list[str]:
        return ProtoReflectionDescriptorDatabase(self.channel).get_services()

    def call(self, service: str, method: str, body: dict) -> dict:  # type: ignore[type-arg]
        m = self.pool.FindServiceByName(service).FindMethodByName(method)
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        rpc = self.channel.unary_unary(f"/{service}/{method}", request_serializer=request_cls.SerializeToString,
                                       response_deserializer=response_cls.FromString)
        return json_format.MessageToDict(rpc(json_format.ParseDict(body, request_cls()), timeout=60))


def test_reflection_only_client_embeds_and_classifies(default_server) -> None:  # type: ignore[no-untyped-def]
    import base64

    client = ReflectionClient(default_server.channel())
    assert {"tandem.v1.Inference", "tandem.v1.Models", "grpc.health.v1.Health"} <= set(client.services())

    texts = ["a small red circle", "a large blue square"]
    # JSON tools read vectors as numbers with float_list ...
    text = client.call("tandem.v1.Inference", "EmbedText", {"texts": texts, "floatList": True})
    assert text["model"] == {"name": "tandem-shapes", "version": "1"}
    m = text["embeddings"]
    assert "data" not in m and (m["rows"], m["dim"]) == (2, text["dim"])
    vectors = np.array(m["values"], np.float32).reshape(2, -1)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # ... and without it get the raw little-endian float32 matrix as base64: the same numbers.
    raw = client.call("tandem.v1.Inference", "EmbedText", {"texts": texts})["embeddings"]
    assert "values" not in raw
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(raw["data"]), "<f4").reshape(2, -1), vectors)

    img, spec = procedural.ShapesDataset("test", 1, seed=7)[0]
    b64 = base64.b64encode(png_bytes(img)).decode()
    image = client.call("tandem.v1.Inference", "EmbedImage", {"images": [b64], "floatList": True})
    assert len(image["embeddings"]["values"]) == text["dim"]

    labels = procedural.class_labels()
    result = client.call("tandem.v1.Inference", "Classify", {"images": [b64], "labels": labels, "topK": 3})
    top = result["results"][0]["top"]
    assert len(top) == 3 and top[0]["label"] == spec.label


def test_default_model_classifies_shapes_zero_shot(default_server) -> None:  # type: ignore[no-untyped-def]
    """Seen classes, all 56 labels as candidates, default prompt ensemble, over gRPC."""
    labels = procedural.class_labels()
    data = [(img, spec) for img, spec in procedural.ShapesDataset("test", 300, seed=123)
            if not procedural.is_held_out(spec.label)]
    with TandemClient(default_server.target) as c:
        correct = 0
        for start in range(0, len(data), 64):
            chunk = data[start : start + 64]
            results = c.classify([png_bytes(img) for img, _ in chunk], labels, top_k=1)
            correct += sum(r[0].label == spec.label for r, (_, spec) in zip(results, chunk))
    assert correct / len(data) >= 0.9


def test_red_circle_versus_blue_square(default_server) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse([12, 12, 52, 52], fill=(220, 30, 30))
    with TandemClient(default_server.target) as c:
        top = c.classify([png_bytes(img)], ["red circle", "blue square"])[0]
    assert top[0].label == "red circle" and top[0].probability > 0.9
