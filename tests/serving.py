"""Starts the real server as a subprocess on a free port, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

READY = re.compile(r"ringserve: serving \S+ on (\S+):(\d+)")

# Started servers by target, so a failing test's report can show the log of the server it used.
SERVERS: dict[str, "ServerProcess"] = {}


class ServerProcess:
    """`ringserve serve` in a child process; `target` is "127.0.0.1:PORT" once ready."""

    def __init__(self, *args: str, startup_timeout: float = 300.0):
        cmd = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", "0", *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.target = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(startup_timeout) or not self.target:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = READY.search(line)
            if match and not self.target:
                self.target = f"{match.group(1)}:{match.group(2)}"
                SERVERS[self.target] = self
                self._ready.set()
        self._ready.set()  # the process ended: wake the waiter either way

    def output(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.proc.poll()


def wait_idle(stats, timeout: float = 60.0):
    """Polls `stats()` (GetStats, or the SDK's `client.stats`) until no request runs or waits for a
    slot, and returns that snapshot. Running totals are read from it, after one's own requests
    ended. The timeout only bounds a hang: the poll returns as soon as the server is idle, so a
    loaded machine costs time, never a failure."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = stats()
        if snapshot.running_requests == 0 and snapshot.waiting_requests == 0:
            return snapshot
        if time.monotonic() > deadline:
            raise AssertionError(f"server still busy after {timeout:.0f} s: {snapshot}")
        time.sleep(0.02)


def modality_counts(message) -> dict[str, int]:
    """A CountTokens response's or usage's prompt_tokens_details as {"TEXT": n, "IMAGE": m, ...}."""
    from ringserve.v1 import inference_pb2 as pb

    return {pb.Modality.Name(d.modality): d.token_count for d in message.prompt_tokens_details}


def hf_greedy(model, inputs, steps: int) -> tuple[list[int], list[int]]:
    """A transformers model's prompt ids and `steps` greedy tokens for one processed prompt."""
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt):].tolist()


@contextlib.contextmanager
def served(*args: str):
    """`ringserve serve ARGS` and an Inference stub on it; the server stops on exit."""
    import grpc

    from ringserve.v1 import inference_pb2_grpc as pb_grpc

    server = ServerProcess(*args)
    try:
        with grpc.insecure_channel(server.target) as channel:
            yield pb_grpc.InferenceStub(channel)
    finally:
        server.terminate()
