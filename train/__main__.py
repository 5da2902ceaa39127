"""`python -m train`: train the default model (or a resized one) on synthetic needle tasks.

Example: python -m train --out build/train/default --steps 3000 --lengths 256,512,1024 --time-limit 3600
"""

from __future__ import annotations

import argparse
import sys

from model import presets
from model.config import parse_layer_kinds
from train import data
from train.trainer import COMPUTE_DTYPES, TASKS, TrainConfig, model_config, train


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(',') if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: expected comma-separated integers such as 256,512,1024')


def _kinds(text: str):
    try:
        return parse_layer_kinds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _names(choices):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x for x in text.split(',') if x)
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f'{text!r}: choose from {",".join(choices)}')
        return names
    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m train', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='training directory: checkpoint, optimizer state, train_log.jsonl')
    p.add_argument('--resume', action='store_true', help='continue from the checkpoint in --out')
    p.add_argument('--init-from', metavar='DIR',
                   help='start from this checkpoint\'s weights and architecture (fresh optimizer and '
                        'schedule: a fine-tune); "default" is the shipped model')
    p.add_argument('--steps', type=int, default=1000, help='total optimizer steps (default 1000)')
    p.add_argument('--batch', type=int, default=8, help='examples per step (default 8)')
    p.add_argument('--batch-tokens', type=int,
                   help='tokens per step instead of --batch: examples = this // the curriculum length')
    p.add_argument('--lr', type=float, default=1e-3, help='peak learning rate (default 1e-3)')
    p.add_argument('--warmup', type=int, default=50, help='linear warmup steps before the cosine decay (default 50)')
    p.add_argument('--weight-decay', type=float, default=0.1)
    p.add_argument('--clip', type=float, default=1.0, help='global gradient-norm clip (default 1.0)')
    p.add_argument('--lengths', type=_ints, default=(256, 512, 1024),
                   help='curriculum lengths in tokens, steps split evenly, shortest first (default 256,512,1024)')
    p.add_argument('--tasks', type=_names(TASKS), default=tuple(data.TASKS),
                   help=f'comma-separated tasks, drawn uniformly per example: repeat one to weight it '
                        f'(default the text ones: {",".join(data.TASKS)}); "video" makes whole steps video '
                        f'ones at its share and trains the image encoder too; "audio" the audio one, "audio_loop" '
                        f'says the audio needle all through the track (a first, hearing stage), and '
                        f'"audio_edge" puts it across a window edge or at the track\'s end')
    p.add_argument('--fillers', type=_names(data.FILLERS), default=data.FILLERS,
                   help=f'haystack texts (default {",".join(data.FILLERS)})')
    p.add_argument('--freeze-decoder', action='store_true',
                   help='train only the media tasks\' encoders: the decoder (and with it text and the other '
                        'media) stays as it is')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--dtype', choices=COMPUTE_DTYPES, default='float32',
                   help='compute dtype of the forward pass; master weights stay float32')
    p.add_argument('--d-model', type=int, help='width (default: the preset\'s 256)')
    p.add_argument('--layers', type=int, help='decoder layers (default 4)')
    p.add_argument('--heads', type=int, help='query heads (default 4)')
    p.add_argument('--kv-heads', type=int, help='kv heads (default 2)')
    p.add_argument('--head-dim', type=int, help='head dim (default d_model // heads)')
    p.add_argument('--mlp-dim', type=int, help='MLP hidden size (default 3 * d_model)')
    p.add_argument('--layer-kinds', type=_kinds,
                   help='per-layer attention, comma-separated rope|nope[@WINDOW][/logBASE] (sets the layer '
                        'count), e.g. rope@64,nope/log1024,rope@64,nope/log1024')
    p.add_argument('--rope-theta', type=float, help='RoPE base (default: the preset\'s 10000)')
    p.add_argument('--checkpoint-every', type=int, default=200)
    p.add_argument('--eval-every', type=int, default=0, help='steps between recall evals (default: only at the end)')
    p.add_argument('--eval-examples', type=int, default=8, help='examples per length in each eval (0: none)')
    p.add_argument('--time-limit', type=float, help='seconds; stop cleanly with a checkpoint when exceeded')
    p.add_argument('--no-progress', action='store_true', help='no progress bar on stderr')
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig(out=args.out, steps=args.steps, batch=args.batch, batch_tokens=args.batch_tokens,
                          lr=args.lr, warmup=args.warmup,
                          weight_decay=args.weight_decay, clip=args.clip, lengths=args.lengths, tasks=args.tasks,
                          fillers=args.fillers, seed=args.seed, compute_dtype=args.dtype,
                          checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                          eval_examples=args.eval_examples, time_limit=args.time_limit,
                          progress=not args.no_progress, train_decoder=not args.freeze_decoder)
        shape = (args.d_model, args.layers, args.heads, args.kv_heads, args.head_dim, args.mlp_dim,
                 args.layer_kinds, args.rope_theta)
        if args.init_from and any(x is not None for x in shape):
            raise ValueError('--init-from takes the checkpoint\'s architecture: drop the model shape flags.')
        init_from = presets.SHIPPED_DEFAULT if args.init_from == 'default' else args.init_from
        config = None if args.resume or init_from else model_config(args.d_model, args.layers, args.heads, args.kv_heads,
                                                       args.head_dim, args.mlp_dim, layer_kinds=args.layer_kinds,
                                                       rope_theta=args.rope_theta)
        train(cfg, config, resume=args.resume, init_from=init_from)
    except (ValueError, FileNotFoundError) as e:
        print(f'python -m train: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
