"""The SDK stands alone: its wheel declares only grpcio and protobuf, and installed next to those
two (and grpcio's own typing-extensions) and nothing else, it imports and talks to the server."""

from __future__ import annotations

import email
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SDK_MODULES = ["ringserve", "ringserve.client", "ringserve.aio", "ringserve.errors",
               "ringserve.types", "ringserve.chat", "ringserve.cli"]
FORBIDDEN = ["jax", "jaxlib", "numpy", "flax", "server", "model", "preprocess", "sentencepiece",
             "grpc_health", "grpc_reflection", "grpc_tools"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The SDK's wheel, built from a copy of clients/ (the tree stays untouched)."""
    if not (ROOT / "clients/ringserve/v1/inference_pb2.py").exists():
        pytest.fail("generated stubs missing: run `make protos`")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "clients"
    shutil.copytree(ROOT / "clients", src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp / "dist"), str(src)], check=True)
    (path,) = (tmp / "dist").glob("ringserve_client-*.whl")
    return path


def test_wheel_requires_only_grpcio_and_protobuf(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(meta_name))
        (entry_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(entry_name).decode()
    requires = meta.get_all("Requires-Dist")
    # Optional extras (e.g. `[niah]`'s Pillow for heatmaps) are not requirements.
    assert {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires
            if "extra ==" not in r} == {"grpcio", "protobuf"}
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "ringserve"}
    assert {"ringserve/v1/inference_pb2.py", "ringserve/v1/inference_pb2_grpc.py"} <= set(names)
    assert "ringserve = ringserve.cli:main" in entry_points


def _minimal_site(tmp: Path, wheel: Path) -> Path:
    """A directory holding the unpacked wheel plus grpcio, protobuf and typing-extensions only."""
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    for name in ["grpc", "google.protobuf", "google._upb", "typing_extensions"]:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.submodule_search_locations[0] if spec.submodule_search_locations
                      else spec.origin)
        dest = site / origin.relative_to(origin.parents[name.count(".")])
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(origin, target_is_directory=origin.is_dir())
    return site


CHECK = textwrap.dedent("""
    import importlib, sys
    for name in {forbidden!r}:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        raise SystemExit(f"{{name}} is importable: the environment is not minimal")
    for name in {modules!r}:
        importlib.import_module(name)
    import ringserve
    assert ringserve.__file__.startswith({site!r}), ringserve.__file__
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})
    assert not leaked, leaked
    with ringserve.Client({target!r}, timeout=60) as client:
        assert client.health() == "SERVING"
        result = client.generate_text("hi", max_output_tokens=2, temperature=0)
        assert result.usage.candidates_token_count == 2, result
    print("standalone ok")
""")


def test_sdk_runs_with_grpcio_and_protobuf_alone(wheel, tmp_path, server_target):
    site = _minimal_site(tmp_path, wheel)
    # -S: no site-packages (so no jax, numpy, ... and not the venv's own ringserve); the SDK and
    # its two dependencies come from PYTHONPATH alone. Run outside the repository.
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site)}
    code = CHECK.format(forbidden=FORBIDDEN, modules=SDK_MODULES, site=str(site),
                        target=server_target)
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "standalone ok" in run.stdout

    cli = subprocess.run([sys.executable, "-S", "-m", "ringserve.cli", "info", "--target",
                          server_target], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "health: SERVING" in cli.stdout

    serve = subprocess.run([sys.executable, "-S", "-m", "ringserve.cli", "serve"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert serve.returncode == 2
    assert "ringserve serve needs the server package" in serve.stderr
