import os
import sys

import pytest

# Eight simulated CPU devices for the mesh tests (set before anything imports JAX); everything
# else runs on device 0 as before. Server subprocesses inherit it and still use one device unless
# given --mesh.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

# Tests import the tree as it is (server/, model/, preprocess/ and tests' helpers).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from serving import ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def server_target():
    """The real server on the default model (random weights), on a free port."""
    server = ServerProcess("--model", "default", "--max-batch", "4", "--grace-period", "2")
    yield server.target
    server.terminate()
