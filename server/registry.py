"""The model repository as the server sees it: every bundle folder with its status (READY, LOADING,
UNAVAILABLE with the reason, UNLOADED) and, for the ready ones, the ONNX sessions, the tokenizer and one
batcher per (model, tower). Bundles load and unload while the server runs: LoadModel/UnloadModel and
polling (docs/models.md). A bundle that fails to load is listed with its reason and the others serve."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bundle import Bundle, BundleError, discover, load_bundle, version_key
from bundle.manifest import Manifest
from bundle.parity import PROBE_TEXTS, probe_pixels
from bundle.signing import load_public_key
from bundle.tokenizer import ClipTokenizer
from bundle.zero_shot import LabelCache

from . import metrics, torch_images
from .batcher import Batcher
from .config import ServerConfig
from .errors import ApiError, failed_precondition, in_flight, not_found, unavailable
from .runtime import Tower, choose_providers, fp16_tower, usable_cores

log = logging.getLogger("tandem.registry")
T = TypeVar("T")

READY, LOADING, UNAVAILABLE, UNLOADED = "READY", "LOADING", "UNAVAILABLE", "UNLOADED"
UNLOADED_REASON = "unloaded by UnloadModel; LoadModel serves it again"


def health_name(name: str, version: str) -> str:
    """The grpc.health.v1 service name of one bundle: SERVING while it is READY."""
    return f"tandem.model/{name}/{version}"


LOADER_PREFIX = "load-"


def loading_in_background() -> bool:
    """Whether a thread of in_daemon_thread is still at work (a start-up stopped mid-load left it running)."""
    return any(t.name.startswith(LOADER_PREFIX) and t.is_alive() for t in threading.enumerate())


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a thread of its own. A daemon thread, unlike an executor's: one stuck loading a bundle
    (a slow disk, a huge model) does not hold up the process's exit on SIGTERM (`tandem serve` then ends
    the process without tearing the interpreter down under it: server/cli.py)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:
        if future.done():  # the caller was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=work, name=f"{LOADER_PREFIX}{getattr(fn, '__name__', 'fn')}", daemon=True).start()
    return await future


def fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of a bundle folder's files: polling reloads when it changes."""
    files = []
    for p in sorted(folder.rglob("*")):
        with contextlib.suppress(OSError):
            if p.is_file():
                st = p.stat()
                files.append((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(files)


@dataclass
class LoadedModel:
    bundle: Bundle
    image: Batcher
    text: Batcher | None
    tokenizer: ClipTokenizer | None
    provider: str
    precision: str = "fp32"  # what the towers run in: the bundle's, or fp16 when converted at load
    torch_images: Any = None  # server/torch_images.TorchImages when JPEGs are decoded with torchvision
    labels: LabelCache = field(default_factory=lambda: LabelCache(64 << 20, 256))
    # The request tasks that looked this model up (Registry.get): unloading waits for them to finish.
    users: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version


@dataclass
class Entry:
    """One <name>/<version> folder of the repository, served or not."""

    name: str
    version: str
    status: str
    reason: str = ""  # why it is not READY; for a READY one, why its last reload failed
    fingerprint: tuple[tuple[str, int, int], ...] = ()  # of the folder when last loaded or tried


class Registry:
    """Every bundle in the model repository, by name and version.

    `models` holds the READY ones (name -> version -> LoadedModel): what requests are served with.
    `entries` holds every folder the registry has seen, with its status and reason. Loads, reloads,
    unloads and polls run one at a time (`_lock`); a reload swaps the new copy in only once it is
    warm, and the old copy's batchers stop once the requests using it have finished.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.repository = Path(config.models)
        self.models: dict[str, dict[str, LoadedModel]] = {}
        self.entries: dict[tuple[str, str], Entry] = {}
        self.ready = False  # the start-up load is over
        self.serving = False  # the whole server has started (collections open): model changes move its health
        self.health: Any = None  # a grpc_health HealthServicer: per-bundle statuses go there when set
        self.public_key = load_public_key(Path(config.bundle_public_key)) if config.bundle_public_key else None
        # Threads start as needed: up to model_runners per model and tower run at once.
        self.inference_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="ort")
        self.preprocess_pool = ThreadPoolExecutor(max_workers=config.preprocess_threads, thread_name_prefix="pre")
        self._providers: list[str] | None = None
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task[None], LoadedModel] = {}  # copies draining after unload or reload

    # -- start-up --------------------------------------------------------------------
    async def start(self) -> None:
        """Load every bundle of the repository. Raises BundleError, with every reason, if none loads."""
        async with self._lock:
            folders = discover(self.repository)
            if not folders:
                raise BundleError(f"no bundles under {self.repository} (expected <name>/<version>/manifest.json)")
            for folder in folders:
                await self._load(folder)
        if not self.models:
            raise BundleError(f"none of the {len(folders)} bundle(s) under {self.repository} could be loaded:\n"
                              + "\n".join(f"  {e.name}/{e.version}: {e.reason}" for e in self.entries.values()))
        for name in sorted(set(self.config.model_settings) - {name for name, _ in self.entries}):
            log.warning('[server.model."%s"] names no model of %s (models: %s): a typo? Its settings apply to '
                        "nothing", name, self.repository, ", ".join(sorted({n for n, _ in self.entries})))
        default = self.config.default_model
        if default and default not in {name for name, _ in self.entries}:
            raise BundleError(f"default_model {default!r} is not in {self.repository} "
                              f"(found {sorted({name for name, _ in self.entries})})")
        if default and default not in self.models:
            log.error("default_model %s did not load: requests that name no model get FAILED_PRECONDITION", default)
        self.ready = True

    # -- loading ---------------------------------------------------------------------
    def _open(self, folder: Path) -> LoadedModel:
        """Check the bundle and open its ONNX sessions and tokenizer (in a thread: this is the slow part)."""
        if self._providers is None:
            self._providers = choose_providers(self.config.device)
        bundle = load_bundle(folder, verify_hashes=self.config.verify_hashes, public_key=self.public_key)
        m = bundle.manifest
        tokenizer = ClipTokenizer(bundle.tokenizer_path, m.text.context_length) if m.text else None
        towers = {}
        for tower, path in (("image", bundle.image_path), ("text", bundle.text_path)):
            if path is not None:
                probe = probe_pixels(m.image.size) if tower == "image" else tokenizer.encode_batch(PROBE_TEXTS)[0]
                towers[tower] = self._tower(path, m, tower, probe)
        precisions = {t.precision for t in towers.values()}
        torch_images = self._torch_images(m, towers["image"].device)
        return LoadedModel(
            bundle=bundle,
            image=self._batcher(towers["image"], m.name, "image"),
            text=self._batcher(towers["text"], m.name, "text") if "text" in towers else None,
            tokenizer=tokenizer,
            provider=towers["image"].provider,
            precision=precisions.pop() if len(precisions) == 1 else ", ".join(f"{k} {t.precision}"
                                                                              for k, t in towers.items()),
            labels=LabelCache(self.config.label_cache_bytes, self.config.label_cache_size),
            torch_images=torch_images,
        )

    def _torch_images(self, m: Manifest, device: str) -> Any:
        """A TorchImages for the model when the image_decoder setting asks for one (auto: on CUDA, if torchvision
        is installed); None: Pillow decodes. torch is imported here only then (the serving install has none)."""
        choice = self.config.image_decoder
        if choice == "pil" or (choice == "auto" and (device != "cuda" or not torch_images.available())):
            return None
        if not torch_images.available():
            raise BundleError("image_decoder is torch but torchvision is not installed (pip install torchvision, "
                              "a CUDA build for nvJPEG); or set image_decoder auto or pil")
        images = torch_images.TorchImages(m.image, device)
        log.info("%s/%s: JPEGs decoded and resized by torchvision on %s", m.name, m.version, device)
        return images

    def _tower(self, path: Path, m: Manifest, kind: str, probe: np.ndarray) -> Tower:
        """One tower's session: the bundle's file, or its fp16 conversion where the `precision` setting asks for
        one (auto: on CUDA) and it keeps the fp16 parity threshold on the probe batch."""
        c = self.config.for_model(m.name)

        def open_(model: Path | bytes, precision: str) -> Tower:
            return Tower(model, self._providers or ["CPUExecutionProvider"], precision, self.intra_op_threads(m.name),
                         c.inter_op_threads, spinning=c.ort_spinning, max_batch=c.max_batch_size)

        tower = open_(path, m.precision)
        if m.precision != "fp32" or c.precision == "bundle" or (c.precision == "auto" and tower.device != "cuda"):
            return tower
        fp16, why = fp16_tower(path, tower, probe, lambda model: open_(model, "fp16"))
        (log.info if fp16 else log.warning)("%s/%s %s tower %s%s", m.name, m.version, kind, why,
                                            "" if fp16 else "; serving it in fp32")
        return fp16 or tower

    def intra_op_threads(self, model: str) -> int:
        """Threads per ONNX Runtime run: as configured, or the CPUs this process may use shared by the runners
        (0, ONNX Runtime's own default of all physical cores, when that is one runner on an unrestricted machine)."""
        c = self.config.for_model(model)
        if c.intra_op_threads:
            return c.intra_op_threads
        cores = usable_cores()
        if c.model_runners == 1 and cores == os.cpu_count():
            return 0
        return max(1, cores // c.model_runners)

    def _batcher(self, tower: Tower, name: str, kind: str) -> Batcher:
        c = self.config.for_model(name)  # [server.model."NAME"] settings over the server's
        # Wait max_queue_delay_us for company only while more requests are in flight than are queued here:
        # a lone request runs at once instead of waiting out the delay for nobody.
        return Batcher(tower, self.inference_pool, c.max_batch_size, c.max_queue_delay_us, c.max_queue_rows,
                       labels=(name, kind), queue_timeout_us=c.queue_timeout_ms * 1000,
                       company_coming=lambda held: in_flight() > held, runners=c.model_runners)

    @staticmethod
    async def _warm_up(m: LoadedModel) -> None:
        """One run per tower so the first real request does not pay ONNX Runtime's set-up; it also checks that
        each tower's output has the manifest's dimension (collections and clients rely on it)."""
        size, dim = m.bundle.manifest.image.size, m.bundle.manifest.dim
        outputs = [("image", await m.image.submit(np.zeros((1, 3, size, size), np.float32)))]
        if m.text is not None and m.tokenizer is not None:
            outputs.append(("text", await m.text.submit(m.tokenizer.encode_batch(["warm up"])[0])))
        for tower, out in outputs:
            if out.ndim != 2 or out.shape[1] != dim:
                raise BundleError(f"{tower}.onnx answers embeddings of shape {list(out.shape)}, but the manifest "
                                  f"says dim {dim}; re-export the bundle (tandem export)")

    async def _load(self, folder: Path) -> Entry:
        """Load (or reload) one bundle folder; on failure the copy loaded before, if any, keeps serving."""
        name, version = folder.parent.name, folder.name
        old = self.models.get(name, {}).get(version)
        entry = self.entries.get((name, version))
        if entry is None or old is None:
            entry = self.entries[(name, version)] = Entry(name, version, LOADING)
            await self._set_health(name, version, False)
        entry.fingerprint = fingerprint(folder)
        log.info("%s %s/%s", "reloading" if old else "loading", name, version)
        loaded = None
        try:
            loaded = await in_daemon_thread(self._open, folder)
            await self._warm_up(loaded)
        except Exception as e:
            if loaded is not None:
                await self._stop(loaded)
            reason = self._public(str(e) if isinstance(e, BundleError) else f"{type(e).__name__}: {e}")
            if old is None:
                entry.status, entry.reason = UNAVAILABLE, reason
                log.error("%s/%s is UNAVAILABLE: %s", name, version, e)
            else:
                entry.reason = f"reloading failed, the copy loaded before keeps serving: {reason}"
                log.error("reloading %s/%s failed, the copy loaded before keeps serving: %s", name, version, e)
            return entry
        if old is not None:
            self._forget_metrics(old)
        self.models.setdefault(name, {})[version] = loaded
        entry.status, entry.reason = READY, ""
        m = loaded.bundle.manifest
        metrics.MODEL_INFO.labels(name, version, m.kind, loaded.provider).set(1)
        await self._set_health(name, version, True)
        log.info("loaded %s/%s (%s, dim %d) on %s, %s", name, version, m.kind, m.dim, loaded.provider,
                 loaded.precision)
        if old is not None:
            self._retire_in_background(old)
        return entry

    async def load(self, name: str, version: str) -> list[Entry]:
        """LoadModel: load or reload <name>/<version> (every version of name if version is empty)."""
        async with self._lock:
            try:
                folders = discover(self.repository)
            except BundleError as e:
                raise failed_precondition(str(e)) from None
            chosen = [f for f in folders if f.parent.name == name and (not version or f.name == version)]
            if not chosen:
                found = ", ".join(f"{f.parent.name}/{f.name}" for f in folders) or "none"
                raise not_found(f"the model repository has no bundle {name}/{version or '*'} "
                                f"(<name>/<version>/manifest.json); it has: {found}")
            return [await self._load(f) for f in chosen]

    # -- unloading -------------------------------------------------------------------
    async def unload(self, name: str, version: str) -> list[LoadedModel]:
        """UnloadModel: stop serving <name>/<version> (every loaded version of name if version is empty).
        Returns once the requests that were using them have finished and their batchers have stopped."""
        async with self._lock:
            versions = self.models.get(name, {})
            chosen = [versions[version]] if version in versions else [] if version else list(versions.values())
            if not chosen:
                loaded = ", ".join(f"{m.name}/{m.version}" for m in self.all()) or "none"
                raise not_found(f"model {name}/{version or '*'} is not loaded, so there is nothing to unload; "
                                f"loaded: {loaded}")
            for m in chosen:
                self._remove(m.name, m.version)
                entry = self.entries.setdefault((m.name, m.version), Entry(m.name, m.version, UNLOADED))
                entry.status, entry.reason = UNLOADED, UNLOADED_REASON
                await self._set_health(m.name, m.version, False)
                log.info("unloaded %s/%s; draining its requests in progress", m.name, m.version)
        # Shielded: an UnloadModel call that gives up waiting does not stop the drain.
        await asyncio.shield(asyncio.gather(*(self._retire_in_background(m) for m in chosen)))
        return chosen

    def _remove(self, name: str, version: str) -> LoadedModel | None:
        versions = self.models.get(name, {})
        m = versions.pop(version, None)
        if not versions:
            self.models.pop(name, None)
        return m

    def _retire_in_background(self, m: LoadedModel) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._retire(m), name=f"retire-{m.name}/{m.version}")
        self._retiring[task] = m
        task.add_done_callback(lambda t: self._retiring.pop(t, None))
        return task

    async def _retire(self, m: LoadedModel) -> None:
        """Drain: wait for the requests that looked m up, then for its batchers to go idle, then stop them."""
        users = {t for t in m.users if not t.done()}
        if users:
            await asyncio.wait(users)
        for b in (m.image, m.text):
            # Callers that reached the model without Registry.get (none should) still get their answers.
            while b is not None and not b.idle:
                await asyncio.sleep(0.01)
        await self._stop(m)
        if self.models.get(m.name, {}).get(m.version) is None:
            self._forget_metrics(m)
        log.info("%s/%s: in-flight requests done, sessions closed", m.name, m.version)

    @staticmethod
    async def _stop(m: LoadedModel) -> None:
        await asyncio.gather(*(b.stop() for b in (m.image, m.text) if b is not None))

    @staticmethod
    def _forget_metrics(m: LoadedModel) -> None:
        with contextlib.suppress(KeyError):
            metrics.MODEL_INFO.remove(m.name, m.version, m.bundle.manifest.kind, m.provider)

    # -- polling ---------------------------------------------------------------------
    async def poll(self) -> None:
        """Load bundles added to the repository or changed since they were (last) tried; unload removed ones.
        Bundles unloaded by UnloadModel are left alone."""
        async with self._lock:
            try:
                folders = discover(self.repository)
            except BundleError as e:
                log.warning("model polling: %s", e)
                return
            seen = set()
            for folder in folders:
                key = (folder.parent.name, folder.name)
                seen.add(key)
                entry = self.entries.get(key)
                if entry is None or (entry.status != UNLOADED and entry.fingerprint != fingerprint(folder)):
                    await self._load(folder)
            for name, version in [k for k in self.entries if k not in seen]:
                del self.entries[(name, version)]
                m = self._remove(name, version)
                await self._set_health(name, version, False)
                if m is not None:
                    log.info("%s/%s left the model repository: unloading it", name, version)
                    self._retire_in_background(m)

    async def poll_forever(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.poll()
            except Exception:  # the next poll tries again; the server keeps serving
                log.exception("model polling failed")

    # -- lookups ---------------------------------------------------------------------
    @property
    def default(self) -> tuple[str, str] | None:
        """(name, version) a request that names no model gets; None while that model is not ready."""
        name = self.config.default_model or min(self.models, default="")
        versions = self.models.get(name)
        return (name, max(versions, key=version_key)) if versions else None

    def get(self, name: str, version: str) -> LoadedModel:
        """The READY model a request asked for (empty name: the default, empty version: the highest).
        The calling request's task is remembered, so that unloading the model waits for it."""
        if not self.ready:
            raise unavailable("the server is still loading its models; retry shortly")
        name = name or self.config.default_model or min(self.models, default="")
        versions = self.models.get(name, {})
        version = version or max(versions, key=version_key, default="")
        m = versions.get(version)
        if m is None:
            raise self._missing(name, version)
        return self._used(m)

    def lookup(self, name: str, version: str) -> LoadedModel | None:
        """The READY <name>/<version> or None (both given: a collection's bound bundle), remembered like get()."""
        m = self.models.get(name, {}).get(version)
        return None if m is None else self._used(m)

    @staticmethod
    def _used(m: LoadedModel) -> LoadedModel:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to drain for
            task = asyncio.current_task()
            if task is not None and task not in m.users:
                m.users.add(task)
                task.add_done_callback(m.users.discard)
        return m

    def _missing(self, name: str, version: str) -> ApiError:
        known = [e for (n, v), e in self.entries.items() if n == name and (not version or v == version)]
        failed = [e for e in known if e.status in (UNAVAILABLE, LOADING)]
        if failed:
            e = max(failed, key=lambda e: version_key(e.version))
            if e.status == LOADING:
                return unavailable(f"model {e.name}/{e.version} is still loading; retry shortly")
            return failed_precondition(f"model {e.name}/{e.version} is UNAVAILABLE: it failed to load: {e.reason}")
        loaded = ", ".join(sorted(self.models)) or "none"
        if not name:  # the request named no model, and there is no default to give it
            return not_found(f"the request names no model and no model is loaded to be the default (loaded "
                             f"models: {loaded}); load one (LoadModel) or name one in the request")
        if known:
            return not_found(f"model {name}/{known[0].version} was unloaded (UnloadModel); loaded models: {loaded}")
        if name not in self.models:
            return not_found(f"model {name!r} is not loaded; loaded models: {loaded}")
        return not_found(f"model {name!r} has no version {version!r}; loaded versions: {', '.join(self.models[name])}")

    def entry(self, name: str, version: str) -> Entry | None:
        """The repository entry <name>/<version> (highest version if empty), READY or not."""
        known = [e for (n, _), e in self.entries.items() if n == name and (not version or e.version == version)]
        return max(known, key=lambda e: version_key(e.version), default=None)

    def listing(self) -> list[tuple[Entry, LoadedModel | None]]:
        """Every entry, by name then version, with its LoadedModel when READY."""
        keys = sorted(self.entries, key=lambda k: (k[0], version_key(k[1])))
        return [(self.entries[k], self.models.get(k[0], {}).get(k[1])) for k in keys]

    def all(self) -> list[LoadedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    # -- helpers ---------------------------------------------------------------------
    def _public(self, reason: str) -> str:
        """A load error as clients see it: without the model repository's local path unless configured."""
        if self.config.reveal_source_paths:
            return reason
        for prefix in {str(self.repository.resolve()), str(self.repository)}:
            # Only where a path starts: "models/" goes, the "models/" inside "my-models/1" stays.
            reason = re.sub(r"(?<![\w./-])" + re.escape(prefix.rstrip("/") + "/"), "", reason)
        return reason

    async def _set_health(self, name: str, version: str, serving: bool) -> None:
        if self.health is not None:
            from grpc_health.v1 import health_pb2

            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set(health_name(name, version), status)
            if self.serving:  # after start-up (the server sets them then): "" and Inference need a READY model
                await self.set_overall_health()

    async def set_overall_health(self) -> None:
        """"" and tandem.v1.Inference: SERVING while a model is READY."""
        if self.health is not None:
            from grpc_health.v1 import health_pb2

            overall = health_pb2.HealthCheckResponse.SERVING if self.models else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", "tandem.v1.Inference"):
                await self.health.set(service, overall)

    async def close(self) -> None:
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*(self._stop(m) for m in [*self.all(), *self._retiring.values()]))
        self.inference_pool.shutdown(wait=False, cancel_futures=True)
        self.preprocess_pool.shutdown(wait=False, cancel_futures=True)
