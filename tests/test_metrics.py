import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import FINISH_REASONS, Metrics


def samples(text: bytes | str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} from the text exposition format."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed, name, **labels):
    return parsed[(name, frozenset(labels.items()))]


def test_histograms_count_and_bucket_observations():
    m = Metrics()
    m.observe_first_token(0.02)
    m.observe_first_token(3.0)
    for gap in (0.004, 0.004, 0.2):
        m.observe_token_gap(gap)
    m.observe_queue_wait(0.5)
    got = samples(m.exposition())

    assert value(got, "ringserve_time_to_first_token_seconds_count") == 2
    assert value(got, "ringserve_time_to_first_token_seconds_sum") == pytest.approx(3.02)
    assert value(got, "ringserve_time_to_first_token_seconds_bucket", le="0.025") == 1
    assert value(got, "ringserve_time_to_first_token_seconds_bucket", le="5.0") == 2
    assert value(got, "ringserve_inter_token_latency_seconds_count") == 3
    assert value(got, "ringserve_inter_token_latency_seconds_bucket", le="0.005") == 2
    assert value(got, "ringserve_inter_token_latency_seconds_bucket", le="0.25") == 3
    assert value(got, "ringserve_queue_wait_seconds_count") == 1
    assert value(got, "ringserve_queue_wait_seconds_bucket", le="0.25") == 0
    assert value(got, "ringserve_queue_wait_seconds_bucket", le="0.5") == 1
    assert value(got, "ringserve_request_duration_seconds_count") == 0


def test_finish_counts_requests_tokens_and_duration():
    m = Metrics()
    m.observe_finish("MAX_TOKENS", 1.5, prompt_tokens=10, generated_tokens=4)
    m.observe_finish("MAX_TOKENS", 0.5, prompt_tokens=6, generated_tokens=2)
    m.observe_finish("CANCELLED", 0.1, prompt_tokens=3, generated_tokens=0)
    got = samples(m.exposition())

    assert value(got, "ringserve_requests_total", finish_reason="MAX_TOKENS") == 2
    assert value(got, "ringserve_requests_total", finish_reason="CANCELLED") == 1
    # Every reason is exported before its first request, at zero.
    for reason in ("STOP", "STOP_SEQUENCE", "ERROR"):
        assert value(got, "ringserve_requests_total", finish_reason=reason) == 0
    assert {dict(labels)["finish_reason"] for name, labels in got
            if name == "ringserve_requests_total"} == set(FINISH_REASONS)
    assert value(got, "ringserve_prompt_tokens_total") == 19
    assert value(got, "ringserve_generation_tokens_total") == 6
    assert value(got, "ringserve_request_duration_seconds_count") == 3
    assert value(got, "ringserve_request_duration_seconds_sum") == pytest.approx(2.1)


def test_rpc_prefix_and_preemption_counters():
    m = Metrics()
    m.observe_rpc("Generate", "OK")
    m.observe_rpc("Generate", "OK")
    m.observe_rpc("Generate", "RESOURCE_EXHAUSTED")
    m.observe_rpc("CountTokens", "INVALID_ARGUMENT")
    m.observe_prefix(hit_tokens=32, query_tokens=40)
    m.observe_prefix(hit_tokens=0, query_tokens=8)
    m.observe_preemptions(0)
    m.observe_preemptions(2)
    got = samples(m.exposition())

    assert value(got, "ringserve_rpc_status_total", method="Generate", code="OK") == 2
    assert value(got, "ringserve_rpc_status_total", method="Generate",
                 code="RESOURCE_EXHAUSTED") == 1
    assert value(got, "ringserve_rpc_status_total", method="CountTokens",
                 code="INVALID_ARGUMENT") == 1
    assert value(got, "ringserve_prefix_cache_hit_tokens_total") == 32
    assert value(got, "ringserve_prefix_cache_query_tokens_total") == 48
    assert value(got, "ringserve_preemptions_total") == 2


def test_snapshot_sets_gauges():
    m = Metrics()
    m.set_snapshot(running=3, waiting=5, kv_total=100, kv_used=40, kv_cached=25, kv_pinned=8)
    m.set_snapshot(running=2, waiting=1, kv_total=100, kv_used=25, kv_cached=30, kv_pinned=8)
    got = samples(m.exposition())

    assert value(got, "ringserve_requests_running") == 2
    assert value(got, "ringserve_requests_waiting") == 1
    assert value(got, "ringserve_kv_pages_total") == 100
    assert value(got, "ringserve_kv_pages_used") == 25
    assert value(got, "ringserve_kv_pages_cached") == 30
    assert value(got, "ringserve_kv_pages_pinned") == 8
    assert value(got, "ringserve_kv_cache_usage_ratio") == pytest.approx(0.25)

    m.set_snapshot(running=0, waiting=0, kv_total=0, kv_used=0, kv_cached=0, kv_pinned=0)
    assert value(samples(m.exposition()), "ringserve_kv_cache_usage_ratio") == 0


def test_unknown_label_values_raise():
    m = Metrics()
    with pytest.raises(ValueError, match="finish reason"):
        m.observe_finish("DONE", 1.0, 1, 1)
    with pytest.raises(ValueError, match="gRPC status"):
        m.observe_rpc("Generate", "StatusCode.OK")
    got = samples(m.exposition())
    assert not any(name == "ringserve_rpc_status_total" for name, _ in got)
    assert value(got, "ringserve_request_duration_seconds_count") == 0


def test_instances_do_not_share_state():
    a, b = Metrics(), Metrics()  # a second registry with the same names must not clash
    a.observe_finish("STOP", 1.0, prompt_tokens=5, generated_tokens=7)
    a.observe_rpc("Generate", "OK")
    a.set_snapshot(running=1, waiting=0, kv_total=10, kv_used=4, kv_cached=0, kv_pinned=0)
    got = samples(b.exposition())

    assert value(got, "ringserve_requests_total", finish_reason="STOP") == 0
    assert value(got, "ringserve_generation_tokens_total") == 0
    assert value(got, "ringserve_requests_running") == 0
    assert not any(name == "ringserve_rpc_status_total" for name, _ in got)
    assert value(samples(a.exposition()), "ringserve_requests_total", finish_reason="STOP") == 1


def test_http_endpoint_serves_this_registry():
    m, other = Metrics(), Metrics()
    m.observe_finish("STOP_SEQUENCE", 0.3, prompt_tokens=2, generated_tokens=9)
    m.observe_first_token(0.05)
    port = m.start_http_server(0)
    other_port = other.start_http_server(0)
    try:
        assert port > 0 and port != other_port
        with pytest.raises(RuntimeError, match="already serves"):
            m.start_http_server(0)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            got = samples(response.read())
        assert value(got, "ringserve_requests_total", finish_reason="STOP_SEQUENCE") == 1
        assert value(got, "ringserve_generation_tokens_total") == 9
        assert value(got, "ringserve_time_to_first_token_seconds_count") == 1
        # Only this registry: nothing from the process-wide default (python_gc_*, process_*).
        assert all(name.startswith("ringserve_") for name, _ in got)

        with urllib.request.urlopen(f"http://127.0.0.1:{other_port}/metrics",
                                    timeout=5) as response:
            assert value(samples(response.read()), "ringserve_generation_tokens_total") == 0
    finally:
        m.close()
        other.close()
    m.close()  # closing twice is harmless
