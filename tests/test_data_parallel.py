"""`--mesh data=2`: two engine replicas behind one server (8 simulated CPU devices, see conftest).

Greedy answers equal one replica's, both replicas take work, stats add up, and a named cache is
served by the replica that pinned it."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from google.protobuf import duration_pb2

from model.sharding import MeshShape
from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc
from serving import ServerProcess
from test_server_e2e import run, token_ids, wait_idle

PROMPTS = [f"Request {i}: tell me about the harbour and the ferry at dawn." for i in range(8)]
GREEDY = pb.GenerationConfig(max_output_tokens=8, temperature=0)


def ask(stub, text):
    return token_ids(run(stub, pb.GenerateRequest(
        contents=[pb.Content(role="user", parts=[pb.Part(text=text)])],
        generation_config=GREEDY), timeout=120))


@pytest.fixture(scope="module")
def replicated(random_default_dir):
    server = ServerProcess("--model", str(random_default_dir), "--mesh", "data=2,sequence=2", "--max-batch", "2",
                           "--max-len", "4096", "--kv-cache-gib", "0.25", "--grace-period", "2",
                           "--no-warmup")  # compiles only what the test uses
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.InferenceStub(channel), server
    server.terminate()


def test_replicas_answer_like_one_engine(replicated, server_target):
    stub, server = replicated
    with grpc.insecure_channel(server_target) as channel:
        single = pb_grpc.InferenceStub(channel)
        expected = [ask(single, p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda p: ask(stub, p), PROMPTS))
    assert got == expected

    stats = wait_idle(stub)
    assert stats.decode_slots == 4  # two replicas x --max-batch 2
    assert stats.finished_requests["MAX_TOKENS"] == len(PROMPTS)
    assert stats.kv_pages_used == 0
    assert "mesh data=2,sequence=2,tensor=1" in server.output()


def test_named_cache_lives_on_one_replica(replicated):
    stub, _ = replicated
    before = wait_idle(stub)
    document = "The lighthouse keeper counted ships every night. " * 40
    contents = [pb.Content(role="user", parts=[pb.Part(text=document)]),
                pb.Content(role="model", parts=[pb.Part(text="Noted.")])]
    cache = stub.CreateCache(pb.CreateCacheRequest(contents=contents,
                                                   ttl=duration_pb2.Duration(seconds=300)))
    question = pb.Content(role="user", parts=[pb.Part(text="How many ships?")])
    answers = []
    for _ in range(4):  # whichever replica is least loaded, the cache's requests go to its own
        out = run(stub, pb.GenerateRequest(cached_content=cache.name, contents=[question],
                                           generation_config=GREEDY), timeout=120)
        assert out[-1].usage_metadata.cached_content_token_count >= cache.pinned_token_count
        answers.append(token_ids(out))
    whole = token_ids(run(stub, pb.GenerateRequest(contents=[*contents, question],
                                                   generation_config=GREEDY), timeout=120))
    assert answers == [whole] * 4
    pinned = cache.pinned_token_count // before.kv_page_tokens
    assert wait_idle(stub).kv_pages_pinned == before.kv_pages_pinned + pinned
    stub.DeleteCache(pb.DeleteCacheRequest(name=cache.name))
    assert wait_idle(stub).kv_pages_pinned == before.kv_pages_pinned


def test_mesh_shape_replica():
    shape = MeshShape.parse("data=2,sequence=2,tensor=2")
    assert shape.size == 8 and shape.replica == MeshShape(1, 2, 2)


def test_replica_stats_add_every_field():
    """Every field of Stats is added across replicas (a field the sum forgot would read 0)."""
    import collections
    import dataclasses

    from server.engine_loop import Stats
    from server.replicas import sum_stats

    def stats(k: int) -> Stats:
        values = {}
        for field in dataclasses.fields(Stats):
            default = Stats().__getattribute__(field.name)
            if isinstance(default, bool):
                values[field.name] = k == 1
            elif isinstance(default, int):
                values[field.name] = k * 10 + len(values)
            elif isinstance(default, collections.Counter):
                values[field.name] = collections.Counter({"STOP": k, "CANCELLED": 2 * k})
        return Stats(**values)

    total = sum_stats([stats(1), stats(2)])
    for field in dataclasses.fields(Stats):
        one, two, got = (getattr(s, field.name) for s in (stats(1), stats(2), total))
        if field.name == "kv":
            assert got is None
        elif isinstance(one, bool):
            assert got is False  # serving only when every replica is
        else:
            assert got == one + two, field.name
