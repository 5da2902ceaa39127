"""ringserve client SDK (needs only grpcio and protobuf).

    import ringserve
    with ringserve.Client("127.0.0.1:50051") as client:
        print(client.generate_text("Hello").text)
        print(client.generate_text([["Describe this.", ringserve.Image.from_file("cat.png")]]).text)
"""

from ringserve.aio import AsyncClient
from ringserve.client import Client, Stream
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
from ringserve.media import Audio, Image, Media, Video, guess_mime_type
from ringserve.upload import MediaInfo
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
    "AsyncClient", "Audio", "CachedContent", "Cancelled", "Chunk", "Client", "DeadlineExceeded",
    "FailedPrecondition", "Image", "Internal", "InvalidArgument", "Media", "MediaInfo",
    "ModelInfo", "NotFound", "PermissionDenied", "ResourceExhausted", "Result", "RingserveError",
    "ServerStats", "Stream", "TokenCount", "Unauthenticated", "Unavailable", "Unimplemented", "Usage",
    "Video", "from_rpc_error", "guess_mime_type",
]
