# Two commands on a fresh machine: `make serve` and `make test`. Each sets up what is missing
# (venv, packages, generated gRPC stubs) and nothing more on a second run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 50051
MODEL  ?= default
PYTEST_ARGS ?=

PROTOS := $(wildcard protos/ringserve/v1/*.proto)
STUBS  := clients/ringserve/v1/inference_pb2.py
DEPS   := $(VENV)/.deps-installed

.PHONY: setup serve test protos bench client-wheel clean

setup: $(DEPS) $(STUBS)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The stamp depends on both project files, so changing a dependency reinstalls; nothing else does.
$(DEPS): pyproject.toml clients/pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ./clients -e '.[test]'
	touch $@

$(STUBS): $(PROTOS) $(DEPS)
	mkdir -p clients/ringserve/v1
	$(PY) -m grpc_tools.protoc -I protos --python_out=clients --pyi_out=clients \
	    --grpc_python_out=clients $(PROTOS)
	touch clients/ringserve/v1/__init__.py
	touch $@

protos: $(STUBS)

serve: setup
	$(VENV)/bin/ringserve serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.generate --out bench/results/generate.json

# A wheel of the SDK alone (grpcio + protobuf, no JAX).
client-wheel: $(STUBS)
	$(PY) -m pip wheel --no-deps -w dist ./clients

clean:
	rm -rf $(VENV) clients/ringserve/v1 dist build
