"""Several processes, one engine: process 0 serves gRPC and mirrors every engine call to the others.

Design note
1. Why. A mesh whose devices belong to several processes (one per host on a GPU cluster or TPU
   pod) runs SPMD programs: every process must launch the same jitted computations with the same
   arguments in the same order, or the collectives inside them wait forever. So only process 0
   runs the gRPC server, the scheduler and the KV manager; every other process (a worker) holds
   the same model and mesh and runs exactly the engine calls process 0 makes, in its order.
2. Process group. `setup` runs before JAX touches a device: on CPU it selects gloo collectives,
   then `jax.distributed.initialize` (the coordinator service lives on process 0; with
   `--coordinator auto` JAX detects TPU pods, SLURM and Open MPI). The mesh then spans the devices
   of all processes (`jax.devices()`).
3. The step channel. Process 0 listens on a TCP port (`--step-port`, 0 = any free one) and announces
   HOST:PORT and a random token with one broadcast over the devices
   (`multihost_utils.broadcast_one_to_all`), so no second address needs configuring: HOST is the
   coordinator's (process 0's own name with `auto`). Each worker connects and says its process id
   and proof that it knows the token (a MAC, not the token itself); process 0 waits until all
   have. Then messages only go from process 0 to the workers, one TCP stream per worker, so order
   is kept. A message is msgpack of plain types, numpy arrays and registered dataclasses
   (server/step_codec.py): a worker never runs code the bytes name, as it would with pickle. Each
   frame carries a sequence number (per stream, from 0) and an HMAC-SHA256 over both, keyed by a
   key derived from the token, so nobody without the token can inject, alter, replay or reorder
   engine calls; a worker treats any such frame as a lost process 0. The messages:
   `("engine", kwargs, identity)` builds the engine (process 0 decides every shape, so all
   processes compile the same programs; `identity` names the model and mesh, which must match),
   `("call", method, args, kwargs)` runs one engine method, `("stop", status)` ends the worker.
   TCP_NODELAY (one small message per call), keepalive (a vanished host is noticed in ~30 s).
4. Mirroring. `MirroredEngine` has the engine's surface: attributes are read locally; every public
   method is sent to all workers first, then run locally. Workers drop the results: the SPMD
   programs return the same values everywhere. The engine loop cannot tell it from the engine.
5. Failure. A worker whose call raises, or whose model or mesh differs, sends process 0 its reason
   and exits with status 1. Any bytes or EOF from a worker mark it lost: the `watch` callbacks run
   at once (the server reports NOT_SERVING), and every later engine call raises `WorkerLost`,
   which the engine loop turns into errors for every pending request. A call already inside a
   collective cannot be interrupted; JAX's coordination service aborts every process whose peer
   stopped heartbeating (after 100 s by default). A worker that loses process 0 (EOF, reset,
   keepalive timeout) exits with status 1; the JAX service, which lives on process 0, aborts it
   too if it is quicker. Processes leaving after a failure use `exit_now`, skipping JAX's exit
   barrier, which would wait for a peer that is gone.
6. Shutdown. When the server has drained (SIGTERM), process 0 sends `("stop", 0)`; the workers
   return 0 and all processes meet at JAX's exit barrier. If process 0 fails before serving, it
   sends `("stop", its exit status)`, so the workers exit with the same status.
7. Debugging. Every process logs "step channel: ..." lines (address, who joined, who was lost and
   why); run each process with `--log-level DEBUG` to see every mirrored call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import selectors
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from server import step_codec

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!Q")  # every frame: its byte length, then the bytes
_SEQ = struct.Struct("!Q")  # a step frame: sequence number, message, MAC over both
_MAC_BYTES = hashlib.sha256().digest_size
_STEP_BYTES = _SEQ.size + step_codec.MAX_BYTES + _MAC_BYTES
_HELLO_BYTES = 4096  # a worker's handshake is tiny; anything longer is not a worker
_ANNOUNCE_BYTES = 512  # the broadcast "HOST:PORT TOKEN", zero-padded


class WorkerLost(RuntimeError):
    """A worker process failed or went away: the mesh is broken, no engine call can run."""


class LeaderLost(RuntimeError):
    """Process 0 went away (or sent garbage): this worker has nobody to follow."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Who the processes are (`--coordinator`, `--num-processes`, `--process-id`, `--step-port`).

    coordinator: "HOST:PORT" of process 0 (JAX's coordinator service), "auto" (JAX detects the
        cluster: TPU pod, SLURM, Open MPI), or None: one process, nothing distributed.
    num_processes, process_id: None lets JAX detect them (on the clusters above).
    step_port: process 0's port for the step channel; 0 picks a free one.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    step_port: int = 0

    def __post_init__(self):
        if self.coordinator is None:
            if (self.num_processes or 1) > 1 or self.process_id:
                raise ValueError(f"--num-processes {self.num_processes} / --process-id "
                                 f"{self.process_id}: several processes need --coordinator "
                                 "HOST:PORT (process 0's address), or --coordinator auto on a "
                                 "TPU pod or SLURM / Open MPI job")
            return
        if self.coordinator != "auto":
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--coordinator {self.coordinator!r}: expected HOST:PORT of "
                                 "process 0 (e.g. 10.0.0.1:1234) or 'auto'")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"--num-processes {self.num_processes}: must be >= 1")
        if self.process_id is not None and (self.process_id < 0 or (
                self.num_processes is not None and self.process_id >= self.num_processes)):
            raise ValueError(f"--process-id {self.process_id}: process ids count from 0 to "
                             f"--num-processes - 1 (--num-processes {self.num_processes})")
        if not 0 <= self.step_port < 65536:
            raise ValueError(f"--step-port {self.step_port}: not a TCP port")

    @property
    def coordinator_host(self) -> str | None:
        if self.coordinator in (None, "auto"):
            return None
        return self.coordinator.rpartition(":")[0].strip("[]")


# ---- framing --------------------------------------------------------------------------------


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket, limit: int | None = None) -> bytes:
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if limit is not None and length > limit:
        raise ValueError(f"frame of {length} bytes (limit {limit})")
    return _recv_exact(sock, length)


def step_key(token: str) -> bytes:
    """The step channel's MAC key: the token's, for this one use (hello proofs, frame MACs)."""
    return _mac(token.encode(), b"ringserve-step-v1")


def _hello_proof(key: bytes, process_id: int) -> str:
    """What a worker sends instead of the token, which would give the MAC key away."""
    return _mac(key, b"hello %d" % process_id).hex()


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


class StepWriter:
    """Process 0's end of one worker's stream: numbers and MACs every message it sends."""

    def __init__(self, sock: socket.socket, key: bytes):
        self.sock = sock
        self._key = key
        self._seq = 0  # the worker expects exactly this one next

    def seal(self, payload: bytes) -> bytes:
        """The next frame's bytes: sequence number, `payload`, MAC over both."""
        head = _SEQ.pack(self._seq) + payload
        self._seq += 1
        return head + _mac(self._key, head)

    def write(self, payload: bytes) -> None:
        _send_frame(self.sock, self.seal(payload))


class StepReader:
    """A worker's end of its stream: accepts only process 0's frames, each once, in order."""

    def __init__(self, sock: socket.socket, key: bytes):
        self.sock = sock
        self._key = key
        self._seq = 0

    def read(self) -> tuple:
        """The next message; LeaderLost when process 0 is gone or a frame is not its own."""
        try:
            frame = _recv_frame(self.sock, limit=_STEP_BYTES)
        except (OSError, EOFError) as error:
            raise LeaderLost(f"lost process 0: {error!r}") from error
        except ValueError as error:  # too long
            raise _garbled(error) from error
        try:
            message = step_codec.decode(self.open(frame))
        except ValueError as error:
            raise _garbled(error) from error
        if type(message) is not tuple or not message or type(message[0]) is not str:
            raise _garbled(f"not a step message: {type(message).__name__}")
        return message

    def open(self, frame: bytes) -> bytes:
        """`frame`'s payload; ValueError unless it is authentic and the next in order."""
        if len(frame) < _SEQ.size + _MAC_BYTES:
            raise ValueError(f"frame of {len(frame)} bytes is too short")
        head, mac = frame[:-_MAC_BYTES], frame[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, _mac(self._key, head)):
            raise ValueError("bad MAC (wrong token or altered bytes)")
        (seq,) = _SEQ.unpack_from(head)
        if seq != self._seq:  # authentic but replayed or out of order
            raise ValueError(f"frame {seq} where frame {self._seq} was due")
        self._seq += 1
        return head[_SEQ.size:]


def _garbled(reason) -> LeaderLost:
    return LeaderLost(f"garbled/unauthenticated message from process 0: {reason}")


def _tune(sock: socket.socket) -> None:
    """One small message per engine call: no Nagle delay. Keepalive notices a vanished host."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, name):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# ---- process 0's end ------------------------------------------------------------------------


class StepLeader:
    """Process 0's end of the step channel: sends every message to every worker, in order."""

    def __init__(self, listener: socket.socket, num_workers: int, token: str):
        self._listener = listener
        self.num_workers = num_workers
        self.token = token
        self._key = step_key(token)
        self._workers: dict[int, StepWriter] = {}  # by process id, 1..num_workers
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()  # guards lost, closing and the watchers
        self._watchers: list[Callable[[WorkerLost], None]] = []
        self.lost: WorkerLost | None = None
        self._closing = False

    @classmethod
    def listen(cls, num_workers: int, port: int = 0, host: str = "") -> StepLeader:
        """Binds the step port (all interfaces by default) for `num_workers` workers."""
        listener = socket.create_server((host, port))
        return cls(listener, num_workers, secrets.token_hex(16))

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def accept(self, timeout: float) -> None:
        """Waits until every worker has connected with its process id and proof of the token."""
        deadline = time.monotonic() + timeout
        while len(self._workers) < self.num_workers:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, self.num_workers + 1)) - set(self._workers))
                raise WorkerLost(f"step channel: worker processes {missing} did not connect to "
                                 f"port {self.port} within {timeout:.0f}s")
            self._listener.settimeout(left)
            try:
                conn, peer = self._listener.accept()
            except socket.timeout:
                continue
            process_id = self._handshake(conn, peer)
            if process_id is None:
                conn.close()
                continue
            _tune(conn)
            self._workers[process_id] = StepWriter(conn, self._key)
            log.info("step channel: worker process %d joined from %s", process_id, peer[0])
        self._listener.close()
        threading.Thread(target=self._monitor, name="ringserve-step-monitor", daemon=True).start()

    def _handshake(self, conn: socket.socket, peer) -> int | None:
        conn.settimeout(10.0)
        try:
            hello = json.loads(_recv_frame(conn, limit=_HELLO_BYTES))
            process_id = int(hello["process_id"])
            proof = str(hello["proof"]).encode("ascii")  # compare_digest takes no other str
        except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
            log.warning("step channel: dropped a connection from %s: %r", peer[0], error)
            return None
        conn.settimeout(None)
        if not hmac.compare_digest(proof, _hello_proof(self._key, process_id).encode()):
            log.warning("step channel: dropped %s: wrong token proof", peer[0])
            return None
        if not 1 <= process_id <= self.num_workers or process_id in self._workers:
            log.warning("step channel: dropped %s: process id %d unexpected or taken", peer[0],
                        process_id)
            return None
        return process_id

    def watch(self, callback: Callable[[WorkerLost], None]) -> None:
        """Calls `callback(error)` once when a worker is lost (at once if one already is)."""
        with self._state_lock:
            lost = self.lost
            if lost is None:
                self._watchers.append(callback)
        if lost is not None:
            callback(lost)

    def send(self, message: tuple) -> None:
        """Sends `message` to every worker; raises WorkerLost when one is gone."""
        payload = step_codec.encode(message)  # TypeError here for what workers could not rebuild
        with self._send_lock:
            if self.lost is not None:
                raise WorkerLost(str(self.lost))
            for process_id, writer in self._workers.items():
                try:
                    writer.write(payload)
                except OSError as error:
                    self._mark_lost(process_id, f"sending failed: {error!r}")
                    raise WorkerLost(str(self.lost)) from error

    def close(self, status: int = 0) -> None:
        """Tells every worker to exit with `status`, then closes the channel."""
        with self._state_lock:
            self._closing = True
        payload = step_codec.encode(("stop", status))
        with self._send_lock:
            for writer in self._workers.values():  # a lost worker's send fails: it is gone anyway
                try:
                    writer.write(payload)
                    writer.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        self._listener.close()

    def _monitor(self) -> None:
        """Workers only write when they fail; any bytes or EOF from one means it is lost."""
        selector = selectors.DefaultSelector()
        for process_id, writer in self._workers.items():
            selector.register(writer.sock, selectors.EVENT_READ, process_id)
        open_workers = len(self._workers)
        while open_workers:
            for key, _ in selector.select():
                process_id, conn = key.data, key.fileobj
                selector.unregister(conn)
                open_workers -= 1
                try:
                    conn.settimeout(1.0)
                    reason = _recv_frame(conn, limit=1 << 16).decode(errors="replace")
                except (OSError, EOFError, ValueError):
                    reason = "its connection closed (the process died or was killed)"
                with self._state_lock:
                    closing = self._closing
                if not closing:  # else it exited because it was told to
                    self._mark_lost(process_id, reason)
                conn.close()
        selector.close()

    def _mark_lost(self, process_id: int, reason: str) -> None:
        with self._state_lock:
            if self.lost is not None:
                return
            self.lost = WorkerLost(f"worker process {process_id} is lost: {reason}")
            watchers, self._watchers = self._watchers, []
        log.error("step channel: %s", self.lost)
        for callback in watchers:
            callback(self.lost)


class MirroredEngine:
    """The engine's surface on process 0; each public method runs on every worker first.

    `factory(**kwargs)` builds the engine here and on every worker (`("engine", ...)`); `identity`
    names what must match across processes (model and mesh). Attributes and properties are read
    from the local engine; results of calls on workers are dropped.
    """

    def __init__(self, leader: StepLeader, factory: Callable[..., Any], kwargs: dict[str, Any],
                 identity: str):
        self._leader = leader
        leader.send(("engine", kwargs, identity))
        self._engine = factory(**kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._engine, name)
        if not callable(value):
            return value

        def mirrored(*args, **kwargs):
            self._leader.send(("call", name, args, kwargs))
            return value(*args, **kwargs)

        return mirrored


# ---- a worker's end -------------------------------------------------------------------------


class StepFollower:
    """A worker's end of the step channel: receives process 0's messages, in order."""

    def __init__(self, conn: socket.socket, process_id: int, token: str):
        self._conn = conn
        self._reader = StepReader(conn, step_key(token))
        self.process_id = process_id

    @classmethod
    def connect(cls, address: str, process_id: int, token: str,
                timeout: float = 60.0) -> StepFollower:
        """Connects to process 0's step port ("HOST:PORT") and introduces itself."""
        host, _, port = address.rpartition(":")
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = socket.create_connection((host.strip("[]"), int(port)), timeout=10.0)
                break
            except OSError as error:
                if time.monotonic() > deadline:
                    raise LeaderLost(f"step channel: cannot reach process 0 at {address}: "
                                     f"{error}") from error
                time.sleep(0.2)
        conn.settimeout(None)
        _tune(conn)
        proof = _hello_proof(step_key(token), process_id)
        _send_frame(conn, json.dumps({"process_id": process_id, "proof": proof}).encode())
        return cls(conn, process_id, token)

    def receive(self) -> tuple:
        """The next message; LeaderLost when process 0 is gone or sent a bad frame."""
        return self._reader.read()

    def report(self, reason: str) -> None:
        """Best effort: tells process 0 why this worker is about to exit."""
        try:
            _send_frame(self._conn, reason.encode()[: 1 << 16])
        except OSError:
            pass

    def close(self) -> None:
        self._conn.close()


def run_worker(follower: StepFollower, factory: Callable[..., Any], identity: str) -> int:
    """A worker's life: builds the engine and runs process 0's calls until told to stop.

    Returns the exit status: the one process 0 sent with "stop", or 1 when process 0 was lost, a
    call failed or the model / mesh differ from process 0's (then process 0 is told why).
    """
    engine = None
    calls = 0
    try:
        while True:
            try:
                message = follower.receive()
            except LeaderLost as error:
                log.error("worker process %d: %s; exiting", follower.process_id, error)
                return 1
            kind = message[0]
            if kind == "stop":
                log.info("worker process %d: stopped by process 0 after %d calls",
                         follower.process_id, calls)
                return int(message[1])
            try:
                if kind == "engine":
                    _, kwargs, leader_identity = message
                    if leader_identity != identity:
                        raise ValueError(
                            f"worker process {follower.process_id} runs {identity}, process 0 "
                            f"runs {leader_identity}: start every process with the same --model, "
                            "--dtype and --mesh")
                    engine = factory(**kwargs)
                elif kind == "call" and engine is not None and not message[1].startswith("_"):
                    _, name, args, kwargs = message
                    log.debug("worker process %d: %s%r", follower.process_id, name, args)
                    getattr(engine, name)(*args, **kwargs)
                    calls += 1
                else:
                    raise ValueError(f"unexpected message {kind!r} (engine built: "
                                     f"{engine is not None})")
            except Exception as error:  # noqa: BLE001 - reported to process 0, then we exit
                log.exception("worker process %d: %s failed", follower.process_id, kind)
                follower.report(f"{type(error).__name__}: {error}")
                return 1
    finally:
        follower.close()


# ---- the process group ----------------------------------------------------------------------


def setup(group: ProcessGroup, connect_timeout: float = 600.0) -> StepLeader | StepFollower | None:
    """Joins the process group and opens the step channel; call before JAX touches a device.

    Returns None for a single process, the StepLeader on process 0, a StepFollower elsewhere.
    `connect_timeout` bounds how long process 0 waits for every worker to connect.
    """
    if group.coordinator is None:
        return None
    # Cross-process collectives on CPU need gloo; GPUs use NCCL and TPUs their own network.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        None if group.coordinator == "auto" else group.coordinator,
        num_processes=group.num_processes, process_id=group.process_id)
    count, index = jax.process_count(), jax.process_index()
    log.info("process %d of %d: %d local devices, %d in all", index, count,
             jax.local_device_count(), jax.device_count())
    if count == 1:
        return None
    leader = None
    announce = ""
    if index == 0:
        leader = StepLeader.listen(count - 1, group.step_port)
        host = group.coordinator_host or socket.gethostbyname(socket.gethostname())
        announce = f"{host}:{leader.port} {leader.token}"
    # Every process takes part (a collective): afterwards all know process 0's address.
    address, token = _broadcast_text(announce).split()
    if leader is not None:
        log.info("step channel: listening on %s for %d workers", address, count - 1)
        leader.accept(connect_timeout)
        return leader
    log.info("step channel: worker process %d following %s", index, address)
    return StepFollower.connect(address, index, token)


def _broadcast_text(text: str) -> str:
    """Process 0's `text`, on every process (a collective: all must call it)."""
    raw = text.encode()
    if len(raw) > _ANNOUNCE_BYTES:
        raise ValueError(f"step channel address {text!r} is too long")
    buf = np.zeros(_ANNOUNCE_BYTES, np.uint8)
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    out = multihost_utils.broadcast_one_to_all(buf)
    return bytes(np.asarray(out, np.uint8)).rstrip(b"\0").decode()


def exit_now(status: int) -> None:
    """Leaves at once after a failure: JAX's exit barrier would wait for a peer that is gone."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
