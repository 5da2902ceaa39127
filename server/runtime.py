"""Loads a model and tokenizer and builds the engine loop: everything a servicer needs."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from model import checkpoint, presets
from model.config import ModelConfig
from model.kv_pages import pages_for_budget
from model.media_encoder import MediaEncoder
from model.paged_engine import PagedEngine
from model.sharding import MeshShape, make_mesh
from preprocess import prompt as prompt_lib
from preprocess import tokenizer as tokenizer_lib
from preprocess.tokenizer_protocol import TextTokenizer
from preprocess.gemma3_image import Gemma3ImageConfig
from preprocess.qwen2_vl_image import Qwen2VLImageConfig
from preprocess.qwen2_vl_video import Qwen2VLVideoConfig
from preprocess.whisper_features import WhisperFeatureConfig
from server.distributed import MirroredEngine, StepLeader
from server.engine_loop import EngineLoop
from server.replicas import Replicas, replica_metrics
from server.kv_manager import KVCacheManager
from server.media import MediaEmbedder, MediaLimits, MediaResolver
from server.media_store import MediaStore
from server.metrics import Metrics
from server.probe_pool import ProbePool
from server.validation import Limits

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    model: str = "default"  # "default" or a checkpoint directory
    tokenizer: str | None = None  # tokenizer file or directory; default: the model directory's
    dtype: str | None = None  # override the checkpoint's dtype
    max_slots: int = 8  # concurrent decoding requests
    max_len: int | None = None  # context cap; default: the model's max_context
    max_waiting: int = 256
    default_max_output_tokens: int = 512
    prefill_chunk: int = 512  # largest prefill step in tokens
    token_budget: int | None = None  # tokens per step; default: prefill_chunk + max_slots
    kv_cache_gib: float = 1.0  # the page pool per device, allocated once at start-up
    kv_cache_fraction: float | None = None  # instead: this share of each device's free memory
    page_len: int = 16  # tokens per KV page
    prefix_caching: bool = True
    warmup: bool = True
    mesh: MeshShape = MeshShape()  # devices: all of one process's, or of every process's
    steps: StepLeader | None = None  # process 0 of several: mirror every engine call to the others
    media_dir: str | None = None  # uploaded media; default: a temporary directory
    media_limits: MediaLimits = MediaLimits()
    media_store_gib: float = 20.0  # uploads kept at once, bytes
    media_probe_workers: int = 4  # threads validating requests with media parts

    def __post_init__(self):
        if self.max_slots < 1:
            raise ValueError(f"max_slots={self.max_slots}: need at least 1 decode slot")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len={self.max_len}: need room for a prompt and one token")


@dataclasses.dataclass
class Runtime:
    config: ModelConfig
    tokenizer: TextTokenizer
    engine: PagedEngine | MirroredEngine  # replica 0's
    engine_loop: Replicas  # one EngineLoop per data-parallel replica
    limits: Limits
    model_name: str
    param_count: int
    prefix_caching: bool
    metrics: Metrics
    media_store: MediaStore
    media: MediaResolver  # media parts -> prompt ids
    embedder: MediaEmbedder  # media -> encoder embeddings
    probes: ProbePool  # where requests with media parts are validated

    def close(self) -> None:
        self.embedder.close()
        self.probes.close()
        self.media_store.close()


def resolve_model_dir(model: str) -> pathlib.Path:
    if model == "default":
        return presets.ensure_default_checkpoint(presets.default_checkpoint_dir())
    path = pathlib.Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"--model {model}: not a directory (give a checkpoint directory or "
                         "'default')")
    return path


def load_tokenizer(model_dir: pathlib.Path, override: str | None) -> TextTokenizer:
    """`override` (a tokenizer file or directory) when given, else the checkpoint's: tokenizer.json
    when it has one (as transformers prefers), else tokenizer.model. The chat template and eos ids
    come from the files beside the tokenizer."""
    try:
        return tokenizer_lib.load(pathlib.Path(override) if override else model_dir)
    except FileNotFoundError as error:
        raise ValueError(f"{error}: put a tokenizer.json or sentencepiece tokenizer.model in the "
                         "checkpoint directory or pass --tokenizer") from None


def load_image_processor(model_dir: pathlib.Path,
                         config: ModelConfig) -> Gemma3ImageConfig | Qwen2VLImageConfig | None:
    """The image processor of a Hugging Face directory with a vision tower (Gemma 3's, or
    Qwen2.5-VL's dynamic-resolution one), from its preprocessor_config.json; None for
    ringserve's own format, whose images are preprocessed the built-in way."""
    tower = config.qwen_vision
    if (config.vision is None and tower is None) or not (
            model_dir / checkpoint.HF_CONFIG_FILE).is_file():
        return None
    try:
        if tower is None:
            return Gemma3ImageConfig.from_dir(model_dir)
        processor = Qwen2VLImageConfig.from_dir(model_dir)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise ValueError(f"{model_dir}: the image processor's config: {error}") from None
    return _cut_for(processor, tower, model_dir, "image")


def load_video_processor(model_dir: pathlib.Path, config: ModelConfig) -> Qwen2VLVideoConfig | None:
    """Qwen2.5-VL's video processor (video_preprocessor_config.json, else the image processor's
    file, as transformers falls back); None for other models."""
    tower = config.qwen_vision
    if tower is None or not (model_dir / checkpoint.HF_CONFIG_FILE).is_file():
        return None
    try:
        processor = Qwen2VLVideoConfig.from_dir(model_dir)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise ValueError(f"{model_dir}: the video processor's config: {error}") from None
    _cut_for(processor.pixels, tower, model_dir, "video")
    return processor


def _cut_for(pixels: Qwen2VLImageConfig, tower, model_dir: pathlib.Path, what: str):
    """`pixels`, once its patches are checked to be what the tower takes."""
    ours = (pixels.patch_size, pixels.temporal_patch_size, pixels.merge_size)
    theirs = (tower.patch_size, tower.temporal_patch_size, tower.merge_size)
    if ours != theirs:
        raise ValueError(f"{model_dir}: the {what} processor cuts (patch, temporal patch, merge) "
                         f"= {ours}; the vision tower takes {theirs}")
    return pixels


def load_audio_features(model_dir: pathlib.Path,
                        config: ModelConfig) -> WhisperFeatureConfig | None:
    """The feature extractor of an audio encoder that masks padding (Qwen2-Audio's), from the
    checkpoint's preprocessor_config.json; None for other models."""
    if config.audio is None or not config.audio.mask_padding:
        return None
    try:
        return WhisperFeatureConfig.from_dir(model_dir)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise ValueError(f"{model_dir}: the audio feature extractor's config: {error}") from None


def kv_budget_bytes(options: RuntimeOptions) -> int:
    """The page pool's memory on each device: a fixed budget, or a share of the free device memory
    after the weights are loaded (accelerators report it; the CPU does not)."""
    if options.kv_cache_fraction is None:
        return int(options.kv_cache_gib * 2**30)
    if not 0 < options.kv_cache_fraction < 1:
        raise ValueError(f"--kv-cache-fraction {options.kv_cache_fraction}: use a value in (0, 1)")
    device = jax.local_devices()[0]
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"--kv-cache-fraction: {device.platform} does not report its memory; "
                         "give --kv-cache-gib instead")
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return int(free * options.kv_cache_fraction)


def pool_pages(options: RuntimeOptions, config: ModelConfig) -> int:
    """Pages in the pool (null page included), a multiple of the mesh's sequence size S.

    Each of the S sequence ranks holds 1/S of the pages and 1/T of their kv heads (T: tensor), so
    a per-device budget of B bytes fits B * T / page_bytes pages per rank.
    """
    shape = options.mesh
    per_rank = pages_for_budget(config, options.page_len, kv_budget_bytes(options) * shape.tensor)
    return shape.sequence * per_rank


def build_meshes(shape: MeshShape, config: ModelConfig) -> list[Mesh | None]:
    """One mesh per data-parallel replica (None: one device), each over `shape.replica`'s
    devices: the first `shape.size` devices, or every device of every process when there are
    several processes (then data must be 1)."""
    shape.check(config)
    devices = jax.devices()
    if jax.process_count() > 1:
        if shape.size != len(devices):
            raise ValueError(
                f"--mesh {shape} covers {shape.size} devices, but the {jax.process_count()} "
                f"processes have {len(devices)} ({jax.local_device_count()} each): with several "
                "processes the mesh must use every device of every process")
        if shape.data != 1:
            raise ValueError(f"--mesh {shape}: data parallelism across processes is not "
                             "supported yet; run one server group per replica")
        return [make_mesh(shape, devices)]
    if shape.size == 1:
        return [None]
    if len(devices) < shape.size:
        raise ValueError(
            f"--mesh {shape} needs {shape.size} devices, but this process sees {len(devices)} "
            f"({devices[0].platform}); on CPU run with XLA_FLAGS="
            f"--xla_force_host_platform_device_count={shape.size} in the environment")
    per = shape.replica.size
    return [None if per == 1 and shape.data == 1 else
            make_mesh(shape.replica, devices[d * per:(d + 1) * per]) for d in range(shape.data)]


def build_mesh(shape: MeshShape, config: ModelConfig) -> Mesh | None:
    """The mesh of a single-replica engine (worker processes: data is always 1 there)."""
    return build_meshes(shape, config)[0]


def load_model(options: RuntimeOptions) -> tuple[pathlib.Path, ModelConfig, nnx.Module, list]:
    """The checkpoint's directory, config, model and one mesh per data-parallel replica. With
    one process the weights load straight into the first replica's shards (no device holds a
    whole copy); with several, each process loads them whole and the engine places its part."""
    model_dir = resolve_model_dir(options.model)
    config = checkpoint.load_config(model_dir, dtype=options.dtype)
    meshes = build_meshes(options.mesh, config)
    _, model = checkpoint.load(model_dir, dtype=options.dtype,
                               mesh=meshes[0] if jax.process_count() == 1 else None)
    return model_dir, config, model, meshes


def engine_identity(config: ModelConfig, shape: MeshShape) -> str:
    """What every process of a group must agree on: the model's config and the mesh."""
    return json.dumps({"model": config.to_dict(), "mesh": str(shape)}, sort_keys=True)


def worker_engine(options: RuntimeOptions) -> tuple[Callable[..., PagedEngine], str]:
    """For a worker process: how to build its engine once (process 0 sends the shapes), and the
    identity that must match process 0's."""
    _, config, model, (mesh,) = load_model(options)
    unsharded = [model]

    def build_once(**shapes) -> PagedEngine:
        # The engine keeps its sharded copy of the weights; this one goes once it is built.
        return PagedEngine(config, unsharded.pop(), mesh=mesh, **shapes)

    return build_once, engine_identity(config, options.mesh)


def build(options: RuntimeOptions,
          on_failure: Callable[[BaseException], None] | None = None,
          metrics: Metrics | None = None) -> Runtime:
    started = time.monotonic()
    model_dir, config, model, meshes = load_model(options)
    tokenizer = load_tokenizer(model_dir, options.tokenizer)
    audio_features = load_audio_features(model_dir, config)
    image_processor = load_image_processor(model_dir, config)
    video_processor = load_video_processor(model_dir, config)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary "
                         f"is {config.vocab_size}: they do not belong together")
    encoder = MediaEncoder(config, model)  # before the engine takes the model
    max_len = min(options.max_len or config.max_context, config.max_context)
    num_pages = pool_pages(options, config)
    shapes = dict(max_slots=options.max_slots, num_pages=num_pages, page_len=options.page_len,
                  max_len=max_len, prefill_chunk=options.prefill_chunk)
    if options.steps is None:
        # One engine per data-parallel replica, each with its own copy of the weights.
        engines = [PagedEngine(config, model, mesh=mesh, **shapes) for mesh in meshes]
    else:
        if on_failure is not None:
            options.steps.watch(on_failure)  # a lost worker: NOT_SERVING at once
        factory = functools.partial(PagedEngine, config, model, mesh=meshes[0])
        engines = [MirroredEngine(options.steps, factory, shapes,
                                  engine_identity(config, options.mesh))]
    if options.warmup:
        for engine in engines:
            engine.warmup()
        encoder.warmup()
    metrics = metrics or Metrics()
    loops = []
    for engine, view in zip(engines, replica_metrics(metrics, len(engines))):
        kv = KVCacheManager(num_pages, options.page_len,
                            enable_prefix_caching=options.prefix_caching,
                            num_ranks=options.mesh.sequence)
        loops.append(EngineLoop(
            engine, kv, tokenizer, prompt_lib.stop_token_ids(tokenizer),
            max_slots=options.max_slots,
            token_budget=options.token_budget or engine.prefill_chunk + options.max_slots,
            max_waiting=options.max_waiting, metrics=view, on_failure=on_failure))
    engine = engines[0]
    loop = Replicas(loops, metrics)
    log.info("loaded %s from %s in %.1fs (%d compilations); mesh %s over %d process(es); "
             "KV pool: %d pages of %d tokens per replica", config.name, model_dir, time.monotonic() - started,
             sum(e.compile_count for e in engines), options.mesh, jax.process_count(),
             num_pages - options.mesh.sequence, options.page_len)  # a null page per rank
    store = MediaStore(options.media_dir, budget_bytes=int(options.media_store_gib * 2**30),
                       max_bytes=options.media_limits.max_bytes)
    return Runtime(
        media_store=store, media=MediaResolver(config, tokenizer, store, options.media_limits,
                                               image_processor, video_processor),
        embedder=MediaEmbedder(encoder, options.media_limits, audio_features=audio_features,
                               image_processor=image_processor, video_processor=video_processor),
        probes=ProbePool(options.media_probe_workers),
        config=config, tokenizer=tokenizer, engine=engine, engine_loop=loop,
        limits=Limits(context_length=max_len,
                      default_max_output_tokens=options.default_max_output_tokens),
        model_name=config.name, param_count=engine.param_count,
        prefix_caching=options.prefix_caching, metrics=loop.metrics)
