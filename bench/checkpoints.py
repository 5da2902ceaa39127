"""Gemma 3 checkpoints: ringserve's engine next to transformers on the same random weights.

    python -m bench.checkpoints --out bench/results/checkpoints.json [--small] [--long]
        [--layers N] [--vocab V] [--vision-image S] [--vision-layers N] [--no-vision]

Weights. A random `Gemma3ForCausalLM` (torch seed 0, transformers' own init) with Gemma 3 1B's text
shape: width 1152, 26 layers, 4 query heads / 1 kv head of 256, MLP 6912, vocabulary 262,144 (the
tied embedding alone is 302M parameters), sliding window 512 on five layers of every six, fp32;
`--layers` and `--vocab` shrink it. It is saved with `save_pretrained` (safetensors) into a
temporary directory, and ringserve loads that directory with `model.checkpoint.load`.

Measures, all in one process; the two sides alternate run by run so that load from other work hits
both, and the best of `--repeats` is kept (every run is in the JSON). Each side runs every shape
once before timing (ringserve's compilation; its time is reported as `warmup_s`), and ringserve's
compile count must not move while timed.
1. Prefill tokens/s, one prompt of 512 tokens (`--long`: also 2048). ringserve: `PagedEngine.prefill`
   in the server's chunks of up to 512 tokens, first token sampled. transformers: one forward of the
   prompt, `use_cache=True`, `logits_to_keep=1` (as generate does; ringserve also computes logits at
   the sampled position only).
2. Decode tokens/s with 1 and 16 sequences, each after a 512-token prompt (`--decode-prompt`),
   `--new-tokens` greedy tokens a sequence. ringserve: `PagedEngine.decode_steps` in windows of the
   engine's `max_steps` (8) tokens, as server/engine_loop.py's multi-step windows call it.
   transformers: a manual loop of one-token forwards over a copy of the prompt's `DynamicCache`
   (what generate's decode phase runs, without its per-step bookkeeping). Prefill of these prompts
   is done once and not counted; every decode run restarts from the same prompt state.
3. Vision, when `checkpoint.load` brings back a Gemma 3 multimodal directory's SigLIP tower
   (checked on a tiny Gemma3ForConditionalGeneration first): images/s of `Transformer.encode_images`
   against `get_image_features` (tower and projector), SigLIP-So400m's shape by default (width 1152,
   27 layers, 16 heads, MLP 4304, 896-pixel images of 14-pixel patches, 256 tokens an image).
   Its decoder is one layer of the text width with a 1024-token vocabulary (only the projector's
   output width matters). transformers initialises the projection to zeros; it is made random.

KV memory: both sides' K/V bytes after the decode prompts are in the JSON. transformers' sliding
layers keep only their last window; ringserve's pool keeps every position on every layer (and its
ragged decode reads a row's pages up to FLAT_MAX_KEYS keys, masking those outside the window), so
the two differ only once prompts pass the window (`--decode-prompt 2048`).
Torch runs one thread per core (`--threads`); JAX runs on its default CPU backend. The full run
peaks at about 14 GiB (the weights exist twice, plus transient copies while building and loading).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from bench.generate import compare, machine_info
from model import checkpoint
from model.paged_engine import PagedEngine
from model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
PAGE_LEN = 16  # the server's defaults
CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one run measures."""

    text: dict  # Gemma3TextConfig settings
    prefill: tuple[int, ...]  # prompt lengths for measure 1
    decode_prompt: int  # tokens before decoding starts (measure 2)
    new_tokens: int  # decoded tokens per sequence
    batches: tuple[int, ...]  # concurrent sequences (measure 2)
    vision: dict  # SiglipVisionConfig settings
    mm_tokens: int  # decoder tokens per image
    images: int  # images per encoder call


def gemma3_1b(layers: int = 26, vocab: int = 262144) -> dict:
    """Gemma 3 1B's text settings (google/gemma-3-1b-pt's config.json), random weights."""
    return dict(vocab_size=vocab, hidden_size=1152, intermediate_size=6912, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                sliding_window_pattern=6, query_pre_attn_scalar=256, rope_theta=1e6, rope_local_base_freq=1e4,
                max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=None,
                pad_token_id=0, tie_word_embeddings=True)  # fmt: skip


def so400m(image: int = 896, layers: int = 27) -> dict:
    """SigLIP-So400m's vision tower (Gemma 3's), at `image` pixels a side."""
    return dict(model_type='siglip_vision_model', hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers,
                num_attention_heads=16, image_size=image, patch_size=14, layer_norm_eps=1e-6)  # fmt: skip


def small_shapes() -> Shapes:
    """A tiny Gemma 3 (window 16, six layers: five local, one global) that runs in well under a minute."""
    text = dict(gemma3_1b(layers=6, vocab=512), hidden_size=64, intermediate_size=128, head_dim=16,
                sliding_window=16, query_pre_attn_scalar=16)
    vision = dict(model_type='siglip_vision_model', hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    return Shapes(text, (64,), 48, 16, (1, 16), vision, mm_tokens=4, images=2)


# ---- building both sides ------------------------------------------------------------------------


def hf_text(settings: dict) -> transformers.Gemma3ForCausalLM:
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**settings)).eval()
    model.generation_config.eos_token_id = None
    return model


def hf_multimodal(text: dict, vision: dict, mm_tokens: int) -> transformers.Gemma3ForConditionalGeneration:
    """A Gemma3ForConditionalGeneration whose decoder is one layer of `text`'s width, vocabulary 1024."""
    vocab = min(text['vocab_size'], 1024)  # the encoder does not use it: no 300M-parameter table
    ids = dict(boi_token_index=vocab - 3, eoi_token_index=vocab - 2, image_token_index=vocab - 1)
    text = dict(text, vocab_size=vocab, num_hidden_layers=1, sliding_window_pattern=1)
    config = transformers.Gemma3Config(text_config=text,
                                       vision_config=vision, mm_tokens_per_image=mm_tokens, **ids)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises the projection to zeros: every image row would be 0
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.normal_(0.0, config.text_config.initializer_range)
    return model


def vision_loads(workdir: Path) -> str | None:
    """None when checkpoint.load keeps a Gemma 3 multimodal directory's vision tower; else why not."""
    tiny = small_shapes()
    path = workdir / 'vision-probe'
    hf_multimodal(tiny.text, tiny.vision, tiny.mm_tokens).save_pretrained(path, safe_serialization=True)
    try:
        config, _ = checkpoint.load(path, dtype='float32')
    except ValueError as error:
        return f'checkpoint.load refused a Gemma3ForConditionalGeneration directory: {error}'
    if getattr(config, 'vision', None) is None:
        return 'checkpoint.load read the decoder of a Gemma3ForConditionalGeneration directory but not its vision tower'
    return None


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def cache_bytes(cache) -> int:
    """Bytes of K and V a transformers cache holds (sliding layers keep only their window)."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


# ---- one run of each side -----------------------------------------------------------------------


def tables_for(slots: int, pages: int) -> list[list[int]]:
    """Disjoint block tables, as the server's cache manager would hand out (page 0 is the null page)."""
    return [list(range(1 + i * pages, 1 + (i + 1) * pages)) for i in range(slots)]


def ours_prefill(engine: PagedEngine, prompt: np.ndarray, slot: int, table: list[int]) -> tuple[float, int]:
    """(seconds, sampled token): one prompt in the server's chunks."""
    ids = prompt.tolist()
    start = time.perf_counter()
    for s in range(0, len(ids), CHUNK):
        token = engine.prefill(slot, ids[s:s + CHUNK], s, table)
    return time.perf_counter() - start, token


def theirs_prefill(model, prompts: np.ndarray) -> tuple[float, np.ndarray, object]:
    """(seconds, greedy next token per row, cache): one forward of the whole batch."""
    ids = torch.from_numpy(prompts.astype(np.int64))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - start
    return seconds, out.logits[:, -1].argmax(-1).numpy(), out.cache


def ours_decode(engine: PagedEngine, first: np.ndarray, start: int, tables, steps: int) -> tuple[float, np.ndarray]:
    """(seconds, tokens [B, steps]): multi-step windows of engine.max_steps, as the engine loop runs them."""
    slots = list(range(len(first)))
    out, token = [], first.tolist()
    begin = time.perf_counter()
    for done in range(0, steps, engine.max_steps):
        window = min(engine.max_steps, steps - done)
        rows = engine.decode_steps(slots, token, [start + done] * len(slots), tables, window)
        out.append(np.array(rows))
        token = [row[-1] for row in rows]
    return time.perf_counter() - begin, np.concatenate(out, axis=1)


def theirs_decode(model, first: np.ndarray, prefilled, steps: int) -> tuple[float, np.ndarray]:
    """(seconds, tokens [B, steps]): one-token forwards over a fresh copy of the prompt's cache."""
    cache = copy.deepcopy(prefilled)
    token = torch.from_numpy(first.astype(np.int64))[:, None]
    out = []
    with torch.inference_mode():
        begin = time.perf_counter()
        for _ in range(steps):
            logits = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1:].argmax(-1)
            out.append(token)
        seconds = time.perf_counter() - begin
    return seconds, torch.cat(out, dim=1).numpy()


def best_of(repeats: int, ours, theirs) -> tuple[list, list]:
    """Alternates ours() and theirs() `repeats` times; each returns (seconds, result)."""
    runs_ours, runs_theirs = [], []
    for _ in range(repeats):
        runs_ours.append(ours())
        runs_theirs.append(theirs())
    return runs_ours, runs_theirs


def side(runs: list, work: float, unit: str, warmup_s: float | None = None) -> dict:
    seconds = [r[0] for r in runs]
    row = {unit: work / min(seconds), 'best_s': min(seconds), 'runs_s': seconds}
    if warmup_s is not None:
        row['warmup_s'] = warmup_s
    return row


def measure(name: str, ours: dict, theirs: dict, unit: str, **extra) -> dict:
    row = {'measure': name, **extra, 'ours': ours, 'theirs': theirs, 'ratio': ours[unit] / theirs[unit]}
    shown = ' '.join(f'{k}={v["identical_rows"] if k == "greedy" else v}' for k, v in extra.items()
                     if not k.startswith(('kv_', 'prompts_')))
    print(f'{name:8s} {shown:40s} ringserve {ours[unit]:9.2f} vs transformers {theirs[unit]:9.2f} '
          f'{unit} ({row["ratio"]:.2f}x)', flush=True)
    return row


# ---- the measures -------------------------------------------------------------------------------


def text_sides(shapes: Shapes, workdir: Path) -> tuple[transformers.Gemma3ForCausalLM, PagedEngine, dict]:
    """transformers' model, ringserve's engine on the same weights (loaded from its directory), and facts."""
    started = time.perf_counter()
    hf_model = hf_text(shapes.text)
    built = time.perf_counter()
    path = workdir / 'gemma3-text'
    hf_model.save_pretrained(path, safe_serialization=True)
    saved = time.perf_counter()
    config, model = checkpoint.load(path, dtype='float32')
    loaded = time.perf_counter()
    longest = max(*shapes.prefill, shapes.decode_prompt + shapes.new_tokens)
    pages = -(-longest // PAGE_LEN)
    slots = max(shapes.batches)
    engine = PagedEngine(config, model, max_slots=slots, num_pages=slots * pages + 1, page_len=PAGE_LEN,
                         max_len=pages * PAGE_LEN, prefill_chunk=CHUNK)
    for slot in range(slots):
        engine.set_params(slot, GREEDY)
    info = {
        'params': engine.param_count,
        'build_s': built - started, 'save_s': saved - built, 'load_s': loaded - saved,
        'weights_gib': engine.param_count * 4 / 2**30,
        'pool_gib': engine.pool_bytes_per_device / 2**30,
        'attn_implementation': hf_model.config._attn_implementation,
        'rss_after_load_gib': peak_rss_gib(),
    }  # fmt: skip
    print(f"{info['params'] / 1e6:.1f}M parameters; built {info['build_s']:.0f} s, saved {info['save_s']:.0f} s, "
          f"loaded {info['load_s']:.0f} s; peak RSS {info['rss_after_load_gib']:.1f} GiB", flush=True)
    return hf_model, engine, info


def bench_prefill(hf_model, engine: PagedEngine, length: int, repeats: int, rng: np.random.Generator) -> dict:
    prompt = rng.integers(3, engine.config.vocab_size, length)
    table = tables_for(1, engine.pages_per_seq)[0]
    warm = time.perf_counter()
    _, token = ours_prefill(engine, prompt, 0, table)
    warmup_s = time.perf_counter() - warm
    compiles = engine.compile_count
    _, want, _ = theirs_prefill(hf_model, prompt[None])
    runs_ours, runs_theirs = best_of(repeats, lambda: ours_prefill(engine, prompt, 0, table),
                                     lambda: theirs_prefill(hf_model, prompt[None])[:2])
    assert engine.compile_count == compiles, 'a timed prefill compiled'
    return measure('prefill', side(runs_ours, length, 'tok_s', warmup_s), side(runs_theirs, length, 'tok_s'),
                   'tok_s', prompt=length, same_token=bool(token == want[0]))


def bench_decode(hf_model, engine: PagedEngine, batch: int, shapes: Shapes, repeats: int,
                 rng: np.random.Generator) -> dict:
    prompts = rng.integers(3, engine.config.vocab_size, (batch, shapes.decode_prompt))
    tables = tables_for(batch, engine.pages_per_seq)
    begin = time.perf_counter()
    first = np.array([ours_prefill(engine, prompts[b], b, tables[b])[1] for b in range(batch)])
    prompts_s = {'ours': time.perf_counter() - begin}  # untimed setup, reported for planning
    prompts_s['theirs'], first_theirs, prefilled = theirs_prefill(hf_model, prompts)
    start, steps = shapes.decode_prompt, shapes.new_tokens
    warm = time.perf_counter()
    ours_decode(engine, first, start, tables, steps)
    warmup_s = time.perf_counter() - warm
    compiles = engine.compile_count
    theirs_decode(hf_model, first_theirs, prefilled, steps)
    runs_ours, runs_theirs = best_of(repeats, lambda: ours_decode(engine, first, start, tables, steps),
                                     lambda: theirs_decode(hf_model, first_theirs, prefilled, steps))
    assert engine.compile_count == compiles, 'a timed decode compiled'
    greedy = compare(np.concatenate([first[:, None], runs_ours[-1][1]], axis=1),
                     np.concatenate([first_theirs[:, None], runs_theirs[-1][1]], axis=1))
    kv_per_token = 2 * engine.config.n_layers * engine.config.n_kv_heads * engine.config.head_dim * 4
    tokens = batch * steps
    return measure('decode', side(runs_ours, tokens, 'tok_s', warmup_s), side(runs_theirs, tokens, 'tok_s'),
                   'tok_s', batch=batch, prompt=start, new_tokens=steps, greedy=greedy, prompts_s=prompts_s,
                   kv_bytes_ours=prompts.size * kv_per_token,  # both after the prompts
                   kv_bytes_theirs=cache_bytes(prefilled))  # fmt: skip


def bench_text(shapes: Shapes, repeats: int, workdir: Path) -> tuple[dict, list[dict]]:
    hf_model, engine, info = text_sides(shapes, workdir)
    rng = np.random.default_rng(0)
    rows = [bench_prefill(hf_model, engine, length, repeats, rng) for length in shapes.prefill]
    rows += [bench_decode(hf_model, engine, batch, shapes, repeats, rng) for batch in shapes.batches]
    info['compilations'] = engine.compile_count
    return info, rows


def bench_vision(shapes: Shapes, repeats: int, workdir: Path) -> tuple[dict, list[dict]]:
    hf_model = hf_multimodal(shapes.text, shapes.vision, shapes.mm_tokens)
    path = workdir / 'gemma3-vision'
    hf_model.save_pretrained(path, safe_serialization=True)
    config, model = checkpoint.load(path, dtype='float32')
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, pixels: nnx.merge(graphdef, state).encode_images(pixels))
    pixels = np.random.default_rng(1).normal(0.0, 1.0, (shapes.images, 3, config.vision.image_size,
                                                        config.vision.image_size)).astype(np.float32)
    ours_pixels = pixels.transpose(0, 2, 3, 1)  # ours: channels last
    theirs_pixels = torch.from_numpy(pixels)

    def ours():
        begin = time.perf_counter()
        rows = encode(state, ours_pixels).block_until_ready()
        return time.perf_counter() - begin, np.asarray(rows)

    def theirs():
        with torch.inference_mode():
            begin = time.perf_counter()
            rows = hf_model.get_image_features(theirs_pixels).pooler_output
            return time.perf_counter() - begin, rows.numpy()

    warmup_s, got = ours()
    _, want = theirs()
    runs_ours, runs_theirs = best_of(repeats, ours, theirs)
    tower = sum(np.size(x) for x in jax.tree.leaves(nnx.state(model.vision, nnx.Param)))
    info = {'vision_params': int(tower), 'vision': dataclasses.asdict(config.vision)}
    row = measure('vision', side(runs_ours, shapes.images, 'images_s', warmup_s), side(runs_theirs, shapes.images,
                  'images_s'), 'images_s', images=shapes.images, image_size=config.vision.image_size,
                  max_abs_diff=float(np.abs(got - want).max()))  # fmt: skip
    return info, [row]


# ---- main -----------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='bench/results/checkpoints.json', help='JSON file to write')
    parser.add_argument('--small', action='store_true', help='a tiny Gemma 3, end to end in under a minute')
    parser.add_argument('--long', action='store_true', help='also prefill a 2048-token prompt')
    parser.add_argument('--layers', type=int, default=26, help='decoder layers (Gemma 3 1B: 26)')
    parser.add_argument('--vocab', type=int, default=262144, help='vocabulary (Gemma 3 1B: 262144)')
    parser.add_argument('--decode-prompt', type=int, default=512, help='tokens before decoding starts')
    parser.add_argument('--new-tokens', type=int, default=32, help='decoded tokens per sequence')
    parser.add_argument('--batches', default='1,16', help='concurrent sequences to decode, comma-separated')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per measure and side (best kept)')
    parser.add_argument('--vision-image', type=int, default=896, help='image side in pixels (So400m: 896)')
    parser.add_argument('--vision-layers', type=int, default=27, help='vision tower layers (So400m: 27)')
    parser.add_argument('--images', type=int, default=1, help='images per encoder call')
    parser.add_argument('--no-vision', action='store_true', help='skip the vision encoder')
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads (default: every core)')
    return parser.parse_args(argv)


def shapes_from(args: argparse.Namespace) -> Shapes:
    if args.small:
        return small_shapes()
    image = args.vision_image
    if image % 14 or (image // 14) % 16:
        raise ValueError(f'--vision-image {image}: use a multiple of 224 (14-pixel patches pooled to 16 x 16 tokens)')
    return Shapes(gemma3_1b(args.layers, args.vocab), (512, 2048) if args.long else (512,), args.decode_prompt,
                  args.new_tokens, tuple(int(b) for b in args.batches.split(',')),
                  so400m(image, args.vision_layers), mm_tokens=256, images=args.images)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    shapes = shapes_from(args)
    started = time.perf_counter()
    result = {
        'benchmark': 'Gemma 3 checkpoints against transformers',
        'command': ' '.join([Path(sys.executable).name, '-m', 'bench.checkpoints', *(argv or sys.argv[1:])]),
        'machine': machine_info(),
        'dtype': 'float32',
        'repeats': args.repeats,
        'config': dataclasses.asdict(shapes),
    }
    with tempfile.TemporaryDirectory(prefix='ringserve-checkpoints-') as workdir:
        text_info, measures = bench_text(shapes, args.repeats, Path(workdir))
        result['text'] = text_info
        skipped = 'skipped with --no-vision' if args.no_vision else vision_loads(Path(workdir))
        if skipped is None:
            vision_info, vision_rows = bench_vision(shapes, args.repeats, Path(workdir))
            result['vision'] = vision_info
            measures += vision_rows
        else:
            print(f'vision: {skipped}', flush=True)
            result['vision'] = {'skipped': skipped}
    result['measures'] = measures
    result['peak_rss_gib'] = peak_rss_gib()
    result['wall_s'] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {out} in {result["wall_s"]:.0f} s; peak RSS {result["peak_rss_gib"]:.1f} GiB')


if __name__ == '__main__':
    main()
