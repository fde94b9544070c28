"""gRPC handlers for tandem.v1.Collections: validate, embed with the bound model, store durably, search.

Texts and images (in items and queries) go through the same inference
batchers as the Inference service. Unfiltered searches from many clients are
batched into one FAISS call per (collection, k) with the same Batcher.
Filtered and exact searches run on their own (their candidate sets differ).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np
from google.protobuf import json_format, struct_pb2
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from index.backend import CollectionBackend as Collection
from index.backend import IndexBusy
from index.collection import CollectionError, Spec
from index.filters import FilterError, compile_filter
from index.manager import CollectionExists, CollectionNotFound, Collections
from index.metadata import MetadataError, canonical_json
from index.metadata import loads as metadata_loads
from index.store import Put, StoreClosed, StoreFull

from . import hitwire, metrics, wire
from .batcher import Batcher
from .config import ServerConfig
from .errors import ApiError, Code, alone, failed_precondition, invalid, not_found, rpc
from .registry import LoadedModel, Registry
from .service import Inference

log = logging.getLogger("tandem.collections")

MAX_ID_CHARS = 256
MAX_NORM = 1e15  # longest vector or weighted query accepted: float32 squares overflow past ~1.8e19
# A search that is the only request in flight runs on the event loop, without the thread hop (~0.1 ms, more than
# an IVF search), when the collection's recent searches took less than this; others queue for the batcher.
INLINE_SEARCH_MAX_S = 0.002
INLINE_UPSERT_ITEMS = 16  # an Upsert of up to this many items is checked on the event loop, without a thread hop
ENTRY_OVERHEAD = 320  # bytes a cache entry costs besides its data (OrderedDict node, (collection, rowid) key, tuple, bytes headers; tracemalloc)


def _ref(m: LoadedModel) -> pb.ModelRef:
    return pb.ModelRef(name=m.name, version=m.version)


@functools.lru_cache(maxsize=256)
def _ref_bytes(name: str, version: str) -> bytes:
    return pb.ModelRef(name=name, version=version).SerializeToString()


def observe(c: Collection | None, name: str = "") -> None:
    """Export a collection's gauges (items stored; where and with which index it searches: read at scrape
    time), or stop exporting them (None)."""
    if c is None:
        metrics.COLLECTIONS.collections.pop(name, None)
    else:
        metrics.COLLECTIONS.collections[c.spec.name] = c


class HitCache:
    """(collection, rowid) -> a hit's fixed parts, the item's id and metadata fields encoded for the wire
    (server/hitwire.py), for the items written or found since the start, of every collection of the server: one
    budget in bytes (hit_cache_bytes), least recently used out first. A collection is a number from `tag()`, never
    reused, so a dropped collection's entries are never read again; `forget` frees them. A rowid's id and metadata
    never change (an upsert of the same id gets a new rowid, and rowids are never reused), so entries never go
    stale. A hit found here costs no SQLite lookup (10 hits: 40-50 us) and no metadata encoding."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._entries: OrderedDict[tuple[int, int], tuple[bytes, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._tags = itertools.count()

    def tag(self) -> int:
        """A new collection's number."""
        return next(self._tags)

    def lookup(self, tag: int, rowids: Sequence[int]) -> dict[int, tuple[bytes, bytes]]:
        """The cached entries among collection `tag`'s `rowids`, by rowid (marked recently used)."""
        found = {}
        with self._lock:
            for r in rowids:
                entry = self._entries.get((tag, r))
                if entry is not None:
                    self._entries.move_to_end((tag, r))
                    found[r] = entry
        return found

    @staticmethod
    def _entry(item_id: str, metadata_json: str) -> tuple[bytes, bytes]:
        return hitwire.item_fields(item_id, metadata_loads(metadata_json))

    def add(self, tag: int, rowid: int, item_id: str, metadata_json: str) -> tuple[bytes, bytes]:
        entry = self._entry(item_id, metadata_json)
        self._keep([((tag, rowid), entry)])
        return entry

    def written(self, tag: int, rowids: Sequence[int], puts: Sequence[Put], removed: Sequence[int]) -> None:
        """After a committed write to collection `tag`: its items go in (searches soon after find them here, not
        in SQLite), the rowids it deleted or replaced go out (they are never hits again)."""
        entries = [((tag, r), self._entry(p.id, p.metadata)) for r, p in zip(rowids, puts)]
        with self._lock:
            for r in removed:
                if (old := self._entries.pop((tag, r), None)) is not None:
                    self.bytes -= _entry_bytes(old)
        self._keep(entries)

    def warm(self, tag: int, c: Collection, share: int, page: int = 1000) -> tuple[int, int]:
        """Fill the cache with collection `tag`'s newest items back, while they fit in `share` bytes and in the
        whole budget (after a restart, so that the first searches need not read SQLite hit by hit). Returns the
        items and bytes added."""
        added, used, before = 0, 0, 2**63 - 1
        while rows := c.newest(before, page):
            entries = [((tag, r), self._entry(item_id, meta)) for r, item_id, meta in rows]
            size = sum(_entry_bytes(e) for _, e in entries)
            if used + size > share or self.bytes + size > self.max_bytes:
                break  # full: evicting would only throw out what warming just put in
            self._keep(entries)
            added, used, before = added + len(entries), used + size, rows[-1][0]
            time.sleep(0)  # let the event loop have the GIL between pages
        return added, used

    def forget(self, tag: int, chunk: int = 10_000) -> int:
        """Free collection `tag`'s entries (a dropped collection). The keys are copied under the lock in one C
        call and removed a chunk at a time, so searches wait for one chunk at most. Returns the entries freed."""
        with self._lock:
            keys = list(self._entries)
        mine = [k for k in keys if k[0] == tag]
        for i in range(0, len(mine), chunk):
            with self._lock:
                for key in mine[i : i + chunk]:
                    if (old := self._entries.pop(key, None)) is not None:
                        self.bytes -= _entry_bytes(old)
        return len(mine)

    def _keep(self, entries: Sequence[tuple[tuple[int, int], tuple[bytes, bytes]]]) -> None:
        with self._lock:
            for key, entry in entries:
                if key not in self._entries:
                    self._entries[key] = entry
                    self.bytes += _entry_bytes(entry)
            while self.bytes > self.max_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                self.bytes -= _entry_bytes(old)


def _item_results(items: Sequence[pb.Item], errors: dict[int, ApiError]) -> list[pb.ItemResult]:
    return [pb.ItemResult(id=item.id, code=errors[i].code.value[0], message=errors[i].message) if i in errors
            else pb.ItemResult(id=item.id) for i, item in enumerate(items)]


def _bad_id(item_id: str, what: str) -> ApiError | None:
    """The error for an id no item can have (ids are 1 to MAX_ID_CHARS characters), or None."""
    if item_id and len(item_id) <= MAX_ID_CHARS:
        return None
    return invalid(f"{what} is {'empty' if not item_id else f'{len(item_id):,} characters'}; ids are 1 to "
                   f"{MAX_ID_CHARS} characters")


def _check_ids(ids: Sequence[str]) -> None:
    """Ids of Get and Delete checked as Upsert checks them: one no item can have is a mistake to say so."""
    for i, item_id in enumerate(ids):
        if (error := _bad_id(item_id, f"ids[{i}]")) is not None:
            raise error


def _entry_bytes(entry: tuple[bytes, bytes]) -> int:
    return len(entry[0]) + len(entry[1]) + ENTRY_OVERHEAD


def _struct(metadata_json: str) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(metadata_loads(metadata_json))
    return s


class CollectionsService(pb_grpc.CollectionsServicer):
    def __init__(self, registry: Registry, collections: Collections, config: ServerConfig, inference: Inference):
        self.registry, self.collections, self.config, self.inference = registry, collections, config, inference
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="index")
        # Rebuild calls wait for each other per collection (Collection.rebuild): not in the pool searches use
        self._rebuilds = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rebuild")
        self._batchers: dict[tuple[str, int, bool], Batcher] = {}
        self.hits = HitCache(config.hit_cache_bytes)  # one budget for all collections
        cache = weakref.ref(self.hits)  # the gauge must not keep a stopped server's cache alive
        metrics.HIT_CACHE_BYTES.set_function(lambda: (c.bytes if (c := cache()) is not None else 0))
        self._cache_found, self._cache_missed = metrics.HIT_CACHE.labels("hit"), metrics.HIT_CACHE.labels("miss")
        # Each collection object's number in it (rowids are unique within one; a dropped and re-created name is
        # another object, with another number).
        self._tags: weakref.WeakKeyDictionary[Collection, int] = weakref.WeakKeyDictionary()
        self._closing = False
        self.ready = False  # set once the collections are open (start-up): calls before answer UNAVAILABLE

    def warm_caches(self) -> list[Future[int]]:
        """Start filling the hit cache from the collections' stores in a pool thread (at start-up), smallest
        collection first: each may take an equal share of what the ones before it left, so small collections
        take what they need and leave the rest to the big ones. One future per collection (items cached)."""
        order = sorted(self.collections.all(), key=lambda c: c.count())
        futures: list[Future[int]] = [Future() for _ in order]

        def warm_all() -> None:
            left = self.hits.max_bytes
            for i, (c, done) in enumerate(zip(order, futures)):
                n = 0
                try:
                    n, used = self.hits.warm(self._tag(c), c, left // (len(order) - i))
                    left -= used
                    log.debug("collection %s: %d items in the hit cache", c.spec.name, n)
                except Exception:
                    if self._closing:  # the server stopped while warming: the store is closed under it
                        for rest in futures[i:]:
                            rest.set_result(0)
                        return
                    log.exception("warming the hit cache of collection %s failed (searches read SQLite instead)",
                                  c.spec.name)
                done.set_result(n)

        if order:
            self.pool.submit(warm_all)
        return futures

    # -- lookups ---------------------------------------------------------------------
    def _tag(self, c: Collection) -> int:
        """Collection `c`'s number in the hit cache."""
        if (tag := self._tags.get(c)) is None:
            tag = self._tags.setdefault(c, self.hits.tag())
        return tag

    def _opened(self) -> None:
        if not self.ready:
            raise ApiError(Code.UNAVAILABLE, "the server is still opening its collections (health NOT_SERVING); "
                                             "retry shortly")

    def _collection(self, name: str) -> Collection:
        self._opened()
        try:
            return self.collections.get(name)
        except CollectionNotFound as e:
            raise not_found(str(e.args[0])) from None

    def _bound_model(self, c: Collection) -> LoadedModel:
        """The loaded bundle the collection is bound to, or FAILED_PRECONDITION naming it."""
        s = c.spec
        m = self.registry.lookup(s.model, s.version)  # remembered: unloading the model waits for this request
        if m is None:
            raise failed_precondition(
                f"collection {s.name!r} is bound to model {s.model}/{s.version} (image.onnx sha256 "
                f"{s.model_sha256[:12]}), which this server has not loaded; add that bundle to the model "
                "repository, or LoadModel it if it is there. Its vectors cannot be mixed with another model's")
        if m.bundle.manifest.image.sha256 != s.model_sha256:
            raise failed_precondition(
                f"collection {s.name!r} was built with {s.model}/{s.version} whose image.onnx has sha256 "
                f"{s.model_sha256[:12]}, but the loaded {s.model}/{s.version} has {m.bundle.manifest.image.sha256[:12]}:"
                " a different model under the same name. Restore the original bundle, or create a new collection")
        return m

    def info(self, c: Collection) -> pb.CollectionInfo:
        s, d = c.spec, c.describe()
        loaded = self.registry.models.get(s.model, {}).get(s.version)
        return pb.CollectionInfo(
            name=s.name, model=pb.ModelRef(name=s.model, version=s.version), dim=s.dim, index_spec=s.index_spec,
            metric=s.metric, count=d["count"], device=c.device, model_sha256=s.model_sha256,
            model_loaded=loaded is not None and loaded.bundle.manifest.image.sha256 == s.model_sha256,
            index_kind=d["index_kind"], trained=d["trained"], exact=d["exact"], durable_seq=d["durable_seq"],
            snapshot_seq=d["snapshot_seq"], deleted_pending=d["deleted_pending"], created_at=s.created_at)

    async def _off_loop(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- lifecycle -------------------------------------------------------------------
    @rpc("CreateCollection")
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context: grpc.aio.ServicerContext
                               ) -> pb.CollectionInfo:
        self._opened()
        m = self.registry.get(request.model, request.version)
        spec = Spec.new(request.name, m.name, m.version, m.bundle.manifest.image.sha256, m.bundle.manifest.dim,
                        request.metric, request.index_spec)
        try:
            c = await self._off_loop(self.collections.create, spec)
        except CollectionExists as e:
            raise ApiError(Code.ALREADY_EXISTS, str(e)) from None
        except CollectionError as e:
            raise invalid(str(e)) from None
        observe(c)
        return await self._off_loop(self.info, c)

    @rpc("ListCollections")
    async def ListCollections(self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
                              ) -> pb.ListCollectionsResponse:
        self._opened()
        infos = [await self._off_loop(self.info, c) for c in self.collections.all()]  # info() may wait on locks
        return pb.ListCollectionsResponse(collections=infos)

    @rpc("GetCollection")
    async def GetCollection(self, request: pb.GetCollectionRequest, context: grpc.aio.ServicerContext
                            ) -> pb.CollectionInfo:
        return await self._off_loop(self.info, self._collection(request.name))

    @rpc("DropCollection")
    async def DropCollection(self, request: pb.DropCollectionRequest, context: grpc.aio.ServicerContext
                             ) -> pb.DropCollectionResponse:
        c = self._collection(request.name)
        for key in [k for k in self._batchers if k[0] == request.name]:
            await self._batchers.pop(key).stop(f"collection {request.name!r} was dropped while this call waited",
                                               gone=True)
        await self._off_loop(self.collections.drop, request.name)
        observe(None, request.name)
        await self._off_loop(self.hits.forget, self._tag(c))  # its cache entries are never read again
        return pb.DropCollectionResponse()

    @rpc("Rebuild")
    async def Rebuild(self, request: pb.RebuildRequest, context: grpc.aio.ServicerContext) -> pb.CollectionInfo:
        c = self._collection(request.name)
        self._bound_model(c)
        try:
            await asyncio.get_running_loop().run_in_executor(self._rebuilds, c.rebuild)
        except (OSError, StoreClosed):
            if self.collections.has(c):
                raise
            raise not_found(f"collection {request.name!r} was dropped while it was being rebuilt") from None
        return await self._off_loop(self.info, c)

    # -- vectors from items and query terms -------------------------------------------
    def _vector(self, m: pb.Matrix, dim: int, what: str, cosine: bool = False) -> np.ndarray | ApiError:
        try:
            x = wire.decode(m, what)
        except wire.MatrixError as e:
            return invalid(str(e))
        if x.shape != (1, dim):
            return invalid(f"{what} is {x.shape[0]} x {x.shape[1]}; this collection takes one row of dim {dim}")
        v = x[0].astype(np.float32)
        # NaN and infinities fail this length check too (float64 squares of float32 numbers never overflow):
        # one check instead of two on every vector, a batch-1 search paying for each array call.
        squared = float(np.dot(v.astype(np.float64), v))
        if squared <= MAX_NORM * MAX_NORM:
            if cosine and squared < 1e-30:  # no direction: every cosine with it would be 0 (or NaN)
                return invalid(f"{what} has length 0; a cosine collection compares directions, and this vector "
                               "has none")
            return v
        if not math.isfinite(squared):
            return invalid(f"{what} has NaN or infinite values")
        return invalid(f"{what} has length {math.sqrt(squared):.3g}, over {MAX_NORM:g}: float32 scores of it "
                       "would overflow; scale it down")

    async def _embed(self, m: LoadedModel, texts: dict[int, str], images: dict[int, bytes], labels: dict[int, str]
                     ) -> dict[int, np.ndarray | ApiError]:
        """Embed texts and images keyed by position; a bad one becomes its own error naming labels[key],
        the rest still embed."""
        out: dict[int, np.ndarray | ApiError] = {}
        good_texts = {}
        for i, t in texts.items():
            if not t.strip():
                out[i] = invalid(f"{labels[i]}.text is empty; send non-blank text")
            elif len(t) > self.config.max_text_chars:
                out[i] = invalid(f"{labels[i]}.text has {len(t)} characters, more than max_text_chars="
                                 f"{self.config.max_text_chars}")
            else:
                good_texts[i] = t
        if (total := sum(map(len, good_texts.values()))) > self.config.max_request_text_chars:
            raise invalid(f"the texts of this request have {total:,} characters in all, more than "
                          f"max_request_text_chars={self.config.max_request_text_chars:,}; split the request")
        if good_texts:
            emb, _ = await self.inference.embed_texts(m, list(good_texts.values()))  # admitted in there
            out.update(zip(good_texts, emb))
        if images:
            keys = list(images)
            with self.inference.admission.admit(m.name, m.version, "image", len(keys)):
                tensors = await self.inference.preprocess_images(m, [images[k] for k in keys],
                                                                 [f"{labels[k]}.image" for k in keys])
                ok = [(k, t) for k, t in zip(keys, tensors) if not isinstance(t, ApiError)]
                for k, t in zip(keys, tensors):
                    if isinstance(t, ApiError):
                        out[k] = t
                if ok:
                    emb = await m.image.submit(np.stack([t for _, t in ok]))
                    out.update(zip([k for k, _ in ok], emb))
        return out

    # -- items -----------------------------------------------------------------------
    @rpc("Upsert")
    async def Upsert(self, request: pb.UpsertRequest, context: grpc.aio.ServicerContext) -> pb.UpsertResponse:
        c = self._collection(request.collection)
        m = self._bound_model(c)
        items = request.items
        self.inference._check_count(len(items), "items")
        # The per-item work of a bulk upsert (ids, metadata, vectors: ~30 us an item) runs in a pool thread:
        # on the event loop, 4,096 items held every other client up for ~100 ms (searches' p99 111 ms while
        # one client ingested; benchmarks in docs/benchmarks.md). Small upserts skip the thread hop.
        inline = len(items) <= INLINE_UPSERT_ITEMS
        errors, metadata, vectors, texts, images = \
            self._check_items(c, items) if inline else await self._off_loop(self._check_items, c, items)
        vectors.update(await self._embed(m, texts, images, {i: f"items[{i}]" for i in (*texts, *images)}))
        puts, stored = self._puts(c, items, vectors, metadata, errors) if inline else \
            await self._off_loop(self._puts, c, items, vectors, metadata, errors)
        seq = 0
        if puts:
            written = await self._write(c, puts=puts)
            seq = written.seq
            self._cache_written(c, [rowid for rowid, _ in written.added], puts, written.removed)  # one per put
        results = _item_results(items, errors) if inline else await self._off_loop(_item_results, items, errors)
        return pb.UpsertResponse(results=results, upserted=len(stored), seq=seq)

    def _check_items(self, c: Collection, items: Sequence[pb.Item]) -> tuple[
            dict[int, ApiError], dict[int, str], dict[int, np.ndarray | ApiError], dict[int, str], dict[int, bytes]]:
        """(errors, canonical metadata JSON, vectors, texts, images) by item position: each item's own checks."""
        errors: dict[int, ApiError] = {}
        last: dict[str, int] = {}
        for i, item in enumerate(items):
            if (error := _bad_id(item.id, f"items[{i}].id")) is not None:
                errors[i] = error
            elif item.id in last:
                errors[last[item.id]] = invalid(f"items[{last[item.id]}] id {item.id!r} appears again at items[{i}]; "
                                                "only the last one counts (stored if it is valid: see its status)")
            if item.id and i not in errors:
                last[item.id] = i
        metadata: dict[int, str] = {}
        for i, item in enumerate(items):
            if i in errors:
                continue
            try:
                metadata[i] = canonical_json(json_format.MessageToDict(item.metadata), self.config.max_metadata_bytes)
            except MetadataError as e:
                errors[i] = invalid(f"items[{i}] {e}")
            except ValueError:  # protobuf refuses to read NaN or an infinity out of a Struct
                errors[i] = invalid(f"items[{i}].metadata has a number that is NaN or infinite; metadata numbers "
                                    "must be finite")
        vectors: dict[int, np.ndarray | ApiError] = {}
        texts, images = {}, {}
        for i, item in enumerate(items):
            if i in errors:
                continue
            kind = item.WhichOneof("content")
            if kind == "vector":
                vectors[i] = self._vector(item.vector, c.spec.dim, f"items[{i}].vector", c.spec.metric == "cosine")
            elif kind == "text":
                texts[i] = item.text
            elif kind == "image":
                images[i] = item.image
            else:
                errors[i] = invalid(f"items[{i}] has no content; set one of text, image or vector")
        return errors, metadata, vectors, texts, images

    @staticmethod
    def _puts(c: Collection, items: Sequence[pb.Item], vectors: dict[int, np.ndarray | ApiError],
              metadata: dict[int, str], errors: dict[int, ApiError]) -> tuple[list[Put], list[int]]:
        """The writes for the items whose vectors are good (in item order), and their positions; the rest go
        into errors."""
        errors.update((i, v) for i, v in vectors.items() if isinstance(v, ApiError))
        good = sorted(i for i in vectors if i not in errors)
        if not good:
            return [], []
        prepared = c.prepare(np.stack([vectors[i] for i in good]))  # type: ignore[misc]
        return [Put(items[i].id, row, metadata[i]) for i, row in zip(good, prepared)], good

    def _cache_written(self, c: Collection, added: list[int], puts: list[Put], removed: list[int]) -> None:
        """Tell the hit cache about a committed write: on the event loop when small, else in a pool thread that
        nobody waits for. The cache only saves SQLite reads, so a failure here is logged and the write stands."""
        tag = self._tag(c)

        def update() -> None:
            try:
                self.hits.written(tag, added, puts, removed)
            except Exception:
                log.exception("updating the hit cache of collection %s failed (searches read SQLite instead)",
                              c.spec.name)

        if len(added) + len(removed) <= INLINE_UPSERT_ITEMS:
            update()
        else:
            self.pool.submit(update)

    async def _write(self, c: Collection, **kw):  # type: ignore[no-untyped-def]
        try:
            return await asyncio.wrap_future(c.write(**kw))
        except StoreFull as e:
            raise ApiError(Code.RESOURCE_EXHAUSTED, str(e)) from None

    def _where(self, text: str) -> tuple[str, list] | None:
        if not text.strip():
            return None
        try:
            return compile_filter(text)
        except FilterError as e:
            raise invalid(str(e)) from None

    @rpc("Delete")
    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        c = self._collection(request.collection)
        ids = list(request.ids)
        _check_ids(ids)
        where = self._where(request.filter)
        if ids and where is not None:
            raise invalid("give ids or a filter, not both")
        if not ids and where is None:
            raise invalid("give the ids to delete, or a filter matching the items to delete")
        w = await self._write(c, delete_ids=ids, delete_where=where)
        self._cache_written(c, [], [], w.removed)
        return pb.DeleteResponse(deleted=len(w.removed), not_found=w.not_found, seq=w.seq)

    @rpc("Get")
    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.GetResponse:
        c = self._collection(request.collection)
        ids = list(request.ids)
        self.inference._check_count(len(ids), "ids")
        _check_ids(ids)
        found = await self._off_loop(c.get, ids)
        present = [i for i in dict.fromkeys(ids) if i in found]
        r = pb.GetResponse(items=[pb.StoredItem(id=i, metadata=_struct(found[i][2])) for i in present],
                           missing=[i for i in dict.fromkeys(ids) if i not in found])
        if request.with_vectors:
            rows = np.stack([found[i][1] for i in present]) if present else np.zeros((0, c.spec.dim), np.float32)
            try:
                r.vectors.CopyFrom(wire.encode(rows, request.dtype))
            except wire.MatrixError as e:
                raise invalid(str(e)) from None
        return r

    # -- search ------------------------------------------------------------------------
    async def _query_vectors(self, c: Collection, m: LoadedModel, queries: Sequence[pb.Query]) -> np.ndarray:
        if len(queries) == 1 and len(terms := queries[0].terms) == 1 and terms[0].WhichOneof("what") == "vector" \
                and terms[0].weight in (0.0, 1.0):
            # One plain vector, the common batch-1 search: the general path below without its bookkeeping (on a
            # lone search, that cost as much as FAISS). Collection.search prepares it (normalises, for cosine).
            v = self._vector(terms[0].vector, c.spec.dim, "queries[0].terms[0].vector", c.spec.metric == "cosine")
            if isinstance(v, ApiError):
                raise v
            return v[None]
        texts: dict[int, str] = {}
        images: dict[int, bytes] = {}
        plain: dict[int, np.ndarray] = {}
        ids: dict[int, str] = {}
        flat: list[tuple[int, float]] = []  # (query index, weight) per term, in order
        labels: dict[int, str] = {}
        for qi, q in enumerate(queries):
            if not q.terms:
                raise invalid(f"queries[{qi}] has no terms; give at least one text, image, vector or id")
            if len(q.terms) > self.config.max_query_terms:
                raise invalid(f"queries[{qi}] has {len(q.terms)} terms, more than max_query_terms="
                              f"{self.config.max_query_terms}")
            for ti, t in enumerate(q.terms):
                key, what = len(flat), f"queries[{qi}].terms[{ti}]"
                labels[key] = what
                if not math.isfinite(t.weight):
                    raise invalid(f"{what}.weight is not a finite number")
                flat.append((qi, t.weight or 1.0))
                kind = t.WhichOneof("what")
                if kind == "text":
                    texts[key] = t.text
                elif kind == "image":
                    images[key] = t.image
                elif kind == "vector":
                    v = self._vector(t.vector, c.spec.dim, f"{what}.vector", c.spec.metric == "cosine")
                    if isinstance(v, ApiError):
                        raise v
                    plain[key] = v
                elif kind == "id":
                    if (error := _bad_id(t.id, f"{what}.id")) is not None:
                        raise error
                    ids[key] = t.id
                else:
                    raise invalid(f"{what} is empty; set one of text, image, vector or id")
        rows = self.config.for_model(m.name).max_queue_rows  # the model's own queue ([server.model."NAME"])
        for n, tower in ((len(texts), "text"), (len(images), "image")):
            if n > rows:  # could never be queued: refuse before any work, not as overload
                raise invalid(f"the queries have {n} {tower} terms, more than the {tower} queue holds "
                              f"(max_queue_rows={rows}); send fewer per request")
        embedded = await self._embed(m, texts, images, labels)
        for key, v in embedded.items():
            if isinstance(v, ApiError):
                raise v
            plain[key] = v
        if ids:
            stored = await self._off_loop(c.get, list(ids.values()))
            for key, item_id in ids.items():
                if item_id not in stored:
                    raise not_found(f"{labels[key]}.id {item_id!r} is not stored in collection {c.spec.name!r}")
                plain[key] = stored[item_id][1]
        out = np.zeros((len(queries), c.spec.dim), np.float64)
        for key, (qi, weight) in enumerate(flat):
            out[qi] += weight * c.prepare(plain[key][None])[0]
        norms = np.linalg.norm(out, axis=1)
        if c.spec.metric == "cosine":
            for qi in np.flatnonzero(norms < 1e-15):
                raise invalid(f"queries[{qi}]: its weighted terms cancel out (length 0), so it has no direction "
                              "to compare; change the weights")
        for qi in np.flatnonzero(~(norms <= MAX_NORM)):
            raise invalid(f"queries[{qi}]: its weighted sum of terms has length {norms[qi]:.3g}, over {MAX_NORM:g}: "
                          "float32 scores would overflow; use smaller weights (for cosine and ip only their "
                          "ratios matter)")
        return out.astype(np.float32)

    def _results(self, c: Collection, scores: np.ndarray, rowids: np.ndarray, with_metadata: bool) -> np.ndarray:
        """One serialized QueryResult per query row (an object array of bytes), hits resolved to ids and
        metadata. Runs in a pool thread, right after the search, so a search costs the event loop one thread
        hop (or none: Batcher.run_inline)."""
        rowid_lists = rowids.tolist()  # plain Python from here: a batch-1 search has 10 hits, not 10,000
        rows = {r for row in rowid_lists for r in row if r >= 0}
        tag = self._tag(c)
        found = self.hits.lookup(tag, rows)
        self._cache_found.inc(len(found))
        if len(found) < len(rows):
            self._cache_missed.inc(len(rows) - len(found))
            missing = [r for r in rows if r not in found]
            for r, (item_id, meta) in c.resolve(missing).items():  # deleted since the search: not there
                found[r] = self.hits.add(tag, r, item_id, meta)
        score_bytes = np.ascontiguousarray(scores, "<f4").tobytes()  # float32 scores as the Hit field holds them
        out = np.empty(len(rowid_lists), object)
        width = 4 * scores.shape[1]
        for qi, row in enumerate(rowid_lists):  # found.get: None for padding (-1), or deleted since the search
            out[qi] = hitwire.query_result([found.get(r) for r in row], score_bytes[qi * width:(qi + 1) * width],
                                           with_metadata)
        return out

    def _batcher(self, c: Collection, k: int, with_metadata: bool) -> Batcher:
        key = (c.spec.name, k, with_metadata)
        b = self._batchers.get(key)
        if b is None:
            def run(q: np.ndarray) -> np.ndarray:
                return self._search(c, q, k, None, False, with_metadata)[0]

            # No waiting for company: a search runs at once with whatever queued up while the last one ran
            # (text-embeddings-inference's batcher never idles either). Waiting would add the whole delay to
            # every lone search, and FAISS's cost per query barely falls with batch size on the CPU.
            cfg = self.config
            b = Batcher(run, self.pool, cfg.max_batch_size, 0, cfg.max_queue_rows, labels=(c.spec.name, "search"),
                        queue_timeout_us=cfg.queue_timeout_ms * 1000)
            self._batchers[key] = b
        return b

    def _search(self, c: Collection, q: np.ndarray, k: int, where: tuple[str, list] | None, exact: bool,
                with_metadata: bool, wait: bool = True) -> tuple[np.ndarray, bool]:
        """(serialized QueryResults, exact?); wait=False raises IndexBusy rather than wait for the index."""
        scores, rowids, was_exact = c.search(q, k, where, exact, wait)
        return self._results(c, scores, rowids, with_metadata), was_exact

    @rpc("Search")
    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> bytes:
        """Answers a serialized SearchResponse (server/hitwire.py)."""
        c = self._collection(request.collection)
        m = self._bound_model(c)
        queries = list(request.queries)
        if not queries:
            raise invalid("queries is empty; send at least one query")
        if len(queries) > self.config.max_queries_per_search:
            raise invalid(f"queries has {len(queries)} entries, more than max_queries_per_search="
                          f"{self.config.max_queries_per_search}")
        k = request.top_k or 10
        if k > self.config.max_top_k:
            raise invalid(f"top_k {k} is over the limit of {self.config.max_top_k} (server option max_top_k)")
        where = self._where(request.filter)
        q = await self._query_vectors(c, m, queries)
        with_metadata = not request.without_metadata
        if where is None and not request.exact:
            b = self._batcher(c, k, with_metadata)
            results = None
            if b.idle and b.quick_run_s < INLINE_SEARCH_MAX_S and await alone():
                # A lone, cheap search: a thread hop would cost more than FAISS. It must not wait on the event loop
                # for a write holding the index (that stalled every client): then it queues instead.
                with contextlib.suppress(IndexBusy):
                    results = b.run_inline(q, lambda rows: self._search(c, rows, k, None, False, with_metadata,
                                                                         wait=False)[0])
            if results is None:
                results = await b.submit(q)
            exact = c.exact  # read after the search: an index swapped in meanwhile is never reported exact
        else:
            results, exact = await self._off_loop(self._search, c, q, k, where, request.exact, with_metadata)
        return hitwire.search_response(_ref_bytes(m.name, m.version), results, bool(exact))

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(b.stop() for b in self._batchers.values()))
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._rebuilds.shutdown(wait=False, cancel_futures=True)
