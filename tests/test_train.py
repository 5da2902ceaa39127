"""train/: synthetic needle data (placement, answers, masks, lengths, seeds) and the trainer (a tiny
run lowers the loss, resuming replays the same losses, encoders stay frozen, the checkpoint loads as
the server loads it)."""

from __future__ import annotations

import io
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from model import checkpoint
from model.transformer import Transformer
from preprocess import prompt
from preprocess.tokenizer import Tokenizer
from train import data
from train import trainer

TOK = Tokenizer.default()
EOT = TOK.token_id(prompt.END_OF_TURN)
CASES = [(task, filler) for task in data.TASKS for filler in data.FILLERS]


def _check_example(ex: data.Example, length: int) -> None:
    ids = [int(i) for i in ex.input_ids]
    # Lengths: never over, short by at most a word's tokens.
    assert length - 6 <= len(ids) <= length, (ex.task, len(ids), length)
    # The prompt is exactly what the server renders for its text (the chat template, tokenised whole).
    shown = TOK.decode(ids[:ex.prompt_len])  # "user\n{text}\nmodel\n": turn markers dropped
    assert shown.startswith('user\n') and shown.endswith('\nmodel\n')
    text = shown[len('user\n'):-len('\nmodel\n')]
    assert ids[:ex.prompt_len] == prompt.render([(prompt.USER, text)], None, TOK)
    assert ids[ex.prompt_len - 4:ex.prompt_len] == [TOK.token_id(prompt.START_OF_TURN), *TOK.encode('model\n')]
    # The loss mask covers exactly the answer and <end_of_turn>, at the end.
    masked = np.flatnonzero(ex.loss_mask)
    assert list(masked) == list(range(ex.prompt_len, len(ids)))
    assert ids[ex.prompt_len:] == TOK.encode(ex.answer) + [EOT]
    # Every needle is where the example says: its tokens start at the offset.
    for text, offset in zip(ex.needles, ex.needle_offsets):
        assert ex.prompt_len > offset > 2
        assert TOK.decode(ids[offset:offset + len(TOK.encode(' ' + text))]).strip() == text


@pytest.mark.parametrize('task,filler', CASES)
@pytest.mark.parametrize('length', [400, 2000])
def test_needles_answers_masks_lengths(task, filler, length):
    for depth in (0.0, 0.5, 1.0, None):
        _check_example(data.TASKS[task](length, depth, np.random.default_rng(7), filler=filler), length)


def test_answers_are_the_asked_needles_values():
    rng = np.random.default_rng(3)
    ex = data.passkey(500, 0.3, rng)
    key = re.fullmatch(r'The pass key is (\d{5})\. Remember it\. \1 is the pass key\.', ex.needles[0]).group(1)
    assert ex.answer == key
    ex = data.classic(500, 0.3, rng, distractors=2)
    city, activity = re.fullmatch(r'The best thing to do in (.+) is (.+)\.', ex.needles[ex.asked]).groups()
    assert ex.answer == activity
    assert TOK.decode(ex.prompt_ids).rstrip().endswith(f'What is the best thing to do in {city}?\nmodel')
    others = [re.fullmatch(r'The best thing to do in (.+) is (.+)\.', n).groups() for i, n in enumerate(ex.needles)
              if i != ex.asked]
    assert len(others) == 2 and all(c != city and a != activity for c, a in others)


def test_multikey_distractor_keys_differ_from_the_asked_key():
    for seed in range(5):
        ex = data.multikey(800, None, np.random.default_rng(seed), distractors=4)
        pairs = [re.fullmatch(r'One of the special magic numbers for (\S+) is: (\d{7})\.', n).groups()
                 for n in ex.needles]
        keys = [k for k, _ in pairs]
        assert len(set(keys)) == 5
        asked_key, value = pairs[ex.asked]
        assert ex.answer == value
        question = TOK.decode(ex.prompt_ids).rsplit('\n\n', 1)[1]
        assert asked_key in question and not any(k in question for k in keys if k != asked_key)


def test_multivalue_answers_in_order_of_appearance():
    ex = data.multivalue(1000, 0.5, np.random.default_rng(11), values=4)
    by_offset = [n for _, n in sorted(zip(ex.needle_offsets, ex.needles))]
    values = [re.search(r'(\d{7})\.$', n).group(1) for n in by_offset]
    assert ex.answer == ', '.join(values)
    assert len(set(n.split(' is: ')[0] for n in ex.needles)) == 1  # one key


def test_depth_moves_the_needle_through_the_haystack():
    offsets = [data.passkey(1500, d, np.random.default_rng(5)).needle_offset for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert offsets == sorted(offsets) and len(set(offsets)) == 5
    intro = len(TOK.encode('user\n' + data.niah_tasks.PASSKEY_INTRO)) + 2
    assert abs(offsets[0] - intro) <= 1  # depth 0: straight after the intro
    # depth 0.5 lands within a sentence (<= 20 tokens of filler) of the middle of the haystack
    first, last = offsets[0], offsets[-1]
    assert abs(offsets[2] - (first + last) / 2) <= 20


def test_seeded_determinism_and_batches():
    a = data.sample_batch(np.random.default_rng(1), 4, 600)
    b = data.sample_batch(np.random.default_rng(1), 4, 600)
    c = data.sample_batch(np.random.default_rng(2), 4, 600)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.loss_mask, b.loss_mask)
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.shape == (4, 600) and a.tokens.dtype == np.int32 and a.loss_mask.dtype == bool
    for row, ex in enumerate(a.examples):
        n = len(ex.input_ids)
        assert np.array_equal(a.tokens[row, :n], ex.input_ids)
        assert (a.tokens[row, n:] == TOK.pad_id).all() and not a.loss_mask[row, n:].any()


def test_bad_inputs_name_the_limit():
    with pytest.raises(ValueError, match='too short.*at least'):
        data.multivalue(100, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r'depth=1.5: must be in \[0, 1\]'):
        data.passkey(300, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match='filler'):
        data.passkey(300, 0.5, np.random.default_rng(0), filler='nope')
    with pytest.raises(ValueError, match='more than the batch length'):
        data.pad_batch([data.passkey(300, 0.5, np.random.default_rng(0))], 200)


# ------------------------------------------------------------------------------------------------
# Trainer.
# ------------------------------------------------------------------------------------------------
TINY = trainer.model_config(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)
STEPS = 30


def _cfg(out, **changes) -> trainer.TrainConfig:
    base = dict(out=str(out), steps=STEPS, batch=8, lr=3e-3, warmup=4, lengths=(160,), tasks=('passkey',),
                fillers=('passkey',), checkpoint_every=10, eval_examples=0, progress=False, seed=0)
    return trainer.TrainConfig(**{**base, **changes})


def _losses(out) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / trainer.LOG_FILE).read_text().splitlines()]
    return {line['step']: line['loss'] for line in lines if 'loss' in line}


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('full')
    log = io.StringIO()
    summary = trainer.train(_cfg(out, eval_examples=2), TINY, log=log)
    return out, summary, log.getvalue()


def test_tiny_run_lowers_the_loss(full_run):
    out, summary, log = full_run
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # Five-digit keys over a 2-layer model: from chance over 8192 pieces towards chance over digits.
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)])
    assert last < 0.6 * first, (first, last)
    assert summary.steps_done == STEPS and set(summary.recall) == {160}
    assert f'trained to step {STEPS}' in log and 'recall at 160 tokens' in log
    assert json.loads((out / trainer.STATE_FILE).read_text())['step'] == STEPS


def test_checkpoint_loads_as_the_server_loads_it_and_encoders_stay_frozen(full_run):
    out, _, _ = full_run
    config, model = checkpoint.load(out)
    assert config == TINY
    assert Tokenizer(out).vocab_size == TOK.vocab_size  # <model>/tokenizer.model, the server's default
    init = Transformer(TINY, rngs=nnx.Rngs(0))
    trained_enc, init_enc = (nnx.state(m, nnx.Param).to_pure_dict() for m in (model, init))
    for name in ('vision', 'audio'):
        for a, b in zip(jax.tree.leaves(trained_enc[name]), jax.tree.leaves(init_enc[name])):
            assert np.array_equal(np.asarray(a), np.asarray(b))  # no gradient, no weight decay
    assert not np.allclose(np.asarray(model.embedder.table[...]), np.asarray(init.embedder.table[...]))
    # Greedy decoding through the loaded model equals decoding the trained parameters directly.
    graphdef, params, frozen = nnx.split(model, trainer.TRAINABLE, ...)
    examples = data.sample_batch(np.random.default_rng(9), 2, 160, ('passkey',), ('passkey',)).examples
    answers = trainer.greedy_answers(trainer.make_next_token(graphdef, 'float32'), params, frozen, examples, TOK, 4)
    # Reference: the loaded module itself, full logits (no logits_at), one padded buffer per example.
    full_logits = jax.jit(lambda tokens: model(tokens, np.arange(tokens.shape[1], dtype=np.int32)[None])[0])
    for ex, answer in zip(examples, answers):
        ids = list(ex.prompt_ids)
        for _ in range(4):
            buffer = np.zeros((1, 168), np.int32)
            buffer[0, :len(ids)] = ids
            token = int(np.argmax(np.asarray(full_logits(buffer))[0, len(ids) - 1]))
            if token in prompt.stop_token_ids(TOK):
                break
            ids.append(token)
        assert answer == TOK.decode(ids[ex.prompt_len:])


def test_resume_continues_with_identical_losses(full_run, tmp_path):
    out, _, _ = full_run
    cfg = _cfg(tmp_path)
    first = trainer.train(cfg, TINY, until=15, log=io.StringIO())
    assert first.steps_done == 15 and json.loads((tmp_path / trainer.STATE_FILE).read_text())['step'] == 15
    second = trainer.train(cfg, resume=True, log=io.StringIO())
    assert second.steps_done == STEPS
    resumed, straight = _losses(tmp_path), _losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in range(16, STEPS + 1)],
                               [straight[s] for s in range(16, STEPS + 1)], rtol=1e-5)


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match='train into .* first'):
        trainer.train(_cfg(tmp_path / 'empty'), resume=True, log=io.StringIO())


def test_curriculum_steps_up_through_the_lengths():
    cfg = trainer.TrainConfig(out='x', steps=9, lengths=(1024, 256, 512))
    assert [cfg.length_at(s) for s in range(9)] == [256] * 3 + [512] * 3 + [1024] * 3
