"""train/: synthetic needle data (the prompt is what `ringserve niah` sends, id for id; needles,
answers, masks, lengths, seeds) and the trainer (a tiny run lowers the loss, resuming replays the
same losses, encoders stay frozen, the checkpoint loads as the server loads it)."""

from __future__ import annotations

import io
import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from model import checkpoint
from model.transformer import Transformer
from preprocess import prompt
from preprocess.tokenizer import Tokenizer
from ringserve import types
from ringserve.niah import scoring
from ringserve.niah import tasks as niah_tasks
from ringserve.niah.runner import Grid, Runner, Settings
from ringserve.niah.sizing import Sizer
from train import data
from train import trainer

TOK = Tokenizer.default()
EOT = TOK.token_id(prompt.END_OF_TURN)
CASES = [(task, filler) for task in data.TASKS for filler in data.FILLERS]
NIAH_TASKS = {'passkey': niah_tasks.Passkey, 'classic': niah_tasks.Classic, 'multikey': niah_tasks.MultiKey,
              'multivalue': niah_tasks.MultiValue}


@pytest.fixture(scope='module', autouse=True)
def niah_home(tmp_path_factory):
    """niah's stdlib haystack caches its text under $RINGSERVE_HOME: a temporary one, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('RINGSERVE_HOME', str(tmp_path_factory.mktemp('home')))
        yield


class ExactCounter:
    """CountTokens as the server answers it: the length of the real chat template's ids."""

    def count_tokens(self, contents, system_instruction=None, *, cached_content=None) -> int:
        assert cached_content is None
        return len(prompt.render(contents, system_instruction, TOK))


class LocalServer(ExactCounter):
    """Enough of `ringserve.Client` for niah's Runner: it records the ids each generate call would
    feed the model (the server's render_prompt is prompt.render) and answers `answer`."""

    def __init__(self, answer: str):
        self.answer = answer
        self.sent: list[list[int]] = []

    def model_info(self) -> types.ModelInfo:
        return types.ModelInfo('local', 1 << 20, (1 << 20) - 1, TOK.vocab_size, ['TEXT'], 0, 'float32')

    def generate_text(self, contents, *, system_instruction=None, cached_content=None, max_output_tokens=None,
                      temperature=None) -> types.Result:
        assert cached_content is None and temperature == 0
        self.sent.append(prompt.render(contents, system_instruction, TOK))
        n = len(self.sent[-1])
        return types.Result(self.answer, 'STOP', types.Usage(n, 8, 0, n + 8), 0.01, (), '')


def _open_turn(ex: data.Example) -> bool:
    return ex.origin.question.turns[-1][0] == prompt.MODEL


def _check_example(ex: data.Example, length: int) -> None:
    ids = [int(i) for i in ex.input_ids]
    assert len(ids) <= length, (ex.task, len(ids), length)
    # Not one more haystack unit would fit (the niah Sizer's rule, with the answer's tokens set aside).
    sizer = Sizer(ExactCounter(), data.haystack(ex.origin.filler, ex.origin.start))
    context, question = ex.origin.context, ex.origin.question
    units = sizer.size(context).units
    longer = sizer.render(context, units + 1, sizer.place(context, units + 1))
    assert len(prompt.render([('user', longer), *question.turns], context.system, TOK)) + len(ids) - ex.prompt_len \
        > length
    # The loss mask covers exactly the answer and <end_of_turn>, at the end.
    assert list(np.flatnonzero(ex.loss_mask)) == list(range(ex.prompt_len, len(ids)))
    space = ' ' if _open_turn(ex) else ''
    assert ids[ex.prompt_len:] == TOK.encode(space + ex.answer) + [EOT]
    # The answer continues the prompt as text: the prompt's ids plus the answer's decode to the
    # prompt's text plus the answer, and the model turn encodes whole to the same ids (what greedy
    # decoding there can produce).
    assert TOK.decode(ids[:-1]) == TOK.decode(ex.prompt_ids) + space + ex.answer
    turn = ids[len(ids) - 1 - ids[::-1].index(TOK.token_id(prompt.START_OF_TURN)) + 1:-1]
    assert turn == TOK.encode(TOK.decode(turn))
    # niah's own scorer for the task accepts the answer.
    task = NIAH_TASKS[ex.task]
    assert scoring.SCORERS[task.scorer](ex.answer, ex.expected) == 1.0
    # Every needle is where the example says: the ids before its offset decode to the text before it
    # (the space before a needle belongs to its first token), the ids from there start with it.
    shown = TOK.decode(ids[:ex.prompt_len])
    for text, offset in zip(ex.needles, ex.needle_offsets):
        before = TOK.decode(ids[:offset])
        assert shown.startswith(before) and shown.count(text) == 1
        assert len(before) in (shown.index(text), shown.index(text) - 1), (ex.task, text)
        assert TOK.decode(ids[offset:offset + len(TOK.encode(' ' + text))]).strip() == text


@pytest.mark.parametrize('task,filler', CASES)
@pytest.mark.parametrize('length', [400, 2000])
def test_needles_answers_masks_lengths(task, filler, length):
    for depth in (0.0, 0.5, 1.0, None):
        _check_example(data.TASKS[task](length, depth, np.random.default_rng(7), filler=filler), length)


@pytest.mark.parametrize('task,filler', CASES)
def test_the_prompt_is_what_niah_sizes_and_renders(task, filler):
    """The key property, by an independent path: niah's Sizer counting with the real template (what
    the server's CountTokens returns, no memo), the runner's `contents(question)` and system
    instruction rendered by the server's template, give the example's prompt ids exactly."""
    rng = np.random.default_rng(21)
    for length in (300, 1500):
        ex = data.TASKS[task](length, None, rng, filler=filler)
        context = ex.origin.context
        sized = Sizer(ExactCounter(), data.haystack(ex.origin.filler, ex.origin.start)).size(context)
        assert sized.prompt_tokens == ex.prompt_len
        want = prompt.render(sized.contents(ex.origin.question), context.system, TOK)
        assert [int(i) for i in ex.prompt_ids] == want
        assert ex.needles == tuple(n.text for n in context.needles)


@pytest.mark.parametrize('task', list(data.TASKS))
def test_niahs_runner_sends_the_training_prompt_and_scores_its_answer(task, tmp_path):
    """`ringserve niah`'s own Runner, over the task object, length, depth and haystack the example
    came from, sends exactly the example's prompt; answered with the example's target text, its
    scorer gives full marks. (Classic without distractors: niah's Classic has none.)"""
    options = {'classic': dict(distractors=0)}.get(task, {})
    filler = 'passkey' if task == 'passkey' else 'stdlib'
    ex = data.TASKS[task](700, None, np.random.default_rng(5), filler=filler, **options)
    answer = TOK.decode(ex.input_ids[ex.prompt_len:])  # what greedy decoding of the target prints
    server = LocalServer(answer)
    niah_task = ex.origin.task
    settings = Settings(out=tmp_path / 'rows.jsonl', scorer=niah_task.scorer,
                        max_output_tokens=niah_task.max_output_tokens)
    runner = Runner(server, niah_task, data.haystack(ex.origin.filler, ex.origin.start), settings,
                    log=lambda message: None, progress_stream=io.StringIO())
    (row,) = runner.run(Grid((ex.origin.context.length,), (ex.origin.question.depth,), 1))
    assert server.sent == [[int(i) for i in ex.prompt_ids]]
    assert row['score'] == 1.0 and row['expected'] == list(ex.expected)


def test_the_evals_own_classic_needle_is_one_of_the_draws():
    task = niah_tasks.Classic()  # what `ringserve niah --task classic` asks
    ex = data.from_niah(task, 500, 0.4, filler='stdlib', start=3)
    assert ex.needles == (niah_tasks.CLASSIC_NEEDLE,) and ex.answer == niah_tasks.CLASSIC_ANSWER + '.'
    drawn = {data._classic_needle(c, a) for c in data._CITIES for a in data._ACTIVITIES}
    assert niah_tasks.CLASSIC_NEEDLE in drawn


def test_answers_are_the_asked_needles_values():
    rng = np.random.default_rng(3)
    ex = data.passkey(500, 0.3, rng)
    key = re.fullmatch(r'The pass key is (\d{5})\. Remember it\. \1 is the pass key\.', ex.needles[0]).group(1)
    assert ex.answer == f'{key}.' and ex.expected == (key,)
    assert TOK.decode(ex.prompt_ids).endswith('What is the pass key?\nmodel\nThe pass key is')
    ex = data.classic(500, 0.3, rng, distractors=2)
    city, activity = re.fullmatch(r'The best thing to do in (.+) is (.+)\.', ex.needles[ex.asked]).groups()
    assert ex.answer == f'{activity}.' and ex.expected == (activity,)
    question = TOK.decode(ex.prompt_ids).rsplit('\nuser\n', 1)[1]
    assert question.startswith(f'What is the best thing to do in {city}? ') and question.endswith('\nmodel\n')
    others = [re.fullmatch(r'The best thing to do in (.+) is (.+)\.', n).groups() for i, n in enumerate(ex.needles)
              if i != ex.asked]
    assert len(others) == 2 and all(c != city and a != activity for c, a in others)
    assert not any(c in question for c, _ in others)


def test_multikey_distractor_keys_differ_from_the_asked_key():
    for seed in range(5):
        ex = data.multikey(800, None, np.random.default_rng(seed), distractors=4)
        pairs = [re.fullmatch(r'One of the special magic numbers for (\S+) is: (\d{7})\.', n).groups()
                 for n in ex.needles]
        keys = [k for k, _ in pairs]
        assert len(set(keys)) == 5
        asked_key, value = pairs[ex.asked]
        assert ex.answer == f'{value}.'
        question = TOK.decode(ex.prompt_ids).rsplit('\nuser\n', 1)[1]
        assert asked_key in question and not any(k in question for k in keys if k != asked_key)
        assert question.endswith('mentioned in the provided text is')


def test_multivalue_answers_in_order_of_appearance():
    for seed in range(4):
        ex = data.multivalue(1000, None, np.random.default_rng(seed), values=4)
        by_offset = [n for _, n in sorted(zip(ex.needle_offsets, ex.needles))]
        values = [re.search(r'(\d{7})\.$', n).group(1) for n in by_offset]
        assert ex.answer == ', '.join(values) + '.'
        assert sorted(ex.expected) == sorted(values)
        assert len(set(n.split(' is: ')[0] for n in ex.needles)) == 1  # one key


def test_depth_moves_the_needle_through_the_haystack():
    def offsets(filler):
        return [data.passkey(1500, d, np.random.default_rng(5), filler=filler).needle_offset
                for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    for filler in ('passkey', 'stdlib'):
        got = offsets(filler)
        assert got == sorted(got) and len(set(got)) == 5
    got = offsets('passkey')
    intro = len(TOK.encode('user\n' + niah_tasks.PASSKEY_INTRO)) + 2
    assert got[0] == intro  # depth 0: straight after the intro
    # depth 0.5 lands within a filler sentence (<= 8 tokens) of the middle of the haystack
    assert abs(got[2] - (got[0] + got[4]) / 2) <= 8


def test_haystack_start_is_a_rotation_of_niahs_haystack():
    base = data.haystack('stdlib')
    units = data.haystack_units('stdlib')
    assert len(base.units) == units
    rotated = data.haystack('stdlib', 7)
    assert rotated.text(0, 5) == base.text(7, 12) and rotated.text(units - 7, units - 5) == base.text(0, 2)
    starts = {ex.origin.start for ex in data.sample_batch(np.random.default_rng(0), 8, 300, ('multikey',)).examples}
    assert len(starts) > 4


def test_seeded_determinism_and_batches():
    a = data.sample_batch(np.random.default_rng(1), 6, 600)
    b = data.sample_batch(np.random.default_rng(1), 6, 600)
    c = data.sample_batch(np.random.default_rng(2), 6, 600)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.loss_mask, b.loss_mask)
    assert not np.array_equal(a.tokens, c.tokens)
    assert a.tokens.shape == (6, 600) and a.tokens.dtype == np.int32 and a.loss_mask.dtype == bool
    for row, ex in enumerate(a.examples):
        n = len(ex.input_ids)
        assert np.array_equal(a.tokens[row, :n], ex.input_ids)
        assert (a.tokens[row, n:] == TOK.pad_id).all() and not a.loss_mask[row, n:].any()
    # Passkey keeps its filler; the other tasks take the others, or the passkey filler when alone.
    for ex in data.sample_batch(np.random.default_rng(4), 16, 300).examples:
        assert (ex.origin.filler == 'passkey') == (ex.task == 'passkey'), (ex.task, ex.origin.filler)
    alone = data.sample_batch(np.random.default_rng(4), 4, 300, ('classic', 'multikey'), ('passkey',))
    assert {ex.origin.filler for ex in alone.examples} == {'passkey'}


def test_local_counter_counts_as_the_tokenizer():
    counter = data.LocalCounter(TOK)
    texts = ['user\nThe pass key is 12345.', 'a  b   c', ' leading', 'trailing ', 'x\n\n y\nz', '',
             data.haystack('corpus').text(100, 160), 'caf\u00e9 \u2014 na\u00efve \U0001f600 ok']
    for text in texts:
        assert counter.count_text(text) == len(TOK.encode(text)), repr(text)
    turns = [('user', texts[6]), ('model', 'The pass key is')]
    assert counter.count_tokens(turns, 'Be brief.') == len(prompt.render(turns, 'Be brief.', TOK))


def test_bad_inputs_name_the_limit():
    with pytest.raises(ValueError, match='too short.*at least'):
        data.multivalue(100, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r'depth=1.5: must be in \[0, 1\]'):
        data.passkey(300, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match='filler'):
        data.passkey(300, 0.5, np.random.default_rng(0), filler='nope')
    with pytest.raises(ValueError, match='filler'):
        data.sample_batch(np.random.default_rng(0), 2, 300, fillers=('nope',))
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


def test_init_from_starts_at_the_checkpoints_weights(full_run, tmp_path):
    """A fine-tune (`--init-from`) starts where the checkpoint ends: its first loss is the trained
    run's last level, far below a fresh start's, and the architecture is the checkpoint's."""
    out, _, _ = full_run
    cfg = _cfg(tmp_path, steps=3)
    summary = trainer.train(cfg, init_from=out, log=io.StringIO())
    straight = _losses(out)
    fresh_first = np.mean([straight[s] for s in (1, 2, 3)])
    assert summary.first_loss < 0.6 * fresh_first, (summary.first_loss, fresh_first)
    assert checkpoint.load(tmp_path)[0] == TINY
    with pytest.raises(ValueError, match='exclude each other'):
        trainer.train(cfg, resume=True, init_from=out, log=io.StringIO())
    with pytest.raises(ValueError, match="checkpoint's own architecture"):
        trainer.train(cfg, TINY, init_from=out, log=io.StringIO())
