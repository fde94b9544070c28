"""The one place where failures become gRPC status codes.

Handlers raise ApiError (or one of the library errors mapped below); the
`rpc` decorator turns it into a status with a message a user can act on,
counts it in Prometheus and keeps the server serving everyone else.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from . import metrics
from .batcher import QueueExpired, QueueFull

log = logging.getLogger("tandem.server")
Code = grpc.StatusCode
T = TypeVar("T")

_in_flight = 0  # Tandem RPCs being handled right now (all run on the one event loop: no lock needed)


def in_flight() -> int:
    return _in_flight


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
    """Wrap a grpc.aio handler: status mapping, request metrics, error logging."""

    def wrap(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(handler)
        async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
            global _in_flight
            started = time.perf_counter()

            def record(code: grpc.StatusCode) -> None:
                # Before the status goes out, so a client that sees it also sees it counted.
                metrics.REQUESTS.labels(method, code.name).inc()
                metrics.REQUEST_SECONDS.labels(method).observe(time.perf_counter() - started)

            _in_flight += 1
            try:
                response = await handler(self, request, context)
            except ApiError as e:
                record(e.code)
                await context.abort(e.code, e.message)
            except QueueFull as e:
                record(Code.RESOURCE_EXHAUSTED)
                await context.abort(Code.RESOURCE_EXHAUSTED, str(e))
            except QueueExpired as e:
                record(Code.UNAVAILABLE)
                await context.abort(Code.UNAVAILABLE, str(e))
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
            return response

        return wrapped

    return wrap
