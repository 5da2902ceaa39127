"""The SDK (`ringserve.Client`, `ringserve.AsyncClient`) against the real server on the default
model (random weights: the text is gibberish, but token counts, limits and determinism are real)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import grpc
import pytest

import serving

import ringserve
from ringserve import types

# A few turns with a system instruction, to exercise every content form the SDK accepts.
CONVERSATION = [
    "What is the capital of France?",
    ("model", "Paris."),
    {"role": "user", "parts": [{"text": "And of "}, "Italy?"]},
]


@pytest.fixture(scope="module")
def client(server_target):
    with ringserve.Client(server_target, timeout=60) as c:
        yield c


def _wait_idle(client: ringserve.Client) -> ringserve.ServerStats:
    """The server's stats once no request is running or waiting (cancellation freed its slot)."""
    return serving.wait_idle(client.stats)


def _cancelled_count(client: ringserve.Client) -> int:
    """CANCELLED finishes so far, once earlier tests' requests (a missed deadline is cancelled
    on the server too) have all been seen: one request run to the end orders us after them."""
    client.generate_text("hi", max_output_tokens=1)
    return _wait_idle(client).finished_requests.get("CANCELLED", 0)


# ---- requests built without a server ----------------------------------------------------------

def test_contents_forms():
    contents = types.to_contents(CONVERSATION)
    assert [(c.role, [p.text for p in c.parts]) for c in contents] == [
        ("user", ["What is the capital of France?"]),
        ("model", ["Paris."]),
        ("user", ["And of ", "Italy?"]),
    ]
    assert [c.role for c in types.to_contents("hi")] == ["user"]
    assert [c.role for c in types.to_contents(("model", "hi"))] == ["model"]
    assert [c.role for c in types.to_contents(["a", "b"])] == ["user", "user"]
    with pytest.raises(TypeError):
        types.to_contents([42])


def test_unset_options_stay_unset():
    config = types.generate_request("hi", temperature=0.0).generation_config
    assert config.HasField("temperature") and config.temperature == 0.0
    assert not config.HasField("max_output_tokens") and not config.HasField("seed")


def test_health_wire_format():
    assert types.health_request("") == b""
    assert types.health_request("ringserve.v1.Inference") == b"\x0a\x16ringserve.v1.Inference"
    assert types.health_status(b"") == "UNKNOWN"
    assert types.health_status(b"\x08\x01") == "SERVING"
    assert types.health_status(b"\x08\x02") == "NOT_SERVING"


def test_unreachable_server_raises_unavailable():
    with ringserve.Client("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(ringserve.Unavailable) as info:
            c.model_info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ringserve.Unavailable):
            c.generate_text("hi")


# ---- the real server --------------------------------------------------------------------------

def test_stream_chunks_add_up(client):
    chunks = list(client.generate(CONVERSATION, system_instruction="Answer briefly.",
                                  max_output_tokens=12, temperature=0, request_id="req-stream"))
    last = chunks[-1]
    ids = [t for c in chunks for t in c.token_ids]
    assert last.finish_reason in ("STOP", "MAX_TOKENS")
    assert last.usage is not None
    assert len(ids) == last.usage.candidates_token_count <= 12
    assert last.usage.total_token_count == (last.usage.prompt_token_count
                                            + last.usage.candidates_token_count)
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert all(c.request_id == "req-stream" for c in chunks)
    first_with_tokens = next(c for c in chunks if c.token_ids)
    assert first_with_tokens.time_to_first_token > 0
    assert last.time_to_first_token == first_with_tokens.time_to_first_token
    with pytest.raises(dataclasses.FrozenInstanceError):
        last.text = "x"


def test_generate_text_max_tokens(client):
    result = client.generate_text("Count to ten.", max_output_tokens=5, temperature=0)
    assert result.finish_reason == "MAX_TOKENS"
    assert len(result.token_ids) == 5 == result.usage.candidates_token_count
    assert result.time_to_first_token > 0
    assert result.request_id  # made up by the server


def test_greedy_is_deterministic(client):
    a = client.generate_text("Once upon a time", max_output_tokens=8, temperature=0)
    b = client.generate_text("Once upon a time", max_output_tokens=8, temperature=0)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_seeded_sampling_is_reproducible(client):
    def run(seed):
        return client.generate_text("Once upon a time", max_output_tokens=8, temperature=1.0,
                                    seed=seed).token_ids

    assert run(1234) == run(1234)
    assert run(1234) != run(99)  # 8 draws from a near-uniform 8192-token vocabulary


def test_count_tokens_matches_prompt_usage(client):
    n = client.count_tokens(CONVERSATION, system_instruction="Answer briefly.")
    result = client.generate_text(CONVERSATION, system_instruction="Answer briefly.",
                                  max_output_tokens=1, temperature=0)
    assert n == result.usage.prompt_token_count > 0
    assert client.count_tokens("hi") < n


def test_model_info(client):
    info = client.model_info()
    assert info.name
    assert info.input_token_limit == 1 << 20  # the default model's context
    assert info.vocab_size == 8192
    assert 0 < info.output_token_limit <= info.input_token_limit
    assert "TEXT" in info.supported_modalities
    assert info.parameter_count > 0
    assert info.dtype in ("float32", "bfloat16")


def test_health(client):
    assert client.health() == "SERVING"
    assert client.health("ringserve.v1.Inference") == "SERVING"
    with pytest.raises(ringserve.NotFound):
        client.health("no.such.Service")


@pytest.mark.parametrize("options, field", [
    (dict(max_output_tokens=0), "max_output_tokens"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_config_raises_invalid_argument(client, options, field):
    with pytest.raises(ringserve.InvalidArgument) as info:
        client.generate_text("hi", **options)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details


def test_bad_contents_raise_invalid_argument(client):
    with pytest.raises(ringserve.InvalidArgument, match="contents"):
        client.generate_text([])
    with pytest.raises(ringserve.InvalidArgument, match="role"):
        client.generate_text([("user", "hi"), ("robot", "beep")])
    with pytest.raises(ringserve.InvalidArgument, match="contents"):
        client.count_tokens([])


def test_tiny_timeout_raises_deadline_exceeded(client):
    with pytest.raises(ringserve.DeadlineExceeded) as info:
        client.generate_text("hi", max_output_tokens=2000, ignore_eos=True, timeout=0.001)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.generate_text("hi", max_output_tokens=2, ignore_eos=True).usage.candidates_token_count == 2


def test_breaking_out_cancels_on_server(client):
    before = _cancelled_count(client)
    start = time.monotonic()
    for chunk in client.generate("Tell me a long story.", max_output_tokens=4000, ignore_eos=True):
        if chunk.token_ids:
            break
    # The server records the cancel and frees the slot long before 4000 tokens could be made.
    stats = _wait_idle(client)
    assert stats.finished_requests.get("CANCELLED", 0) == before + 1
    assert time.monotonic() - start < 30
    assert client.generate_text("hi", max_output_tokens=3, ignore_eos=True).usage.candidates_token_count == 3


def test_closing_the_stream_cancels(client):
    before = _cancelled_count(client)
    stream = client.generate("Tell me a long story.", max_output_tokens=4000, ignore_eos=True)
    next(stream)
    stream.close()
    assert _wait_idle(client).finished_requests.get("CANCELLED", 0) == before + 1


def test_cancel_from_another_thread_ends_the_iteration(client):
    """`Stream.cancel()` is what a Ctrl-C handler or a UI thread calls while the main thread
    iterates: the iteration ends with Cancelled and the server frees the request."""
    before = _cancelled_count(client)
    stream = client.generate("Tell me a long story.", max_output_tokens=4000, ignore_eos=True)
    seen = 0
    with pytest.raises(ringserve.Cancelled):
        for chunk in stream:
            seen += len(chunk.token_ids)
            if seen == 1:
                threading.Thread(target=stream.cancel).start()
    assert 1 <= seen < 4000
    assert _wait_idle(client).finished_requests.get("CANCELLED", 0) == before + 1


def test_cancel_before_the_call_starts(client):
    stream = client.generate("hi", max_output_tokens=4000, ignore_eos=True)
    stream.cancel()
    with pytest.raises(ringserve.Cancelled):
        next(stream)


# ---- the asyncio client -----------------------------------------------------------------------

def test_async_client_basics(server_target):
    async def main():
        async with ringserve.AsyncClient(server_target, timeout=60) as c:
            chunks = [ch async for ch in c.generate(CONVERSATION, max_output_tokens=6,
                                                     temperature=0)]
            ids = [t for ch in chunks for t in ch.token_ids]
            assert len(ids) == chunks[-1].usage.candidates_token_count
            assert chunks[-1].finish_reason in ("STOP", "MAX_TOKENS")

            result = await c.generate_text(CONVERSATION, max_output_tokens=6, temperature=0)
            assert result.token_ids == tuple(ids)  # greedy: same as the stream above
            assert await c.count_tokens(CONVERSATION) == result.usage.prompt_token_count
            assert (await c.model_info()).vocab_size == 8192
            assert await c.health() == "SERVING"

            with pytest.raises(ringserve.InvalidArgument, match="top_p"):
                await c.generate_text("hi", top_p=1.5)
            with pytest.raises(ringserve.DeadlineExceeded):
                await c.generate_text("hi", max_output_tokens=2000, ignore_eos=True, timeout=0.001)

    asyncio.run(main())


def test_async_task_cancel_cancels_rpc(server_target):
    async def main():
        async with ringserve.AsyncClient(server_target, timeout=60) as c:
            with ringserve.Client(server_target) as sync_client:
                before = _cancelled_count(sync_client)
            first = asyncio.Event()

            async def consume():
                async for chunk in c.generate("Tell me a long story.", max_output_tokens=4000, ignore_eos=True):
                    if chunk.token_ids:
                        first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 60)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            deadline = time.monotonic() + 10
            while True:
                stats = await c.stats()
                if stats.running_requests == 0 and stats.waiting_requests == 0:
                    break
                assert time.monotonic() < deadline, f"server still busy: {stats}"
                await asyncio.sleep(0.02)
            assert stats.finished_requests.get("CANCELLED", 0) == before + 1
            result = await c.generate_text("hi", max_output_tokens=2, ignore_eos=True)
            assert result.usage.candidates_token_count == 2

    asyncio.run(main())
