"""Python clients for a Tandem server, synchronous and asyncio.

    from server.client import TandemClient
    with TandemClient("127.0.0.1:50051") as c:
        vectors = c.embed_text(["a small red circle"]).embeddings   # numpy [1, dim]
        top = c.classify(["shape.png"], ["red circle", "blue square"])[0]

Images may be given as bytes or as paths to files. Errors arrive as
grpc.RpcError with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import grpc
import numpy as np
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

ImageLike = Union[bytes, str, Path]
def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # float32 [n, dim]
    model: str
    version: str
    normalized: bool
    truncated: list[bool]


@dataclass
class Label:
    label: str
    index: int
    probability: float
    cosine: float


def _bytes(image: ImageLike) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _result(r: pb.EmbedResponse) -> EmbedResult:
    emb = np.array([e.values for e in r.embeddings], dtype=np.float32).reshape(len(r.embeddings), r.dim)
    return EmbedResult(emb, r.model.name, r.model.version, r.normalized, list(r.truncated))


def _labels(r: pb.ClassifyResponse) -> list[list[Label]]:
    return [[Label(s.label, s.index, s.probability, s.cosine) for s in c.top] for c in r.results]


@dataclass
class _Requests:
    """Builds request messages for one (model, version)."""

    model: str
    version: str

    def text(self, texts: Sequence[str], normalize: bool, reject_truncated: bool) -> pb.EmbedTextRequest:
        return pb.EmbedTextRequest(model=self.model, version=self.version, texts=list(texts),
                                   unnormalized=not normalize, reject_truncated=reject_truncated)

    def image(self, images: Sequence[ImageLike], normalize: bool) -> pb.EmbedImageRequest:
        return pb.EmbedImageRequest(model=self.model, version=self.version, images=[_bytes(i) for i in images],
                                    unnormalized=not normalize)

    def classify(self, images: Sequence[ImageLike], labels: Sequence[str], templates: Sequence[str] | None,
                 top_k: int) -> pb.ClassifyRequest:
        return pb.ClassifyRequest(model=self.model, version=self.version, images=[_bytes(i) for i in images],
                                  labels=list(labels), templates=list(templates or []), top_k=top_k)


class TandemClient:
    """Blocking client. `model`/`version` empty = the server's default."""

    def __init__(self, target: str = "127.0.0.1:50051", model: str = "", version: str = "",
                 timeout_s: float | None = 30.0, max_message_bytes: int = 64 << 20):
        self.channel = grpc.insecure_channel(target, options=_options(max_message_bytes))
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.models = pb_grpc.ModelsStub(self.channel)
        self.req, self.timeout_s = _Requests(model, version), timeout_s

    def embed_text(self, texts: Sequence[str], normalize: bool = True, reject_truncated: bool = False) -> EmbedResult:
        return _result(self.inference.EmbedText(self.req.text(texts, normalize, reject_truncated),
                                                timeout=self.timeout_s))

    def embed_image(self, images: Sequence[ImageLike], normalize: bool = True) -> EmbedResult:
        return _result(self.inference.EmbedImage(self.req.image(images, normalize), timeout=self.timeout_s))

    def classify(self, images: Sequence[ImageLike], labels: Sequence[str], templates: Sequence[str] | None = None,
                 top_k: int = 5) -> list[list[Label]]:
        return _labels(self.inference.Classify(self.req.classify(images, labels, templates, top_k),
                                               timeout=self.timeout_s))

    def list_models(self) -> pb.ListModelsResponse:
        return self.models.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s)

    def get_model(self, model: str = "", version: str = "") -> pb.ModelInfo:
        return self.models.GetModel(pb.GetModelRequest(model=model, version=version), timeout=self.timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTandemClient:
    """asyncio client with the same methods as TandemClient, awaitable."""

    def __init__(self, target: str = "127.0.0.1:50051", model: str = "", version: str = "",
                 timeout_s: float | None = 30.0, max_message_bytes: int = 64 << 20):
        self.channel = grpc.aio.insecure_channel(target, options=_options(max_message_bytes))
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.models = pb_grpc.ModelsStub(self.channel)
        self.req, self.timeout_s = _Requests(model, version), timeout_s

    async def embed_text(self, texts: Sequence[str], normalize: bool = True,
                         reject_truncated: bool = False) -> EmbedResult:
        return _result(await self.inference.EmbedText(self.req.text(texts, normalize, reject_truncated),
                                                      timeout=self.timeout_s))

    async def embed_image(self, images: Sequence[ImageLike], normalize: bool = True) -> EmbedResult:
        return _result(await self.inference.EmbedImage(self.req.image(images, normalize), timeout=self.timeout_s))

    async def classify(self, images: Sequence[ImageLike], labels: Sequence[str],
                       templates: Sequence[str] | None = None, top_k: int = 5) -> list[list[Label]]:
        return _labels(await self.inference.Classify(self.req.classify(images, labels, templates, top_k),
                                                     timeout=self.timeout_s))

    async def list_models(self) -> pb.ListModelsResponse:
        return await self.models.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s)

    async def get_model(self, model: str = "", version: str = "") -> pb.ModelInfo:
        return await self.models.GetModel(pb.GetModelRequest(model=model, version=version), timeout=self.timeout_s)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
