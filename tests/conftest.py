import os
import shutil
import sys
import tempfile

import pytest

# Eight simulated CPU devices for the mesh tests (set before anything imports JAX); everything
# else runs on device 0 as before. Server subprocesses inherit it and still use one device unless
# given --mesh.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

# One JAX compilation cache for the whole run, shared by the in-process tests and by every server
# subprocess (they inherit the environment): the default model's serving programs compile once,
# not once per server start (a server start measured 211 s cold, 43 s warm on a 2-core box). A
# fresh directory per run, removed at its end, so a run never reads another run's programs.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="ringserve-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Tests import the tree as it is (server/, model/, preprocess/ and tests' helpers).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from serving import SERVERS, ServerProcess  # noqa: E402


# Fixtures that start (or exist to start) a real server process: their tests are marked `e2e`,
# so `-m "not e2e"` runs the in-process tests alone (README: the fast subset).
_SERVER_FIXTURES = {"server_target", "trained_server_target", "random_default_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used a shared server gets that server's last log lines in its report
    (a stall or an engine error is then visible in CI's output)."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for name in ("server_target", "trained_server_target"):
        server = SERVERS.get(getattr(item, "funcargs", {}).get(name, ""))
        if server is not None:
            report.sections.append((f"{name}'s log, last 40 lines", "".join(server.lines[-40:])))


@pytest.fixture(scope="session")
def random_default_dir(tmp_path_factory):
    """A checkpoint of the default model's architecture with random (seeded) weights.

    The serving tests run on it rather than on the trained default: a random model almost never
    emits a stop token, so cancellation, deadlines, length limits and long streams behave the same
    whatever the prompt. The trained model answers briefly and stops (tests/test_default_model.py).
    """
    from flax import nnx

    from model import checkpoint, presets
    from model.transformer import Transformer

    directory = tmp_path_factory.mktemp("random-default")
    config = presets.default_config()
    checkpoint.save(directory, config, Transformer(config, rngs=nnx.Rngs(presets.DEFAULT_SEED)))
    shutil.copyfile(presets.DEFAULT_TOKENIZER, directory / presets.TOKENIZER_FILE)
    return directory


@pytest.fixture(scope="session")
def server_target(random_default_dir):
    """The real server on the default architecture with random weights, on a free port."""
    server = ServerProcess("--model", str(random_default_dir), "--max-batch", "4", "--grace-period", "2")
    yield server.target
    server.terminate()


@pytest.fixture(scope="session")
def trained_server_target():
    """The real server on the shipped, trained default model (`--model default`), on a free port."""
    server = ServerProcess("--model", "default", "--max-batch", "4", "--grace-period", "2")
    yield server.target
    server.terminate()
