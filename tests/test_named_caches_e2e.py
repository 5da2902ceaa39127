"""Named context caches through the real server: create, use, list, update, delete, expire."""

import time

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc
from test_server_e2e import run, token_ids, wait_idle

DOCUMENT = "Chapter one. The ferry left the harbour at dawn and the gulls followed it. " * 25


@pytest.fixture(scope="module")
def stub(server_target):
    with grpc.insecure_channel(server_target) as channel:
        yield pb_grpc.InferenceStub(channel)


def user(text):
    return pb.Content(role="user", parts=[pb.Part(text=text)])


def model_turn(text):
    return pb.Content(role="model", parts=[pb.Part(text=text)])


def create(stub, ttl_seconds=600, text=DOCUMENT, system="Answer from the book."):
    return stub.CreateCache(pb.CreateCacheRequest(
        contents=[user(text), model_turn("I have read it.")],
        system_instruction=pb.Content(parts=[pb.Part(text=system)]),
        ttl=duration_pb2.Duration(seconds=ttl_seconds), display_name="book"))


def test_cache_gives_the_same_tokens_as_the_whole_prompt(stub):
    before = wait_idle(stub)
    cache = create(stub)
    assert cache.name.startswith("cachedContents/") and cache.display_name == "book"
    assert cache.total_token_count > 300
    assert 0 < cache.pinned_token_count <= cache.total_token_count
    assert cache.pinned_token_count % before.kv_page_tokens == 0
    assert wait_idle(stub).kv_pages_pinned == before.kv_pages_pinned + (
        cache.pinned_token_count // before.kv_page_tokens)

    question = dict(generation_config=pb.GenerationConfig(max_output_tokens=10, temperature=0))
    with_cache = run(stub, pb.GenerateRequest(cached_content=cache.name,
                                              contents=[user("Where did the ferry go?")],
                                              **question))
    whole = run(stub, pb.GenerateRequest(
        contents=[user(DOCUMENT), model_turn("I have read it."), user("Where did the ferry go?")],
        system_instruction=pb.Content(parts=[pb.Part(text="Answer from the book.")]),
        **question))
    assert token_ids(with_cache) == token_ids(whole)
    usage = with_cache[-1].usage_metadata
    assert usage.prompt_token_count == whole[-1].usage_metadata.prompt_token_count
    assert usage.cached_content_token_count >= cache.pinned_token_count

    counted = stub.CountTokens(pb.CountTokensRequest(cached_content=cache.name,
                                                     contents=[user("Where did the ferry go?")]))
    assert counted.total_tokens == usage.prompt_token_count
    assert counted.cached_content_token_count == cache.total_token_count
    stub.DeleteCache(pb.DeleteCacheRequest(name=cache.name))


def test_list_update_delete(stub):
    base = wait_idle(stub).kv_pages_pinned
    cache = create(stub, ttl_seconds=60)
    listed = [c.name for c in stub.ListCaches(pb.ListCachesRequest()).cached_contents]
    assert cache.name in listed
    updated = stub.UpdateCache(pb.UpdateCacheRequest(
        name=cache.name, ttl=duration_pb2.Duration(seconds=7200)))
    assert updated.expire_time.seconds - cache.expire_time.seconds > 7000
    assert stub.GetCache(pb.GetCacheRequest(name=cache.name)).expire_time == updated.expire_time
    stub.DeleteCache(pb.DeleteCacheRequest(name=cache.name))
    assert wait_idle(stub).kv_pages_pinned == base
    for call in (lambda: stub.GetCache(pb.GetCacheRequest(name=cache.name)),
                 lambda: stub.DeleteCache(pb.DeleteCacheRequest(name=cache.name)),
                 lambda: run(stub, pb.GenerateRequest(cached_content=cache.name,
                                                      contents=[user("hi")]))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_ttl_expiry_frees_pages(stub):
    base = wait_idle(stub).kv_pages_pinned
    cache = create(stub, ttl_seconds=1, text="A short note about tides. " * 20)
    assert wait_idle(stub).kv_pages_pinned > base
    deadline = time.monotonic() + 10
    while stub.GetStats(pb.GetStatsRequest()).kv_pages_pinned != base:
        assert time.monotonic() < deadline, "expired cache still pins pages"
        time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetCache(pb.GetCacheRequest(name=cache.name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("req,code,names", [
    (pb.CreateCacheRequest(), grpc.StatusCode.INVALID_ARGUMENT, "contents"),
    (pb.CreateCacheRequest(contents=[user("x")], ttl=duration_pb2.Duration(seconds=-5)),
     grpc.StatusCode.INVALID_ARGUMENT, "ttl"),
    # Past year 9999 date arithmetic overflows; the answer must still name the field.
    (pb.CreateCacheRequest(contents=[user("x")], ttl=duration_pb2.Duration(seconds=315576000000)),
     grpc.StatusCode.INVALID_ARGUMENT, "maximum TTL"),
    (pb.CreateCacheRequest(contents=[user("x")], ttl=duration_pb2.Duration(seconds=10**15)),
     grpc.StatusCode.INVALID_ARGUMENT, "ttl"),
    (pb.CreateCacheRequest(contents=[user("x")],
                           expire_time=timestamp_pb2.Timestamp(seconds=253402300799)),
     grpc.StatusCode.INVALID_ARGUMENT, "expire_time"),
    (pb.CreateCacheRequest(contents=[user("x")], expire_time=timestamp_pb2.Timestamp(seconds=10**13)),
     grpc.StatusCode.INVALID_ARGUMENT, "expire_time"),
], ids=["no contents", "negative ttl", "ttl of 10000 years", "ttl past int64 days",
        "expire_time in year 9999", "expire_time past year 9999"])
def test_bad_create(stub, req, code, names):
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateCache(req)
    assert err.value.code() == code and names in err.value.details()


def test_system_instruction_with_cache_is_rejected(stub):
    cache = create(stub, ttl_seconds=60, text="Short.")
    with pytest.raises(grpc.RpcError) as err:
        run(stub, pb.GenerateRequest(cached_content=cache.name, contents=[user("q")],
                                     system_instruction=pb.Content(parts=[pb.Part(text="s")])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "system_instruction" in err.value.details()
    stub.DeleteCache(pb.DeleteCacheRequest(name=cache.name))
