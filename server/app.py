"""The gRPC server: listen first (health says NOT_SERVING), load and warm the models, open the
collections, then SERVING. Signals are handled from the first moment (in a container the server is
PID 1): SIGTERM during loading stops at once, afterwards calls in progress get shutdown_grace_seconds."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from tandem.v1 import tandem_pb2 as pb

from index.manager import Collections

from . import metrics
from .auth import TokenAuth, TokenStore, check_exposure, server_credentials
from .collections import CollectionsService, observe
from .config import ServerConfig, grpc_server_options
from .errors import add_servicer
from .registry import Registry
from .service import Inference, Models

log = logging.getLogger("tandem.server")

SERVICES = tuple(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Inference", "Models", "Collections"))


class Health(health.aio.HealthServicer):
    """grpc's health servicer, except that Watch streams end once shutdown begins, right after they sent
    NOT_SERVING: a client's open Watch would otherwise hold an idle server for the whole shutdown grace period
    (grpc.aio waits for every call in progress)."""

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:  # as grpc's own Watch
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()  # NOT_SERVING for every known service, its watchers woken
        for condition in list(self._server_watchers.values()):  # and those of names it does not know
            async with condition:
                condition.notify_all()


class TandemServer:
    """Owns the grpc.aio server, the registry and the health status."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.tokens = TokenStore.from_config(config)
        check_exposure(config, self.tokens)
        credentials = server_credentials(config)
        self.registry = Registry(config)
        metrics.MODEL_STATUS.registry = self.registry
        self.collections = Collections(Path(config.data_dir), config.snapshot_every_changes, config.device)
        self.health = Health()
        self.registry.health = self.health  # one service name per bundle: tandem.model/<name>/<version>
        self._poll: asyncio.Task[None] | None = None
        self._collections_open = False
        self.cache_warming: list = []  # futures of the hit caches being filled at start-up (tests wait on them)
        options = grpc_server_options(config)
        self.server = grpc.aio.server(options=options, interceptors=[TokenAuth(self.tokens)] if self.tokens else [])
        inference = Inference(self.registry, config)
        self.collections_service = CollectionsService(self.registry, self.collections, config, inference)
        # Like pb_grpc.add_*Servicer_to_server, but request bytes that do not parse are INVALID_ARGUMENT.
        services = pb.DESCRIPTOR.services_by_name
        add_servicer(self.server, services["Inference"], inference)
        add_servicer(self.server, services["Models"], Models(self.registry))
        add_servicer(self.server, services["Collections"], self.collections_service)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:
            reflection.enable_server_reflection(
                SERVICES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server,
            )
        address = f"{config.host}:{config.port}"
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's "Failed to bind to address"
            self.port = 0
        if self.port == 0:
            raise RuntimeError(f"could not listen on {address}: the port is in use (another server?) or the address "
                               "is not this machine's; choose another with --port or --host")

    def reload_tokens(self) -> None:
        """Read tokens_file again (SIGHUP); requests also notice a changed file within a second."""
        if self.tokens is None:
            log.info("nothing to reload: tokens are off")
        else:
            self.tokens.reload()

    async def _set_health(self, status: int) -> None:
        for name in ("",) + SERVICES:
            await self.health.set(name, status)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.collections.claim)  # before anything listens or loads
        await self.server.start()
        c = self.config
        access = ("mTLS" if c.tls_client_ca else "TLS" if c.tls_cert else "plaintext") + (
            ", tokens" if self.tokens else ", no tokens")
        log.info("listening on %s:%d, %s (NOT_SERVING until models are warm)", c.host, self.port, access)
        await self.registry.start()
        await loop.run_in_executor(None, self.collections.load)
        self._collections_open = self.collections_service.ready = True
        self.cache_warming = self.collections_service.warm_caches()  # in the background; searches need not wait
        for c in self.collections.all():
            observe(c)
        for c in self.collections.all():
            log.info("collection %s: %d items, %s index, searching on the %s", c.spec.name, c.count(), c.kind,
                     "GPU" if c.device == "cuda" else "CPU")
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.registry.serving = True
        await self.registry.set_overall_health()  # NOT_SERVING again if an UnloadModel left no model meanwhile
        unavailable = [f"{e.name}/{e.version}" for e, m in self.registry.listing() if m is None]
        log.info("SERVING %d model(s)%s, %d collection(s); default model %s", len(self.registry.all()),
                 f" ({len(unavailable)} unavailable: {', '.join(unavailable)})" if unavailable else "",
                 len(self.collections.all()), "/".join(self.registry.default or ("none",)))
        if (every := self.config.model_poll_seconds) > 0:
            self._poll = loop.create_task(self.registry.poll_forever(every), name="model-poll")
            log.info("polling %s for bundle changes every %d s", self.config.models, every)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, give calls in progress up to grace_s (shutdown_grace_seconds) to
        finish, then close everything."""
        if self._poll is not None:
            self._poll.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.shutdown_grace_seconds if grace_s is None else grace_s)
        await self.collections_service.close()
        await self.registry.close()
        if self._collections_open:  # a start-up stopped while collections were opening leaves them be
            await asyncio.get_running_loop().run_in_executor(None, self.collections.close)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """glibc malloc gives each thread that allocates its own arena (up to 8 per core) and keeps what it freed
    there: under mixed load (decode threads, ONNX Runtime, FAISS, SQLite) the server's memory crept up
    (benchmarks/soak.py: +37 MB in 2 minutes of collection writes with the default, +3.6 MB with 2). This is
    MALLOC_ARENA_MAX=2 set from inside, for `tandem serve` run outside the container too; an explicit
    MALLOC_ARENA_MAX in the environment wins. Returns whether it was applied (glibc only)."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    M_ARENA_MAX = -8  # from glibc's malloc.h
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    if limit_malloc_arenas():
        log.debug("malloc arenas limited to 2 (MALLOC_ARENA_MAX)")
    metrics_host = config.metrics_host or config.host
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=metrics_host)
        log.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, config.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before anything slow: loading can take minutes
        loop.add_signal_handler(sig, stop.set)
    server = TandemServer(config)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)
    starting = asyncio.ensure_future(server.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("stopping during start-up")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await server.stop(0)
        return
    if (error := starting.exception()) is not None:
        stopping.cancel()
        await server.stop(0)  # close the listening port before the error reaches the user
        raise error
    if ready:
        ready.set()
    _print_howto(config, server)
    await stopping
    log.info("shutting down: calls in progress get up to %d s", config.shutdown_grace_seconds)
    await server.stop()
    log.info("stopped")


def _print_howto(config: ServerConfig, server: TandemServer) -> None:
    name, version = server.registry.default or ("?", "?")
    target = f"{config.host}:{server.port}"
    access = (" --tls-ca CA.pem" if config.tls_cert else "") + (
        " --tls-cert CLIENT.pem --tls-key CLIENT.key" if config.tls_client_ca else "")
    python_access = (", tls_ca='CA.pem'" if config.tls_cert else "") + (
        ", tls_cert='CLIENT.pem', tls_key='CLIENT.key'" if config.tls_client_ca else "")
    if server.tokens is not None:
        access, python_access = access + " --token TOKEN", python_access + ", token=TOKEN"
    print(
        f"\nTandem is serving {name}/{version} on {target}.\n"
        f"  .venv/bin/tandem classify --server {target}{access} IMAGE.png --labels 'red circle' 'blue square'\n"
        f"  .venv/bin/tandem embed --server {target}{access} --text 'a small red circle'\n"
        f"  Python: from server.client import TandemClient; "
        f"TandemClient('{target}'{python_access}).embed_text(['hi'])\n"
        + (f"  Metrics: http://{config.metrics_host or config.host}:{config.metrics_port}/metrics\n"
           if config.metrics_port else "")
        + "Ctrl-C stops it.\n",
        flush=True,
    )
