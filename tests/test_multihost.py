"""Several processes, one engine (server/distributed.py).

First the step channel and the mirror in one process (threads, real sockets, a recording engine):
order, stop, a dead or failing worker, a lost process 0, strangers. Then the real thing: two
server processes of 4 CPU devices each (`--mesh sequence=8`, `sequence=4,tensor=2`) answer greedy
requests with the same tokens as a one-device server, and both exit on SIGTERM to process 0.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

from _model_helpers import tiny_config
from model.kv_pages import pages_for_budget
from model.sampling import SamplingParams
from model.sharding import MeshShape
from ringserve import Client
from serving import ServerProcess
from server import runtime
from server.distributed import (LeaderLost, MirroredEngine, ProcessGroup, StepFollower,
                                StepLeader, WorkerLost, run_worker)

# ---- the channel and the mirror, in one process ---------------------------------------------


class Recorder:
    """Stands in for PagedEngine: the same methods, each call recorded; results are made up."""

    prefill_chunk = 16

    def __init__(self, **shapes):
        self.shapes = shapes
        self.calls: list[tuple] = []

    def set_params(self, slot, params):
        self.calls.append(("set_params", slot, params))

    def prefill(self, slot, token_ids, start, block_table):
        self.calls.append(("prefill", slot, tuple(token_ids), start, tuple(block_table)))
        return sum(token_ids) % 97

    def decode(self, slots, tokens, positions, block_tables):
        self.calls.append(("decode", tuple(slots), tuple(tokens), tuple(positions),
                           tuple(map(tuple, block_tables))))
        return [t + 1 for t in tokens]

    def warmup(self):
        self.calls.append(("warmup",))


class FailsOnDecode(Recorder):
    def decode(self, *args):
        raise RuntimeError("device lost")


class Group:
    """Process 0's leader and `workers` followers, each worker running `run_worker` in a thread."""

    def __init__(self, workers: int = 2, factories=None, identities=None, start=None):
        self.leader = StepLeader.listen(workers, host="127.0.0.1")
        self.address = f"127.0.0.1:{self.leader.port}"
        self.followers = [StepFollower.connect(self.address, i, self.leader.token)
                          for i in range(1, workers + 1)]
        self.leader.accept(timeout=10)
        self.engines: dict[int, Recorder] = {}
        self.status: dict[int, int] = {}
        self.threads = []
        factories = factories or {}
        identities = identities or {}
        for follower in self.followers:
            i = follower.process_id
            if start is not None and i not in start:
                continue
            thread = threading.Thread(target=self._work, daemon=True, args=(
                follower, factories.get(i, Recorder), identities.get(i, "model")))
            thread.start()
            self.threads.append(thread)

    def _work(self, follower, factory, identity):
        def build(**shapes):
            engine = self.engines[follower.process_id] = factory(**shapes)
            return engine
        self.status[follower.process_id] = run_worker(follower, build, identity)

    def join(self, timeout=10.0):
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a worker did not exit"
        return self.status


def mirror(group: Group, factory=Recorder, shapes=None):
    """Process 0's MirroredEngine over `group`, and the engine it built locally."""
    built = []

    def build(**kwargs):
        built.append(factory(**kwargs))
        return built[-1]

    return MirroredEngine(group.leader, build, shapes or {}, "model"), built


def wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def dropped(sock: socket.socket) -> bool:
    """True once the other end has closed `sock`."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def random_call(rng, engine):
    kind = rng.choice(["set_params", "prefill", "decode"])
    if kind == "set_params":
        return engine.set_params(rng.randrange(4), SamplingParams(temperature=rng.random(),
                                                                  seed=rng.randrange(100)))
    if kind == "prefill":
        n = rng.randrange(1, 16)
        return engine.prefill(rng.randrange(4), [rng.randrange(97) for _ in range(n)],
                              rng.randrange(64), list(range(1, rng.randrange(2, 6))))
    rows = rng.randrange(1, 4)
    return engine.decode(list(range(rows)), [rng.randrange(97) for _ in range(rows)],
                         [rng.randrange(64) for _ in range(rows)], [[1, 2]] * rows)


def test_every_call_runs_on_every_worker_in_order():
    group = Group(workers=2)
    local, (mine,) = mirror(group, shapes={"max_slots": 4, "num_pages": 8})
    assert local.prefill_chunk == 16  # attributes are read locally
    local.warmup()
    rng = random.Random(0)
    for _ in range(300):
        random_call(rng, local)
    group.leader.close(0)
    assert group.join() == {1: 0, 2: 0}
    assert len(mine.calls) == 301
    for worker in group.engines.values():
        assert worker.shapes == {"max_slots": 4, "num_pages": 8}
        assert worker.calls == mine.calls


def test_local_results_are_the_engines():
    group = Group(workers=1)
    local, _ = mirror(group)
    assert local.prefill(0, [3, 4], 0, [1]) == 7
    assert local.decode([0, 1], [5, 6], [2, 2], [[1], [2]]) == [6, 7]
    group.leader.close(0)
    assert group.join() == {1: 0}


def test_stop_status_reaches_the_workers():
    group = Group(workers=2)
    mirror(group)
    group.leader.close(3)  # process 0 failed to start: the workers exit with its status
    assert group.join() == {1: 3, 2: 3}


def test_a_dead_worker_fails_the_engine_at_once():
    group = Group(workers=2, start={1})  # worker 2 connects but never runs
    lost = []
    got_lost = threading.Event()
    group.leader.watch(lambda error: (lost.append(error), got_lost.set()))
    local, (mine,) = mirror(group)
    local.warmup()
    group.followers[1].close()  # worker 2 dies: its connection closes
    assert got_lost.wait(5), "process 0 did not notice the dead worker"
    assert isinstance(lost[0], WorkerLost) and "worker process 2" in str(lost[0])
    with pytest.raises(WorkerLost, match="worker process 2"):
        local.prefill(0, [1, 2], 0, [1])
    assert mine.calls == [("warmup",)]  # the failed call did not run here either
    late = []
    group.leader.watch(late.append)  # watching after the loss reports it at once
    assert late and "worker process 2" in str(late[0])
    group.leader.close(0)  # the survivor is still told to stop
    assert group.join() == {1: 0}


def test_a_failing_worker_reports_why():
    group = Group(workers=2, factories={2: FailsOnDecode})
    local, _ = mirror(group)
    local.decode([0], [5], [3], [[1]])  # runs here; worker 2's decode raises
    wait_until(lambda: group.leader.lost is not None)
    assert "worker process 2" in str(group.leader.lost)
    assert "RuntimeError: device lost" in str(group.leader.lost)
    with pytest.raises(WorkerLost, match="device lost"):
        local.warmup()
    group.leader.close(0)
    assert group.join() == {1: 0, 2: 1}


def test_a_worker_with_another_model_or_mesh_refuses():
    group = Group(workers=1, identities={1: "other model"})
    mirror(group)
    assert group.join() == {1: 1}
    wait_until(lambda: group.leader.lost is not None)
    assert "same --model, --dtype and --mesh" in str(group.leader.lost)
    assert 1 not in group.engines  # it built nothing
    group.leader.close(1)


def test_a_worker_exits_when_process_0_is_lost():
    fake_leader = socket.create_server(("127.0.0.1", 0))
    follower = StepFollower.connect(f"127.0.0.1:{fake_leader.getsockname()[1]}", 1, "t")
    conn, _ = fake_leader.accept()
    status = []
    thread = threading.Thread(target=lambda: status.append(run_worker(follower, Recorder, "m")))
    thread.start()
    conn.close()  # process 0 dies without a word
    thread.join(5)
    assert status == [1]
    fake_leader.close()


def test_a_worker_cannot_reach_a_missing_process_0():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(LeaderLost, match="cannot reach process 0"):
        StepFollower.connect(f"127.0.0.1:{port}", 1, "t", timeout=0.5)


def test_strangers_are_turned_away():
    leader = StepLeader.listen(1, host="127.0.0.1")
    address = ("127.0.0.1", leader.port)
    garbage = socket.create_connection(address)
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
    impostor = StepFollower.connect(f"127.0.0.1:{leader.port}", 1, "not the token")
    worker = StepFollower.connect(f"127.0.0.1:{leader.port}", 1, leader.token)
    leader.accept(timeout=10)
    assert dropped(garbage)
    with pytest.raises(LeaderLost):
        impostor.receive()
    leader.close(0)
    assert worker.receive() == ("stop", 0)
    garbage.close()
    impostor.close()
    worker.close()


def test_process_0_gives_up_on_workers_that_never_come():
    leader = StepLeader.listen(2, host="127.0.0.1")
    StepFollower.connect(f"127.0.0.1:{leader.port}", 1, leader.token)
    with pytest.raises(WorkerLost, match=r"\[2\] did not connect"):
        leader.accept(timeout=0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2), "need --coordinator"),
    (dict(coordinator="nohost"), "expected HOST:PORT"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), "count from 0"),
    (dict(coordinator="h:1", num_processes=0), "must be >= 1"),
])
def test_process_group_flags_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProcessGroup(**kwargs)


def test_a_mesh_larger_than_the_devices_says_how_to_get_more():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=4096"):
        runtime.build_mesh(MeshShape(sequence=4096), tiny_config())
    with pytest.raises(ValueError, match="does not divide"):
        runtime.build_mesh(MeshShape(tensor=3), tiny_config())
    assert runtime.build_mesh(MeshShape(), tiny_config()) is None


def test_the_pool_budget_is_per_device():
    """S sequence ranks hold S times the pages; T tensor ranks each hold 1/T of a page."""
    config = tiny_config()
    budget = int(0.001 * 2**30)

    def pages(mesh):
        return runtime.pool_pages(runtime.RuntimeOptions(kv_cache_gib=0.001, page_len=16,
                                                         mesh=mesh), config)

    assert pages(MeshShape()) == pages_for_budget(config, 16, budget)
    assert pages(MeshShape(sequence=8)) == 8 * pages_for_budget(config, 16, budget)
    assert pages(MeshShape(sequence=4, tensor=2)) == 4 * pages_for_budget(config, 16, 2 * budget)


# ---- the real thing: two server processes -----------------------------------------------------

SERVE = ("--model", "default", "--max-len", "512", "--max-batch", "2", "--prefill-chunk", "64",
         "--kv-cache-gib", "0.01", "--no-warmup", "--grace-period", "2")
# Short, one chunk; ~300 tokens: five 64-token chunks over pages on all 8 sequence ranks; digits.
PROMPTS = ["The quick brown fox", "Tell me about the sea and the ships on it. " * 30, "1, 2, 3, 4,"]
MAX_TOKENS = 8


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


class Worker:
    """A worker process of a group (`python -m server.cli ... --process-id I`), output kept."""

    def __init__(self, args, env):
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def answers(target: str) -> list[tuple[tuple[int, ...], str]]:
    """Greedy answers to every prompt, and a seeded sample (it reads the whole distribution)."""
    with Client(target, timeout=120) as client:
        results = [client.generate_text(p, max_output_tokens=MAX_TOKENS, temperature=0)
                   for p in PROMPTS]
        results.append(client.generate_text(PROMPTS[1], max_output_tokens=MAX_TOKENS,
                                             temperature=1.0, seed=7))
    return [(r.token_ids, r.text) for r in results]


@pytest.fixture(scope="module")
def one_device_answers():
    server = ServerProcess(*SERVE)
    try:
        yield answers(server.target)
    finally:
        server.terminate()


# Both axes at once; the sequence axis spans the two processes (its ring crosses between them).
@pytest.mark.parametrize("mesh", ["sequence=4,tensor=2"])
def test_two_processes_answer_like_one_device(mesh, one_device_answers, monkeypatch):
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    group = ("--mesh", mesh, "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2")
    worker = Worker([*SERVE, *group, "--process-id", "1"], env)
    try:
        with monkeypatch.context() as patch:
            patch.setenv("XLA_FLAGS", env["XLA_FLAGS"])  # ServerProcess copies os.environ
            server = ServerProcess(*SERVE, *group, "--process-id", "0", startup_timeout=240)
        try:
            assert answers(server.target) == one_device_answers
        finally:
            status = server.terminate(timeout=60)
        assert status == 0, server.output()
        assert worker.proc.wait(30) == 0, worker.output()
        assert "stopped by process 0" in worker.output()
    finally:
        worker.kill()
        print(worker.output()[-3000:])


def test_the_identity_is_the_model_and_the_mesh():
    config = tiny_config()
    a = runtime.engine_identity(config, MeshShape(sequence=8))
    assert json.loads(a)["mesh"] == "data=1,sequence=8,tensor=1"
    assert a != runtime.engine_identity(config, MeshShape(sequence=4, tensor=2))
    assert a != runtime.engine_identity(tiny_config(n_layers=3), MeshShape(sequence=8))
