"""Who may call the server: API keys checked on every RPC but health, TLS, and the bind rule.

- Keys come from a file (`--api-keys FILE`): one key a line, or `name:key`; blank lines and lines
  starting with '#' are skipped. The name identifies the caller (it will own what the key
  creates); a bare key is named by the start of its SHA-256, so logs never show a key.
  SIGHUP reloads the file; a file that no longer parses keeps the old keys and logs why.
- A call carries its key as `authorization: Bearer KEY` or `x-goog-api-key: KEY` (Gemini's
  header). Every key is compared with `hmac.compare_digest`, all of them every time, so timing
  says nothing about which key or how much of it matched.
- Health checks need no key: load balancers and orchestrators probe without one.
- Without keys the server answers anyone who reaches it, so it binds only loopback unless told
  `--insecure-allow-remote`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import threading
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"
MAX_KEY_CHARS = 512


class KeyFileError(ValueError):
    """The key file is missing or malformed; the message names the file and line."""


def parse_keys(text: str, source: str = "api keys") -> dict[str, str]:
    """{key: name} from the key file's text."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.rpartition(":")
        if not sep:
            name, key = "key-" + hashlib.sha256(line.encode()).hexdigest()[:12], line
        name, key = name.strip(), key.strip()
        if not key or not name or len(key) > MAX_KEY_CHARS or any(c.isspace() for c in key):
            raise KeyFileError(f"{source}, line {number}: write KEY or NAME:KEY (a key has no "
                               f"spaces and at most {MAX_KEY_CHARS} characters)")
        if key in keys:
            raise KeyFileError(f"{source}, line {number}: this key is listed twice")
        keys[key] = name
    if not keys:
        raise KeyFileError(f"{source}: no keys (one per line, KEY or NAME:KEY)")
    return keys


class KeyRing:
    """The accepted keys, reloadable from their file while the server runs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys: dict[bytes, str] = {}
        self.load()

    def load(self) -> int:
        """Reads the file; raises KeyFileError (the old keys stay) when it does not parse."""
        try:
            text = self.path.read_text()
        except OSError as error:
            raise KeyFileError(f"api keys: cannot read {self.path}: {error.strerror}") from None
        keys = parse_keys(text, str(self.path))
        with self._lock:
            self._keys = {key.encode(): name for key, name in keys.items()}
        return len(keys)

    def reload(self) -> None:
        """SIGHUP: loads the file again, keeping the old keys if it is broken."""
        try:
            log.info("api keys reloaded from %s: %d keys", self.path, self.load())
        except KeyFileError as error:
            log.error("api keys not reloaded, the old ones stay: %s", error)

    def owner(self, presented: str | None) -> str | None:
        """The name of the key presented, or None when it is none of them."""
        if not presented:
            return None
        given = presented.encode()[:MAX_KEY_CHARS + 1]
        with self._lock:
            keys = list(self._keys.items())
        found = None
        for key, name in keys:  # no early exit: every key is compared, whatever matches
            if hmac.compare_digest(given, key):
                found = name
        return found


def presented_key(metadata) -> str | None:
    """The key in a call's metadata: `authorization: Bearer KEY` or `x-goog-api-key: KEY`."""
    for name, value in metadata or ():
        if name == "x-goog-api-key":
            return value if isinstance(value, str) else None
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks that carries no valid key: UNAUTHENTICATED."""

    def __init__(self, keys: KeyRing):
        self._keys = keys

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS_PREFIX):
            return handler
        key = presented_key(details.invocation_metadata)
        if self._keys.owner(key) is not None:
            return handler
        message = ("no API key: send 'authorization: Bearer KEY' or 'x-goog-api-key: KEY'"
                   if key is None else "API key not accepted")
        return _refusing(handler, message)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED."""
    async def refuse_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: makes this an async generator, as streaming handlers are

    codec = dict(request_deserializer=handler.request_deserializer,
                 response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse_unary, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)


@dataclasses.dataclass(frozen=True)
class Security:
    """The serve command's security flags."""

    api_keys: str | None = None  # path of the key file
    tls_cert: str | None = None  # PEM certificate chain
    tls_key: str | None = None  # PEM private key
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a certificate it signed
    allow_remote: bool = False  # serve beyond loopback without keys

    def check(self, host: str) -> None:
        """Raises ValueError for flags that do not go together, before anything loads."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS)")
        if self.api_keys is None and not self.allow_remote and not is_loopback(host):
            raise ValueError(
                f"--host {host} reaches beyond this machine, and without --api-keys anyone who "
                "reaches the port can use the server: give --api-keys FILE, bind 127.0.0.1, or "
                "pass --insecure-allow-remote")

    def keyring(self) -> KeyRing | None:
        return None if self.api_keys is None else KeyRing(self.api_keys)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None:
            return None
        pair = (_read(self.tls_key, "--tls-key"), _read(self.tls_cert, "--tls-cert"))
        if self.tls_client_ca is None:
            return grpc.ssl_server_credentials([pair])
        return grpc.ssl_server_credentials([pair], root_certificates=_read(
            self.tls_client_ca, "--tls-client-ca"), require_client_auth=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{flag}: cannot read {path}: {error.strerror}") from None
