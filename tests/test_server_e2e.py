"""End to end through the real server process and raw gRPC stubs (the SDK has its own tests)."""

import concurrent.futures
import random
import threading
import time

import grpc
import pytest

import serving

from model import checkpoint, presets
from preprocess import prompt as prompt_lib
from preprocess.tokenizer import Tokenizer
from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc

FINISH = pb.GenerateResponse.FinishReason


@pytest.fixture(scope="module")
def stub(server_target):
    with grpc.insecure_channel(server_target) as channel:
        yield pb_grpc.InferenceStub(channel)


def request(text="Tell me about the sea.", *, role="user", system=None, request_id="", **config):
    req = pb.GenerateRequest(
        request_id=request_id,
        contents=[pb.Content(role=role, parts=[pb.Part(text=text)])],
        generation_config=pb.GenerationConfig(**config))
    if system is not None:
        req.system_instruction.CopyFrom(pb.Content(parts=[pb.Part(text=system)]))
    return req


def run(stub, req, timeout=60):
    return list(stub.Generate(req, timeout=timeout))


def token_ids(responses):
    return [t for r in responses for t in r.token_ids]


def wait_idle(stub, timeout=60.0):
    """The server's stats once no request holds a slot or waits for one (serving.wait_idle)."""
    return serving.wait_idle(lambda: stub.GetStats(pb.GetStatsRequest()), timeout)


def test_generate_streams_text_tokens_and_usage(stub):
    responses = run(stub, request(request_id="req-1", max_output_tokens=12, temperature=0))
    assert all(r.request_id == "req-1" for r in responses)
    last = responses[-1]
    ids = token_ids(responses)
    assert last.finish_reason in (FINISH.MAX_TOKENS, FINISH.STOP)
    if last.finish_reason == FINISH.MAX_TOKENS:
        assert len(ids) == 12
    usage = last.usage_metadata
    assert usage.candidates_token_count == len(ids)
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert usage.prompt_token_count > 0
    assert all(r.finish_reason == FINISH.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    # Incremental text, joined, is the full decode: nothing split, nothing lost.
    tokenizer = Tokenizer.default()
    assert "".join(r.text for r in responses) == tokenizer.decode(ids)
    ttft = responses[0].time_to_first_token.ToTimedelta().total_seconds()
    assert 0 < ttft < 30
    assert last.time_to_first_token.ToTimedelta().total_seconds() == pytest.approx(ttft)


def test_greedy_output_equals_offline_model(stub, random_default_dir):
    """The served tokens are what the model itself says, token for token (no server drift)."""
    req = request("The quick brown fox", system="Be brief.", max_output_tokens=16, temperature=0)
    served = token_ids(run(stub, req))

    config, model = checkpoint.load(random_default_dir)  # what server_target serves
    tokenizer = Tokenizer.default()
    prompt = prompt_lib.render([("user", "The quick brown fox")], "Be brief.", tokenizer)
    usage = run(stub, req)[-1].usage_metadata
    assert usage.prompt_token_count == len(prompt)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    width = 64  # fixed padded width: causal attention makes the padding after the ids invisible

    @jax.jit
    def next_token(state, ids, n):
        logits, _ = nnx.merge(graphdef, state)(ids, jnp.arange(width)[None], None)
        return jnp.argmax(logits[0, n - 1])

    ids = list(prompt)
    assert len(ids) + 16 <= width
    stops = prompt_lib.stop_token_ids(tokenizer)
    expected = []
    for _ in range(16):  # full forward each step: independent of the KV cache and the engine
        padded = jnp.array([ids + [0] * (width - len(ids))])
        token = int(next_token(state, padded, len(ids)))
        if token in stops:
            break
        expected.append(token)
        ids.append(token)
    assert served == expected


def test_seeded_sampling_is_reproducible(stub):
    a = token_ids(run(stub, request(max_output_tokens=16, temperature=1.0, seed=1234)))
    b = token_ids(run(stub, request(max_output_tokens=16, temperature=1.0, seed=1234)))
    c = token_ids(run(stub, request(max_output_tokens=16, temperature=1.0, seed=99)))
    assert a == b
    assert a != c


def test_stop_sequence_cuts_text(stub):
    # Seeded sampling is reproducible, and varied enough to hold a stop string mid-text.
    config = dict(max_output_tokens=24, temperature=1.0, seed=5)
    full = run(stub, request("Once upon a time", **config))
    text = "".join(r.text for r in full)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), f"generated text too short to pick a stop: {text!r}"
    cut = run(stub, request("Once upon a time", stop_sequences=["\x00never", stop], **config))
    assert cut[-1].finish_reason == FINISH.STOP_SEQUENCE
    assert "".join(r.text for r in cut) == text[:text.index(stop)]


def test_model_turn_is_continued(stub):
    """A final `model` content is continued: the prompt is one template token shorter."""
    open_turn = stub.CountTokens(pb.CountTokensRequest(contents=[
        pb.Content(role="user", parts=[pb.Part(text="hi")])])).total_tokens
    continued = stub.CountTokens(pb.CountTokensRequest(contents=[
        pb.Content(role="user", parts=[pb.Part(text="hi")]),
        pb.Content(role="model", parts=[pb.Part(text="The answer is")])])).total_tokens
    tokenizer = Tokenizer.default()
    expected = prompt_lib.render([("user", "hi"), ("model", "The answer is")], None, tokenizer)
    assert continued == len(expected) > open_turn


def test_count_tokens_matches_generate_usage(stub):
    req = request("How many tokens is this?", system="You count.", max_output_tokens=1)
    usage = run(stub, req)[-1].usage_metadata
    counted = stub.CountTokens(pb.CountTokensRequest(
        contents=req.contents, system_instruction=req.system_instruction))
    assert counted.total_tokens == usage.prompt_token_count


def test_model_info(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.name == presets.default_config().name
    assert info.input_token_limit == presets.default_config().max_context
    assert info.vocab_size == presets.default_config().vocab_size
    assert set(info.supported_modalities) == {pb.TEXT, pb.IMAGE, pb.AUDIO, pb.VIDEO}
    assert info.parameter_count > 0


# More tokens than the default model's context (1M): a ~5 MB message, within the server's 64 MiB.
LONG = "word " * (presets.default_config().max_context + 1000)

BAD_REQUESTS = [
    (pb.GenerateRequest(), "contents"),
    (pb.GenerateRequest(contents=[pb.Content(parts=[])]), "contents[0].parts"),
    (pb.GenerateRequest(contents=[pb.Content(parts=[pb.Part()])]), "no data set"),
    (request(""), "contents[0].parts[0].text: empty"),
    (request(role="assistant"), "role"),
    (request(max_output_tokens=0), "max_output_tokens"),
    (request(max_output_tokens=-5), "max_output_tokens"),
    (request(max_output_tokens=10_000_000), "max_output_tokens"),
    (request(top_p=1.5), "top_p"),
    (request(top_p=0.0), "top_p"),
    (request(temperature=-0.1), "temperature"),
    (request(temperature=float("nan")), "temperature"),
    (request(top_k=-1), "top_k"),
    (request(stop_sequences=[""]), "stop_sequences[0]"),
    (request(stop_sequences=["x"] * 17), "stop_sequences"),
    (request(LONG), "context"),
    (request(request_id="r" * 300), "request_id"),
]


@pytest.mark.parametrize("req,names", BAD_REQUESTS, ids=[n for _, n in BAD_REQUESTS])
def test_bad_requests_get_invalid_argument(stub, req, names):
    with pytest.raises(grpc.RpcError) as err:
        run(stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names in err.value.details()
    # The server keeps serving.
    assert run(stub, request(max_output_tokens=1))[-1].usage_metadata.candidates_token_count >= 0


def test_count_tokens_rejects_bad_contents(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.CountTokens(pb.CountTokensRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cancelled_stream_frees_its_slot(stub):
    before = wait_idle(stub)
    call = stub.Generate(request(max_output_tokens=4000, temperature=1.0, ignore_eos=True), timeout=120)
    got = [next(call), next(call)]
    assert got[0].token_ids
    call.cancel()
    stats = wait_idle(stub)
    assert stats.finished_requests["CANCELLED"] == before.finished_requests["CANCELLED"] + 1
    # Nothing keeps generating for the cancelled stream.
    generated = stats.generated_tokens_total
    time.sleep(0.3)
    assert stub.GetStats(pb.GetStatsRequest()).generated_tokens_total == generated


def test_deadline_stops_generation(stub):
    wait_idle(stub)
    with pytest.raises(grpc.RpcError) as err:
        run(stub, request(max_output_tokens=4000, ignore_eos=True), timeout=0.7)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(stub)


def test_concurrent_streams_match_solo_runs(stub):
    """More streams than decode slots: each gets exactly the tokens it gets alone."""
    prompts = [f"Question number {i}: " + "why? " * i for i in range(7)]
    solo = [token_ids(run(stub, request(p, max_output_tokens=10 + i, temperature=0)))
            for i, p in enumerate(prompts)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(
            lambda ip: token_ids(run(stub, request(ip[1], max_output_tokens=10 + ip[0],
                                                   temperature=0))), enumerate(prompts)))
    assert together == solo
    wait_idle(stub)


def test_client_disconnect_frees_slot(server_target):
    """Closing the channel mid-stream (a client that vanishes) frees the slot."""
    with grpc.insecure_channel(server_target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        wait_idle(stub)
        call = stub.Generate(request(max_output_tokens=4000, ignore_eos=True))
        next(call)
    with grpc.insecure_channel(server_target) as channel:
        wait_idle(pb_grpc.InferenceStub(channel))


def test_hundred_streams_with_cancels_and_deadlines_leave_nothing_behind(stub):
    """100 concurrent streams, a third cancelled midway and some with tight deadlines: every
    stream that runs to the end gets exactly its solo tokens, and no slot or page leaks."""
    rng = random.Random(7)
    prompts = [f"Topic {i}: " + "sails and ropes " * i for i in range(8)]
    solo = {i: token_ids(run(stub, request(p, max_output_tokens=16, temperature=0)))
            for i, p in enumerate(prompts)}
    plans = [(rng.randrange(8), rng.choice(["full", "full", "cancel", "deadline"]))
             for _ in range(100)]

    def one(plan):
        topic, kind = plan
        timeout = 0.3 if kind == "deadline" else 120
        call = stub.Generate(request(prompts[topic], max_output_tokens=16, temperature=0),
                             timeout=timeout)
        out = []
        try:
            for response in call:
                out.append(response)
                if kind == "cancel" and len(out) == 2:
                    call.cancel()
                    return "cancelled"
        except grpc.RpcError as err:
            return err.code().name
        assert token_ids(out) == solo[topic]
        return "ok"

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, plans))
    assert results.count("ok") >= sum(kind == "full" for _, kind in plans)
    assert set(results) <= {"ok", "cancelled", "CANCELLED", "DEADLINE_EXCEEDED"}
    stats = wait_idle(stub)
    assert stats.kv_pages_used == stats.kv_pages_pinned


def test_sigterm_drains_then_exits(random_default_dir):
    from serving import ServerProcess
    server = ServerProcess("--model", str(random_default_dir), "--max-batch", "2", "--grace-period", "1",
                           "--no-warmup")
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            call = stub.Generate(request(max_output_tokens=8000, ignore_eos=True), timeout=120)
            next(call)
            threading.Timer(0.2, server.proc.terminate).start()  # SIGTERM
            t0 = time.monotonic()
            reason = None
            try:
                for response in call:
                    reason = response.finish_reason
            except grpc.RpcError as err:  # cancelled by the server after the grace period
                reason = err.code()
            assert reason in (FINISH.CANCELLED, grpc.StatusCode.CANCELLED,
                              grpc.StatusCode.UNAVAILABLE)
            assert time.monotonic() - t0 < 20
        assert server.wait_exit(30) == 0, server.output()
        assert "ringserve: stopped" in server.output()
    finally:
        server.kill()
