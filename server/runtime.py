"""Loads a model and tokenizer and builds the engine loop: everything a servicer needs."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Callable

import jax

from model import checkpoint, presets
from model.config import ModelConfig
from model.kv_pages import pages_for_budget
from model.paged_engine import PagedEngine
from preprocess import prompt as prompt_lib
from preprocess.tokenizer import Tokenizer
from server.engine_loop import EngineLoop
from server.kv_manager import KVCacheManager
from server.metrics import Metrics
from server.validation import Limits

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    model: str = "default"  # "default" or a checkpoint directory
    tokenizer: str | None = None  # sentencepiece .model; default: <model>/tokenizer.model
    dtype: str | None = None  # override the checkpoint's dtype
    max_slots: int = 8  # concurrent decoding requests
    max_len: int | None = None  # context cap; default: the model's max_context
    max_waiting: int = 256
    default_max_output_tokens: int = 512
    prefill_chunk: int = 512  # largest prefill step in tokens
    token_budget: int | None = None  # tokens per step; default: prefill_chunk + max_slots
    kv_cache_gib: float = 1.0  # the page pool, allocated once at start-up
    kv_cache_fraction: float | None = None  # instead: this share of the device's free memory
    page_len: int = 16  # tokens per KV page
    prefix_caching: bool = True
    warmup: bool = True

    def __post_init__(self):
        if self.max_slots < 1:
            raise ValueError(f"max_slots={self.max_slots}: need at least 1 decode slot")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len={self.max_len}: need room for a prompt and one token")


@dataclasses.dataclass
class Runtime:
    config: ModelConfig
    tokenizer: Tokenizer
    engine: PagedEngine
    engine_loop: EngineLoop
    limits: Limits
    model_name: str
    param_count: int
    prefix_caching: bool
    metrics: Metrics


def resolve_model_dir(model: str) -> pathlib.Path:
    if model == "default":
        return presets.ensure_default_checkpoint(presets.default_checkpoint_dir())
    path = pathlib.Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"--model {model}: not a directory (give a checkpoint directory or "
                         "'default')")
    return path


def load_tokenizer(model_dir: pathlib.Path, override: str | None) -> Tokenizer:
    path = pathlib.Path(override) if override else model_dir / "tokenizer.model"
    if not path.is_file():
        raise ValueError(f"no tokenizer at {path}: put a sentencepiece tokenizer.model in the "
                         "checkpoint directory or pass --tokenizer")
    return Tokenizer(str(path))


def kv_budget_bytes(options: RuntimeOptions) -> int:
    """The page pool's size: a fixed budget, or a share of the free device memory after the
    weights are loaded (accelerators report it; the CPU does not)."""
    if options.kv_cache_fraction is None:
        return int(options.kv_cache_gib * 2**30)
    if not 0 < options.kv_cache_fraction < 1:
        raise ValueError(f"--kv-cache-fraction {options.kv_cache_fraction}: use a value in (0, 1)")
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"--kv-cache-fraction: {jax.devices()[0].platform} does not report its "
                         "memory; give --kv-cache-gib instead")
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return int(free * options.kv_cache_fraction)


def build(options: RuntimeOptions,
          on_failure: Callable[[BaseException], None] | None = None,
          metrics: Metrics | None = None) -> Runtime:
    started = time.monotonic()
    model_dir = resolve_model_dir(options.model)
    config, model = checkpoint.load(model_dir, dtype=options.dtype)
    tokenizer = load_tokenizer(model_dir, options.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary "
                         f"is {config.vocab_size}: they do not belong together")
    max_len = min(options.max_len or config.max_context, config.max_context)
    num_pages = pages_for_budget(config, options.page_len, kv_budget_bytes(options))
    engine = PagedEngine(config, model, max_slots=options.max_slots, num_pages=num_pages,
                         page_len=options.page_len, max_len=max_len,
                         prefill_chunk=options.prefill_chunk)
    if options.warmup:
        engine.warmup()
    kv = KVCacheManager(num_pages, options.page_len,
                        enable_prefix_caching=options.prefix_caching)
    loop = EngineLoop(engine, kv, tokenizer, prompt_lib.stop_token_ids(tokenizer),
                      max_slots=options.max_slots,
                      token_budget=options.token_budget or engine.prefill_chunk + options.max_slots,
                      max_waiting=options.max_waiting, metrics=metrics, on_failure=on_failure)
    log.info("loaded %s from %s in %.1fs (%d compilations); KV pool: %d pages of %d tokens",
             config.name, model_dir, time.monotonic() - started, engine.compile_count,
             num_pages - 1, options.page_len)
    return Runtime(
        config=config, tokenizer=tokenizer, engine=engine, engine_loop=loop,
        limits=Limits(context_length=max_len,
                      default_max_output_tokens=options.default_max_output_tokens),
        model_name=config.name, param_count=engine.param_count,
        prefix_caching=options.prefix_caching, metrics=loop.metrics)
