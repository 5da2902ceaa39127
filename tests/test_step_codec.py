"""The step channel's bytes (server/step_codec.py, the frames of server/distributed.py).

The codec: every supported type round-trips exactly; anything else fails at encode with a
TypeError; any bytes at all decode to a message or a ValueError, pickles included, and nothing
they name runs. The frames, over a socketpair: process 0's messages pass in order; an altered,
foreign, replayed or reordered frame makes the worker give up on process 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.sampling import SamplingParams
from server import step_codec
from server.distributed import (LeaderLost, StepFollower, StepLeader, StepReader, StepWriter,
                                _send_frame, step_key)
from server.step_codec import decode, encode

DTYPES = sorted(step_codec._DTYPES)


def same(a, b) -> bool:
    """Equal values of identical types, all the way down (1 == 1.0 == True will not do)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def round_trip(x):
    back = decode(encode(x))
    assert same(back, x), (x, back)
    return back


@pytest.mark.parametrize("x", [
    None, True, False, 0, -1, 2**63 - 1, -2**63, 2**64 - 1, 0.0, -2.5, float("inf"), float("nan"),
    "", "page", "ünïcode ✓", b"", b"\x00\xff", [], (), {}, [1, [2, [3]]], (1, (2, (3,))),
    ((),), [()], ([],), {"a": (1, [2, {"b": ()}])}, ("stop", 0),
    ("call", "prefill", (0, [5, 6, 7], 16, [1, 2]), {}),
    ("call", "decode", ([0, 1], [5, 6], [2, 2], [[1], [2]]), {}),
    ("engine", {"max_slots": 4, "num_pages": 8, "page_len": 16}, '{"model": "tiny"}'),
])
def test_plain_values_round_trip(x):
    round_trip(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_arrays_of_every_dtype_round_trip(dtype):
    values = np.arange(24).reshape(2, 3, 4) % 2
    for a in (values.astype(dtype), np.zeros((0, 3), dtype), np.zeros((), dtype),
              np.array(1, dtype)):
        back = round_trip(a)
        assert back.flags.writeable and back.flags.c_contiguous
    round_trip(np.array(1, dtype)[()])  # a numpy scalar stays one


def test_non_contiguous_and_foreign_order_arrays_round_trip():
    a = np.arange(60, dtype=np.float32).reshape(5, 12)
    for view in (a[:, ::3], a.T, a[::-1], np.asfortranarray(a), a.astype(">f4")):
        back = decode(encode(view))
        assert back.dtype == np.float32 and back.shape == view.shape
        np.testing.assert_array_equal(back, view)


def test_registered_dataclasses_round_trip():
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=-3)
    assert round_trip(params) == params
    message = ("call", "set_params", (3, params), {})
    assert round_trip(message)[2][1] == params
    embeds = np.linspace(0, 1, 64 * 8, dtype=np.float32).reshape(64, 8)
    round_trip(("call", "prefill", (0, list(range(-3, 61)), 0, [1, 2, 3, 4]), {"embeds": embeds}))


class Arbitrary:
    pass


class Str(str):
    pass


@pytest.mark.parametrize("x, name", [
    (lambda: 0, "function"), ({1, 2}, "set"), (Arbitrary(), "Arbitrary"), (Str("s"), "Str"),
    ({1: "a"}, "keys must be str"), (np.array([object()]), "dtype object"),
    (np.array(["a"]), "dtype <U1"), (bytearray(b"x"), "bytearray"), (2**64, "64 bits"),
    (np.ma.masked_array([1]), "MaskedArray"), ([{"deep": ("x", Arbitrary())}], "Arbitrary"),
    (SamplingParams, "type"),
])
def test_anything_else_fails_at_encode(x, name):
    with pytest.raises(TypeError, match=name):
        encode(x)


def test_unregistered_dataclasses_fail_at_encode():
    @dataclasses.dataclass(frozen=True)
    class Other:
        temperature: float = 1.0

    with pytest.raises(TypeError, match="Other"):
        encode(Other())


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_decode_or_raise_value_error(data):
    try:
        decode(data)
    except ValueError:
        pass


def ext(code: int, fields) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(fields, use_bin_type=True)))


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.integers(-128, 127), st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                  max_size=4),
    max_leaves=12))
def test_random_ext_values_decode_or_raise_value_error(code, fields):
    """Well-formed msgpack with arbitrary ext codes and contents gets past the parser."""
    try:
        decode(ext(code, fields))
    except ValueError:
        pass


class Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_pickle_is_rejected_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        payload = pickle.dumps(("call", "warmup", (Exploit(marker),), {}), protocol=protocol)
        with pytest.raises(ValueError):
            decode(payload)
    assert not marker.exists()


def test_deep_nesting_is_rejected():
    for wrap in (lambda x: [x], lambda x: (x,), lambda x: {"k": x}):
        x = 0
        for _ in range(step_codec.MAX_DEPTH):
            x = wrap(x)
        round_trip(x)
        with pytest.raises(TypeError, match="deeper"):
            encode(wrap(wrap(x)))
    deep = msgpack.packb(0)
    for _ in range(step_codec.MAX_DEPTH + 2):
        deep = msgpack.packb(msgpack.ExtType(1, b"\x91" + deep))  # a tuple of one
    with pytest.raises(ValueError, match="deeper"):
        decode(deep)
    with pytest.raises(ValueError):
        decode(b"\x91" * 100_000 + b"\x00")  # plain lists: msgpack's own stack limit


@pytest.mark.parametrize("fields, message", [
    (["float32", [2, 3], b"\0" * 23], "needs 24 bytes"),
    (["float32", [2, 3], b"\0" * 25], "needs 24 bytes"),
    (["float32", [2**40, 2**40], b""], "needs"),
    (["float32", [-1], b""], "bad array shape"),
    (["float32", [1] * 9, b"\0" * 4], "bad array shape"),
    (["float32", "23", b""], "bad array shape"),
    (["object", [1], b"\0" * 8], "unknown dtype"),
    (["<f4", [1], b"\0" * 4], "unknown dtype"),
    (["bool", [2], b"\0\2"], "other than 0 and 1"),
    (["float32", [1]], r"\[dtype, shape, bytes\]"),
])
def test_bad_arrays_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        decode(ext(2, fields))


@pytest.mark.parametrize("data, message", [
    (ext(9, []), "unknown ext code 9"),
    (msgpack.packb(msgpack.Timestamp(1)), "unknown value"),
    (ext(4, ["os.system", {}]), "unknown dataclass"),
    (ext(4, ["SamplingParams", {"temperature": 1.0}]), "expected"),
    (ext(4, ["SamplingParams", {"temperature": -1.0, "top_k": 0, "top_p": 1.0, "seed": 0}]),
     "rejected"),
    (ext(4, ["SamplingParams", {"temperature": "hot", "top_k": 0, "top_p": 1.0, "seed": 0}]),
     "rejected"),
    (ext(3, ["int32", [2], b"\0" * 8]), "scalar of shape"),
    (msgpack.packb({1: 2}), "map key"),
    (msgpack.packb({b"k": 2}), "not a str"),
    (msgpack.packb([1]) + b"\0", "extra data"),
])
def test_bad_values_are_rejected(data, message):
    with pytest.raises(ValueError, match=message):
        decode(data)


# ---- frames over a socketpair ----------------------------------------------------------------

TOKEN = "0123456789abcdef0123456789abcdef"
MESSAGES = [("engine", {"max_slots": 2}, "model"),
            ("call", "set_params", (0, SamplingParams(temperature=0.5, seed=1)), {}),
            ("call", "prefill", (0, [1, 2, 3], 0, [1]), {"embeds": np.ones((3, 4), np.float32)}),
            ("stop", 0)]


@pytest.fixture
def channel():
    """Process 0's writer and a worker's reader on the two ends of a socketpair."""
    a, b = socket.socketpair()
    yield StepWriter(a, step_key(TOKEN)), StepReader(b, step_key(TOKEN))
    a.close()
    b.close()


def test_good_frames_pass_in_order(channel):
    writer, reader = channel
    for message in MESSAGES:
        writer.write(encode(message))
    for message in MESSAGES:
        assert same(reader.read(), message)


def test_a_flipped_bit_is_caught(channel):
    writer, reader = channel
    frame = bytearray(writer.seal(encode(MESSAGES[0])))
    frame[12] ^= 0x04  # inside the payload
    _send_frame(writer.sock, bytes(frame))
    with pytest.raises(LeaderLost, match="garbled/unauthenticated.*bad MAC"):
        reader.read()


def test_a_frame_from_another_token_is_caught(channel):
    writer, reader = channel
    stranger = StepWriter(writer.sock, step_key("f" * 32))
    stranger.write(encode(MESSAGES[0]))
    with pytest.raises(LeaderLost, match="garbled/unauthenticated.*bad MAC"):
        reader.read()


def test_a_replayed_frame_is_caught(channel):
    writer, reader = channel
    frame = writer.seal(encode(MESSAGES[0]))
    _send_frame(writer.sock, frame)
    _send_frame(writer.sock, frame)
    assert reader.read() == MESSAGES[0]
    with pytest.raises(LeaderLost, match="garbled/unauthenticated.*frame 0 where frame 1"):
        reader.read()


def test_reordered_frames_are_caught(channel):
    writer, reader = channel
    first, second = (writer.seal(encode(m)) for m in MESSAGES[:2])
    _send_frame(writer.sock, second)
    _send_frame(writer.sock, first)
    with pytest.raises(LeaderLost, match="garbled/unauthenticated.*frame 1 where frame 0"):
        reader.read()


@pytest.mark.parametrize("payload, message", [
    (pickle.dumps(("stop", 0)), "extra data"), (encode(["stop", 0]), "not a step message"),
    (encode(()), "not a step message"), (b"", "incomplete"),
])
def test_authentic_frames_must_still_hold_a_message(channel, payload, message):
    writer, reader = channel
    writer.write(payload)
    with pytest.raises(LeaderLost, match=message):
        reader.read()


def test_short_and_oversized_frames_are_caught(channel):
    writer, reader = channel
    _send_frame(writer.sock, b"\0" * 39)
    with pytest.raises(LeaderLost, match="too short"):
        reader.read()
    writer.sock.sendall((1 << 62).to_bytes(8, "big"))
    with pytest.raises(LeaderLost, match="limit"):
        reader.read()


def test_a_closed_stream_is_a_lost_process_0(channel):
    writer, reader = channel
    writer.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(LeaderLost, match="lost process 0"):
        reader.read()


def test_the_hello_proves_the_token_without_sending_it():
    leader = StepLeader.listen(1, host="127.0.0.1")
    address = ("127.0.0.1", leader.port)
    odd = socket.create_connection(address)
    _send_frame(odd, json.dumps({"process_id": 1, "proof": "é"}).encode())
    with socket.create_server(("127.0.0.1", 0)) as spy:  # what a worker's hello holds
        StepFollower.connect(f"127.0.0.1:{spy.getsockname()[1]}", 1, leader.token).close()
        hello = spy.accept()[0].recv(4096)
    assert leader.token.encode() not in hello
    worker = StepFollower.connect(f"127.0.0.1:{leader.port}", 1, leader.token)
    leader.accept(timeout=10)  # the odd hello was dropped, the worker's taken
    assert odd.recv(1) == b""
    leader.close(0)
    assert worker.receive() == ("stop", 0)
    odd.close()
    worker.close()
