"""Errors of media preprocessing. The server maps them to gRPC codes in server/errors.py.

Messages name the reason only ("truncated PNG: ..."); the caller prefixes which part of the
request it was (contents[0].parts[2].inline_data), so the same preprocessing serves every RPC.
"""

from __future__ import annotations


class MediaError(ValueError):
    """The media is unreadable or not what it claims to be (INVALID_ARGUMENT)."""


class MediaTooLarge(MediaError):
    """The media passes a configured limit: pixels, duration or bytes (RESOURCE_EXHAUSTED)."""
