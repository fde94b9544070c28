"""gRPC handlers for tandem.v1: validate, admit, preprocess off the event loop, batch, answer.

Every budget is checked before work starts: items, characters and prompts per request from the request itself,
then the items in flight (server/admission.py); image memory from each image's header before it is decoded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from bundle import zero_shot
from bundle.image import ImageInputError, preprocess, preprocess_pixels, sniff

from . import metrics, wire
from .admission import ADMISSION_REJECTED, PREPROCESS_ITEMS, Admission, QueueTimeout
from .config import ServerConfig
from .errors import ApiError, failed_precondition, invalid, rpc
from .registry import READY, Entry, LoadedModel, Registry


def _ref(m: LoadedModel) -> pb.ModelRef:
    return pb.ModelRef(name=m.name, version=m.version)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_vector_format(request: pb.EmbedTextRequest | pb.EmbedImageRequest) -> None:
    """Refuse an unusable dtype / float_list before any work is done."""
    if request.dtype not in wire.DTYPES:
        raise invalid(f"dtype {request.dtype} is unknown; use DTYPE_FLOAT32 (default) or DTYPE_FLOAT16")
    if request.float_list and request.dtype != pb.DTYPE_FLOAT32:
        raise invalid("float_list answers float32 numbers; leave dtype unset with float_list")


def _matrix(x: np.ndarray, request: pb.EmbedTextRequest | pb.EmbedImageRequest) -> pb.Matrix:
    try:
        return wire.encode(x, request.dtype, request.float_list)
    except wire.MatrixError as e:
        raise invalid(str(e)) from None


def check_labels(labels: list[str], templates: list[str], config: ServerConfig, defaults: bool = False) -> None:
    """Labels and templates within their limits, and the prompts they make within the text budgets, counted
    without building a prompt: a 54 KB request could otherwise make a 100-million-character prompt list.
    `defaults`: the templates are the server's (the request sent none), which messages must not call the
    request's."""
    if not labels:
        raise invalid("labels is empty; send at least one candidate label, e.g. ['dog', 'cat']")
    if len(labels) > config.max_labels:
        raise invalid(f"labels has {len(labels)} entries, more than max_labels={config.max_labels}")
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in seen:
            raise invalid(f"labels[{i}] {label!r} repeats labels[{seen[label]}]; labels must be unique")
        seen[label] = i
    if len(templates) > config.max_templates and not defaults:  # the limits on templates are for the client's
        raise invalid(f"templates has {len(templates)} entries, more than max_templates={config.max_templates}")
    slots = []
    for i, t in enumerate(templates):
        if defaults:
            slots.append(t.count("{}"))
            continue
        if len(t) > config.max_template_chars:
            raise invalid(f"templates[{i}] has {len(t)} characters, more than "
                          f"max_template_chars={config.max_template_chars}")
        slots.append(t.count("{}"))
        if slots[-1] == 0:
            raise invalid(f"templates[{i}] {t!r} has no '{{}}' where the label goes, e.g. 'a photo of a {{}}.'")
        if slots[-1] > config.max_template_slots:
            raise invalid(f"templates[{i}] has {slots[-1]} '{{}}' label slots, more than "
                          f"max_template_slots={config.max_template_slots}")
    prompts = len(labels) * len(templates)
    # The prompts are texts of one request: the queue, the in-flight budget and preprocessing must all hold them.
    limit, name = min((config.max_queue_rows, "max_queue_rows"), (config.max_inflight_items, "max_inflight_items"),
                      (config.max_preprocess_items, "max_preprocess_items"))
    if prompts > limit:
        raise invalid(
            f"{len(labels)} labels x {len(templates)} templates = {prompts} prompts, more "
            f"than the server takes in one request ({name}={limit}); send fewer of either"
        )
    # A prompt is its template with each '{}' (2 characters) replaced by the label.
    longest_at = max(range(len(labels)), key=lambda j: len(labels[j]))
    longest_label = len(labels[longest_at])
    for i, (t, k) in enumerate(zip(templates, slots)):
        if (longest := len(t) - 2 * k + k * longest_label) > config.max_text_chars:
            which = f"the default template {t!r}" if defaults else f"templates[{i}]"
            raise invalid(f"labels[{longest_at}] ({longest_label} "
                          f"characters) in {which} makes a prompt of {longest} characters, more than "
                          f"max_text_chars={config.max_text_chars}; send shorter labels"
                          + ("" if defaults else " or fewer '{}' per template"))
    total = len(labels) * sum(len(t) - 2 * k for t, k in zip(templates, slots)) + sum(slots) * sum(map(len, labels))
    if total > config.max_request_text_chars:
        raise invalid(f"{len(labels)} labels x {len(templates)} templates make {prompts} prompts of {total:,} "
                      f"characters in all, more than max_request_text_chars={config.max_request_text_chars:,}; "
                      "send fewer or shorter labels or templates")


# Texts of a request with at most this many characters in all are tokenised on the event loop (~15 us for a
# short caption) instead of in a preprocessing thread.
INLINE_TOKENIZE_CHARS = 256


class Inference(pb_grpc.InferenceServicer):
    def __init__(self, registry: Registry, config: ServerConfig):
        self.registry, self.config = registry, config
        self.admission = Admission(config.max_inflight_items, config.max_preprocess_items, config.queue_timeout_ms)

    # -- validation ------------------------------------------------------------
    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise invalid(f"{what} is empty; send at least one item")
        if n > self.config.max_items_per_request:
            raise invalid(
                f"{what} has {n} items, more than max_items_per_request={self.config.max_items_per_request}; "
                "split the request"
            )

    def _check_texts(self, texts: list[str], what: str) -> None:
        for i, text in enumerate(texts):
            if not text.strip():
                raise invalid(f"{what}[{i}] is empty; send non-blank text")
            if len(text) > self.config.max_text_chars:
                raise invalid(
                    f"{what}[{i}] has {len(text)} characters, more than max_text_chars={self.config.max_text_chars}"
                )
        if (total := sum(map(len, texts))) > self.config.max_request_text_chars:
            raise invalid(f"{what} have {total:,} characters in all, more than max_request_text_chars="
                          f"{self.config.max_request_text_chars:,}; split the request")

    # -- shared steps ----------------------------------------------------------
    async def _run_items(self, m: LoadedModel, tower: str, fn: Callable[[int], Any], n: int, fail_fast: bool,
                         items: int | None = None, started: bool = False) -> list[Any]:
        """fn(0..n-1) in the preprocessing threads, after admission of `items` (default n) images or texts
        (RESOURCE_EXHAUSTED at once when full).

        fn returns a value or an ApiError for a bad item. With fail_fast, the first bad item ends the call:
        items not started never start, and items running finish (Pillow cannot be interrupted) unanswered.
        The same holds when the caller is cancelled (client gone, deadline passed): nothing is left queued.
        With queue_timeout_ms, a request none of whose items has started by then is refused at that moment
        (`started`: a later part of a request whose first part ran, never timed out).
        """
        loop = asyncio.get_running_loop()
        with self.admission.preprocess(m.name, tower, n if items is None else items, started) as work:

            def one(i: int) -> Any:
                if not work.may_start(tower):
                    return None
                out = fn(i)
                if fail_fast and isinstance(out, ApiError):
                    work.stop.set()  # the request's next items are skipped even before the event loop knows
                return out

            # Futures of the pool itself: their cancel() says whether the item had started.
            submitted = [self.registry.preprocess_pool.submit(one, i) for i in range(n)]
            futures = [asyncio.wrap_future(f, loop=loop) for f in submitted]

            def expire() -> None:
                if work.expire():
                    for f in submitted:  # the ones not started: their asyncio futures end as cancelled
                        f.cancel()

            timer = loop.call_later(work.timeout_s, expire) if work.timeout_s and not work.started else None
            try:
                for next_done in asyncio.as_completed(futures):
                    out = await next_done
                    if fail_fast and isinstance(out, ApiError):
                        raise out
                return [f.result() for f in futures]
            except (QueueTimeout, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) and not work.expired:
                    raise  # the caller was cancelled (client gone, deadline passed)
                ADMISSION_REJECTED.labels(m.name, tower, "queue_timeout").inc()
                raise work.timeout_error() from None
            finally:
                if timer is not None:
                    timer.cancel()
                work.stop.set()
                cancelled = sum(f.cancel() for f in submitted)
                if work.expired:  # one item counts as expired, as a thread would have counted it
                    PREPROCESS_ITEMS.labels(tower, "expired").inc()
                    cancelled -= 1
                if cancelled > 0:
                    PREPROCESS_ITEMS.labels(tower, "cancelled").inc(cancelled)

    async def embed_texts(self, m: LoadedModel, texts: list[str], reject_truncated: bool = False
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(raw embeddings [n, dim], truncated flags [n])."""
        if m.text is None or m.tokenizer is None:
            raise failed_precondition(
                f"model {m.name}/{m.version} is image-only (kind {m.bundle.manifest.kind!r}); "
                "it cannot embed text. Use a CLIP model for text and zero-shot classification"
            )
        tokenizer, stage = m.tokenizer, metrics.STAGE_SECONDS.labels("tokenize", m.name, "text")

        def tokenize(_: int) -> tuple[np.ndarray, np.ndarray]:
            started = time.perf_counter()
            out = tokenizer.encode_batch(texts)
            stage.observe(time.perf_counter() - started)
            PREPROCESS_ITEMS.labels("text", "ok").inc()
            return out

        with self.admission.admit(m.name, m.version, "text", len(texts)):
            if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:
                ids, truncated = tokenize(0)  # tens of microseconds: less than the hop to a thread and back
            else:
                [(ids, truncated)] = await self._run_items(m, "text", tokenize, 1, fail_fast=True, items=len(texts))
            if reject_truncated and truncated.any():
                over = np.flatnonzero(truncated)
                where = ", ".join(f"texts[{i}]" for i in over[:10]) + (" ..." if len(over) > 10 else "")
                raise invalid(
                    f"{where} {'exceeds' if len(over) == 1 else 'exceed'} the model's context length of {m.tokenizer.context_length} tokens "
                    "and reject_truncated is set; shorten them or allow truncation"
                )
            return await m.text.submit(ids), truncated

    async def preprocess_images(self, m: LoadedModel, images: Sequence[bytes] | np.ndarray, labels: Sequence[str],
                                fail_fast: bool = False) -> list[np.ndarray | ApiError]:
        """Each image's input tensor, or the INVALID_ARGUMENT error naming it by its label (decoded in parallel).
        `images`: encoded files, or raw RGB pixels (uint8 [n, height, width, 3], see _image_inputs).

        With fail_fast, the first bad image raises its error and the images not yet started are not decoded.
        """
        spec, limit, max_bytes = m.bundle.manifest.image, self.config.max_image_pixels, self.config.max_image_decode_bytes
        stage = {s: metrics.STAGE_SECONDS.labels(s, m.name, "image") for s in ("decode", "preprocess")}
        raw = isinstance(images, np.ndarray)
        done: list[np.ndarray | ApiError | None] = [None] * len(images)
        under_way = False  # a first part of the request ran: the queue timeout no longer applies
        if m.torch_images is not None and not raw and len(images):
            # One preprocessing-thread call decodes and resizes the JPEGs torchvision takes, together (one nvJPEG
            # batch on CUDA); Pillow takes the rest below, image by image in parallel, and words the errors.
            def batch(_: int) -> list[np.ndarray | None]:
                out, seconds = m.torch_images.batch(images, limit, max_bytes)
                if taken := sum(x is not None for x in out):
                    PREPROCESS_ITEMS.labels("image", "ok").inc(taken)
                    for _ in range(taken):
                        stage["decode"].observe(seconds / taken)  # decode and resize together, a share each
                return out

            [done] = await self._run_items(m, "image", batch, 1, fail_fast, items=len(images))  # type: ignore[misc]
            under_way = True

        def one(i: int) -> np.ndarray | ApiError:
            seconds: dict[str, float] = {}
            try:
                if raw:
                    tensor = preprocess_pixels(images[i], spec, seconds)
                else:
                    tensor = preprocess(images[i], spec, limit, seconds, max_decode_bytes=max_bytes)  # type: ignore[arg-type]
            except ImageInputError as e:
                PREPROCESS_ITEMS.labels("image", "invalid").inc()
                return invalid(f"{labels[i]} {e}")
            PREPROCESS_ITEMS.labels("image", "ok").inc()
            for name, s in seconds.items():
                stage[name].observe(s)
            return tensor

        rest = [i for i, x in enumerate(done) if x is None]
        if len(rest) == len(images):
            return await self._run_items(m, "image", one, len(images), fail_fast, started=under_way)
        if not rest:
            return done  # type: ignore[return-value]
        for i, x in zip(rest, await self._run_items(m, "image", lambda j: one(rest[j]), len(rest), fail_fast,
                                                    started=under_way)):
            done[i] = x
        return done  # type: ignore[return-value]

    def _image_inputs(self, request: pb.EmbedImageRequest | pb.ClassifyRequest) -> list[bytes] | np.ndarray:
        """The request's encoded images, or its raw pixels as uint8 [count, height, width, 3] (checked)."""
        if not request.HasField("pixels"):
            images = list(request.images)
            self._check_count(len(images), "images")
            for i, data in enumerate(images):  # empty and non-image items fail the request before any decoding
                if (why := sniff(data)) is not None:
                    raise invalid(f"images[{i}] {why}")
            return images
        if request.images:
            raise invalid("the request sets both images (encoded files) and pixels (raw RGB); send one of them")
        p = request.pixels
        self._check_count(p.count, "pixels.count")
        if p.height == 0 or p.width == 0:
            raise invalid(f"pixels are {p.height} x {p.width}: set pixels.height and pixels.width (at least 1)")
        if p.height * p.width > self.config.max_image_pixels:
            raise invalid(f"pixels are {p.height} x {p.width} = {p.height * p.width:,} pixels an image, more than "
                          f"max_image_pixels={self.config.max_image_pixels:,}")
        want = p.count * p.height * p.width * 3
        if len(p.data) != want:
            raise invalid(f"pixels.data has {len(p.data):,} bytes; count x height x width x 3 = {p.count} x {p.height} x "
                          f"{p.width} x 3 = {want:,} (8-bit RGB, numpy uint8 [count, height, width, 3] in C order)")
        return np.frombuffer(p.data, np.uint8).reshape(p.count, p.height, p.width, 3)

    async def embed_images(self, m: LoadedModel, images: list[bytes] | np.ndarray, what: str = "images"
                           ) -> np.ndarray:
        what = "pixels" if isinstance(images, np.ndarray) else what
        with self.admission.admit(m.name, m.version, "image", len(images)):
            tensors = await self.preprocess_images(m, images, [f"{what}[{i}]" for i in range(len(images))],
                                                   fail_fast=True)
            return await m.image.submit(np.stack(tensors))  # type: ignore[arg-type]

    # -- handlers --------------------------------------------------------------
    @rpc("EmbedText")
    async def EmbedText(self, request: pb.EmbedTextRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        m = self.registry.get(request.model, request.version)
        texts = list(request.texts)
        metrics.ITEMS.labels("EmbedText").inc(len(texts))
        self._check_count(len(texts), "texts")
        self._check_texts(texts, "texts")
        _check_vector_format(request)
        out, truncated = await self.embed_texts(m, texts, request.reject_truncated)
        if not request.unnormalized:
            out = l2_normalize(out)
        return pb.EmbedResponse(model=_ref(m), dim=out.shape[1], embeddings=_matrix(out, request),
                                normalized=not request.unnormalized, truncated=truncated.tolist())

    @rpc("EmbedImage")
    async def EmbedImage(self, request: pb.EmbedImageRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        m = self.registry.get(request.model, request.version)
        images = self._image_inputs(request)
        metrics.ITEMS.labels("EmbedImage").inc(len(images))
        _check_vector_format(request)
        out = await self.embed_images(m, images)
        if not request.unnormalized:
            out = l2_normalize(out)
        return pb.EmbedResponse(model=_ref(m), dim=out.shape[1], embeddings=_matrix(out, request),
                                normalized=not request.unnormalized)

    @rpc("Classify")
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        m = self.registry.get(request.model, request.version)
        if m.text is None:
            raise failed_precondition(
                f"model {m.name}/{m.version} is image-only (kind {m.bundle.manifest.kind!r}): zero-shot "
                "classification needs a text tower. Use a CLIP model, or embed images and search instead"
            )
        images, labels = self._image_inputs(request), list(request.labels)
        templates = list(request.templates) or list(zero_shot.DEFAULT_TEMPLATES)
        metrics.ITEMS.labels("Classify").inc(len(images))
        self._check_texts(labels, "labels")
        check_labels(labels, templates, self.config.for_model(m.name), defaults=not request.templates)
        key = (tuple(labels), tuple(templates))
        label_emb = m.labels.get(key)
        metrics.ZERO_SHOT_CACHE.labels("hit" if label_emb is not None else "miss").inc()
        if label_emb is None:
            prompts = zero_shot.prompts(labels, templates)
            text_out, _ = await self.embed_texts(m, prompts)
            label_emb = zero_shot.label_embeddings(text_out, len(labels), len(templates))
            m.labels.put(key, label_emb)
        image_emb = l2_normalize(await self.embed_images(m, images))
        top_k = min(request.top_k or 5, len(labels))
        results = zero_shot.classify(image_emb, label_emb, m.bundle.manifest.logit_scale, top_k)
        return pb.ClassifyResponse(
            model=_ref(m),
            results=[
                pb.Classification(top=[pb.LabelScore(label=labels[j], index=j, probability=p, cosine=c)
                                       for j, p, c in row])
                for row in results
            ],
        )


class Models(pb_grpc.ModelsServicer):
    """What the model repository holds and in which state; LoadModel and UnloadModel (scope admin)."""

    def __init__(self, registry: Registry):
        self.registry, self.config = registry, registry.config

    def info(self, m: LoadedModel) -> pb.ModelInfo:
        man = m.bundle.manifest
        entry = self.registry.entry(m.name, m.version)
        return pb.ModelInfo(
            model=_ref(m), kind=man.kind, dim=man.dim, image_size=man.image.size,
            context_length=man.text.context_length if man.text else 0, logit_scale=man.logit_scale,
            precision=m.precision, architecture=man.architecture,
            source=self.source(man.source, self.registry.config.reveal_source_paths),
            parity_min_cosine=float(man.parity.get("min_cosine", 0.0)),
            towers=["image", "text"] if man.text else ["image"], execution_provider=m.provider,
            status=pb.MODEL_STATUS_READY, reason=entry.reason if entry else "",
        )

    def entry_info(self, e: Entry, m: LoadedModel | None) -> pb.ModelInfo:
        if m is not None:
            return self.info(m)
        return pb.ModelInfo(model=pb.ModelRef(name=e.name, version=e.version),
                            status=pb.ModelStatus.Value(f"MODEL_STATUS_{e.status}"), reason=e.reason)

    @staticmethod
    def source(source: dict[str, Any], reveal_paths: bool) -> str:
        """Where a bundle's weights came from, without local paths unless the operator allows them."""
        checkpoint, digest = source.get("checkpoint"), source.get("checkpoint_sha256")
        if checkpoint and reveal_paths:
            return str(checkpoint)
        if digest:
            return f"checkpoint sha256:{str(digest)[:12]}"
        return str(source.get("weights") or "")

    @rpc("ListModels")
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        default = self.registry.default
        return pb.ListModelsResponse(
            models=[self.entry_info(e, m) for e, m in self.registry.listing()],
            default_model=pb.ModelRef(name=default[0], version=default[1]) if default else None,
        )

    @rpc("GetModel")
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            return self.info(self.registry.get(request.model, request.version))
        except ApiError:
            entry = self.registry.entry(request.model, request.version) if request.model else None
            if entry is None:
                raise
            return self.entry_info(entry, None)

    @staticmethod
    def _check_ref(model: str, what: str) -> None:
        if not model:
            raise invalid(f"{what} needs `model`, the bundle's folder name in the model repository "
                          "(ListModels lists them); `version` may be empty for every version")

    @rpc("LoadModel")
    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
                        ) -> pb.LoadModelResponse:
        self._check_ref(request.model, "LoadModel")
        entries = await self.registry.load(request.model, request.version)
        if failed := [e for e in entries if e.status != READY or e.reason]:
            raise failed_precondition("; ".join(f"{e.name}/{e.version}: {e.reason}" for e in failed))
        return pb.LoadModelResponse(models=[self.info(self.registry.models[e.name][e.version]) for e in entries])

    @rpc("UnloadModel")
    async def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
                          ) -> pb.UnloadModelResponse:
        self._check_ref(request.model, "UnloadModel")
        unloaded = await self.registry.unload(request.model, request.version)
        return pb.UnloadModelResponse(unloaded=[_ref(m) for m in unloaded])

