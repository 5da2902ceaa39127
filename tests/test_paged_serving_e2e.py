"""The paged engine through the real server: prefix caching, pool pressure, no leaked pages."""

import concurrent.futures
import re
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc
from serving import ServerProcess
from test_server_e2e import request, run, token_ids, wait_idle

PAGE_TOKENS = 16
# 2 * layers(4) * kv heads(2) * 16 tokens * head dim(64) * 4 bytes = 64 KiB a page: 48 pages.
SMALL_POOL_GIB = 48 * 64 * 1024 / 2**30


@pytest.fixture(scope="module")
def stub(server_target):
    with grpc.insecure_channel(server_target) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def small_server(random_default_dir):
    server = ServerProcess("--model", str(random_default_dir), "--max-batch", "4", "--kv-cache-gib",
                           str(SMALL_POOL_GIB), "--page-len", str(PAGE_TOKENS),
                           "--prefill-chunk", "64", "--metrics-port", "0",
                           "--max-len", "4096")  # no block-walking decode programs to compile
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def small_pool(small_server):
    with grpc.insecure_channel(small_server.target) as channel:
        yield pb_grpc.InferenceStub(channel)


def test_prefix_cache_hit_gives_same_tokens(stub):
    document = "The lighthouse keeper counted ships every night. " * 30
    first = run(stub, request(document + "How many?", max_output_tokens=12, temperature=0))
    again = run(stub, request(document + "Why?", max_output_tokens=12, temperature=0))
    repeat = run(stub, request(document + "How many?", max_output_tokens=12, temperature=0))
    prompt = first[-1].usage_metadata.prompt_token_count
    assert first[-1].usage_metadata.cached_content_token_count == 0
    # Everything but the last, partial page is reused; the shared document alone covers most.
    hit = repeat[-1].usage_metadata.cached_content_token_count
    assert hit % PAGE_TOKENS == 0 and prompt - PAGE_TOKENS <= hit < prompt
    assert again[-1].usage_metadata.cached_content_token_count >= prompt - 3 * PAGE_TOKENS
    assert token_ids(repeat) == token_ids(first)
    stats = wait_idle(stub)
    assert stats.prefix_cache_hit_rate > 0
    assert stats.kv_pages_used == 0 and stats.kv_pages_cached > 0
    assert stats.kv_page_tokens == PAGE_TOKENS


def test_request_larger_than_pool_is_resource_exhausted(small_pool):
    info = small_pool.GetStats(pb.GetStatsRequest())
    capacity = info.kv_pages_total * info.kv_page_tokens
    with pytest.raises(grpc.RpcError) as err:
        run(small_pool, request("hi", max_output_tokens=capacity))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "pages" in err.value.details()


def test_pool_pressure_preempts_and_every_stream_stays_correct(small_pool):
    """8 requests of ~12 pages each on 48 pages and 4 slots: some wait, some are preempted and
    recomputed; every stream still gets exactly its solo tokens, and no page leaks."""
    prompts = [f"Request {i}: " + "tell me more about the river and the mill. " * 12
               for i in range(8)]
    configs = [dict(max_output_tokens=60, temperature=0.0 if i % 2 else 1.0, seed=i, ignore_eos=True)
               for i in range(8)]
    solo = [token_ids(run(small_pool, request(p, **c))) for p, c in zip(prompts, configs)]
    before = wait_idle(small_pool)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda pc: token_ids(run(small_pool, request(*pc[:1], **pc[1]))),
                                 zip(prompts, configs)))
    assert together == solo
    after = wait_idle(small_pool)
    assert after.preemptions_total > before.preemptions_total
    assert after.kv_pages_used == 0


def test_cache_larger_than_pool_is_resource_exhausted(small_pool):
    info = small_pool.GetStats(pb.GetStatsRequest())
    with pytest.raises(grpc.RpcError) as err:
        small_pool.CreateCache(pb.CreateCacheRequest(contents=[
            pb.Content(role="user", parts=[pb.Part(text="lots of words here " * 400)])]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{info.kv_pages_total} pages" in err.value.details()


def test_prometheus_metrics_follow_the_traffic(small_server, small_pool):
    run(small_pool, request("count me", max_output_tokens=3))
    with pytest.raises(grpc.RpcError):
        run(small_pool, request("x", top_p=3.0))
    url = re.search(r"metrics on (http://\S+)", small_server.output()).group(1)
    families = {f.name: f for f in text_string_to_metric_families(
        urllib.request.urlopen(url, timeout=10).read().decode())}

    def value(family, sample_name, **labels):
        return sum(s.value for s in families[family].samples
                   if s.name == sample_name and all(s.labels.get(k) == v
                                                    for k, v in labels.items()))

    assert value("ringserve_requests", "ringserve_requests_total", finish_reason="MAX_TOKENS") >= 1
    assert value("ringserve_time_to_first_token_seconds",
                 "ringserve_time_to_first_token_seconds_count") >= 1
    assert value("ringserve_rpc_status", "ringserve_rpc_status_total", method="Generate",
                 code="INVALID_ARGUMENT") >= 1
    assert value("ringserve_rpc_status", "ringserve_rpc_status_total", method="Generate",
                 code="OK") >= 1
    assert value("ringserve_kv_pages_total", "ringserve_kv_pages_total") == 47
