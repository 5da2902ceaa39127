# ringserve server image with CUDA-enabled JAX.
#   docker build -t ringserve .
#   docker run --gpus all -p 50051:50051 ringserve                      # embedded default model
#   docker run --gpus all -p 50051:50051 -v /ckpt:/ckpt ringserve serve --model /ckpt --host 0.0.0.0
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH RINGSERVE_HOME=/var/lib/ringserve
WORKDIR /src
COPY . .
# Stubs are generated here (they are not committed), then both packages install non-editable.
RUN python3 -m venv $VIRTUAL_ENV \
 && pip install --no-cache-dir grpcio-tools "jax[cuda12]>=0.10,<0.12" \
 && mkdir -p clients/ringserve/v1 && touch clients/ringserve/v1/__init__.py \
 && python -m grpc_tools.protoc -I protos --python_out=clients --pyi_out=clients \
      --grpc_python_out=clients protos/ringserve/v1/*.proto \
 && pip install --no-cache-dir ./clients . \
 && pip uninstall -y grpcio-tools \
 && python -c "from model import presets; presets.ensure_default_checkpoint(presets.default_checkpoint_dir())"

WORKDIR /
EXPOSE 50051
ENTRYPOINT ["ringserve"]
# Listening beyond loopback needs keys (`--api-keys /keys.txt`, mounted) or an explicit opt-out.
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--insecure-allow-remote"]
