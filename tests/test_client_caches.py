"""Named context caches through the SDK (`Client`, `AsyncClient`) and the `ringserve cache` command,
against the real server on the default model (random weights: the text is gibberish, but token
counts, pinning and greedy determinism are real).

Other tests share the server: every test deletes what it creates, and none assumes the cache list
is empty.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import subprocess
import sys
import time

import grpc
import pytest

import serving

import ringserve
from ringserve import types

UTC = datetime.timezone.utc
# About 400 tokens of prose, cached as a user turn plus the model's acknowledgement.
DOCUMENT = ("The lighthouse keeper wrote in the log every evening: the wind, the ships that "
            "passed, the colour of the sea at dusk and the names of the birds on the rocks. ") * 10
ACK = ("model", "I have read the log.")
SYSTEM = "Answer from the log."
QUESTION = "Which birds did the keeper see?"
GREEDY = dict(max_output_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def client(server_target):
    with ringserve.Client(server_target, timeout=60) as c:
        yield c


@pytest.fixture
def cleanup(client):
    """Names to delete after the test, whatever happened (already deleted is fine)."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            client.delete_cache(name)
        except ringserve.NotFound:
            pass


def _wait_idle(client: ringserve.Client) -> ringserve.ServerStats:
    return serving.wait_idle(client.stats)


# ---- requests built without a server ----------------------------------------------------------

def test_cache_requests():
    request = types.create_cache_request([DOCUMENT, ACK], system_instruction=SYSTEM, ttl=90.5,
                                         display_name="log")
    assert [c.role for c in request.contents] == ["user", "model"]
    assert request.system_instruction.parts[0].text == SYSTEM
    assert request.ttl.ToNanoseconds() == 90_500_000_000 and not request.HasField("expire_time")
    assert request.display_name == "log"
    request = types.create_cache_request("x", ttl=datetime.timedelta(hours=2))
    assert request.ttl.seconds == 7200
    assert not types.create_cache_request("x").HasField("ttl")  # the server's default

    when = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(
        datetime.timedelta(hours=2)))
    update = types.update_cache_request("cachedContents/a", expire_time=when)
    assert update.expire_time.ToDatetime(tzinfo=UTC) == when
    assert not update.HasField("ttl")
    with pytest.raises(ValueError, match="aware"):
        types.update_cache_request("cachedContents/a", expire_time=datetime.datetime(2030, 1, 1))
    with pytest.raises(TypeError):
        types.create_cache_request("x", ttl="1h")

    cache = types.CachedContent("cachedContents/a", "", None, None, None, 10, 8)
    assert types.generate_request("q", cached_content=cache).cached_content == "cachedContents/a"
    assert types.count_tokens_request("q", cached_content="cachedContents/b").cached_content == (
        "cachedContents/b")
    assert types.generate_request("q").cached_content == ""
    with pytest.raises(TypeError):
        types.generate_request("q", cached_content=42)


# ---- the real server --------------------------------------------------------------------------

def test_cache_gives_the_whole_prompts_tokens(client, cleanup):
    before = _wait_idle(client)
    assert before.kv_pages_total > 0 and before.kv_page_tokens > 0
    cache = client.create_cache([DOCUMENT, ACK], system_instruction=SYSTEM, ttl=600,
                                display_name="sdk-log")
    cleanup.append(cache.name)
    assert cache.name.startswith("cachedContents/") and cache.display_name == "sdk-log"
    assert 300 < cache.total_token_count < 600
    assert 0 < cache.pinned_token_count <= cache.total_token_count
    assert cache.pinned_token_count % before.kv_page_tokens == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cache.name = "x"
    pinned = _wait_idle(client)
    assert pinned.kv_pages_pinned == (before.kv_pages_pinned
                                      + cache.pinned_token_count // before.kv_page_tokens)

    with_cache = client.generate_text(QUESTION, cached_content=cache, **GREEDY)
    whole = client.generate_text([DOCUMENT, ACK, QUESTION], system_instruction=SYSTEM, **GREEDY)
    assert with_cache.token_ids == whole.token_ids and with_cache.text == whole.text
    assert with_cache.usage.prompt_token_count == whole.usage.prompt_token_count
    assert with_cache.usage.cached_content_token_count >= cache.pinned_token_count

    # By name, streaming: the same tokens again.
    chunks = list(client.generate(QUESTION, cached_content=cache.name, **GREEDY))
    assert tuple(t for c in chunks for t in c.token_ids) == whole.token_ids
    assert chunks[-1].usage.cached_content_token_count >= cache.pinned_token_count

    counted = client.count_tokens_detail(QUESTION, cached_content=cache)
    total = with_cache.usage.prompt_token_count
    assert counted == ringserve.TokenCount(total, cache.total_token_count, {"TEXT": total})
    assert client.count_tokens(QUESTION, cached_content=cache.name) == counted.total_tokens
    assert client.count_tokens_detail(QUESTION).cached_content_token_count == 0

    after = _wait_idle(client)
    assert after.cached_prompt_tokens_total >= (pinned.cached_prompt_tokens_total
                                                + 2 * cache.pinned_token_count)
    assert 0 < after.prefix_cache_hit_rate <= 1
    assert after.kv_pages_used >= after.kv_pages_pinned
    assert 0 <= after.kv_token_slots_live <= after.kv_token_slots_allocated
    assert after.preemptions_total >= 0

    # The cache holds its own system instruction.
    with pytest.raises(ringserve.InvalidArgument, match="system_instruction"):
        client.generate_text(QUESTION, cached_content=cache, system_instruction="Be brief.")


def test_list_get_update_delete(client, cleanup):
    base = _wait_idle(client).kv_pages_pinned
    start = datetime.datetime.now(UTC)
    cache = client.create_cache([DOCUMENT, ACK], ttl=datetime.timedelta(minutes=1))
    cleanup.append(cache.name)
    assert cache.display_name == ""
    for t in (cache.create_time, cache.update_time, cache.expire_time):
        assert t.tzinfo is not None and t.utcoffset() == datetime.timedelta(0)
    assert abs((cache.create_time - start).total_seconds()) < 30
    assert abs((cache.expire_time - cache.create_time).total_seconds() - 60) < 5

    listed = {c.name: c for c in client.list_caches()}
    assert listed[cache.name] == cache
    assert client.get_cache(cache.name) == cache
    assert client.get_cache(cache) == cache

    updated = client.update_cache(cache, ttl=7200)
    assert updated.name == cache.name and updated.create_time == cache.create_time
    assert (updated.expire_time - cache.expire_time).total_seconds() > 7000
    assert updated.update_time >= cache.update_time
    assert client.get_cache(cache.name).expire_time == updated.expire_time

    when = (datetime.datetime.now(UTC) + datetime.timedelta(hours=3)).replace(microsecond=0)
    local = when.astimezone(datetime.timezone(datetime.timedelta(hours=-5)))
    assert client.update_cache(cache.name, expire_time=local).expire_time == when

    with pytest.raises(ringserve.InvalidArgument, match="ttl"):
        client.update_cache(cache.name)
    with pytest.raises(ringserve.InvalidArgument, match="ttl"):
        client.update_cache(cache.name, ttl=0)
    with pytest.raises(ringserve.InvalidArgument, match="expire_time"):
        client.update_cache(cache.name,
                            expire_time=datetime.datetime.now(UTC) - datetime.timedelta(hours=1))

    client.delete_cache(cache)
    assert _wait_idle(client).kv_pages_pinned == base
    assert cache.name not in {c.name for c in client.list_caches()}
    calls = [
        lambda: client.get_cache(cache.name),
        lambda: client.update_cache(cache.name, ttl=60),
        lambda: client.delete_cache(cache.name),
        lambda: client.generate_text(QUESTION, cached_content=cache, **GREEDY),
        lambda: client.count_tokens(QUESTION, cached_content=cache.name),
    ]
    for call in calls:
        with pytest.raises(ringserve.NotFound) as info:
            call()
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_short_ttl_expires(client, cleanup):
    cache = client.create_cache("A note that does not last.", ttl=0.5)
    cleanup.append(cache.name)
    assert (cache.expire_time - cache.create_time).total_seconds() < 0.5
    time.sleep(0.7)
    assert cache.name not in {c.name for c in client.list_caches()}
    with pytest.raises(ringserve.NotFound):
        client.get_cache(cache)


def test_create_cache_refuses_bad_requests(client):
    names = {c.name for c in client.list_caches()}
    with pytest.raises(ringserve.InvalidArgument, match="contents"):
        client.create_cache([])
    with pytest.raises(ringserve.InvalidArgument, match="ttl"):
        client.create_cache("hi", ttl=-5)
    with pytest.raises(ringserve.InvalidArgument, match="expire_time"):
        client.create_cache("hi", expire_time=datetime.datetime(2000, 1, 1, tzinfo=UTC))
    assert {c.name for c in client.list_caches()} <= names  # nothing left behind


def test_async_client_caches(server_target):
    async def main():
        async with ringserve.AsyncClient(server_target, timeout=60) as c:
            cache = await c.create_cache([DOCUMENT, ACK], system_instruction=SYSTEM, ttl=300,
                                         display_name="async-log")
            try:
                assert cache.pinned_token_count > 0 and cache.display_name == "async-log"
                assert await c.get_cache(cache.name) == cache
                assert cache.name in {x.name for x in await c.list_caches()}

                with_cache = await c.generate_text(QUESTION, cached_content=cache, **GREEDY)
                whole = await c.generate_text([DOCUMENT, ACK, QUESTION],
                                              system_instruction=SYSTEM, **GREEDY)
                assert with_cache.token_ids == whole.token_ids
                assert with_cache.usage.cached_content_token_count >= cache.pinned_token_count
                detail = await c.count_tokens_detail(QUESTION, cached_content=cache.name)
                assert detail.total_tokens == with_cache.usage.prompt_token_count
                assert detail.cached_content_token_count == cache.total_token_count
                assert await c.count_tokens(QUESTION, cached_content=cache) == detail.total_tokens

                updated = await c.update_cache(cache.name, ttl=datetime.timedelta(hours=2))
                assert (updated.expire_time - cache.expire_time).total_seconds() > 6000
                stats = await c.stats()
                assert stats.kv_pages_pinned >= cache.pinned_token_count // stats.kv_page_tokens
            finally:
                await c.delete_cache(cache)
            with pytest.raises(ringserve.NotFound):
                await c.get_cache(cache.name)
            with pytest.raises(ringserve.NotFound):
                await c.delete_cache(cache.name)
            with pytest.raises(ringserve.NotFound):
                await c.generate_text(QUESTION, cached_content=cache)

    asyncio.run(main())


# ---- the `ringserve` command -------------------------------------------------------------------

def _cli(target: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ringserve.cli", *args, "--target", target],
                            capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_cache_commands(client, server_target, tmp_path, cleanup):
    path = tmp_path / "log.txt"
    path.write_text(DOCUMENT)
    created = json.loads(_cli(server_target, "cache", "create", "--file", str(path), "--ttl",
                              "10m", "--system", SYSTEM, "--display-name", "cli-log",
                              "--json").stdout)
    name = created["name"]
    cleanup.append(name)
    assert name.startswith("cachedContents/") and created["display_name"] == "cli-log"
    assert created["pinned_token_count"] > 0
    cache = client.get_cache(name)
    assert created["total_token_count"] == cache.total_token_count
    assert created["expire_time"] == cache.expire_time.isoformat()
    assert abs((cache.expire_time - cache.create_time).total_seconds() - 600) < 5

    # Plain output: the name and the token counts.
    text = _cli(server_target, "cache", "create", "--text", "A short note to cache.").stdout
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    cleanup.append(lines["name"])
    assert int(lines["total_token_count"]) > 0 and "pinned_token_count" in lines

    listed = _cli(server_target, "cache", "list").stdout
    assert name in listed and lines["name"] in listed
    # --target before the action works too (the trailing one `_cli` adds wins).
    assert name in _cli(server_target, "cache", "--target", "127.0.0.1:1", "list").stdout
    assert name in {c["name"] for c in json.loads(_cli(server_target, "cache", "list",
                                                       "--json").stdout)}
    got = json.loads(_cli(server_target, "cache", "get", name, "--json").stdout)
    assert got == created

    updated = json.loads(_cli(server_target, "cache", "update", name, "--ttl", "7200",
                              "--json").stdout)
    assert updated["expire_time"] > created["expire_time"]
    assert client.get_cache(name).expire_time.isoformat() == updated["expire_time"]

    # generate --cached-content: the CLI's cache is the file's text as one user turn.
    run = _cli(server_target, "generate", QUESTION, "--cached-content", name,
               "--max-output-tokens", "8", "--temperature", "0", "--stats")
    whole = client.generate_text([DOCUMENT, QUESTION], system_instruction=SYSTEM,
                                 max_output_tokens=8, temperature=0)
    assert run.stdout == whole.text + "\n"
    stats = json.loads(run.stderr.strip().splitlines()[-1])
    assert stats["prompt_token_count"] == whole.usage.prompt_token_count
    assert stats["cached_content_token_count"] >= created["pinned_token_count"]
    counted = _cli(server_target, "count-tokens", QUESTION, "--cached-content", name).stdout
    assert int(counted) == whole.usage.prompt_token_count

    for cache_name in (name, lines["name"]):
        assert _cli(server_target, "cache", "delete", cache_name).stdout.strip() == (
            f"deleted {cache_name}")
    missing = _cli(server_target, "cache", "get", name, check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    assert "Traceback" not in missing.stderr
    missing = _cli(server_target, "generate", "hi", "--cached-content", name, check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    bad = _cli(server_target, "cache", "create", "--file", str(tmp_path / "nope.txt"),
               check=False)
    assert bad.returncode == 1 and "nope.txt" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli(server_target, "cache", "update", name, "--ttl", "soon", check=False)
    assert bad.returncode == 2 and "--ttl" in bad.stderr
