"""Text generation throughput: ringserve's PagedEngine next to transformers' `generate`, same weights.

    python -m bench.generate --out bench/results/generate.json [--quick]

For each model a random `LlamaForCausalLM` is created (torch seed 0), saved with save_pretrained as
safetensors and loaded into ringserve with `model.checkpoint.load`, so both run identical fp32
weights. Each workload (batch, prompt length, new tokens) runs greedy decoding on both after a
warm-up of the same shapes; runs of the two alternate and the best of `--repeats` is kept, which
damps interference from other processes on a small box.

Timing. ringserve: prefill = the `PagedEngine.prefill` calls (one slot each, chunks of up to 512
tokens, first token sampled), decode = the N - 1 batched `PagedEngine.decode` calls (one token a
call, each row reading its own pages; block tables laid out on the host as the server's cache
manager would). transformers: a logits processor stamps the clock when
the first token's logits are ready (prefill done) and generate's return ends decode (N - 1 steps).
Torch uses 2 threads; XLA and OMP settings are left as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from model import checkpoint, presets
from model.config import ModelConfig
from model.paged_engine import PagedEngine
from model.sampling import SamplingParams

TORCH_THREADS = 2
GREEDY = SamplingParams(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int  # B
    prompt: int  # tokens per prompt
    new_tokens: int  # N, including the one sampled by prefill
    max_len: int | None = None  # ringserve's KV cache length per slot; None: prompt + new tokens


def llama_125m() -> ModelConfig:
    """A Llama of about 125M parameters (untied head), as in docs/benchmarks.md and ANCHORS.md."""
    return ModelConfig(
        name='llama-125m', vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
        head_dim=64, mlp_dim=2048, tie_embeddings=False, norm_eps=1e-5, max_context=2048,
    )  # fmt: skip


def hf_llama(config: ModelConfig) -> transformers.LlamaConfig:
    """The transformers config of the same architecture (Llama family only)."""
    if config.mlp_activation != 'silu' or config.embed_scale or config.norm_offset or config.qkv_bias:
        raise ValueError(f'{config.name} is not a plain Llama; the benchmark builds Llama weights only.')
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
        max_position_embeddings=config.max_context, bos_token_id=config.bos_id, eos_token_id=None,
        pad_token_id=0, torch_dtype='float32',
    )  # fmt: skip


class _Stamp(transformers.LogitsProcessor):
    """Records when generate first asks for a token: the prefill forward has finished then."""

    def __init__(self):
        self.first: float | None = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def run_transformers(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
    """(prefill seconds, decode seconds, tokens i64[B, N]) of one greedy generate call."""
    ids = torch.from_numpy(prompts.astype(np.int64))
    stamp = _Stamp()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, logits_processor=transformers.LogitsProcessorList([stamp]), pad_token_id=0,
        )  # fmt: skip
        end = time.perf_counter()
    tokens = out[:, prompts.shape[1] :].numpy()
    assert tokens.shape == (len(prompts), new_tokens), tokens.shape
    return stamp.first - start, end - stamp.first, tokens


PAGE_LEN = 16
CHUNK = 512


def run_ringserve(engine: PagedEngine, prompts: np.ndarray, new_tokens: int) -> tuple[float, float, np.ndarray]:
    """(prefill seconds, decode seconds, tokens i32[B, N]): B prefills, then N - 1 batched decodes."""
    batch, prompt = prompts.shape
    pages = -(-(prompt + new_tokens) // PAGE_LEN)
    tables = [list(range(1 + i * pages, 1 + (i + 1) * pages)) for i in range(batch)]  # page 0: null
    slots = list(range(batch))
    for slot in slots:
        engine.set_params(slot, GREEDY)
    tokens = np.zeros((batch, new_tokens), dtype=np.int32)
    start = time.perf_counter()
    for slot in slots:
        for s in range(0, prompt, CHUNK):
            tokens[slot, 0] = engine.prefill(slot, prompts[slot, s:s + CHUNK].tolist(), s, tables[slot])
    prefilled = time.perf_counter()
    for step in range(1, new_tokens):
        tokens[:, step] = engine.decode(slots, tokens[:, step - 1].tolist(), [prompt + step - 1] * batch,
                                        tables)
    end = time.perf_counter()
    return prefilled - start, end - prefilled, tokens


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Whether greedy tokens agree, and where the first row to diverge does."""
    same = ours == theirs
    rows = same.all(axis=1)
    first = [int(np.argmin(row)) for row in same if not row.all()]
    return {
        'identical': bool(rows.all()),
        'identical_rows': f'{int(rows.sum())}/{len(rows)}',
        'first_divergence': min(first) if first else None,
    }


def bench_model(config: ModelConfig, workloads: list[Workload], repeats: int, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_llama(config)).eval()
    hf_dir = workdir / config.name
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    rs_config, rs_model = checkpoint.load(hf_dir, dtype='float32')
    rows = []
    for w in workloads:
        prompts = np.random.default_rng(w.prompt).integers(3, config.vocab_size, size=(w.batch, w.prompt))
        max_len = w.max_len or w.prompt + w.new_tokens
        pages = w.batch * -(-(w.prompt + w.new_tokens) // PAGE_LEN) + 1
        engine = PagedEngine(rs_config, rs_model, max_slots=w.batch, num_pages=pages, page_len=PAGE_LEN,
                             max_len=max_len, prefill_chunk=CHUNK, max_steps=1)
        warm_start = time.perf_counter()
        run_ringserve(engine, prompts, 2)  # compiles this prompt's bucket and the decode programs
        run_ringserve(engine, prompts, w.new_tokens)  # and every decode list length it reaches
        rs_warmup = time.perf_counter() - warm_start
        run_transformers(hf_model, prompts, 2)
        compiles = engine.compile_count

        best_rs = best_hf = None
        for _ in range(repeats):
            rs = run_ringserve(engine, prompts, w.new_tokens)
            hf = run_transformers(hf_model, prompts, w.new_tokens)
            best_rs = rs if best_rs is None else (min(best_rs[0], rs[0]), min(best_rs[1], rs[1]), rs[2])
            best_hf = hf if best_hf is None else (min(best_hf[0], hf[0]), min(best_hf[1], hf[1]), hf[2])
        assert engine.compile_count == compiles, 'the timed runs compiled'

        prefill_tokens = w.batch * w.prompt
        decode_tokens = w.batch * (w.new_tokens - 1)
        row = {
            'model': config.name,
            'params': engine.param_count,
            **dataclasses.asdict(w),
            'max_len': max_len,
            'ringserve': {
                'prefill_tok_s': prefill_tokens / best_rs[0],
                'decode_tok_s': decode_tokens / best_rs[1],
                'prefill_s': best_rs[0],
                'decode_s': best_rs[1],
                'warmup_s': rs_warmup,
                'compilations': compiles,
            },
            'transformers': {
                'prefill_tok_s': prefill_tokens / best_hf[0],
                'decode_tok_s': decode_tokens / best_hf[1],
                'prefill_s': best_hf[0],
                'decode_s': best_hf[1],
            },
            'greedy': compare(best_rs[2], best_hf[2]),
        }
        row['prefill_ratio'] = row['ringserve']['prefill_tok_s'] / row['transformers']['prefill_tok_s']
        row['decode_ratio'] = row['ringserve']['decode_tok_s'] / row['transformers']['decode_tok_s']
        print(
            f"{config.name:18s} B={w.batch:<3d} P={w.prompt:<4d} N={w.new_tokens:<4d} cache={max_len:<5d} "
            f"prefill {row['ringserve']['prefill_tok_s']:8.1f} vs {row['transformers']['prefill_tok_s']:8.1f} tok/s "
            f"({row['prefill_ratio']:.2f}x)  decode {row['ringserve']['decode_tok_s']:7.1f} vs "
            f"{row['transformers']['decode_tok_s']:7.1f} tok/s ({row['decode_ratio']:.2f}x)  "
            f"greedy identical: {row['greedy']['identical_rows']}",
            flush=True,
        )
        rows.append(row)
        del engine
    return rows


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return {
        'cpu': cpu,
        'cores': os.cpu_count(),
        'python': platform.python_version(),
        'jax': jax.__version__,
        'jax_backend': jax.default_backend(),
        'torch': torch.__version__,
        'torch_threads': torch.get_num_threads(),
        'transformers': transformers.__version__,
        'numpy': np.__version__,
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'omp_num_threads': os.environ.get('OMP_NUM_THREADS', ''),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='JSON file to write')
    parser.add_argument('--quick', action='store_true', help='small prompts and few tokens (about a minute)')
    parser.add_argument('--repeats', type=int, default=None, help='timed runs per workload (best kept)')
    args = parser.parse_args(argv)

    torch.set_num_threads(TORCH_THREADS)
    if args.quick:
        workloads = [Workload(1, 128, 16), Workload(4, 64, 16)]
        repeats = args.repeats or 1
    else:
        # The last row uses the server's cache length (the default model's max_context, 8192).
        workloads = [Workload(1, 512, 128), Workload(16, 256, 128), Workload(8, 256, 128, max_len=8192)]
        repeats = args.repeats or 3
    models = [presets.bench_llama(), llama_125m()]

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix='ringserve-bench-') as workdir:
        for config in models:
            rows += bench_model(config, workloads, repeats, Path(workdir))
    result = {
        'benchmark': 'text generation (issue 2)',
        'command': ' '.join([Path(sys.executable).name, '-m', 'bench.generate', *(argv or sys.argv[1:])]),
        'machine': machine_info(),
        'repeats': repeats,
        'dtype': 'float32',
        'decoding': 'greedy',
        'results': rows,
        'wall_s': time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {out} in {result["wall_s"]:.0f} s')


if __name__ == '__main__':
    main()
