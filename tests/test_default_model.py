"""The shipped default model (model/assets/default/, trained by `python -m train`): what `make serve`
serves finds needles, through the real server and the project's own NIAH client.

- the shipped checkpoint is the recipe (presets.architecture()) with weights stored as bfloat16
  and stays a few MB;
- `ringserve niah`'s Runner against the default-model server (tests/conftest.py `trained_server_target`):
  passkey retrieval from a 4K-token haystack at depths 0 / 50 / 100 %, and gkamradt's classic
  needle in the standard library's docs (system prompt, <context> tags, question turn); each
  answer is scored by niah's scorer. A random model scores 0 here (the pass key is 5 random
  digits; the classic answer is an exact 12-word phrase);
- `ringserve niah --modality video` against the same server: the secret word of a one-minute video;
- `ringserve niah --modality audio`: the secret word spoken in a minute of noise, and in a minute
  of other speech (`--haystack-audio speech`).
"""

from __future__ import annotations

import io
import json

import pytest
from safetensors import safe_open

import ringserve
from model import checkpoint, presets
from ringserve import cli
from ringserve.niah import haystack, results, tasks
from ringserve.niah.runner import Grid, Runner, Settings


@pytest.fixture(autouse=True)
def niah_home(tmp_path, monkeypatch):
    """The stdlib haystack's cache goes to a temporary home, not the user's."""
    monkeypatch.setenv('RINGSERVE_HOME', str(tmp_path / 'home'))


def test_shipped_checkpoint_is_the_recipe_in_bfloat16():
    config = presets.default_config()
    assert config == presets.architecture()
    weights = presets.SHIPPED_DEFAULT / checkpoint.WEIGHTS_FILE
    assert weights.stat().st_size < 8 * 2**20
    with safe_open(str(weights), 'np') as f:
        names = list(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {'BF16'}
    assert json.loads((presets.SHIPPED_DEFAULT / checkpoint.CONFIG_FILE).read_text())['dtype'] == 'float32'


def _run(target, task, hay, grid, tmp_path):
    settings = Settings(out=tmp_path / f'{task.name}.jsonl', scorer=task.scorer,
                        max_output_tokens=task.max_output_tokens)
    with ringserve.Client(target, timeout=300) as client:
        return Runner(client, task, hay, settings, progress_stream=io.StringIO()).run(grid)


def test_default_model_finds_the_pass_key_in_4k_tokens(trained_server_target, tmp_path):
    rows = _run(trained_server_target, tasks.Passkey(seed=11), haystack.passkey_filler(),
                Grid((4096,), (0.0, 50.0, 100.0)), tmp_path)
    assert len(rows) == 3
    for row in rows:
        assert row['prompt_tokens'] > 4000
        assert row['score'] == 1.0, row


def test_default_model_answers_the_classic_needle_in_the_stdlib_docs(trained_server_target, tmp_path):
    rows = _run(trained_server_target, tasks.Classic(), haystack.stdlib(), Grid((2048,), (25.0, 75.0)),
                tmp_path)
    assert len(rows) == 2
    assert [row['score'] for row in rows] == [1.0, 1.0], rows


def _niah_minute(target: str, modality: str, depths: str, tmp_path, capsys, *extra: str) -> list[dict]:
    """`ringserve niah --modality M --durations 1m --depths D --seed 3` against the server: its rows."""
    out = tmp_path / f'{modality}.jsonl'
    argv = ['niah', '--target', target, '--modality', modality, '--durations', '1m', '--depths', depths,
            '--seed', '3', '--out', str(out), '--work-dir', str(tmp_path / 'work'), *extra]
    assert cli.main(argv) == 0, capsys.readouterr().err
    return results.read_rows(out)


def test_default_model_reads_the_secret_word_of_a_video(trained_server_target, tmp_path, capsys):
    """`ringserve niah --modality video`: niah draws a one-minute 1 fps video (generated filler
    frames, one frame reading "The secret word is: <word>"), uploads it, and asks for the word; the
    server decodes it with ffmpeg, encodes the frames with the shipped image encoder and prefills
    their rows. A model that cannot read the frame scores about 1 in 32 (the word list)."""
    rows = _niah_minute(trained_server_target, 'video', '0,50,100', tmp_path, capsys)
    assert len(rows) == 3 and len({row['expected'][0] for row in rows}) > 1  # seeded words differ
    for row in rows:
        assert row['prompt_tokens_details']['VIDEO'] == 60 * 16
        assert row['score'] == 1.0, row


def test_default_model_hears_the_secret_word_in_a_minute_of_audio(trained_server_target, tmp_path, capsys):
    """`ringserve niah --modality audio`: niah has espeak-ng say "The secret word is <word>" inside a
    minute of noise at five depths, uploads the FLAC, and asks for the word; the server decodes it
    with ffmpeg, cuts overlapping 10 s log-mel windows and encodes them with the shipped audio
    encoder. A model that cannot hear scores about 1 in 32 a depth."""
    rows = _niah_minute(trained_server_target, 'audio', '0,25,50,75,100', tmp_path, capsys)
    assert len(rows) == 5 and len({row['expected'][0] for row in rows}) > 1  # seeded words differ
    for row in rows:
        assert row['prompt_tokens_details']['AUDIO'] == 60 * 10
    assert sum(row['score'] for row in rows) >= 4, rows


def test_default_model_hears_the_secret_word_inside_other_speech(trained_server_target, tmp_path, capsys):
    """`--haystack-audio speech`: the needle among other espeak-ng voices reading prose, which an
    ear trained in noise alone mistakes for the word (the weights before aud_s2 heard 2 of 10 such
    cells, docs/benchmarks.md)."""
    rows = _niah_minute(trained_server_target, 'audio', '0,25,50,75,100', tmp_path, capsys,
                        '--haystack-audio', 'speech')
    assert len(rows) == 5 and all(row['haystack'] == 'synthesised-speech' for row in rows)
    assert sum(row['score'] for row in rows) >= 4, rows


def test_ignore_eos_runs_past_the_trained_models_stop_token(trained_server_target):
    """The trained model answers and stops; with ignore_eos the same greedy answer goes on past
    its stop token to max_output_tokens (the stop id is streamed as an ordinary token)."""
    from preprocess import prompt as prompt_lib
    from preprocess.tokenizer import Tokenizer

    stops = prompt_lib.stop_token_ids(Tokenizer.default())
    question = 'The pass key is 52817. Remember it. What is the pass key? The pass key is'
    with ringserve.Client(trained_server_target, timeout=120) as client:
        stopped = client.generate_text(question, temperature=0, max_output_tokens=48)
        going = client.generate_text(question, temperature=0, max_output_tokens=48, ignore_eos=True)
    assert stopped.finish_reason == 'STOP' and len(stopped.token_ids) < 47, stopped
    assert going.finish_reason == 'MAX_TOKENS' and len(going.token_ids) == 48, going
    assert going.usage.candidates_token_count == 48
    n = len(stopped.token_ids)
    assert going.token_ids[:n] == stopped.token_ids
    assert going.token_ids[n] in stops
    assert going.text.startswith(stopped.text)
