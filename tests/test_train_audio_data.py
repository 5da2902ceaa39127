"""train/audio_data.py: the sound is what the server decodes from niah's own audio haystack
(sample for sample, so the log-mel windows too), the prompt is what the server lays out, id for
id; the needle is where the example says; examples are seeded and sized to their length. And audio
steps in the trainer: a tiny run lowers the loss and trains the audio encoder (not the image one).
And the hearing stage (train/hearing.py): its windows hold the word exactly when labelled so, and
it trains the audio encoder alone."""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from model import checkpoint, presets
from preprocess import audio as audio_lib
from preprocess import prompt
from preprocess.tokenizer import Tokenizer
from ringserve.niah import audio as niah_audio
from ringserve.niah import speech
from ringserve.niah.media_tasks import AudioSecretWord
from ringserve.v1 import inference_pb2 as pb
from server.media import MediaResolver
from server.media_store import MediaStore
from model.transformer import Transformer
from train import audio_data as ad
from train import hearing
from train import long_eval
from train import media
from train import trainer

TOK = Tokenizer.default()
TPS = 10  # the default model's audio tokens per second
ROWS = 100  # and so its rows per 10 s window
VOICES = ('en', 'en-us+f1')  # not a breathy variant: those follow the clock
SECONDS = 20  # niah's haystack in these tests: two whole windows


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp('bank')


@pytest.fixture(scope='module')
def bank(cache):
    return ad.build_bank(voices=VOICES, rates=(175,), noise_seconds=30, cache_dir=cache)


@pytest.fixture(scope='module')
def niah(tmp_path_factory):
    """niah's own 20 s haystack (seed 0) with "The secret word is falcon" at 80 %: (path, needle
    clip, (start s, clip s))."""
    tmp = tmp_path_factory.mktemp('niah')
    clip_path = niah_audio.speak(AudioSecretWord().phrase('falcon'), tmp)
    spec = niah_audio.AudioSpec(duration_s=SECONDS, depth=80.0, needle=str(clip_path), seed=0)
    placed = niah_audio.build(spec, tmp / 'haystack.flac')
    return tmp / 'haystack.flac', niah_audio.load_clip(clip_path), placed


def _niah_example(bank, **kwargs):
    noise = np.concatenate(list(niah_audio.synthesise(0, 0, SECONDS * ad.SAMPLE_RATE)))
    return ad.example(bank, SECONDS // 10, 0.8, np.random.default_rng(0), tokens_per_second=TPS,
                      tokenizer=TOK, word='falcon', clip=bank.index('falcon'), noise=noise, **kwargs)


def test_bank_is_cached_and_reloads_equal(bank, cache, tmp_path):
    assert len(list(cache.glob('bank-*.npz'))) == 1
    again = ad.build_bank(voices=VOICES, rates=(175,), noise_seconds=30, cache_dir=cache)
    for field in ('noise', 'clips', 'offsets'):
        np.testing.assert_array_equal(getattr(again, field), getattr(bank, field))
    assert (again.clip_words, again.clip_voices, again.clip_rates) == (
        bank.clip_words, bank.clip_voices, bank.clip_rates)
    assert len(bank) == len(ad.WORDS) * 2 and bank.words == ad.WORDS
    assert set(zip(bank.clip_voices, bank.clip_rates)) == {('en', 175), ('en-us+f1', 175)}
    assert bank.noise.shape == (30 * ad.SAMPLE_RATE,) and bank.noise.dtype == np.float32
    # What was built is what its parts make afresh: niah's noise from the bank seed, the clips.
    noise = np.concatenate(list(niah_audio.synthesise(ad.BANK_SEED, 0, 30 * ad.SAMPLE_RATE)))
    np.testing.assert_array_equal(bank.noise, noise)
    c = bank.index('harbor', 'en-us+f1', 175)
    np.testing.assert_array_equal(ad._speak(AudioSecretWord().phrase('harbor'), 'en-us+f1', 175,
                                            tmp_path).astype(np.float32) / 32768, bank.clip(c))
    for i in range(len(bank)):  # spoken phrases: 1 to 2.5 s
        assert 1.0 < len(bank.clip(i)) / ad.SAMPLE_RATE < 2.5
    assert len(bank.clip(bank.index('harbor'))) != len(bank.clip(c))  # another voice
    # niah's eval voice is always among the clips.
    assert ad.clip_keys(('en-us',), (140, 220)) == [('en', 175), ('en-us', 140), ('en-us', 220)]
    assert ad.clip_keys(VOICES, (140, 175)) == [('en', 140), ('en', 175), ('en-us+f1', 140),
                                                ('en-us+f1', 175)]


def test_the_eval_voice_is_niahs_clip_sample_for_sample(bank, niah):
    _, clip, (_, clip_s) = niah
    np.testing.assert_array_equal(bank.clip(bank.index('falcon')), clip)
    assert clip_s == len(clip) / ad.SAMPLE_RATE


def test_the_prompt_is_what_the_server_lays_out_for_niahs_audio(bank, niah, tmp_path):
    path, _, (start_s, clip_s) = niah
    media = MediaResolver(presets.default_config(), TOK, MediaStore(tmp_path / 'store')).resolve(
        pb.Part(inline_data=pb.Blob(mime_type='audio/flac', data=path.read_bytes())), 'contents[0]')
    task = AudioSecretWord(word='falcon')
    (context,) = task.contexts(SECONDS, [80.0], 1)
    sent = prompt.render(task.contents(media, context.questions[0]), context.system, TOK)
    ex = _niah_example(bank)
    holes = np.flatnonzero(np.asarray(sent) < 0)
    assert media.rows == len(holes) == SECONDS * TPS
    np.testing.assert_array_equal(holes, ex.row_positions.reshape(-1))
    np.testing.assert_array_equal(np.where(np.asarray(sent) < 0, 0, sent), ex.prompt_ids)
    assert ex.row_positions.shape == (SECONDS // 10, ROWS)
    assert ex.needle_start_s == start_s and ex.needle_seconds == clip_s
    assert (ex.word, ex.voice, ex.rate, ex.task) == ('falcon', 'en', 175, 'audio')
    answer = ex.input_ids[ex.prompt_len:].tolist()
    assert answer == TOK.encode('falcon') + [TOK.token_id(prompt.END_OF_TURN)]
    assert ex.answer == 'falcon' and ex.loss_mask.sum() == len(answer) and ex.loss_mask[ex.prompt_len:].all()
    assert ad.media_ids(SECONDS, TPS, TOK) == [i if i >= 0 else -1 for i in media.ids]


def test_the_sound_and_mel_are_what_the_server_decodes_from_niahs_file(bank, niah):
    path, _, _ = niah
    noise = np.concatenate(list(niah_audio.synthesise(0, 0, SECONDS * ad.SAMPLE_RATE)))
    track = ad.sound_track(bank, SECONDS // 10, 0.8, np.random.default_rng(0), word='falcon',
                           clip=bank.index('falcon'), noise=noise)
    decoded, rate = sf.read(path, dtype='float32')
    assert rate == ad.SAMPLE_RATE
    np.testing.assert_array_equal(track.samples, decoded)  # the FLAC round trip, sample for sample
    server = np.stack(list(audio_lib.load_windows(path, 'audio/flac')))  # [2, 80, 1000]
    ex = _niah_example(bank)
    assert ex.mel.shape == server.shape == (2, 80, 1000) and ex.mel.dtype == np.float32
    # Same samples, same computation: bit for bit (measured max |diff| on the log-mel: 0).
    assert float(np.abs(ex.mel - server).max()) == 0.0


@pytest.mark.parametrize('depth,windows', [(0.0, 1), (0.3, 2), (1.0, 4)])
def test_the_needle_is_where_the_example_says(bank, depth, windows):
    """windows=4: 40 s of track from 30 s of bank noise, which loops."""
    ex = ad.example(bank, windows, depth, np.random.default_rng(5), tokens_per_second=TPS, tokenizer=TOK)
    track = ad.sound_track(bank, windows, depth, np.random.default_rng(5))
    clip = bank.clip(track.clip)
    total = windows * 10 * ad.SAMPLE_RATE
    start = niah_audio.needle_start(total, len(clip), depth * 100)
    assert track.needle_start == start == round(ex.needle_start_s * ad.SAMPLE_RATE)
    assert ex.needle_seconds == len(clip) / ad.SAMPLE_RATE and ex.clip == track.clip
    assert (ex.word, ex.voice, ex.rate) == (bank.clip_words[ex.clip], bank.clip_voices[ex.clip],
                                             bank.clip_rates[ex.clip])
    np.testing.assert_array_equal(track.samples[start:start + len(clip)], clip)  # spliced in, clean
    noise = ad.quantise(np.take(bank.noise, np.arange(track.noise_start, track.noise_start + total),
                                mode='wrap'))
    outside = np.ones(total, bool)
    outside[start:start + len(clip)] = False
    np.testing.assert_array_equal(track.samples[outside], noise[outside])
    np.testing.assert_array_equal(ex.mel, np.stack(list(audio_lib.mel_windows([track.samples]))))
    assert ex.mel.shape == (windows, 80, 1000)
    assert (np.diff(ex.row_positions.reshape(-1)) == 1).all()  # one run of rows
    first = ex.row_positions[0, 0]
    assert ex.input_ids[first - 1] == TOK.token_id(ad.MEDIA_START)
    assert ex.input_ids[ex.row_positions[-1, -1] + 1] == TOK.token_id(ad.MEDIA_END)
    assert ex.embed_mask.sum() == windows * ROWS and not ex.input_ids[ex.embed_mask].any()
    assert ex.loss_mask.sum() == len(TOK.encode(ex.word)) + 1


def test_a_looped_track_says_its_word_all_through(bank):
    """The hearing stage's track: whole clips of one word (any voice and rate) one after another,
    0.1-0.5 s apart, from the first half second until the next would not fit."""
    sr = ad.SAMPLE_RATE
    for seed in range(4):
        track = np.full(2 * 10 * sr, 7.0, np.float32)  # a value no clip holds: the gaps keep it
        clip = int(np.random.default_rng(seed).integers(len(bank)))
        first = ad.loop_needles(track, bank, clip, np.random.default_rng(seed))
        said = track != 7.0
        edges = np.flatnonzero(np.diff(np.concatenate([[0], said.astype(np.int8), [0]])))
        runs = list(zip(edges[::2], edges[1::2]))  # [start, end) of each clip
        assert runs[0][0] == first < sr // 2 and len(runs) >= 5
        mine = [bank.clip(c) for c in bank.clips_of(bank.clip_words[clip])]
        np.testing.assert_array_equal(track[runs[0][0]:runs[0][1]], bank.clip(clip))
        for start, end in runs:  # each run is one whole clip of the word
            assert any(len(c) == end - start and np.array_equal(track[start:end], c) for c in mine)
        gaps = [b[0] - a[1] for a, b in zip(runs, runs[1:])]
        assert all(sr // 10 <= g < sr // 2 for g in gaps), gaps
        assert len(track) - runs[-1][1] < max(len(c) for c in mine) + sr // 2
    # Through the example path: loop batches are shaped as the plain ones.
    batch = ad.sample_batch(np.random.default_rng(0), 2, 512, bank, tokens_per_second=TPS, tokenizer=TOK,
                            loop=True)
    plain = ad.sample_batch(np.random.default_rng(0), 2, 512, bank, tokens_per_second=TPS, tokenizer=TOK)
    assert batch.mel.shape == plain.mel.shape and batch.tokens.shape == plain.tokens.shape
    assert trainer.trainable(('audio_loop', 'passkey')) == trainer.trainable(('audio',))


def test_an_edge_track_cuts_its_clip_at_a_window_edge(bank):
    """audio_edge: a window edge falls inside the clip, every edge and the track's end alike; the
    clip is spliced in clean there and the example says where."""
    window = 10 * ad.SAMPLE_RATE
    cut_at = []
    for seed in range(60):
        track = ad.sound_track(bank, 3, None, np.random.default_rng(seed), edge=True)
        clip = bank.clip(track.clip)
        start, end = track.needle_start, track.needle_start + len(clip)
        np.testing.assert_array_equal(track.samples[start:end], ad.quantise(clip))
        edges = [e for e in (window, 2 * window, 3 * window) if start < e <= end]
        assert len(edges) == 1, (start, end)
        cut_at.append(edges[0] // window)
        if edges[0] == 3 * window:
            assert end == 3 * window  # the last edge: the clip ends the track
    assert set(cut_at) == {1, 2, 3} and min(np.bincount(cut_at)[1:]) > 10, np.bincount(cut_at)
    ex = ad.example(bank, 3, None, np.random.default_rng(7), tokens_per_second=TPS, tokenizer=TOK, edge=True)
    track = ad.sound_track(bank, 3, None, np.random.default_rng(7), edge=True)
    assert round(ex.needle_start_s * ad.SAMPLE_RATE) == track.needle_start and ex.clip == track.clip
    with pytest.raises(ValueError, match='neither a depth nor loop'):
        ad.sound_track(bank, 3, 0.5, np.random.default_rng(0), edge=True)
    batch = ad.sample_batch(np.random.default_rng(0), 2, 512, bank, tokens_per_second=TPS, tokenizer=TOK,
                            edge=True)
    assert batch.mel.shape[:2] == (2, 4)
    assert trainer.trainable(('audio_edge',)) == trainer.trainable(('audio',))


def test_a_speech_bank_is_niahs_speech_haystack_and_feeds_audio_speech(cache):
    """audio_speech: the needle inside other voices; the bank's haystack is niah's speech track
    from the bank's seed sample for sample, its clips the noise bank's, cached apart from it."""
    speech_bank = ad.build_bank(voices=VOICES, rates=(175,), noise_seconds=SECONDS, cache_dir=cache,
                                haystack='speech')
    said = np.concatenate(list(speech.synthesise(speech.default_lines(), ad.BANK_SEED, 0,
                                                 SECONDS * ad.SAMPLE_RATE)))
    np.testing.assert_array_equal(speech_bank.noise, said)
    noise_bank = ad.build_bank(voices=VOICES, rates=(175,), noise_seconds=SECONDS, cache_dir=cache)
    np.testing.assert_array_equal(speech_bank.clips, noise_bank.clips)
    assert not np.allclose(speech_bank.noise, noise_bank.noise)
    assert len(list(cache.glob('bank-*.npz'))) >= 2
    again = ad.build_bank(voices=VOICES, rates=(175,), noise_seconds=SECONDS, cache_dir=cache,
                          haystack='speech')
    np.testing.assert_array_equal(again.noise, said)
    track = ad.sound_track(speech_bank, 2, 0.5, np.random.default_rng(3))
    clip = speech_bank.clip(track.clip)
    start, end = track.needle_start, track.needle_start + len(clip)
    np.testing.assert_array_equal(track.samples[start:end], ad.quantise(clip))
    around = np.delete(np.arange(len(track.samples)), np.s_[start:end])
    np.testing.assert_allclose(track.samples[around], ad.quantise(np.take(
        said, track.noise_start + around, mode='wrap')), atol=0)
    task = media.media_task('audio_speech', presets.default_config(), speech_bank)
    batch = task.sample(np.random.default_rng(0), 2, 512, TOK)
    assert batch.mel.shape[:2] == (2, 5)  # 40 s of sound, windows every 8 s (context_frames=100)
    assert trainer.trainable(('audio_speech',)) == trainer.trainable(('audio',))
    with pytest.raises(ValueError, match="haystack='babble'"):
        ad.build_bank(haystack='babble', cache_dir=None)


def test_quantise_is_soundfiles_flac_round_trip(tmp_path):
    x = np.concatenate([np.linspace(-1.2, 1.2, 50_001), np.random.default_rng(0).normal(0, 0.3, 50_000),
                        np.arange(-3, 4) / 32768 + 0.5 / 32768]).astype(np.float32)  # ties too
    sf.write(tmp_path / 'q.flac', np.clip(x, -1.0, 32767 / 32768), 16_000, format='FLAC', subtype='PCM_16')
    back, _ = sf.read(tmp_path / 'q.flac', dtype='float32')
    np.testing.assert_array_equal(ad.quantise(x), back)


def test_examples_are_seeded_and_sized(bank):
    a = ad.sample_batch(np.random.default_rng(3), 2, 512, bank, tokens_per_second=TPS, tokenizer=TOK)
    b = ad.sample_batch(np.random.default_rng(3), 2, 512, bank, tokens_per_second=TPS, tokenizer=TOK)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.mel, b.mel)
    count = ad.windows_for_length(512, TPS, TOK)
    assert count >= 2
    assert a.mel.shape == (2, count, 80, 1000) and a.tokens.shape == (2, 512)
    assert a.row_positions.shape == (2, count * ROWS)
    for i, e in enumerate(a.examples):
        n = len(e.input_ids)
        assert n <= 512 and (a.tokens[i, :n] == e.input_ids).all() and not a.loss_mask[i, n:].any()
        np.testing.assert_array_equal(a.embed_mask[i], np.isin(np.arange(512), a.row_positions[i]))
    # As many windows as fit: one more, with the longest word, would not.
    longest = max(ad.WORDS, key=lambda w: len(TOK.encode(w)))
    over = ad.example(bank, count + 1, 0.5, np.random.default_rng(0), tokens_per_second=TPS,
                      tokenizer=TOK, word=longest)
    assert len(over.input_ids) > 512
    fit = ad.example(bank, count, 0.5, np.random.default_rng(0), tokens_per_second=TPS,
                     tokenizer=TOK, word=longest)
    assert len(fit.input_ids) <= 512
    # Padding: a shorter example's missing window is zeros and its rows point past the end.
    short = ad.example(bank, 1, 0.5, np.random.default_rng(1), tokens_per_second=TPS, tokenizer=TOK)
    padded = ad.pad_batch([fit, short], 512)
    assert not padded.mel[1, 1:].any() and (padded.row_positions[1, ROWS:] == 512).all()
    with pytest.raises(ValueError, match='more than the batch length'):
        ad.pad_batch([over], 512)


def test_bad_inputs_are_named(bank):
    rng = np.random.default_rng(0)
    kw = dict(tokens_per_second=TPS, tokenizer=TOK)
    with pytest.raises(ValueError, match='too short for an audio example'):
        ad.windows_for_length(40, TPS, TOK)
    with pytest.raises(ValueError, match='at least one window'):
        ad.example(bank, 0, 0.5, rng, **kw)
    with pytest.raises(ValueError, match=r'depth=1.5: must be in \[0, 1\]'):
        ad.example(bank, 1, 1.5, rng, **kw)
    with pytest.raises(ValueError, match="word='zebra' has no clip"):
        ad.example(bank, 1, 0.5, rng, word='zebra', **kw)
    with pytest.raises(ValueError, match='the bank has clips 0 to'):
        ad.example(bank, 1, 0.5, rng, clip=len(bank), **kw)
    with pytest.raises(ValueError, match="not word='falcon'"):
        ad.example(bank, 1, 0.5, rng, word='falcon', clip=bank.index('harbor'), **kw)
    with pytest.raises(ValueError, match='noise has 100 samples'):
        ad.example(bank, 1, 0.5, rng, noise=np.zeros(100, np.float32), **kw)
    with pytest.raises(ValueError, match='no clip of'):
        bank.index('falcon', 'en-gb-scotland')
    with pytest.raises(ValueError, match='at least one voice and one rate'):
        ad.build_bank(voices=(), cache_dir=None)
    with pytest.raises(ValueError, match='noise_seconds=0'):
        ad.build_bank(noise_seconds=0, cache_dir=None)


TINY = trainer.model_config(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)


def test_a_tiny_audio_run_lowers_the_loss_and_trains_the_audio_encoder(bank, tmp_path):
    cfg = trainer.TrainConfig(out=str(tmp_path), steps=20, batch=8, lr=6e-3, warmup=3, lengths=(256,),
                              tasks=('audio', 'audio', 'passkey'), fillers=('passkey',), checkpoint_every=100,
                              eval_examples=2, progress=False, seed=0)
    log = io.StringIO()
    summary = trainer.train(cfg, TINY, log=log, media_banks={'audio': bank})
    lines = [json.loads(line) for line in (tmp_path / trainer.LOG_FILE).read_text().splitlines()]
    audio = [line['loss'] for line in lines if line.get('media') == 'audio']
    text = [line['loss'] for line in lines if 'loss' in line and 'media' not in line]
    assert len(audio) + len(text) == 20 and len(audio) > len(text) > 0
    assert np.mean(audio[-4:]) < 0.7 * np.mean(audio[:2]), audio
    assert set(summary.media_recall['audio']) == {256} and 'audio recall at 256 tokens' in log.getvalue()
    _, trained = checkpoint.load(tmp_path)
    fresh, after = nnx.state(type(trained)(TINY, rngs=nnx.Rngs(0))), nnx.state(trained)

    def changed(module: str) -> bool:
        return any(not np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(fresh[module]), jax.tree.leaves(after[module])))

    assert changed('audio') and not changed('vision')


def test_word_spans_start_where_the_words_differ(bank):
    spans = hearing.word_spans(bank)
    for voice in VOICES:
        clips = [c for c in range(len(bank)) if bank.clip_voices[c] == voice]
        starts = spans[clips, 0]
        # "The secret word is" at 175 wpm takes most of a second; no word starts before it.
        assert (starts > 0.6 * ad.SAMPLE_RATE).all() and (spans[clips, 1] == np.diff(bank.offsets)[clips]).all()
        first = min(clips, key=lambda c: spans[c, 0])
        # Up to the earliest start, every clip of the voice says the same samples.
        n = int(spans[first, 0])
        assert all(np.abs(bank.clip(c)[:n] - bank.clip(first)[:n]).max() <= 1e-3 for c in clips)


def test_hearing_windows_hold_the_word_only_when_labelled(bank):
    spans = hearing.word_spans(bank)
    rng = np.random.default_rng(3)
    size = audio_lib.MelSpec().window_samples
    kinds = {'word': 0, 'noise': 0, 'clip, no word': 0}
    for _ in range(200):
        w = hearing.window(bank, spans, rng)
        assert w.samples.shape == (size,) and np.array_equal(w.samples, ad.quantise(w.samples))
        if w.clip < 0:
            assert w.label == hearing.NONE
            kinds['noise'] += 1
            continue
        clip = bank.clip(w.clip)
        mid = w.clip_start + (spans[w.clip, 0] + spans[w.clip, 1]) // 2
        lo, hi = max(w.clip_start, 0), min(w.clip_start + len(clip), size)
        assert hi > lo  # the clip is heard
        assert np.array_equal(w.samples[lo:hi], ad.quantise(clip[lo - w.clip_start:hi - w.clip_start]))
        if w.label == hearing.NONE:
            assert not 0 <= mid < size
            kinds['clip, no word'] += 1
        else:
            assert 0 <= mid < size and ad.WORDS[w.label] == bank.clip_words[w.clip]
            kinds['word'] += 1
    assert min(kinds.values()) > 30, kinds  # p_word 0.5: about 100 / 50 / 50


def test_hearing_trains_the_audio_encoder_alone_into_a_servable_checkpoint(bank, tmp_path):
    start = checkpoint.save(tmp_path / 'start', TINY, Transformer(TINY, rngs=nnx.Rngs(0)))
    log = io.StringIO()
    result = hearing.train_hearing(start, tmp_path / 'heard', steps=3, batch_size=4, eval_every=0,
                                   eval_windows=32, bank=bank, log=log)
    assert result['step'] == 3 and result['n_word'] + result['n_none'] == 32
    assert 'hearing step 3' in log.getvalue() and (tmp_path / 'heard' / hearing.HEAD_FILE).is_file()
    lines = [json.loads(x) for x in (tmp_path / 'heard' / hearing.LOG_FILE).read_text().splitlines()]
    assert [x['step'] for x in lines] == [1, 2, 3] and all(np.isfinite(x['loss']) for x in lines)
    _, before = checkpoint.load(start)
    _, after = checkpoint.load(tmp_path / 'heard')
    a, b = nnx.state(before, nnx.Param).to_pure_dict(), nnx.state(after, nnx.Param).to_pure_dict()
    changed = {k for k in a if any(not np.array_equal(np.asarray(x), np.asarray(y))
                                   for x, y in zip(jax.tree.leaves(a[k]), jax.tree.leaves(b[k])))}
    assert changed == {'audio'}


def test_a_frozen_decoder_run_trains_only_the_named_encoders():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, trainer.trainable(('audio', 'passkey'), decoder=False), ...)
    assert set(params.to_pure_dict()) == {'audio'}
    with pytest.raises(ValueError, match='nothing to train'):
        trainer.TrainConfig(out='x', tasks=('passkey',), train_decoder=False)


def test_with_context_the_example_cuts_and_places_rows_as_the_server_does(bank, niah):
    """Windows holding 1 s of each neighbour (the shipped model's context_frames=100): 20 s make
    three windows whose middles start every 8 s; their rows fill the prompt's 200 holes in order,
    and the last window's 40 rows past the end go nowhere."""
    path, _, _ = niah
    spec = ad.mel_spec(dataclasses.replace(presets.default_config().audio, context_frames=100))
    ex, plain = _niah_example(bank, mel_spec=spec), _niah_example(bank)
    server = np.stack(list(audio_lib.load_windows(path, 'audio/flac', spec)))
    assert ex.mel.shape == server.shape == (3, 80, 1000) and float(np.abs(ex.mel - server).max()) == 0.0
    assert ex.row_positions.shape == (3, 80)
    at = ex.row_positions.reshape(-1)
    np.testing.assert_array_equal(at[:200], plain.row_positions.reshape(-1))
    assert (at[200:] == -1).all()
    np.testing.assert_array_equal(ex.prompt_ids, plain.prompt_ids)
    np.testing.assert_array_equal(ex.embed_mask, plain.embed_mask)
    padded = ad.pad_batch([ex], 300)
    assert padded.row_positions.shape == (1, 240) and (padded.row_positions[0, 200:] == 300).all()


@pytest.mark.parametrize('context_frames', [0, 100])
def test_long_eval_answers_an_audio_prompt_as_the_training_forward_pass_does(bank, monkeypatch, context_frames):
    """train.long_eval (chunked prefill into the paged cache, the audio rows spliced into the
    chunks, greedy decode from the cache) against the trainer's cache-free forward pass over the
    whole prompt: the same greedy ids. Chunks of 64 cut the 230-token prompt, and its 200 audio
    rows, in four. With context, three overlapping windows make the 200 rows and 40 that go nowhere."""
    monkeypatch.setattr(long_eval, 'CHUNK', 64)
    config = dataclasses.replace(TINY, audio=dataclasses.replace(TINY.audio, context_frames=context_frames))
    model = Transformer(config, rngs=nnx.Rngs(1))
    ex = _niah_example(bank, mel_spec=ad.mel_spec(config.audio))
    evaluator = long_eval.LongEval(model, 512)
    rows = evaluator.audio_rows(ex.mel, batch=3)  # a padded batch: the rows must not depend on it
    np.testing.assert_allclose(rows, np.asarray(model.encode_audio(ex.mel)).reshape(rows.shape), atol=1e-5)
    at = ex.row_positions.reshape(-1)
    got = evaluator.answer(ex.prompt_ids.tolist(), 4, frozenset(), (at[at >= 0], rows[at >= 0]))

    ids, want = list(ex.prompt_ids), []
    mel = ex.mel[None]
    width = len(ex.input_ids) + 8
    positions = ad.pad_batch([ex], width).row_positions  # nowhere: past the end
    mask = np.zeros((1, width), bool)
    mask[0, at[at >= 0]] = True
    for _ in range(4):  # one width for every step (one compiled program): causal, so padding after is unseen
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        out = media.logits(model, ad.TASK, tokens, np.asarray([[len(ids) - 1]]), mel, positions, mask)
        want.append(int(np.argmax(out[0, 0])))
        ids.append(want[-1])
    assert got == want
