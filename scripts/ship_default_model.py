"""Make a trained checkpoint the embedded default model: model/assets/default/.

    python scripts/ship_default_model.py build/train/default [--check-lengths 1024,4096]

Writes `ringserve_config.json` (named 'ringserve-default', dtype float32: what the server computes
in) and `model.safetensors` with every tensor stored as bfloat16, which halves the repo's copy;
model/checkpoint.py casts to the config dtype on load. Before writing, it measures recall on
--check-tasks (train/long_eval.py; passkey by default, video and audio too for a model trained on them) with
the float32 weights and with the bfloat16-rounded ones, and refuses to ship if rounding costs
recall at any of --check-lengths.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / 'clients')]

from model import checkpoint, presets  # noqa: E402
from train import long_eval  # noqa: E402


def rounded(model: nnx.Module) -> nnx.Module:
    """The model with every float parameter rounded to bfloat16 and back (what the shipped file holds)."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    return nnx.merge(graphdef, state)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('train_dir', help='a checkpoint written by python -m train')
    p.add_argument('--check-lengths', default='1024,4096', help='passkey lengths compared before shipping')
    p.add_argument('--examples', type=int, default=8)
    p.add_argument('--check-tasks', default='passkey',
                   help='tasks compared before shipping (train.long_eval names, e.g. passkey,video,audio)')
    args = p.parse_args(argv)
    config, model = checkpoint.load(args.train_dir, dtype='float32')
    config = config.replace(name=presets.DEFAULT_NAME)
    small = rounded(model)
    lengths = [int(x) for x in args.check_lengths.split(',') if x]
    for task in [t for t in args.check_tasks.split(',') if t] if lengths else []:
        full = long_eval.recall(model, lengths, args.examples, [task])
        half = long_eval.recall(small, lengths, args.examples, [task])
        for n in lengths:
            print(f'{task} recall at {n}: float32 {full[n]:.1%}, bfloat16 weights {half[n]:.1%}')
        if any(half[n] < full[n] for n in lengths):
            print(f'bfloat16 rounding lowers {task} recall; not shipping', file=sys.stderr)
            return 1
    target = presets.SHIPPED_DEFAULT
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        bf16 = config.replace(dtype='bfloat16')
        checkpoint.save(staging, bf16, checkpoint.from_params(
            bf16, dict(checkpoint._flatten(nnx.state(small, nnx.Param).to_pure_dict())).get))
        shutil.copyfile(Path(staging) / checkpoint.WEIGHTS_FILE, target / checkpoint.WEIGHTS_FILE)
    (target / checkpoint.CONFIG_FILE).write_text(config.to_json() + '\n')
    size = (target / checkpoint.WEIGHTS_FILE).stat().st_size
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f'shipped {params:,} parameters ({size / 2**20:.1f} MiB) to {target}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
