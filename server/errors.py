"""The one place where failures become gRPC status codes.

Handlers raise ApiError (or one of the library errors mapped below); the
`rpc` decorator turns it into a status with a message a user can act on,
counts it in Prometheus and keeps the server serving everyone else.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from index.store import StoreClosed, StoreFull

from . import metrics
from .batcher import BatcherStopped, QueueExpired, QueueFull

log = logging.getLogger("tandem.server")
Code = grpc.StatusCode
T = TypeVar("T")

_in_flight = 0  # Tandem RPCs being handled right now (all run on the one event loop: no lock needed)


def in_flight() -> int:
    return _in_flight


async def alone() -> bool:
    """Whether the calling RPC is the only one being handled. It first lets every handler that is ready to start
    do so (one turn of the event loop): a handler that never awaits would otherwise run start to end before the
    next one starts, and under any load each would find itself alone."""
    await asyncio.sleep(0)
    return _in_flight == 1


class ApiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> ApiError:
    return ApiError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> ApiError:
    return ApiError(Code.NOT_FOUND, message)


def failed_precondition(message: str) -> ApiError:
    return ApiError(Code.FAILED_PRECONDITION, message)


def unavailable(message: str) -> ApiError:
    return ApiError(Code.UNAVAILABLE, message)


def rpc(method: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Wrap a grpc.aio handler: status mapping, request metrics, error logging, and the answer serialized and
    held to max_message_bytes (RESOURCE_EXHAUSTED, counted as such). The servicer has the server's `config`."""

    def wrap(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        counters: dict[grpc.StatusCode, Any] = {}  # the series, looked up once each
        seconds = metrics.REQUEST_SECONDS.labels(method)

        @functools.wraps(handler)
        async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
            global _in_flight
            started = time.perf_counter()

            def record(code: grpc.StatusCode) -> None:
                # Before the status goes out, so a client that sees it also sees it counted.
                if (counter := counters.get(code)) is None:
                    counter = counters[code] = metrics.REQUESTS.labels(method, code.name)
                counter.inc()
                seconds.observe(time.perf_counter() - started)

            _in_flight += 1
            try:
                response = await handler(self, request, context)
                # Serialized here rather than by grpc, to check its size: an answer over the limit would
                # otherwise leave as gRPC's own "Sent message larger than max" after being counted OK.
                data = response if type(response) is bytes else response.SerializeToString()
                if len(data) > (limit := self.config.max_message_bytes):
                    raise ApiError(Code.RESOURCE_EXHAUSTED, f"the answer is {len(data):,} bytes, larger than max "
                                   f"message size max_message_bytes={limit:,}; ask for less in one call (fewer "
                                   "items, queries or labels, a smaller top_k, no vectors or metadata)")
            except ApiError as e:
                record(e.code)
                await context.abort(e.code, _said(e.message))
            except QueueFull as e:
                record(Code.RESOURCE_EXHAUSTED)
                await context.abort(Code.RESOURCE_EXHAUSTED, _said(str(e)))
            except QueueExpired as e:
                record(Code.UNAVAILABLE)
                await context.abort(Code.UNAVAILABLE, _said(str(e)))
            except StoreClosed as e:  # the collection was dropped while the call used it
                record(Code.NOT_FOUND)
                await context.abort(Code.NOT_FOUND, _said(str(e)))
            except BatcherStopped as e:
                code = Code.NOT_FOUND if e.gone else Code.UNAVAILABLE
                record(code)
                await context.abort(code, _said(str(e)))
            except (OSError, sqlite3.Error) as e:
                if not _disk_full(e):
                    log.exception("%s failed", method)
                    record(Code.INTERNAL)
                    await context.abort(Code.INTERNAL, f"{method} failed inside the server; the error is in the "
                                        "server log")
                log.warning("%s: disk full: %s", method, e)  # the path is for the operator, not the client
                record(Code.RESOURCE_EXHAUSTED)
                await context.abort(Code.RESOURCE_EXHAUSTED, "the server's disk is full; nothing of this call was "
                                    "acknowledged; retry once space is freed")
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                record(Code.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else Code.CANCELLED)
                raise
            except Exception:
                log.exception("%s failed", method)
                record(Code.INTERNAL)
                await context.abort(Code.INTERNAL, f"{method} failed inside the server; the error is in the server log")
            finally:
                _in_flight -= 1
            record(Code.OK)
            return data  # type: ignore[return-value]  # bytes pass through the method's serializer (_serializer)

        return wrapped

    return wrap


MAX_MESSAGE_CHARS = 2000


def _said(message: str) -> str:
    """A status message cut to MAX_MESSAGE_CHARS: messages travel in gRPC trailers, which a client refuses past
    8-16 KiB ("metadata size exceeds hard limit", seen as RESOURCE_EXHAUSTED); some quote a client's input."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... (message cut: {len(message):,} characters)"


def _disk_full(e: BaseException) -> bool:
    """An OSError ENOSPC / EDQUOT, or SQLite's "database or disk is full"."""
    if isinstance(e, StoreFull):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "disk is full" in str(e)  # SQLite: "database or disk is full"


# -- request bodies that do not parse ---------------------------------------------------------------------
@dataclass
class Unparsable:
    """What a request deserializer returns for bytes that are not the method's message (grpc.aio itself would
    answer UNKNOWN and log an error)."""

    message: str  # the expected message's full name
    error: str


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as e:  # corrupt wire format, or invalid UTF-8 in a string field
            return Unparsable(cls.DESCRIPTOR.full_name, str(e))

    return parse


def _serializer(cls: Any) -> Callable[[Any], bytes]:
    """The message's serializer, passing through bytes a handler serialized itself (Search: server/hitwire.py)."""
    serialize = cls.SerializeToString

    def serialized(response: Any) -> bytes:
        return response if type(response) is bytes else serialize(response)

    return serialized


def _guarded(method: str, handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> T:
        if isinstance(request, Unparsable):
            metrics.REQUESTS.labels(method, Code.INVALID_ARGUMENT.name).inc()
            await context.abort(Code.INVALID_ARGUMENT, f"the request body is not a valid {request.message} "
                                f"({request.error}); send it serialized by the tandem.v1 proto (proto/)")
        return await handler(request, context)

    return guarded


def add_servicer(server: grpc.aio.Server, service: Any, servicer: Any) -> None:
    """Register `servicer` for the proto `service` (a ServiceDescriptor) like the generated add_*_to_server,
    except that request bytes which do not parse are INVALID_ARGUMENT with the parser's message, and that a
    handler may answer its response already serialized."""
    handlers = {}
    for m in service.methods:
        request, response = GetMessageClass(m.input_type), GetMessageClass(m.output_type)
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            _guarded(m.name, getattr(servicer, m.name)), request_deserializer=_parser(request),
            response_serializer=_serializer(response))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
