"""Python clients for a Tandem server, synchronous and asyncio.

    from server.client import TandemClient
    with TandemClient("127.0.0.1:50051") as c:
        vectors = c.embed_text(["a small red circle"]).embeddings   # numpy [1, dim]
        top = c.classify(["shape.png"], ["red circle", "blue square"])[0]

A server with TLS, client certificates (mTLS) or tokens (docs/security.md):

    TandemClient("tandem.internal:50051", tls_ca="ca.pem", tls_cert="client.pem", tls_key="client.key",
                 token=os.environ["TANDEM_TOKEN"])

`tls=True` alone checks the server against the system's root certificates; `tls_server_name` checks
its certificate against another name than the target's. The token goes with every call as
`authorization: Bearer <token>` metadata.

Images may be given as bytes or as paths to files. Embeddings arrive as
read-only numpy views of the response's raw buffer (no copy; `.copy()` for a
writable array); float16 on request (`dtype="float16"`).

A failed call raises a TandemError subclass, one per kind of failure, with
the status code and the server's message:

    InvalidArgument      INVALID_ARGUMENT, OUT_OF_RANGE: fix the request
    NotFound             NOT_FOUND: no such model (or collection)
    AlreadyExists        ALREADY_EXISTS
    FailedPrecondition   FAILED_PRECONDITION: the model cannot do this (e.g. text on an image-only model)
    Overloaded           RESOURCE_EXHAUSTED: queue full; retry with backoff
    Unavailable          UNAVAILABLE: server starting, stopping or unreachable; retry
    DeadlineExceeded     DEADLINE_EXCEEDED, CANCELLED
    Unauthorized         UNAUTHENTICATED, PERMISSION_DENIED
    ServerError          INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, ABORTED
    MessageTooLarge      (an InvalidArgument) RESOURCE_EXHAUSTED from gRPC's message size limit: split the request
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

import grpc
import numpy as np
from google.protobuf import json_format
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from .auth import is_loopback
from .wire import decode as decode_matrix
from .wire import encode as encode_matrix

__all__ = ["TandemClient", "AsyncTandemClient", "EmbedResult", "Label", "Hit", "ById", "GetResult", "decode_matrix",
           "TandemError",
           "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "Overloaded", "Unavailable",
           "DeadlineExceeded", "Unauthorized", "ServerError", "MessageTooLarge"]

ImageLike = Union[bytes, str, Path]
T = TypeVar("T")
Code = grpc.StatusCode
log = logging.getLogger("tandem.client")
DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}


class TandemError(Exception):
    """A call the server (or the channel) refused: `code` (grpc.StatusCode) and the server's `message`."""

    retryable = False

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class InvalidArgument(TandemError):
    """The request is wrong; the message names the offending field or item."""


class NotFound(TandemError):
    """No such model, version or collection."""


class AlreadyExists(TandemError):
    """The thing to create exists already."""


class FailedPrecondition(TandemError):
    """The request is well-formed but cannot run in this state (e.g. text on an image-only model)."""


class Overloaded(TandemError):
    """RESOURCE_EXHAUSTED: a queue is full. Retry with backoff."""

    retryable = True


class Unavailable(TandemError):
    """The server is loading, shutting down or unreachable. Retry."""

    retryable = True


class DeadlineExceeded(TandemError):
    """The call ran out of time (or was cancelled) before an answer."""

    retryable = True


class Unauthorized(TandemError):
    """UNAUTHENTICATED or PERMISSION_DENIED."""


class ServerError(TandemError):
    """The server failed (INTERNAL, UNIMPLEMENTED, ...); its log has the details."""


class MessageTooLarge(InvalidArgument):
    """RESOURCE_EXHAUSTED from gRPC itself: the message is over a size limit. Retrying cannot help; split it."""


_FAMILY: dict[grpc.StatusCode, type[TandemError]] = {
    Code.INVALID_ARGUMENT: InvalidArgument, Code.OUT_OF_RANGE: InvalidArgument,
    Code.NOT_FOUND: NotFound, Code.ALREADY_EXISTS: AlreadyExists,
    Code.FAILED_PRECONDITION: FailedPrecondition, Code.RESOURCE_EXHAUSTED: Overloaded,
    Code.UNAVAILABLE: Unavailable, Code.DEADLINE_EXCEEDED: DeadlineExceeded, Code.CANCELLED: DeadlineExceeded,
    Code.UNAUTHENTICATED: Unauthorized, Code.PERMISSION_DENIED: Unauthorized,
}


def error_from(e: grpc.RpcError) -> TandemError:
    """The TandemError subclass for a grpc.RpcError (grpc.aio's AioRpcError too)."""
    code, details = e.code(), e.details() or ""  # type: ignore[attr-defined]
    if code == Code.RESOURCE_EXHAUSTED and "larger than max" in details:
        return MessageTooLarge(code, details)
    return _FAMILY.get(code, ServerError)(code, details)


def _raises_tandem_errors(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as e:
            raise error_from(e) from None

    return wrapped


def _async_raises_tandem_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except grpc.RpcError as e:
            raise error_from(e) from None

    return wrapped


def _dtype(name: str) -> int:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _options(max_message_bytes: int, tls_server_name: str | None = None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes)]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options


@dataclass(frozen=True)
class _Access:
    """How a client reaches a server: TLS (on when `tls` or any file is given) and a bearer token."""

    tls: bool = False  # TLS with the system's root certificates (tls_ca replaces them)
    tls_ca: str | Path | None = None  # PEM CA that signed the server's certificate
    tls_cert: str | Path | None = None  # PEM client certificate, for servers that require one (mTLS)
    tls_key: str | Path | None = None  # its private key
    tls_server_name: str | None = None  # the name the server's certificate is checked against, if not the target's
    token: str | None = None  # sent as `authorization: Bearer <token>` with every call

    @property
    def secure(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_key)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a client certificate needs both tls_cert and tls_key (--tls-cert and --tls-key)")

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca), private_key=read(self.tls_key),
                                            certificate_chain=read(self.tls_cert))

    def metadata(self, target: str) -> tuple[tuple[str, str], ...]:
        if not self.token:
            return ()
        host = target.split("://")[-1].rsplit(":", 1)[0]
        if not self.secure and not is_loopback(host):
            log.warning("sending a token to %s without TLS: anyone on the network path can read it", target)
        return (("authorization", f"Bearer {self.token}"),)


@dataclass
class EmbedResult:
    embeddings: np.ndarray  # [n, dim] float32 (or float16), read-only view of the response buffer
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


def _images(images: Sequence[ImageLike] | np.ndarray) -> dict[str, Any]:
    """The image fields of a request: encoded files, or raw RGB pixels from a uint8 array [n, height, width, 3]
    (nothing for the server to decode)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"raw images must be a uint8 array [n, height, width, 3] (RGB), got {images.dtype} "
                             f"{list(images.shape)}")
        n, h, w, _ = images.shape
        return {"pixels": pb.Pixels(count=n, height=h, width=w, data=np.ascontiguousarray(images).tobytes())}
    if isinstance(images, (str, bytes, Path)):  # one image where a list is meant: bytes would be split in bytes
        raise TypeError(f"images must be a list of images (bytes or paths), got one {type(images).__name__}; "
                        "wrap it in a list: [image]")
    return {"images": [_bytes(i) for i in images]}


def _texts(texts: Sequence[str], what: str = "texts") -> list[str]:
    if isinstance(texts, (str, bytes)):  # a str is a sequence of one-character texts
        raise TypeError(f"{what} must be a list of strings, got one {type(texts).__name__}; wrap it in a list: "
                        f"[{what[:-1]}]")
    return list(texts)


def _plain(value: Any) -> Any:
    """Metadata with numpy scalars and arrays as Python numbers and lists (protobuf's Struct takes only those)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _result(r: pb.EmbedResponse) -> EmbedResult:
    return EmbedResult(decode_matrix(r.embeddings, "embeddings"), r.model.name, r.model.version, r.normalized,
                       list(r.truncated))


def _labels(r: pb.ClassifyResponse) -> list[list[Label]]:
    return [[Label(s.label, s.index, s.probability, s.cosine) for s in c.top] for c in r.results]


@dataclass
class _Requests:
    """Builds request messages for one (model, version)."""

    model: str
    version: str

    def text(self, texts: Sequence[str], normalize: bool, reject_truncated: bool, dtype: str
             ) -> pb.EmbedTextRequest:
        return pb.EmbedTextRequest(model=self.model, version=self.version, texts=_texts(texts),
                                   unnormalized=not normalize, reject_truncated=reject_truncated,
                                   dtype=_dtype(dtype))

    def image(self, images: Sequence[ImageLike] | np.ndarray, normalize: bool, dtype: str) -> pb.EmbedImageRequest:
        return pb.EmbedImageRequest(model=self.model, version=self.version, **_images(images),
                                    unnormalized=not normalize, dtype=_dtype(dtype))

    def classify(self, images: Sequence[ImageLike] | np.ndarray, labels: Sequence[str],
                 templates: Sequence[str] | None, top_k: int) -> pb.ClassifyRequest:
        return pb.ClassifyRequest(model=self.model, version=self.version, **_images(images),
                                  labels=_texts(labels, "labels"), templates=_texts(templates or [], "templates"),
                                  top_k=top_k)


# -- collections ------------------------------------------------------------------


@dataclass
class Hit:
    id: str
    score: float  # higher is better (cosine, inner product, or minus squared L2 distance)
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ById:
    """A query term that uses a stored item's vector: search(..., ById("item-7"))."""

    id: str


# A query: a text, an image (bytes or a path), a vector, ById(...), or a list of (weight, one of those) terms,
# e.g. [(1.0, "red circle"), (1.0, Path("example.png")), (-0.5, "blue")].
QueryLike = Union[str, bytes, Path, np.ndarray, ById, Sequence[tuple[float, Any]]]


def _term(thing: Any, weight: float = 1.0) -> pb.QueryTerm:
    if isinstance(thing, str):
        return pb.QueryTerm(weight=weight, text=thing)
    if isinstance(thing, (bytes, Path)):
        return pb.QueryTerm(weight=weight, image=_bytes(thing))
    if isinstance(thing, ById):
        return pb.QueryTerm(weight=weight, id=thing.id)
    if isinstance(thing, np.ndarray):
        return pb.QueryTerm(weight=weight, vector=encode_matrix(np.asarray(thing, np.float32).reshape(1, -1)))
    raise TypeError(f"a query term is a str (text), bytes or Path (image), numpy vector or ById, not {type(thing)}")


def _query(q: QueryLike) -> pb.Query:
    if isinstance(q, (list, tuple)):
        return pb.Query(terms=[_term(thing, float(weight)) for weight, thing in q])
    return pb.Query(terms=[_term(q)])


def _item(item: Mapping[str, Any]) -> pb.Item:
    """{"id": ..., one of "text" / "image" (bytes or Path) / "vector" (numpy), optional "metadata": {...}}."""
    unknown = set(item) - {"id", "text", "image", "vector", "metadata"}
    if unknown:
        raise ValueError(f"item {item.get('id')!r} has unknown keys {sorted(unknown)}")
    if len(contents := [k for k in ("text", "image", "vector") if k in item]) > 1:
        raise ValueError(f"item {item.get('id')!r} has {' and '.join(contents)}; give exactly one of text, image, "
                         "vector (the server embeds one thing an item)")
    out = pb.Item(id=item["id"])
    if "text" in item:
        out.text = item["text"]
    if "image" in item:
        out.image = _bytes(item["image"])
    if "vector" in item:
        out.vector.CopyFrom(encode_matrix(np.asarray(item["vector"], np.float32).reshape(1, -1)))
    if item.get("metadata"):
        try:
            out.metadata.update(_plain(item["metadata"]))
        except (ValueError, TypeError) as e:
            raise ValueError(f"item {item.get('id')!r}: metadata {item['metadata']!r} is not JSON-like: {e}; use "
                             "strings, numbers, booleans and lists of them") from None
    return out


def _search_request(collection: str, queries: Sequence[QueryLike], top_k: int, filter: str, exact: bool,
                    with_metadata: bool) -> pb.SearchRequest:
    return pb.SearchRequest(collection=collection, queries=[_query(q) for q in queries], top_k=top_k,
                            filter=filter, exact=exact, without_metadata=not with_metadata)


def _metadata(s: Any) -> dict[str, Any]:
    """A Struct as a dict, with integral numbers as ints: they were stored as integers (protobuf's Struct
    carries every number as a double)."""
    def plain(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
            return int(v)
        return [plain(x) for x in v] if isinstance(v, list) else v

    return {k: plain(v) for k, v in json_format.MessageToDict(s).items()}


def _hits(r: pb.SearchResponse) -> list[list[Hit]]:
    return [[Hit(h.id, h.score, _metadata(h.metadata)) for h in res.hits] for res in r.results]


@dataclass
class GetResult:
    items: dict[str, dict[str, Any]]  # id -> metadata, in request order
    vectors: np.ndarray | None  # [len(items), dim] with with_vectors
    missing: list[str]


def _got(r: pb.GetResponse, with_vectors: bool) -> GetResult:
    return GetResult({i.id: _metadata(i.metadata) for i in r.items},
                     decode_matrix(r.vectors, "vectors") if with_vectors else None, list(r.missing))


def _delete_request(collection: str, ids: Sequence[str] | None, filter: str) -> pb.DeleteRequest:
    return pb.DeleteRequest(collection=collection, ids=list(ids or []), filter=filter)


class TandemClient:
    """Blocking client. `model`/`version` empty = the server's default; TLS and token as in the module's doc."""

    def __init__(self, target: str = "127.0.0.1:50051", model: str = "", version: str = "",
                 timeout_s: float | None = 30.0, max_message_bytes: int = 64 << 20, *,
                 tls: bool = False, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, tls_server_name: str | None = None, token: str | None = None):
        access = _Access(tls, tls_ca, tls_cert, tls_key, tls_server_name, token)
        options = _options(max_message_bytes, tls_server_name)
        self.channel = (grpc.secure_channel(target, access.credentials(), options=options) if access.secure
                        else grpc.insecure_channel(target, options=options))
        self.metadata = access.metadata(target)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.models = pb_grpc.ModelsStub(self.channel)
        self.collections = pb_grpc.CollectionsStub(self.channel)
        self.req, self.timeout_s = _Requests(model, version), timeout_s

    @_raises_tandem_errors
    def embed_text(self, texts: Sequence[str], normalize: bool = True, reject_truncated: bool = False,
                   dtype: str = "float32") -> EmbedResult:
        return _result(self.inference.EmbedText(self.req.text(texts, normalize, reject_truncated, dtype),
                                                timeout=self.timeout_s, metadata=self.metadata))

    @_raises_tandem_errors
    def embed_image(self, images: Sequence[ImageLike] | np.ndarray, normalize: bool = True, dtype: str = "float32"
                    ) -> EmbedResult:
        """Embed image files (bytes or paths), or raw RGB pixels given as a uint8 array [n, height, width, 3]."""
        return _result(self.inference.EmbedImage(self.req.image(images, normalize, dtype), timeout=self.timeout_s, metadata=self.metadata))

    @_raises_tandem_errors
    def classify(self, images: Sequence[ImageLike] | np.ndarray, labels: Sequence[str],
                 templates: Sequence[str] | None = None, top_k: int = 5) -> list[list[Label]]:
        return _labels(self.inference.Classify(self.req.classify(images, labels, templates, top_k),
                                               timeout=self.timeout_s, metadata=self.metadata))

    @_raises_tandem_errors
    def list_models(self) -> pb.ListModelsResponse:
        return self.models.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s, metadata=self.metadata)

    @_raises_tandem_errors
    def get_model(self, model: str = "", version: str = "") -> pb.ModelInfo:
        return self.models.GetModel(pb.GetModelRequest(model=model, version=version), timeout=self.timeout_s, metadata=self.metadata)

    # -- collections ---------------------------------------------------------------
    @_raises_tandem_errors
    def create_collection(self, name: str, model: str = "", version: str = "", index_spec: str = "",
                          metric: str = "cosine") -> pb.CollectionInfo:
        return self.collections.CreateCollection(pb.CreateCollectionRequest(
            name=name, model=model, version=version, index_spec=index_spec, metric=metric), timeout=self.timeout_s, metadata=self.metadata)

    @_raises_tandem_errors
    def list_collections(self) -> list[pb.CollectionInfo]:
        return list(self.collections.ListCollections(pb.ListCollectionsRequest(), timeout=self.timeout_s, metadata=self.metadata).collections)

    @_raises_tandem_errors
    def get_collection(self, name: str) -> pb.CollectionInfo:
        return self.collections.GetCollection(pb.GetCollectionRequest(name=name), timeout=self.timeout_s, metadata=self.metadata)

    @_raises_tandem_errors
    def drop_collection(self, name: str) -> None:
        self.collections.DropCollection(pb.DropCollectionRequest(name=name), timeout=self.timeout_s, metadata=self.metadata)

    @_raises_tandem_errors
    def rebuild(self, name: str) -> pb.CollectionInfo:
        return self.collections.Rebuild(pb.RebuildRequest(name=name), timeout=self.timeout_s, metadata=self.metadata)

    @_raises_tandem_errors
    def upsert(self, collection: str, items: Sequence[Mapping[str, Any]]) -> pb.UpsertResponse:
        """Store items; check `.results[i].code` (0 = stored) for each, or `.upserted` for the count."""
        return self.collections.Upsert(pb.UpsertRequest(collection=collection, items=[_item(i) for i in items]),
                                       timeout=self.timeout_s, metadata=self.metadata)

    @_raises_tandem_errors
    def delete(self, collection: str, ids: Sequence[str] | None = None, filter: str = "") -> pb.DeleteResponse:
        return self.collections.Delete(_delete_request(collection, ids, filter), timeout=self.timeout_s, metadata=self.metadata)

    @_raises_tandem_errors
    def get(self, collection: str, ids: Sequence[str], with_vectors: bool = False) -> GetResult:
        return _got(self.collections.Get(pb.GetRequest(collection=collection, ids=list(ids),
                                                       with_vectors=with_vectors), timeout=self.timeout_s, metadata=self.metadata),
                    with_vectors)

    @_raises_tandem_errors
    def search(self, collection: str, *queries: QueryLike, top_k: int = 10, filter: str = "", exact: bool = False,
               with_metadata: bool = True) -> list[list[Hit]]:
        """One list of hits (best first) per query."""
        return _hits(self.collections.Search(_search_request(collection, queries, top_k, filter, exact,
                                                             with_metadata), timeout=self.timeout_s, metadata=self.metadata))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTandemClient:
    """asyncio client with the same methods as TandemClient, awaitable."""

    def __init__(self, target: str = "127.0.0.1:50051", model: str = "", version: str = "",
                 timeout_s: float | None = 30.0, max_message_bytes: int = 64 << 20, *,
                 tls: bool = False, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, tls_server_name: str | None = None, token: str | None = None):
        access = _Access(tls, tls_ca, tls_cert, tls_key, tls_server_name, token)
        options = _options(max_message_bytes, tls_server_name)
        self.channel = (grpc.aio.secure_channel(target, access.credentials(), options=options) if access.secure
                        else grpc.aio.insecure_channel(target, options=options))
        self.metadata = access.metadata(target)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.models = pb_grpc.ModelsStub(self.channel)
        self.collections = pb_grpc.CollectionsStub(self.channel)
        self.req, self.timeout_s = _Requests(model, version), timeout_s

    @_async_raises_tandem_errors
    async def embed_text(self, texts: Sequence[str], normalize: bool = True,
                         reject_truncated: bool = False, dtype: str = "float32") -> EmbedResult:
        return _result(await self.inference.EmbedText(self.req.text(texts, normalize, reject_truncated, dtype),
                                                      timeout=self.timeout_s, metadata=self.metadata))

    @_async_raises_tandem_errors
    async def embed_image(self, images: Sequence[ImageLike] | np.ndarray, normalize: bool = True,
                          dtype: str = "float32") -> EmbedResult:
        """Embed image files (bytes or paths), or raw RGB pixels given as a uint8 array [n, height, width, 3]."""
        return _result(await self.inference.EmbedImage(self.req.image(images, normalize, dtype),
                                                       timeout=self.timeout_s, metadata=self.metadata))

    @_async_raises_tandem_errors
    async def classify(self, images: Sequence[ImageLike] | np.ndarray, labels: Sequence[str],
                       templates: Sequence[str] | None = None, top_k: int = 5) -> list[list[Label]]:
        return _labels(await self.inference.Classify(self.req.classify(images, labels, templates, top_k),
                                                     timeout=self.timeout_s, metadata=self.metadata))

    @_async_raises_tandem_errors
    async def list_models(self) -> pb.ListModelsResponse:
        return await self.models.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s, metadata=self.metadata)

    @_async_raises_tandem_errors
    async def get_model(self, model: str = "", version: str = "") -> pb.ModelInfo:
        return await self.models.GetModel(pb.GetModelRequest(model=model, version=version), timeout=self.timeout_s, metadata=self.metadata)

    # -- collections ---------------------------------------------------------------
    @_async_raises_tandem_errors
    async def create_collection(self, name: str, model: str = "", version: str = "", index_spec: str = "",
                          metric: str = "cosine") -> pb.CollectionInfo:
        return await self.collections.CreateCollection(pb.CreateCollectionRequest(
            name=name, model=model, version=version, index_spec=index_spec, metric=metric), timeout=self.timeout_s, metadata=self.metadata)

    @_async_raises_tandem_errors
    async def list_collections(self) -> list[pb.CollectionInfo]:
        return list((await self.collections.ListCollections(pb.ListCollectionsRequest(), timeout=self.timeout_s, metadata=self.metadata)).collections)

    @_async_raises_tandem_errors
    async def get_collection(self, name: str) -> pb.CollectionInfo:
        return await self.collections.GetCollection(pb.GetCollectionRequest(name=name), timeout=self.timeout_s, metadata=self.metadata)

    @_async_raises_tandem_errors
    async def drop_collection(self, name: str) -> None:
        await self.collections.DropCollection(pb.DropCollectionRequest(name=name), timeout=self.timeout_s, metadata=self.metadata)

    @_async_raises_tandem_errors
    async def rebuild(self, name: str) -> pb.CollectionInfo:
        return await self.collections.Rebuild(pb.RebuildRequest(name=name), timeout=self.timeout_s, metadata=self.metadata)

    @_async_raises_tandem_errors
    async def upsert(self, collection: str, items: Sequence[Mapping[str, Any]]) -> pb.UpsertResponse:
        """Store items; check `.results[i].code` (0 = stored) for each, or `.upserted` for the count."""
        return await self.collections.Upsert(pb.UpsertRequest(collection=collection, items=[_item(i) for i in items]),
                                       timeout=self.timeout_s, metadata=self.metadata)

    @_async_raises_tandem_errors
    async def delete(self, collection: str, ids: Sequence[str] | None = None, filter: str = "") -> pb.DeleteResponse:
        return await self.collections.Delete(_delete_request(collection, ids, filter), timeout=self.timeout_s, metadata=self.metadata)

    @_async_raises_tandem_errors
    async def get(self, collection: str, ids: Sequence[str], with_vectors: bool = False) -> GetResult:
        return _got(await self.collections.Get(pb.GetRequest(collection=collection, ids=list(ids),
                                                       with_vectors=with_vectors), timeout=self.timeout_s, metadata=self.metadata),
                    with_vectors)

    @_async_raises_tandem_errors
    async def search(self, collection: str, *queries: QueryLike, top_k: int = 10, filter: str = "", exact: bool = False,
               with_metadata: bool = True) -> list[list[Hit]]:
        """One list of hits (best first) per query."""
        return _hits(await self.collections.Search(_search_request(collection, queries, top_k, filter, exact,
                                                             with_metadata), timeout=self.timeout_s, metadata=self.metadata))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
