"""The one place where request failures become gRPC statuses.

Code below the servicer raises `RequestError` (or a subclass) with a message that names the field
and the limit; `abort` turns it into a status on a live call. Without a gRPC context (tests calling
the validation directly) the exception simply propagates.
"""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request the server will not serve, with the gRPC code that says why."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(RequestError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RequestError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(RequestError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(RequestError):
    """The server is full; the client may retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(RequestError):
    """A client stopped sending before the server's deadline for the call."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(RequestError):
    """The server is shutting down or its engine has stopped."""

    code = grpc.StatusCode.UNAVAILABLE


class EngineFailure(RequestError):
    code = grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    """Ends the call with `error`'s status. Never returns (grpc raises to unwind the handler)."""
    await context.abort(error.code, error.message)
