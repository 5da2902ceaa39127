"""`ringserve niah --modality video|audio`: the built haystacks, and the CLI against the server.

The media are built by the code under test and checked with independent readers: videos with the
server's own decoder (preprocess/video.py: probe_video, frames at 1 fps), sound with soundfile and
a cross-correlation against the needle clip. The end-to-end runs use the default model, whose
random weights score near 0: they check the pipeline (rows, placement, resume, uploads deleted,
plot), not recall.
"""

from __future__ import annotations

import collections
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from PIL import Image

import ringserve
from preprocess import video as server_video
from ringserve import cli
from ringserve.niah import audio, deps, espeak, ffmpeg, frames, media_tasks, plot, results
from ringserve.niah import scoring, speech
from ringserve.niah.media_runner import MediaHaystack
from ringserve.niah import video as niah_video
from ringserve.niah.command import parse_durations

RATE = 16_000


def decoded(path, size: int) -> np.ndarray:
    """All frames the server would sample at 1 fps, as float [N, size, size, 3]."""
    info = server_video.probe_video(path, "video/mp4")
    chunks = [block for _, block in server_video.frames(path, info, size=size, fps=1)]
    return np.concatenate(chunks).astype(np.float32)


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared difference over the last three axes."""
    return ((a.astype(np.float32) - b.astype(np.float32)) ** 2).mean(axis=(-3, -2, -1))


def tone_clip(path, rate: int = RATE, seconds: float = 0.75) -> np.ndarray:
    """A "spoken" needle: three tones in a row (no espeak-ng here), written as 16-bit WAV."""
    t = np.arange(int(seconds * rate)) / rate  # [n]
    freq = np.select([t < seconds / 3, t < 2 * seconds / 3], [523.0, 784.0], 1046.0)
    clip = (0.6 * np.sin(2 * np.pi * np.cumsum(freq) / rate)).astype(np.float32)
    soundfile.write(path, clip, rate, subtype="PCM_16")
    return soundfile.read(path, dtype="float32")[0]  # as written: 16-bit values


# ---- the video haystack -------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0, 40, 100])
def test_needle_frame_is_at_its_depths_second(tmp_path, depth):
    duration, size = 12, 64
    spec = niah_video.VideoSpec(duration_s=duration, word="lantern", seed=3,
                                needle_second=niah_video.needle_second(duration, depth),
                                frame_size=size)
    assert spec.needle_second == {0: 0, 40: 4, 100: 11}[depth]  # 0.4 * 11 = 4.4 -> 4
    path = tmp_path / "hay.mp4"
    assert niah_video.build(spec, path) == (float(spec.needle_second), 1.0)
    got = decoded(path, size)  # [N, 64, 64, 3]
    assert len(got) == duration  # one frame a second, no more, no less
    needle = frames.needle_frame("lantern", size)
    errors = mse(got, needle[None])  # [N]
    assert int(np.argmin(errors)) == spec.needle_second
    assert errors[spec.needle_second] < 60  # H.264 at crf 18: a few levels per pixel
    others = np.delete(errors, spec.needle_second)
    assert others.min() > 10 * errors[spec.needle_second]
    # The other frames are the generated ones of their own second (so the needle replaced one
    # frame and shifted nothing).
    for second in (0, 5, duration - 1):
        if second != spec.needle_second:
            filler = frames.filler_frame(3, 0, second, size, "lantern")
            assert int(np.argmin(mse(got, filler[None]))) == second


def test_needle_word_is_readable_at_the_encoders_size():
    """Scaled to 64 x 64 the way the server scales frames, the needle words still differ in
    many pixels: big letters, not a grey smudge."""
    small = [np.asarray(Image.fromarray(frames.needle_frame(w, 256)).resize((64, 64),
                                                                             Image.BILINEAR))
             for w in ("lantern", "meadow")]
    word_rows = slice(36, 60)  # the word's half of the frame
    dark = (small[0][word_rows] < 128).all(axis=-1)
    assert 0.1 < dark.mean() < 0.6  # ink covers a good share of the word's band
    assert (np.abs(small[0][word_rows].astype(int) - small[1][word_rows]) > 100).mean() > 0.1
    with pytest.raises(ValueError, match="needle word is empty"):
        frames.needle_frame(" ", 64)


def write_numbered_video(path, seconds: int, fps: int = 4) -> None:
    """A 96 x 64 video whose picture is grey level 40 * s + 20 during second s."""
    cmd = [ffmpeg.binary(), "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo",
           "-pix_fmt", "rgb24", "-s", "96x64", "-framerate", str(fps), "-i", "pipe:",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)]
    data = b"".join(np.full((64, 96, 3), 40 * (i // fps) + 20, np.uint8).tobytes()
                    for i in range(seconds * fps))
    subprocess.run(cmd, input=data, check=True, timeout=60)


def test_user_video_is_looped_and_the_needle_spliced_in(tmp_path):
    user = tmp_path / "user.mp4"
    write_numbered_video(user, 5)
    spec = niah_video.VideoSpec(duration_s=12, needle_second=7, word="walnut", seed=0,
                                frame_size=64, haystack=str(user))
    niah_video.build(spec, tmp_path / "hay.mp4")
    got = decoded(tmp_path / "hay.mp4", 64)  # [12, 64, 64, 3]
    assert len(got) == 12
    assert int(np.argmin(mse(got, frames.needle_frame("walnut", 64)[None]))) == 7
    # 96 x 64 scaled into 64 x 64: rows 11..52 hold the picture, black bars above and below.
    for second in [s for s in range(12) if s != 7]:
        level = 40 * (second % 5) + 20  # looped: second 5 shows the user's second 0 again
        assert abs(got[second, 20:44, 8:56].mean() - level) < 4, second
        assert got[second, :8].max() < 24 and got[second, -8:].max() < 24  # the bars


def test_video_spec_is_checked():
    with pytest.raises(ValueError, match=r"needle_second must be in \[0, 9\]"):
        niah_video.VideoSpec(duration_s=10, needle_second=10, word="x", seed=0)
    with pytest.raises(ValueError, match="even number of pixels"):
        ffmpeg.VideoWriter("/dev/null", 63)


# ---- the audio haystack -------------------------------------------------------------------------

def locate(track: np.ndarray, clip: np.ndarray) -> int:
    """The lag where `clip` best matches `track` (normalised cross-correlation, by FFT)."""
    n = len(track) + len(clip)
    corr = np.fft.irfft(np.fft.rfft(track, n) * np.conj(np.fft.rfft(clip, n)), n)[:len(track)]
    # Energy of track[lag:lag + len(clip)] for every lag, from a running sum.
    sums = np.concatenate([[0.0], np.cumsum(track.astype(np.float64) ** 2)])  # [len(track) + 1]
    ends = np.minimum(np.arange(len(track)) + len(clip), len(track))
    energy = sums[ends] - sums[:len(track)]  # [len(track)]
    return int(np.argmax(corr / np.sqrt(np.maximum(energy, 1e-9))))


@pytest.mark.parametrize("depth", [0, 30, 100])
def test_needle_clip_is_at_its_depths_sample(tmp_path, depth):
    clip = tone_clip(tmp_path / "clip.wav")  # [12000]
    duration = 6
    spec = audio.AudioSpec(duration_s=duration, depth=depth, needle=str(tmp_path / "clip.wav"),
                           seed=1)
    start_s, length_s = audio.build(spec, tmp_path / "hay.flac")
    expected = round(depth / 100 * (duration * RATE - len(clip)))
    assert (start_s * RATE, length_s * RATE) == (expected, len(clip))
    info = soundfile.info(tmp_path / "hay.flac")
    assert (info.format, info.samplerate, info.channels, info.frames) == (
        "FLAC", RATE, 1, duration * RATE)
    track, _ = soundfile.read(tmp_path / "hay.flac", dtype="float32")
    assert locate(track, clip) == expected
    # Spliced, not mixed: the clip's own samples, to 16-bit precision; noise around it.
    assert np.abs(track[expected:expected + len(clip)] - clip).max() <= 1 / 32768
    rest = np.concatenate([track[:expected], track[expected + len(clip):]])
    assert 0.02 < np.sqrt(np.mean(rest ** 2)) < 0.3


def test_synthesised_haystack_is_seeded_by_block():
    short = np.concatenate(list(audio.synthesise(5, 0, 40_000)))
    longer = np.concatenate(list(audio.synthesise(5, 0, 70_000)))
    assert len(short) == 40_000 and np.array_equal(longer[:40_000], short)
    other = np.concatenate(list(audio.synthesise(6, 0, 40_000)))
    assert not np.allclose(other, short)
    # Pink: much more power below 200 Hz than in an equal band at 4 kHz, per Hz.
    power = np.abs(np.fft.rfft(longer)) ** 2
    hz = np.fft.rfftfreq(len(longer), 1 / RATE)
    assert power[(hz > 20) & (hz < 200)].mean() > 5 * power[(hz > 4000) & (hz < 4180)].mean()


def test_user_audio_is_looped_and_resampled(tmp_path):
    ramp = (np.arange(int(2.5 * 8000)) % 400 / 400 - 0.5).astype(np.float32)  # 2.5 s at 8 kHz
    soundfile.write(tmp_path / "user.wav", ramp, 8000, subtype="PCM_16")
    clip = tone_clip(tmp_path / "clip.wav")
    spec = audio.AudioSpec(duration_s=6, depth=50, needle=str(tmp_path / "clip.wav"), seed=0,
                           haystack=str(tmp_path / "user.wav"))
    start_s, _ = audio.build(spec, tmp_path / "hay.flac")
    track, rate = soundfile.read(tmp_path / "hay.flac", dtype="float32")
    assert rate == RATE and len(track) == 6 * RATE
    start = round(start_s * RATE)
    assert locate(track, clip) == start
    # The 8 kHz ramp repeats every 400 / 8000 s = 800 samples at 16 kHz, across the loop point
    # (2.5 s = 40000 samples) too: compare periods before the needle with the first one.
    period = track[800:1600]
    for first in (8000, 39200, 40000):
        assert np.abs(track[first:first + 800] - period).max() < 0.05
    after = start + len(clip) + 800 - (start + len(clip)) % 800
    assert np.abs(track[after:after + 800] - period).max() < 0.05


def test_a_clip_longer_than_the_haystack_is_refused(tmp_path):
    tone_clip(tmp_path / "clip.wav", seconds=2.5)
    spec = audio.AudioSpec(duration_s=2, depth=0, needle=str(tmp_path / "clip.wav"), seed=0)
    with pytest.raises(ValueError, match=r"clip lasts 2.50 s, longer than the 2 s haystack"):
        audio.build(spec, tmp_path / "hay.flac")


# ---- the speech haystack ------------------------------------------------------------------------

LINES = ("The quick answer comes back at once.", "Every window holds ten seconds of sound.",
         "A reader speaks these words in turn.", "Nothing here says what the needle says.")


def test_speech_sentences_are_plain_prose_without_the_key_words():
    units = ["Return the value of the named attribute.  ", "See ``os.path.join()`` for more.  ",
             "The secret of this function is speed and care.  ", "Too short here.  ",
             "A lantern hangs in the hall near the door.  ", "Call it with two plain arguments.\n"]
    assert speech.sentences(units) == ["Return the value of the named attribute.",
                                       "Call it with two plain arguments."]
    lines = speech.default_lines()
    assert len(lines) > 1000  # hours of speech: an hour does not repeat
    words = {w for line in lines for w in line.lower().replace(".", " ").split()}
    assert not words & (set(media_tasks._NOUNS) | {"secret"})


def test_speech_haystack_is_espeak_voices_reading_in_turn():
    track = np.concatenate(list(speech.synthesise(LINES, 2, 0, 12 * RATE)))  # [12 s]
    assert len(track) == 12 * RATE and np.abs(track).max() < 1
    # The same seed and trial: the first part of any longer track; another seed: other speech.
    longer = np.concatenate(list(speech.synthesise(LINES, 2, 0, 20 * RATE)))
    assert np.array_equal(longer[:len(track)], track)
    other = np.concatenate(list(speech.synthesise(LINES, 3, 0, 12 * RATE)))
    assert not np.allclose(other, track)
    # Utterances, checked against espeak-ng itself: each one's samples are there, one after
    # another, each by its own voice, rate and pitch, at SPEECH_RMS.
    said = list(itertools.islice(speech.utterances(LINES, 2, 0), 4))
    at, voices = 0, set()
    for index, utterance in enumerate(said):
        rng = media_tasks._rng(2, "audio-speech", 0, index)
        first = rng.randrange(len(LINES))
        text = " ".join(LINES[(first + k) % len(LINES)] for k in range(rng.randint(1, 3)))
        voice, rate, pitch = rng.choice(speech.SPEECH_VOICES), rng.randint(*speech.RATES), \
            rng.randint(*speech.PITCHES)
        voices.add(voice)
        spoken = espeak.synthesise_16k(text, voice=voice, rate=rate, pitch=pitch)  # [n]
        assert np.abs(spoken).max() > 0.1
        scaled = utterance[:len(spoken)]
        gain = float(np.dot(scaled, spoken) / np.dot(spoken, spoken))
        assert np.abs(scaled - gain * spoken).max() < 1e-4
        rms = np.sqrt(np.mean(scaled ** 2))
        assert rms == pytest.approx(speech.SPEECH_RMS, rel=1e-3) or \
            np.abs(scaled).max() == pytest.approx(speech.PEAK, rel=1e-3)
        pause = utterance[len(spoken):]
        assert speech.PAUSE_S[0] <= len(pause) / RATE <= speech.PAUSE_S[1] and not pause.any()
        if at < len(track):  # the track: this utterance over the quiet noise haystack
            end = min(at + len(utterance), len(track))
            under = track[at:end] - utterance[:end - at]
            noise = np.concatenate(list(audio.synthesise(2, 0, 12 * RATE)))[at:end]
            assert np.abs(under - speech.NOISE_UNDER * noise).max() < 1e-4
        at += len(utterance)
    assert len(voices) >= 3 and "en" not in voices


def test_speech_track_is_cached_and_used_as_a_haystack_file(tmp_path):
    path = speech.track(4, 1, 6, tmp_path, lines=LINES)
    assert speech.track(4, 1, 6, tmp_path, lines=LINES) == path  # made once
    written, rate = soundfile.read(path, dtype="float32")
    expected = np.concatenate(list(speech.synthesise(LINES, 4, 1, 6 * RATE)))
    assert rate == RATE and np.abs(written - expected).max() <= 1 / 32768
    clip = tone_clip(tmp_path / "clip.wav")
    spec = audio.AudioSpec(duration_s=6, depth=50, needle=str(tmp_path / "clip.wav"), seed=4,
                           trial=1, haystack=str(path))
    start_s, _ = audio.build(spec, tmp_path / "hay.flac")
    track, _ = soundfile.read(tmp_path / "hay.flac", dtype="float32")
    start = round(start_s * RATE)
    assert locate(track, clip) == start
    outside = np.concatenate([track[:start] - written[:start],
                              track[start + len(clip):] - written[start + len(clip):]])
    assert np.abs(outside).max() <= 1 / 32768  # the speech as it was, but for the needle


def test_generated_audio_haystacks_are_named_and_checked(tmp_path):
    assert MediaHaystack("audio", synth="speech").name == "synthesised-speech"
    assert MediaHaystack("audio").name == "synthesised-noise"
    with pytest.raises(ValueError, match="generated audio haystack is noise or speech"):
        MediaHaystack("video", synth="speech")
    with pytest.raises(ValueError, match="got 'babble'"):
        MediaHaystack("audio", synth="babble")
    (tmp_path / "hay.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="with the file"):
        MediaHaystack("audio", str(tmp_path / "hay.wav"), synth="speech")


# ---- tasks, flags, results ----------------------------------------------------------------------

def test_media_tasks_draw_a_seeded_word_per_cell():
    task = media_tasks.VideoSecretWord(seed=2)
    contexts = task.contexts(60, [0, 50], 2)
    assert len(contexts) == 4 and {c.length for c in contexts} == {60}
    for context in contexts:
        (question,) = context.questions
        (word,) = question.expected
        assert context.needles == (media_tasks.Needle(f"The secret word is: {word}",
                                                      question.depth / 100),)
        assert question.turns == (("user", media_tasks.VIDEO_QUESTION),)
        assert word == task.cell_word(60, question.depth, question.trial)
    assert media_tasks.VideoSecretWord(seed=2).contexts(60, [0, 50], 2) == contexts
    assert len({c.questions[0].expected for c in contexts}) > 1
    fixed = media_tasks.AudioSecretWord(word="walnut").contexts(30, [10], 1)[0]
    assert fixed.needles[0].text == "The secret word is walnut"
    assert fixed.questions[0].turns == (("user", media_tasks.AUDIO_QUESTION),)
    clip = media_tasks.AudioSecretWord(clip="c.wav", answer="three tones").contexts(30, [10], 1)
    assert clip[0].questions[0].expected == ("three tones",)
    with pytest.raises(ValueError, match="--needle-audio c.wav needs --answer"):
        media_tasks.AudioSecretWord(clip="c.wav")


def test_duration_flags_and_labels():
    assert parse_durations("30s,10m,1h,1.5m,90") == (30, 90, 600, 3600)
    for bad in ["2.5s", "0s", "10x", ""]:
        with pytest.raises(Exception):
            parse_durations(bad)
    assert [results.format_duration(s) for s in (20, 90, 600, 3600, 5400)] == [
        "20s", "1m30s", "10m", "1h", "1h30m"]


def media_rows() -> list[dict]:
    return [{"task": "video", "modality": "video", "duration_s": d, "depth": p, "trial": 0,
             "score": s} for d, p, s in [(30, 0.0, 1.0), (30, 100.0, 0.0), (600, 0.0, 1.0)]]


def test_summary_and_heatmap_name_durations(tmp_path, capsys):
    table = results.summary_table(media_rows(), "niah video")
    assert table.splitlines()[:3] == [
        "niah video: mean score (depth % down, duration across)",
        "  depth   30s   10m", "      0  1.00  1.00"]
    assert results.key(media_rows()[2]) == ("video", 600, 0.0, 0)
    out = tmp_path / "r.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in media_rows()))
    assert cli.main(["niah", "--plot-only", "--modality", "video", "--out", str(out),
                     "--heatmap", str(tmp_path / "v.png")]) == 0
    assert "overall 0.667 over 3 answers" in capsys.readouterr().out
    with Image.open(tmp_path / "v.png") as image:
        layout = plot.Layout(2, 2)
        assert image.size == layout.size
        x0, y0, _, _ = layout.cell(1, 0)  # 10m, depth 0
        assert image.convert("RGB").getpixel((x0 + 4, y0 + 4)) == plot.GREEN


def test_flags_of_another_modality_are_refused(tmp_path, capsys):
    out = str(tmp_path / "r.jsonl")
    assert cli.main(["niah", "--modality", "video", "--lengths", "4k", "--out", out]) == 2
    assert "--lengths is for --modality text runs, not video; video and audio take " \
        "--durations" in capsys.readouterr().err
    assert cli.main(["niah", "--durations", "30s", "--out", out]) == 2
    assert "--durations is for --modality video or audio runs, not text" in \
        capsys.readouterr().err
    assert cli.main(["niah", "--modality", "audio", "--frame-size", "128", "--out", out]) == 2
    assert "--frame-size is for --modality video runs, not audio" in capsys.readouterr().err


def test_missing_packages_and_espeak_are_named(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r.jsonl")
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile now fails
    assert deps.missing("audio") == ["soundfile"] and deps.missing("video") == []
    assert cli.main(["niah", "--modality", "audio", "--out", out]) == 2
    assert "pip install 'ringserve-client[niah]' (or pip install soundfile)" in \
        capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng, whether installed or not
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # nor its library
    assert cli.main(["niah", "--modality", "audio", "--durations", "5s", "--target",
                     "127.0.0.1:9", "--out", out]) == 2  # refused before any RPC
    assert "install it (e.g. apt-get install espeak-ng) or pass --needle-audio CLIP " \
        "--answer TEXT" in capsys.readouterr().err
    tone_clip(tmp_path / "clip.wav")  # a clip of one's own does not make the speech haystack
    assert cli.main(["niah", "--modality", "audio", "--durations", "5s", "--haystack-audio",
                     "speech", "--needle-audio", str(tmp_path / "clip.wav"), "--answer", "tones",
                     "--target", "127.0.0.1:9", "--out", out]) == 2
    assert "the speech haystack (--haystack-audio speech) is read by espeak-ng, which is not " \
        "installed" in capsys.readouterr().err


# ---- end to end: the CLI against the real server ------------------------------------------------

RPCS = ("generate_text", "count_tokens_detail", "model_info", "upload_media", "delete_media")


def count_calls(monkeypatch) -> collections.Counter[str]:
    """Counts calls of the client's RPC methods from now on (they still run)."""
    calls: collections.Counter[str] = collections.Counter()
    for name in RPCS:
        method = getattr(ringserve.Client, name)

        def counted(self, *args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(ringserve.Client, name, counted)
    return calls


@pytest.fixture(scope="module")
def client(server_target):
    with ringserve.Client(server_target, timeout=120) as c:
        yield c


def our_uploads(client) -> list:
    return [m for m in client.list_media() if m.display_name.startswith("niah")]


def test_cli_video_runs_resumes_and_plots(server_target, client, tmp_path, capsys, monkeypatch):
    out, png, work = tmp_path / "video.jsonl", tmp_path / "video.png", tmp_path / "work"
    argv = ["niah", "--target", server_target, "--modality", "video", "--durations", "20s",
            "--depths", "0,100", "--frame-size", "64", "--max-output-tokens", "4", "--seed", "7",
            "--out", str(out), "--heatmap", str(png), "--work-dir", str(work)]
    calls = count_calls(monkeypatch)
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "niah video [########################] 2/2" in captured.err
    assert calls["upload_media"] == calls["delete_media"] == calls["generate_text"] == 2
    info = client.model_info()
    rows = results.read_rows(out)
    assert [(r["duration_s"], r["depth"], r["needle_s"]) for r in rows] == [
        (20, 0.0, 0.0), (20, 100.0, 19.0)]
    for row in rows:
        assert row["task"] == row["modality"] == "video"
        assert row["prompt_tokens_details"]["VIDEO"] == 20 * info.tokens_per_image  # 1 fps
        # The prompt: the frames, their timestamps, the template and the question.
        assert row["prompt_tokens"] == sum(row["prompt_tokens_details"].values())
        assert row["prompt_tokens"] > row["media_tokens"] + 20
        (word,) = row["expected"]
        assert word == media_tasks.VideoSecretWord(seed=7).cell_word(20, row["depth"], 0)
        assert row["score"] == scoring.contains(row["answer"], [word])
        assert row["time_to_first_token_s"] > 0 and row["finish_reason"] == "MAX_TOKENS"
        assert row["haystack"] == "generated-frames" and row["model"] == info.name
    assert row["needle_depth_percent"] == 100.0
    assert captured.out.splitlines()[1].split() == ["depth", "20s"]
    with Image.open(png) as image:
        assert image.size == plot.Layout(1, 2).size
    assert not our_uploads(client)
    built = sorted(work.glob("*.mp4"))
    assert len(built) == 2 and all(p.name.startswith("video-20s-d") for p in built)
    stamps = [p.stat().st_mtime_ns for p in built]

    # Resumed: nothing asked, nothing built or uploaded.
    calls.clear()
    assert cli.main(argv) == 0
    assert sum(calls.values()) == 0 and len(results.read_rows(out)) == 2
    assert "over 2 answers" in capsys.readouterr().out
    # Another results file with the same work dir: the built videos are reused as they are.
    assert cli.main(argv[:-6] + ["--out", str(tmp_path / "again.jsonl"), "--work-dir",
                                 str(work)]) == 0
    assert calls["upload_media"] == 2
    assert [p.stat().st_mtime_ns for p in sorted(work.glob("*.mp4"))] == stamps
    assert not our_uploads(client)


def test_cli_audio_with_a_supplied_clip(server_target, client, tmp_path, capsys):
    tone_clip(tmp_path / "clip.wav", rate=22050)
    out = tmp_path / "audio.jsonl"
    argv = ["niah", "--target", server_target, "--modality", "audio", "--durations", "20s",
            "--depths", "0,100", "--needle-audio", str(tmp_path / "clip.wav"), "--answer",
            "three tones", "--max-output-tokens", "4", "--score", "exact", "--out", str(out),
            "--heatmap", str(tmp_path / "audio.png")]
    assert cli.main(argv) == 0
    rows = results.read_rows(out)
    info = client.model_info()
    assert [(r["duration_s"], r["depth"]) for r in rows] == [(20, 0.0), (20, 100.0)]
    for row in rows:
        assert row["modality"] == "audio" and row["expected"] == ["three tones"]
        assert row["prompt_tokens_details"]["AUDIO"] == 20 * info.audio_tokens_per_second
        assert row["needle_length_s"] == pytest.approx(0.75, abs=1e-3)
        assert row["scorer"] == "exact" and row["score"] in (0.0, 1.0)
        assert row["haystack"] == "synthesised-noise"
    assert rows[0]["needle_s"] == 0.0 and rows[1]["needle_s"] == pytest.approx(19.25, abs=1e-3)
    assert (tmp_path / "audio.png").exists() and not our_uploads(client)
    assert "overall" in capsys.readouterr().out
    assert cli.main(argv) == 0  # resumed
    assert len(results.read_rows(out)) == 2


def test_cli_audio_inside_other_speech(server_target, client, tmp_path, capsys):
    """`--haystack-audio speech`: the spoken needle (espeak-ng) spliced into other voices reading
    prose; the speech track is made once in the work dir and reused by every depth."""
    out, work = tmp_path / "speech.jsonl", tmp_path / "work"
    argv = ["niah", "--target", server_target, "--modality", "audio", "--haystack-audio",
            "speech", "--durations", "20s", "--depths", "0,50", "--seed", "5",
            "--max-output-tokens", "2", "--out", str(out), "--work-dir", str(work)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = results.read_rows(out)
    assert [(r["duration_s"], r["depth"]) for r in rows] == [(20, 0.0), (20, 50.0)]
    (hay,) = work.glob("speech-haystack-seed5-t0-20s-*.flac")
    said, _ = soundfile.read(hay, dtype="float32")
    assert np.sqrt(np.mean(said ** 2)) > 0.5 * speech.SPEECH_RMS  # mostly speech, not pauses
    for row in rows:
        assert row["haystack"] == "synthesised-speech"
        assert row["prompt_tokens_details"]["AUDIO"] == 20 * client.model_info().audio_tokens_per_second
        (built,) = work.glob(f"audio-20s-d{results.format_depth(row['depth'])}-seed5-*.flac")
        track, _ = soundfile.read(built, dtype="float32")
        # the row's times are rounded to 0.1 ms: a sample or two either way
        start, end = round(row["needle_s"] * RATE), round((row["needle_s"] + row["needle_length_s"]) * RATE)
        assert np.abs(np.delete(track - said, np.s_[max(start - 2, 0):end + 2])).max() <= 1 / 32768
        assert np.abs(track[start:end] - said[start:end]).max() > 0.1  # the needle, spliced in
    assert not our_uploads(client)
