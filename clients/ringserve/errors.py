"""Typed exceptions the SDK raises instead of `grpc.RpcError`.

Every failed call becomes a `RingserveError` subclass chosen by its status code, carrying `.code`
(a `grpc.StatusCode`) and `.details` (the server's message, which names the offending field):

    try:
        client.generate_text("hi", top_p=1.5)
    except ringserve.InvalidArgument as e:
        print(e.details)   # "generation_config.top_p: 1.5 is outside (0, 1]"
"""

from __future__ import annotations

import grpc


class RingserveError(Exception):
    """A call that failed with a gRPC status. Subclasses name the common codes."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details


class InvalidArgument(RingserveError):
    """The request is malformed or breaks a limit; `details` names the field. Do not retry as is."""


class ResourceExhausted(RingserveError):
    """The server is full (or a size limit was hit); retry later."""


class DeadlineExceeded(RingserveError):
    """The call's deadline (`timeout`) passed before it finished."""


class Cancelled(RingserveError):
    """The call was cancelled (by this client or by the server shutting down)."""


class Unavailable(RingserveError):
    """The server cannot be reached, or is shutting down; retry later."""


class NotFound(RingserveError):
    """The named thing (method, health service, ...) does not exist on the server."""


class FailedPrecondition(RingserveError):
    """The server is not in a state to serve this request."""


class Unimplemented(RingserveError):
    """The server does not implement this method (an older server?)."""


class Internal(RingserveError):
    """The server failed while serving the call."""


class Unauthenticated(RingserveError):
    """The call lacks valid credentials."""


class PermissionDenied(RingserveError):
    """The caller may not make this call."""


_BY_CODE: dict[grpc.StatusCode, type[RingserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_rpc_error(error: grpc.RpcError) -> RingserveError:
    """The typed exception for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`).

    Use as `raise from_rpc_error(e) from e`. Codes without a subclass give a plain RingserveError.
    """
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    if code is None:
        code = grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, RingserveError)(code, details or "")
