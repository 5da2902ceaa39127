"""API keys and TLS through the real server: certificates are made here, at test time."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import ringserve
from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc
from serving import ServerProcess
from server import cli as server_cli

KEY_A, KEY_B = "alpha-0123456789abcdef", "beta-fedcba9876543210"


def _cert(name: str, key, issuer=None, issuer_key=None, *, ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    root = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("ringserve test CA", ca_key, ca=True)
    files = {"ca.pem": _pem(ca), "server.pem": _pem(_cert("localhost", server_key, ca, ca_key,
                                                           server=True)),
             "server.key": _pem(server_key), "client.pem": _pem(_cert("client", client_key, ca,
                                                                      ca_key)),
             "client.key": _pem(client_key)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# who may call\nteam-a:{KEY_A}\n\n{KEY_B}\n")
    return path


@pytest.fixture(scope="module")
def tls_server(random_default_dir, keys_file, pki):
    """Keys and TLS (no client certificate asked)."""
    server = ServerProcess("--model", str(random_default_dir), "--max-batch", "2", "--no-warmup",
                           "--api-keys", str(keys_file), "--tls-cert", str(pki / "server.pem"),
                           "--tls-key", str(pki / "server.key"))
    yield server
    server.terminate()


def _client(server, key, pki, **extra):
    return ringserve.Client(server.target, api_key=key, tls=pki / "ca.pem", timeout=60, **extra)


def test_every_rpc_but_health_needs_a_key(tls_server, pki):
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(tls_server.target, creds) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.InferenceStub(channel)
        hello = [pb.Content(role="user", parts=[pb.Part(text="hi")])]
        calls = [lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md),
                 lambda md: stub.CountTokens(pb.CountTokensRequest(contents=hello), metadata=md),
                 lambda md: list(stub.Generate(pb.GenerateRequest(contents=hello), metadata=md)),
                 lambda md: stub.ListCaches(pb.ListCachesRequest(), metadata=md),
                 lambda md: stub.GetStats(pb.GetStatsRequest(), metadata=md)]
        for call in calls:
            for metadata, words in ((None, "no API key"),
                                    ((("authorization", "Bearer wrong"),), "not accepted"),
                                    ((("authorization", f"Basic {KEY_A}"),), "no API key"),
                                    ((("x-goog-api-key", KEY_A[:-1]),), "not accepted")):
                with pytest.raises(grpc.RpcError) as err:
                    call(metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert words in err.value.details()
        # Either header carries a good key.
        assert stub.GetModelInfo(pb.GetModelInfoRequest(),
                                 metadata=(("x-goog-api-key", KEY_B),)).vocab_size > 0
        assert stub.GetModelInfo(pb.GetModelInfoRequest(),
                                 metadata=(("authorization", f"Bearer {KEY_A}"),)).vocab_size > 0


def test_sdk_with_key_and_tls(tls_server, pki, monkeypatch):
    with _client(tls_server, KEY_A, pki) as client:
        result = client.generate_text("hi", max_output_tokens=3, temperature=0, ignore_eos=True)
        assert len(result.token_ids) == 3
        assert client.count_tokens("hi") > 0
    monkeypatch.setenv("RINGSERVE_API_KEY", KEY_B)
    with _client(tls_server, None, pki) as client:  # the key from the environment

        async def main():
            async with ringserve.AsyncClient(tls_server.target, tls=pki / "ca.pem",
                                             timeout=60) as aclient:
                chunks = [c async for c in aclient.generate("hi", max_output_tokens=2,
                                                            temperature=0, ignore_eos=True)]
                return sum(len(c.token_ids) for c in chunks)

        import asyncio
        assert asyncio.run(main()) == 2
        assert client.model_info().vocab_size > 0
    with _client(tls_server, "", pki) as client, pytest.raises(ringserve.RingserveError) as err:
        client.model_info()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_client_is_refused_by_a_tls_server(tls_server):
    with ringserve.Client(tls_server.target, api_key=KEY_A, timeout=10) as client:
        with pytest.raises(ringserve.RingserveError) as err:
            client.model_info()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_sighup_reloads_the_keys(tls_server, keys_file, pki):
    new_key = "gamma-" + "7" * 20
    original = keys_file.read_text()
    try:
        keys_file.write_text(original + f"team-c:{new_key}\n")
        tls_server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60  # the reload is logged; wait for it, however slow
        while "api keys reloaded" not in tls_server.output():
            assert time.monotonic() < deadline, tls_server.output()[-2000:]
            time.sleep(0.05)
        with _client(tls_server, new_key, pki) as client:
            assert client.model_info().vocab_size > 0
        # A broken file keeps the keys that work.
        keys_file.write_text("name:\n")
        tls_server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "api keys not reloaded" not in tls_server.output():
            assert time.monotonic() < deadline, tls_server.output()[-2000:]
            time.sleep(0.05)
        with _client(tls_server, new_key, pki) as client:
            assert client.model_info().vocab_size > 0
    finally:
        keys_file.write_text(original)
        tls_server.proc.send_signal(signal.SIGHUP)


def test_mutual_tls_needs_a_client_certificate(random_default_dir, keys_file, pki):
    server = ServerProcess("--model", str(random_default_dir), "--max-batch", "1", "--no-warmup",
                           "--api-keys", str(keys_file), "--tls-cert", str(pki / "server.pem"),
                           "--tls-key", str(pki / "server.key"),
                           "--tls-client-ca", str(pki / "ca.pem"))
    try:
        with _client(server, KEY_A, pki) as client, pytest.raises(ringserve.RingserveError):
            client.model_info()  # TLS, but no client certificate: the handshake fails
        mutual = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.pem").read_bytes(),
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes())
        with ringserve.Client(server.target, api_key=KEY_A, credentials=mutual,
                              timeout=60) as client:
            assert client.model_info().vocab_size > 0
    finally:
        server.terminate()


@pytest.mark.parametrize("argv, words", [
    (["--host", "0.0.0.0"], "--api-keys FILE"),
    (["--host", "::"], "--api-keys FILE"),
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
    (["--api-keys", "/nonexistent/keys.txt"], "cannot read /nonexistent/keys.txt"),
])
def test_unsafe_or_broken_flags_are_refused_before_the_model_loads(argv, words, capsys):
    started = time.monotonic()
    assert server_cli.main(["--model", "/nonexistent-model", "--port", "0", *argv]) == 2
    assert words in capsys.readouterr().err
    assert time.monotonic() - started < 60


def test_command_line_takes_key_and_tls(tls_server, pki, capsys):
    from ringserve import cli

    base = ["--target", tls_server.target, "--tls", str(pki / "ca.pem")]
    assert cli.main(["count-tokens", *base, "--api-key", KEY_A, "Hi"]) == 0
    assert int(capsys.readouterr().out) > 0
    assert cli.main(["generate", *base, "--api-key", KEY_B, "--temperature", "0",
                     "--max-output-tokens", "2", "--ignore-eos", "--stats", "Hi"]) == 0
    assert '"candidates_token_count": 2' in capsys.readouterr().err
    assert cli.main(["count-tokens", *base, "--api-key", "nope", "Hi"]) != 0
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_caches_and_uploads_belong_to_their_key(tls_server, pki):
    """Key B cannot see, read, use or delete key A's caches or uploads: NOT_FOUND, as for a
    name that never existed (names are not disclosed); A's own calls are unaffected."""
    import _media

    with _client(tls_server, KEY_A, pki) as a, _client(tls_server, KEY_B, pki) as b:
        cache = a.create_cache("A note about the harbour and its three lighthouses.", ttl=600)
        upload = a.upload_media(_media.png(seed=9), "image/png")
        try:
            assert cache.name in {c.name for c in a.list_caches()}
            assert upload.name in {m.name for m in a.list_media()}
            assert cache.name not in {c.name for c in b.list_caches()}
            assert upload.name not in {m.name for m in b.list_media()}
            for call in (lambda: b.get_cache(cache), lambda: b.update_cache(cache, ttl=60),
                         lambda: b.delete_cache(cache),
                         lambda: b.generate_text("Which lighthouse?", cached_content=cache,
                                                 max_output_tokens=2),
                         lambda: b.count_tokens("Which?", cached_content=cache),
                         lambda: b.get_media(upload), lambda: b.delete_media(upload)):
                with pytest.raises(ringserve.NotFound):
                    call()
            # Naming A's upload in B's prompt: the same answer as an id that never existed.
            part = pb.Part(file_data=pb.FileData(file_uri=upload.name, mime_type="image/png"))
            answers = []
            for name in (upload.name, "media/0000000000000000"):
                part.file_data.file_uri = name
                with pytest.raises(ringserve.RingserveError) as err:
                    b.count_tokens([pb.Content(role="user", parts=[part])])
                answers.append((err.value.code, err.value.details.replace(name, "NAME")))
            assert answers[0] == answers[1] and answers[0][0] == grpc.StatusCode.INVALID_ARGUMENT
            # A still has both.
            assert a.get_cache(cache).name == cache.name and a.get_media(upload).name == upload.name
            assert a.count_tokens("Which?", cached_content=cache) > 0
        finally:
            a.delete_cache(cache)
            a.delete_media(upload)


def test_list_calls_are_paginated(tls_server, pki):
    with _client(tls_server, KEY_B, pki) as client, grpc.secure_channel(
            tls_server.target, grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())) as ch:
        stub = pb_grpc.InferenceStub(ch)
        metadata = (("x-goog-api-key", KEY_B),)
        made = [client.create_cache(f"Note {i}: the tide turns at {i} o'clock.", ttl=600).name
                for i in range(5)]
        try:
            names, token, pages = [], "", 0
            while True:
                response = stub.ListCaches(pb.ListCachesRequest(page_size=2, page_token=token),
                                           metadata=metadata)
                assert len(response.cached_contents) <= 2
                names += [c.name for c in response.cached_contents]
                pages += 1
                token = response.next_page_token
                if not token:
                    break
            assert names == made and pages == 3  # oldest first, each once
            assert [c.name for c in client.list_caches()] == made  # the SDK follows the pages
            for bad in (pb.ListCachesRequest(page_token="%%%"),
                        pb.ListCachesRequest(page_size=-1)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ListCaches(bad, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            for name in made:
                client.delete_cache(name)


@pytest.fixture(scope="module")
def limited_server(random_default_dir, keys_file):
    """Keys, plaintext, and small per-key limits."""
    server = ServerProcess("--model", str(random_default_dir), "--max-batch", "2", "--no-warmup",
                           "--api-keys", str(keys_file), "--kv-cache-gib", "0.05",
                           "--max-caches-per-key", "2", "--max-streams-per-key", "1",
                           "--max-uploads-per-key", "1", "--max-cache-ttl-hours", "1",
                           "--max-pinned-fraction-per-key", "0.02", "--upload-idle-seconds", "1",
                           "--media-store-gib", "0.001")
    yield server
    server.terminate()


def test_per_key_limits(limited_server):
    import _media

    with ringserve.Client(limited_server.target, api_key=KEY_A, timeout=60) as a, \
            ringserve.Client(limited_server.target, api_key=KEY_B, timeout=60) as b:
        stats = a.stats()
        allowed = int(0.02 * stats.kv_pages_total * stats.kv_page_tokens)
        made = [a.create_cache(f"Short note {i}.", ttl=600) for i in range(2)]
        with pytest.raises(ringserve.ResourceExhausted, match="caches per key.*max-caches"):
            a.create_cache("One too many.", ttl=600)
        other = b.create_cache("B's own note.", ttl=600)  # limits are per key
        long_text = "the river bends past the mill " * (allowed // 4 + 8)
        assert b.count_tokens(long_text) > allowed
        with pytest.raises(ringserve.ResourceExhausted, match="pinned tokens per key"):
            b.create_cache(long_text, ttl=600)
        with pytest.raises(ringserve.InvalidArgument, match="maximum TTL is 3600 s .--max-cache-ttl-hours"):
            b.create_cache("Too long lived.", ttl=7200)
        with pytest.raises(ringserve.InvalidArgument, match="display_name: 600 characters"):
            b.create_cache("Named.", ttl=60, display_name="x" * 600)
        for cache in (*made, other):
            (a if cache in made else b).delete_cache(cache)

        upload = a.upload_media(_media.png(seed=1), "image/png")
        with pytest.raises(ringserve.ResourceExhausted, match="uploads per key"):
            a.upload_media(_media.png(seed=2), "image/png")
        a.delete_media(upload)

        # One open stream per key: A's second waits its turn, B is not affected.
        stream = a.generate("Tell me a long story.", max_output_tokens=4000, ignore_eos=True)
        next(stream)
        with pytest.raises(ringserve.ResourceExhausted, match="concurrent streams per key"):
            a.generate_text("hi", max_output_tokens=1)
        assert len(b.generate_text("hi", max_output_tokens=2, ignore_eos=True).token_ids) == 2
        stream.close()
        deadline = time.monotonic() + 60  # the server sees the cancel a moment later
        while True:
            try:
                assert a.generate_text("hi", max_output_tokens=1, ignore_eos=True).token_ids
                break
            except ringserve.ResourceExhausted:
                assert time.monotonic() < deadline, "the closed stream still counts"
                time.sleep(0.05)


def test_a_stalled_upload_is_dropped_and_frees_its_bytes(limited_server):
    """An upload that sends its header and then nothing holds its reserved bytes only until
    --upload-idle-seconds passes."""
    import threading

    import _media

    done = threading.Event()

    def stalled():
        yield pb.UploadMediaRequest(header=pb.MediaHeader(
            mime_type="image/png", size_bytes=1_070_000))  # nearly the whole 1 MiB store
        done.wait(120)  # sends nothing more until the call is over

    with grpc.insecure_channel(limited_server.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        try:
            with pytest.raises(grpc.RpcError) as err:
                stub.UploadMedia(stalled(), metadata=(("x-goog-api-key", KEY_B),), timeout=120)
        finally:
            done.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no data for 1 s" in err.value.details()
    with ringserve.Client(limited_server.target, api_key=KEY_B, timeout=60) as client:
        upload = client.upload_media(_media.png(seed=3), "image/png")  # the bytes are free again
        client.delete_media(upload)
