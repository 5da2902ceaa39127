"""train/video_data.py and video steps in train/trainer.py: frames are what the server decodes from
niah's own video, the prompt is what the server lays out, id for id; the needle is where the
example says; a tiny video run lowers the loss and trains the image encoder (not the audio one)."""

from __future__ import annotations

import io
import json

import jax
import numpy as np
import pytest
from flax import nnx

from model import checkpoint, presets
from preprocess import prompt
from preprocess import video as video_lib
from preprocess.tokenizer import Tokenizer
from ringserve.niah import video as niah_video
from ringserve.niah.media_tasks import VideoSecretWord
from ringserve.v1 import inference_pb2 as pb
from server.media import MediaResolver
from server.media_store import MediaStore
from train import trainer
from train import video_data as vd

TOK = Tokenizer.default()
ROWS = 16  # the default model's tokens per image
SIDE = 64  # and its image side


@pytest.fixture(scope='module')
def bank(tmp_path_factory):
    return vd.build_bank(SIDE, fillers=48, variants=2, cache_dir=tmp_path_factory.mktemp('bank'))


def _niah_video(path, duration_s: int, needle_second: int, word: str):
    spec = niah_video.VideoSpec(duration_s=duration_s, needle_second=needle_second, word=word, seed=0)
    niah_video.build(spec, path)
    return path


def test_bank_is_cached_and_reloads_equal(bank, tmp_path):
    again = vd.build_bank(SIDE, fillers=48, variants=2, cache_dir=tmp_path)
    cached = vd.build_bank(SIDE, fillers=48, variants=2, cache_dir=tmp_path)
    assert list(tmp_path.glob('bank-*.npz'))
    for other in (again, cached):
        np.testing.assert_array_equal(other.fillers, bank.fillers)
        np.testing.assert_array_equal(other.needles, bank.needles)
        assert other.filler_words == bank.filler_words and other.words == bank.words
    assert bank.fillers.shape == (48, SIDE, SIDE, 3) and bank.needles.shape == (len(vd.WORDS), 2, SIDE, SIDE, 3)
    assert all(1 <= len(words) <= 2 and set(words) <= set(vd.WORDS) for words in bank.filler_words)


def test_bank_needles_are_what_the_server_decodes_from_niahs_video(bank, tmp_path):
    """niah's needle frame for 'lantern', decoded by the server's reader, is the bank's needle
    frame for that word (up to H.264's neighbours), and unlike every other word's."""
    path = _niah_video(tmp_path / 'v.mp4', 5, 2, 'lantern')
    info = video_lib.probe_video(path, 'video/mp4')
    decoded = np.concatenate([b for _, b in video_lib.frames(path, info, size=SIDE)])  # [5, S, S, 3]
    frame = decoded[2].astype(np.float32)
    distance = [np.abs(bank.needles[w, 0].astype(np.float32) - frame).mean() for w in range(len(vd.WORDS))]
    assert int(np.argmin(distance)) == vd.WORDS.index('lantern')
    assert min(distance) < 3.0, distance  # mean absolute difference in 0-255 levels
    assert sorted(distance)[1] > 3 * min(distance)


def test_the_prompt_is_what_the_server_lays_out_for_niahs_video(bank, tmp_path):
    path = _niah_video(tmp_path / 'v.mp4', 6, 4, 'falcon')
    config = presets.default_config()
    media = MediaResolver(config, TOK, MediaStore(tmp_path / 'store')).resolve(
        pb.Part(inline_data=pb.Blob(mime_type='video/mp4', data=path.read_bytes())), 'contents[0]')
    task = VideoSecretWord(word='falcon')
    (context,) = task.contexts(6, [80.0], 1)
    sent = prompt.render(task.contents(media, context.questions[0]), context.system, TOK)
    ex = vd.example(bank, 6, 0.8, np.random.default_rng(0), rows_per_frame=ROWS, tokenizer=TOK,
                    word='falcon', first_second=0)
    holes = np.flatnonzero(np.asarray(sent) < 0)
    np.testing.assert_array_equal(holes, ex.row_positions.reshape(-1))
    np.testing.assert_array_equal(np.where(np.asarray(sent) < 0, 0, sent), ex.prompt_ids)
    assert ex.needle_frame == niah_video.needle_second(6, 80.0) == 4
    answer = ex.input_ids[ex.prompt_len:].tolist()
    assert answer == TOK.encode('falcon') + [TOK.token_id(prompt.END_OF_TURN)]
    assert ex.loss_mask.sum() == len(answer) and ex.loss_mask[ex.prompt_len:].all()


@pytest.mark.parametrize('depth', [0.0, 0.3, 1.0])
def test_the_needle_frame_is_where_the_example_says(bank, depth):
    ex = vd.example(bank, 20, depth, np.random.default_rng(5), rows_per_frame=ROWS, tokenizer=TOK)
    w = vd.WORDS.index(ex.word)
    assert ex.needle_frame == round(depth * 19)
    assert any(np.array_equal(ex.frames[ex.needle_frame], v) for v in bank.needles[w])
    for f, frame in enumerate(ex.frames):
        if f == ex.needle_frame:
            continue
        (index,) = [i for i in range(len(bank.fillers)) if np.array_equal(bank.fillers[i], frame)][:1]
        assert ex.word not in bank.filler_words[index]  # no filler shows the needle's word
    # Frame f's rows follow its "MM:SS".
    for f in (0, ex.needle_frame, 19):
        stamp = TOK.encode(vd.timestamp(ex.first_second + f))
        at = ex.row_positions[f, 0]
        assert ex.input_ids[at - len(stamp):at].tolist() == stamp
        assert (np.diff(ex.row_positions[f]) == 1).all()
    assert ex.embed_mask.sum() == 20 * ROWS


def test_examples_are_seeded_and_sized(bank):
    a = vd.sample_batch(np.random.default_rng(3), 3, 512, bank, rows_per_frame=ROWS, tokenizer=TOK)
    b = vd.sample_batch(np.random.default_rng(3), 3, 512, bank, rows_per_frame=ROWS, tokenizer=TOK)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.frames, b.frames)
    count = vd.frames_for_length(512, ROWS, TOK)
    assert a.frames.shape[:2] == (3, count) and a.tokens.shape == (3, 512)
    for e in a.examples:
        assert len(e.input_ids) <= 512 and e.first_second + count <= vd.MAX_SECONDS
    # As many frames as fit: one more, with the longest word, would not.
    longest = max(vd.WORDS, key=lambda w: len(TOK.encode(w)))
    over = vd.example(bank, count + 1, 0.5, np.random.default_rng(0), rows_per_frame=ROWS, tokenizer=TOK,
                      word=longest)
    assert len(over.input_ids) > 512
    with pytest.raises(ValueError, match='too short for a video example'):
        vd.frames_for_length(40, ROWS, TOK)


TINY = trainer.model_config(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)


def _losses(out, video: bool) -> list[float]:
    lines = [json.loads(line) for line in (out / trainer.LOG_FILE).read_text().splitlines()]
    return [line['loss'] for line in lines if 'loss' in line and (line.get('media') == 'video') == video]


def test_a_tiny_video_run_lowers_the_loss_and_trains_the_image_encoder(bank, tmp_path):
    cfg = trainer.TrainConfig(out=str(tmp_path), steps=24, batch=8, lr=6e-3, warmup=3, lengths=(256,),
                              tasks=('video', 'video', 'passkey'), fillers=('passkey',), checkpoint_every=100,
                              eval_examples=2, progress=False, seed=0)
    log = io.StringIO()
    summary = trainer.train(cfg, TINY, log=log, media_banks={'video': bank})
    video, text = _losses(tmp_path, True), _losses(tmp_path, False)
    assert len(video) + len(text) == 24 and len(video) > len(text) > 0  # a 2/3 share of video steps
    assert np.mean(video[-4:]) < 0.6 * np.mean(video[:2]), video
    assert set(summary.media_recall['video']) == {256} and 'video recall at 256 tokens' in log.getvalue()
    _, trained = checkpoint.load(tmp_path)
    fresh = nnx.state(type(trained)(TINY, rngs=nnx.Rngs(0)))
    after = nnx.state(trained)

    def changed(module: str) -> bool:
        return any(not np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(fresh[module]), jax.tree.leaves(after[module])))

    assert changed('vision') and not changed('audio')


def test_video_needs_an_image_encoder(tmp_path):
    cfg = trainer.TrainConfig(out=str(tmp_path), steps=2, tasks=('video',), lengths=(256,), progress=False,
                              eval_examples=0)
    with pytest.raises(ValueError, match='image encoder'):
        trainer.train(cfg, TINY.replace(vision=None))
