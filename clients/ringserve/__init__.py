"""ringserve client SDK (needs only grpcio and protobuf).

    import ringserve
    with ringserve.Client("127.0.0.1:50051") as client:
        print(client.generate_text("Hello").text)
"""

from ringserve.aio import AsyncClient
from ringserve.client import Client
from ringserve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RingserveError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from ringserve.types import (
    CachedContent,
    Chunk,
    ModelInfo,
    Result,
    ServerStats,
    TokenCount,
    Usage,
)

__all__ = [
    "AsyncClient", "CachedContent", "Cancelled", "Chunk", "Client", "DeadlineExceeded",
    "FailedPrecondition", "Internal", "InvalidArgument", "ModelInfo", "NotFound",
    "PermissionDenied", "ResourceExhausted", "Result", "RingserveError", "ServerStats",
    "TokenCount", "Unauthenticated", "Unavailable", "Unimplemented", "Usage", "from_rpc_error",
]
