"""preprocess/video.py and preprocess/ffmpeg.py on small videos made here by the bundled ffmpeg.

Source frame k of the test videos (64x48, 10 fps, 6 s) shows k in binary as eight vertical bars
(bar b white when bit b of k is set), which survives lossy coding and scaling, so each decoded frame
says which source frame it is. The frame on screen at time t is then k = floor(10 t).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import signal
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from preprocess import ffmpeg, video
from preprocess.errors import MediaError, MediaTooLarge

RATE = 10  # source frames per second
COUNT = 60  # source frames: 6 s
W, H = 64, 48
TONE = 440.0  # Hz, the sound track


def pattern(k: int) -> np.ndarray:
    frame = np.zeros((H, W, 3), np.uint8)  # [H, W, 3]
    for b in range(8):
        if k >> b & 1:
            frame[:, b * 8:(b + 1) * 8] = 255
    return frame


def frame_ids(frames: np.ndarray) -> list[int]:
    """Source frame numbers of decoded frames [n, S, S, 3] of a W x H pattern video."""
    size = frames.shape[1]
    scale = size / W  # the picture fills the width; bars top and bottom
    row = size // 2
    return [sum(1 << b for b in range(8) if f[row, int((b * 8 + 4) * scale), 0] > 128)
            for f in frames]


def on_screen(times: np.ndarray) -> list[int]:
    """The source frame shown at each time; the last one stays after the video ends."""
    return [min(int(math.floor(t * RATE + 1e-6)), COUNT - 1) for t in times]


def encode(path, frames: np.ndarray, codec: list[str], *, audio: list[str] | None = None,
           audio_input: list[str] | None = None, out: list[str] = ()) -> str:
    """Write `frames` [n, h, w, 3] at RATE fps (and a TONE sine) with the bundled ffmpeg."""
    n, h, w, _ = frames.shape
    cmd = [ffmpeg.binary(), "-y", "-hide_banner", "-loglevel", "error",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(RATE), "-i", "pipe:"]
    if audio is not None:
        cmd += audio_input or ["-f", "lavfi", "-i", f"sine=frequency={TONE:g}:sample_rate=44100"
                               f":duration={n / RATE}"]
    cmd += ["-map", "0:v"] + (["-map", "1:a"] + audio if audio is not None else [])
    cmd += [*codec, "-pix_fmt", "yuv420p", *out, str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True, timeout=60)
    return str(path)


# B-frames, and a keyframe every 3 s exactly (no scene-cut keyframes), so seeks land mid-GOP.
X264 = ["-c:v", "libx264", "-preset", "veryfast", "-sc_threshold", "0", "-g", "30"]
VP9 = ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-g", "30"]
MPEG4 = ["-c:v", "mpeg4", "-q:v", "2", "-g", "30"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    frames = np.stack([pattern(k) for k in range(COUNT)])  # [60, 48, 64, 3]
    white_wide = np.full((COUNT, 32, 64, 3), 255, np.uint8)
    m = {
        "mp4": encode(d / "a.mp4", frames, X264, audio=["-c:a", "aac"]),
        # One keyframe only, so every seek decodes from the start.
        "mp4_silent": encode(d / "b.mp4", frames, X264[:-1] + ["250"]),
        "webm": encode(d / "c.webm", frames, VP9, audio=["-c:a", "libopus"]),
        "mkv": encode(d / "d.mkv", frames, MPEG4, audio=["-c:a", "aac"]),
        # Written as a live stream: the header states no duration.
        "webm_live": encode(d / "e.webm", frames, VP9, audio=["-c:a", "libopus"],
                            out=["-f", "webm", "-live", "1"]),
        "wide": encode(d / "wide.mp4", white_wide, X264),
        "tall": encode(d / "tall.mp4", white_wide.transpose(0, 2, 1, 3).copy(), X264),
        # The sound track starts 1 s after the picture.
        "late_sound": encode(d / "late.mkv", frames, MPEG4, audio=["-c:a", "aac"], audio_input=[
            "-itsoffset", "1", "-f", "lavfi", "-i", f"sine=frequency={TONE:g}:duration=5"]),
    }
    # The wide video marked "display rotated by 90 degrees" (an input option of a stream copy).
    rotated = d / "rot.mp4"
    subprocess.run([ffmpeg.binary(), "-y", "-loglevel", "error", "-display_rotation", "90", "-i",
                    m["wide"], "-c", "copy", str(rotated)], check=True, timeout=60)
    m["rotated"] = str(rotated)
    subprocess.run([ffmpeg.binary(), "-y", "-loglevel", "error", "-i", m["mp4"], "-c", "copy",
                    "-movflags", "+faststart", str(d / "faststart.mp4")], check=True, timeout=60)
    m["faststart"] = str(d / "faststart.mp4")
    cover = ["-f", "lavfi", "-i", "color=size=32x32:duration=0.1", "-map", "0", "-map", "1",
             "-frames:v", "1", "-c:v", "png", "-disposition:v", "attached_pic"]
    for name, args in {"wav": ["-c:a", "pcm_s16le"], "m4a": ["-c:a", "aac"],
                       "m4a_cover": [*cover, "-c:a", "aac"]}.items():  # album art is no video
        path = d / f"{name}.{name[:3]}"
        subprocess.run([ffmpeg.binary(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        "sine=duration=2", *args, str(path)], check=True, timeout=60)
        m[name] = str(path)
    return m


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """Ten minutes of 32x24 testsrc at 2 fps with a sine track, made in about a second."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    subprocess.run([ffmpeg.binary(), "-y", "-hide_banner", "-loglevel", "error",
                    "-f", "lavfi", "-i", "testsrc=size=32x24:rate=2:duration=600",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000:duration=600",
                    "-c:v", "libx264", "-preset", "ultrafast", "-g", "120", "-c:a", "aac",
                    "-b:a", "16k", "-shortest", str(path)], check=True, timeout=120)
    return str(path), video.probe_video(path, "video/mp4")


def gone(pid: int) -> bool:
    """The child is dead and reaped: no /proc entry (not even a zombie) and nothing to wait for."""
    try:
        os.waitpid(pid, os.WNOHANG)
        return False
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")


def collect(chunks) -> tuple[np.ndarray, np.ndarray, list[int]]:
    chunks = list(chunks)
    times = np.concatenate([t for t, _ in chunks])
    frames = np.concatenate([f for _, f in chunks])
    return times, frames, [len(t) for t, _ in chunks]


# ffmpeg.binary

def test_binary_is_the_bundled_ffmpeg_unless_overridden(monkeypatch):
    monkeypatch.delenv("RINGSERVE_FFMPEG", raising=False)
    path = ffmpeg.binary()
    assert os.access(path, os.X_OK)
    version = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30).stdout
    assert version.startswith("ffmpeg version")
    monkeypatch.setenv("RINGSERVE_FFMPEG", "/opt/ffmpeg/bin/ffmpeg")
    assert ffmpeg.binary() == "/opt/ffmpeg/bin/ffmpeg"


# probe_video

@pytest.mark.parametrize("name,mime,codec,audio,container", [
    ("mp4", "video/mp4", "h264", "aac", "mov,mp4,m4a,3gp,3g2,mj2"),
    ("mp4_silent", "video/mp4", "h264", None, "mov,mp4,m4a,3gp,3g2,mj2"),
    ("webm", "video/webm", "vp9", "opus", "matroska,webm"),
    ("mkv", "video/x-matroska", "mpeg4", "aac", "matroska,webm"),
    ("mp4", "video/quicktime; codecs=avc1", "h264", "aac", "mov,mp4,m4a,3gp,3g2,mj2"),
])
def test_probe_reports_streams_and_duration(media, name, mime, codec, audio, container):
    info = video.probe_video(media[name], mime)
    assert info.duration_s == pytest.approx(COUNT / RATE, abs=0.05)
    assert (info.width, info.height, info.fps) == (W, H, RATE)
    assert (info.video_codec, info.audio_codec, info.has_audio) == (codec, audio, audio is not None)
    assert info.container == container


def test_probe_measures_a_file_whose_header_states_no_duration(media):
    said = subprocess.run([ffmpeg.binary(), "-hide_banner", "-i", media["webm_live"]],
                          capture_output=True, text=True, timeout=30).stderr
    assert "Duration: N/A" in said  # so the fallback is what this test exercises
    info = video.probe_video(media["webm_live"], "video/webm")
    assert info.duration_s == pytest.approx(COUNT / RATE, abs=0.05)
    assert (info.width, info.height) == (W, H)


def test_probe_reports_the_displayed_size_of_a_rotated_video(media):
    info = video.probe_video(media["rotated"], "video/mp4")
    assert (info.width, info.height) == (32, 64)


@pytest.mark.parametrize("content,mime,message", [
    (b"", "video/mp4", "empty file"),
    (np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes(), "video/mp4",
     "not a readable video file"),
    (b"ffconcat version 1.0\nfile {mp4}\n", "video/mp4", "not a supported video container"),
    (b"", "image/png", "unsupported video MIME type 'image/png'"),
])
def test_probe_rejects_what_is_not_a_video(media, tmp_path, content, mime, message):
    path = tmp_path / "upload"
    path.write_bytes(content.replace(b"{mp4}", media["mp4"].encode()))
    with pytest.raises(MediaError, match=message) as error:
        video.probe_video(path, mime)
    assert str(tmp_path) not in str(error.value)  # the server's paths stay private


def test_probe_never_opens_files_named_inside_a_playlist(media, tmp_path):
    # Without the demuxer whitelist, ffmpeg would follow the playlist to the mp4 it names.
    (tmp_path / "inner.mp4").write_bytes(Path(media["mp4"]).read_bytes())
    playlist = tmp_path / "upload.ffconcat"
    playlist.write_text("ffconcat version 1.0\nfile inner.mp4\n")
    said = subprocess.run([ffmpeg.binary(), "-hide_banner", "-i", str(playlist)],
                          capture_output=True, text=True, timeout=30).stderr
    assert "Input #0, concat" in said and "Video: h264" in said
    with pytest.raises(MediaError, match="not a supported video container"):
        video.probe_video(playlist, "video/mp4")


@pytest.mark.parametrize("name", ["wav", "m4a", "m4a_cover"])
def test_probe_rejects_sound_without_picture(media, name):
    with pytest.raises(MediaError, match="has no video stream"):
        video.probe_video(media[name], "video/mp4")


@pytest.mark.parametrize("name,mime,fits", [
    ("mp4", "video/webm", "video/mp4 or video/quicktime"),
    ("webm", "video/mp4", "video/webm or video/x-matroska"),
    ("mkv", "video/x-msvideo", "video/webm or video/x-matroska"),
])
def test_probe_rejects_a_mime_type_that_does_not_match_the_container(media, name, mime, fits):
    with pytest.raises(MediaError, match=f"sent as {mime} but .* which is {fits}"):
        video.probe_video(media[name], mime)


def test_probe_rejects_a_video_over_the_duration_limit(media):
    with pytest.raises(MediaTooLarge, match="6.0 s long; the limit is 5 s"):
        video.probe_video(media["mp4"], "video/mp4", max_seconds=5)
    assert video.probe_video(media["mp4"], "video/mp4", max_seconds=7).duration_s == 6.0


def test_truncated_mp4_is_an_error_or_the_frames_up_to_the_cut(media, tmp_path):
    # Header at the end (ffmpeg's default): half a file has no header at all.
    cut = tmp_path / "cut.mp4"
    data = Path(media["mp4"]).read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(MediaError, match="moov atom not found"):
        video.probe_video(cut, "video/mp4")
    # Header first: the first half still decodes; the rest repeats the last frame it got.
    data = Path(media["faststart"]).read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    info = video.probe_video(cut, "video/mp4")
    started = time.monotonic()
    times, frames, _ = collect(video.frames(cut, info, size=32, fps=2, timeout=20))
    assert time.monotonic() - started < 10
    ids, want = frame_ids(frames), on_screen(times)
    assert len(ids) == len(video.sample_times(info.duration_s, fps=2)) == 12
    good = next(i for i in range(len(ids) + 1) if i == len(ids) or ids[i] != want[i])
    assert 1 <= good < len(ids)  # some frames decode, not all (the file is cut)
    assert len(set(ids[good:])) == 1  # after the cut, one frame repeats:
    assert ids[good - 1] <= ids[good] < want[good]  # the last one decoded before the cut


# sample_times

def test_sample_times_are_start_plus_i_over_fps_before_the_end():
    np.testing.assert_array_equal(video.sample_times(6.0), [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(video.sample_times(6.01), [0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(video.sample_times(6.0, fps=2, start=1.5, end=3.5),
                                  [1.5, 2.0, 2.5, 3.0])
    np.testing.assert_allclose(video.sample_times(1.0, fps=3), [0, 1 / 3, 2 / 3])
    assert len(video.sample_times(6.0, fps=3)) == 18  # 6 * 3 is not 18.000000001 frames
    assert len(video.sample_times(3600.0)) == 3600
    assert len(video.sample_times(10.0, fps=0.3)) == 3  # 0, 3.33, 6.67
    assert video.sample_times(6.0).dtype == np.float64


@pytest.mark.parametrize("kwargs,field", [
    (dict(fps=0.0), "video_metadata.fps"),
    (dict(fps=25.0), "video_metadata.fps"),
    (dict(fps=float("nan")), "video_metadata.fps"),
    (dict(start=-1.0), "video_metadata.start_offset"),
    (dict(start=6.0), "video_metadata.start_offset"),
    (dict(start=2.0, end=2.0), "video_metadata.end_offset"),
    (dict(end=6.5), "video_metadata.end_offset"),
])
def test_sample_times_rejects_bad_video_metadata(kwargs, field):
    with pytest.raises(MediaError, match=field):
        video.sample_times(6.0, **kwargs)


# frames

@pytest.mark.parametrize("name", ["mp4", "mp4_silent", "webm", "mkv", "webm_live"])
@pytest.mark.parametrize("fps,start,end", [
    (1.0, 0.0, None), (2.0, 0.0, None), (2.0, 1.55, 4.3), (3.0, 0.95, 3.0), (0.5, 2.5, None),
    (24.0, 5.5, None),  # past the start of the last frame (5.9 s): that frame repeats
])
def test_frames_are_the_frames_on_screen_at_the_sample_times(media, name, fps, start, end):
    info = video.probe_video(media[name], "video/x-matroska" if "webm" in name or name == "mkv"
                             else "video/mp4")
    want = video.sample_times(info.duration_s, fps=fps, start=start, end=end)
    times, frames, sizes = collect(video.frames(media[name], info, size=32, fps=fps, start=start,
                                                end=end, chunk=4))
    np.testing.assert_array_equal(times, want)
    assert frames.shape == (len(want), 32, 32, 3) and frames.dtype == np.uint8
    assert all(0 < n <= 4 for n in sizes)
    assert frame_ids(frames) == on_screen(want)


def test_frames_pad_to_the_exact_count_when_ffmpeg_stops_early(media):
    # Without a known frame rate frames() cannot ask ffmpeg to hold the last frame, so ffmpeg's
    # output ends at the end of the last frame (6.0 s), one slot short of this 6.01 s file.
    info = dataclasses.replace(video.probe_video(media["webm"], "video/webm"), fps=0.0)
    times, frames, sizes = collect(video.frames(media["webm"], info, size=32, chunk=4))
    np.testing.assert_array_equal(times, [0, 1, 2, 3, 4, 5, 6])
    assert sizes == [4, 3]
    assert frame_ids(frames) == [0, 10, 20, 30, 40, 50, 50]


@pytest.mark.parametrize("name,bars", [
    ("wide", "rows"), ("tall", "columns"), ("rotated", "columns")])
def test_frames_keep_the_aspect_ratio_with_black_bars(media, name, bars):
    info = video.probe_video(media[name], "video/mp4")
    _, frames, _ = collect(video.frames(media[name], info, size=32, fps=1, end=2.0))
    assert frames.shape == (2, 32, 32, 3)
    frame = frames[0] if bars == "rows" else frames[0].transpose(1, 0, 2)  # bars on axis 0
    # 64x32 fits 32x32 as 32x16: 8 black rows, 16 picture rows, 8 black rows.
    assert (frame[:8] == 0).all() and (frame[24:] == 0).all()
    assert (frame[8:24] > 200).all()


def test_frames_never_hold_more_than_a_chunk(long_video):
    path, info = long_video
    assert info.duration_s == pytest.approx(600, abs=0.1)
    size, chunk = 64, 8
    decoded = len(video.sample_times(info.duration_s)) * size * size * 3  # 7.4 MB in all
    tracemalloc.start()
    try:
        count = 0
        for times, frames in video.frames(path, info, size=size, chunk=chunk):
            assert len(frames) <= chunk and frames.shape[1:] == (size, size, 3)
            count += len(frames)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 600
    # A chunk is 98 KB; the bound leaves room for bookkeeping and is far below `decoded`.
    assert peak < 1_000_000 < decoded / 7


def test_sound_never_holds_more_than_a_block(long_video):
    path, info = long_video
    tracemalloc.start()
    try:
        total = sum(len(block) for block in video.sound(path, info, block_seconds=10.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == round(info.duration_s * 16000)  # 38 MB as float32
    assert peak < 3_000_000  # a block is 640 KB as float32 plus its 320 KB of int16


# sound

@pytest.mark.parametrize("name", ["mp4", "webm", "mkv", "webm_live"])
@pytest.mark.parametrize("start,end", [(0.0, None), (1.25, 4.5)])
def test_sound_is_16khz_mono_of_exact_length(media, name, start, end):
    info = video.probe_video(media[name], "video/mp4" if name == "mp4" else "video/webm")
    blocks = list(video.sound(media[name], info, start=start, end=end, block_seconds=2.0))
    span = (info.duration_s if end is None else end) - start
    assert all(b.dtype == np.float32 and b.ndim == 1 for b in blocks)
    assert [len(b) for b in blocks[:-1]] == [32000] * (len(blocks) - 1) and len(blocks[-1]) <= 32000
    pcm = np.concatenate(blocks)
    assert len(pcm) == round(span * 16000)
    body = pcm[1600:-1600]  # away from codec edges
    spectrum = np.abs(np.fft.rfft(body))
    assert np.fft.rfftfreq(len(body), 1 / 16000)[spectrum.argmax()] == pytest.approx(TONE, abs=1.0)
    # ffmpeg's sine source has amplitude 1/8.
    assert np.sqrt(np.mean(body ** 2)) == pytest.approx(0.125 / np.sqrt(2), rel=0.1)


def test_sound_of_a_video_without_sound_is_nothing(media):
    info = video.probe_video(media["mp4_silent"], "video/mp4")
    assert list(video.sound(media["mp4_silent"], info)) == []


def test_sound_starting_late_is_silent_until_it_starts(media):
    info = video.probe_video(media["late_sound"], "video/x-matroska")
    pcm = np.concatenate(list(video.sound(media["late_sound"], info)))
    assert len(pcm) == round(info.duration_s * 16000)
    assert np.abs(pcm[:15000]).max() < 0.01  # the first second is silence
    assert np.abs(pcm[17000:32000]).max() > 0.1  # then the tone, on time


# ffmpeg processes: timeouts, cancellation, cleanup

def test_a_timeout_kills_ffmpeg(long_video):
    path, info = long_video
    procs = []
    started = time.monotonic()
    with pytest.raises(MediaError, match=r"ffmpeg timed out after 0\.5 s"):
        for _ in video.frames(path, info, size=32, fps=24, timeout=0.5, process_hook=procs.append):
            time.sleep(0.05)  # a slow consumer: ffmpeg cannot finish 14400 frames in time
    assert time.monotonic() - started < 10
    assert procs[0].returncode == -signal.SIGKILL
    assert gone(procs[0].pid)


def test_closing_the_generator_early_kills_ffmpeg(long_video):
    path, info = long_video
    procs = []
    chunks = video.frames(path, info, size=32, chunk=1, process_hook=procs.append)
    next(chunks)
    assert os.path.exists(f"/proc/{procs[0].pid}")  # still running: 599 frames to go
    chunks.close()
    assert procs[0].returncode == -signal.SIGKILL
    assert gone(procs[0].pid)


def test_dropping_the_generator_kills_ffmpeg(long_video):
    path, info = long_video
    pids = []
    chunks = video.sound(path, info, block_seconds=1.0,
                         process_hook=lambda proc: pids.append(proc.pid))
    next(chunks)
    del chunks
    gc.collect()
    assert gone(pids[0])


def test_dropping_a_process_kills_ffmpeg():
    proc = ffmpeg.Process([ffmpeg.binary(), "-nostdin", "-f", "lavfi", "-i", "testsrc",
                           "-f", "rawvideo", "pipe:"], timeout=None)
    pid = proc.pid
    assert len(proc.read(1000)) == 1000
    del proc
    gc.collect()
    assert gone(pid)


def test_cancel_from_another_thread_stops_the_reader(long_video):
    path, info = long_video
    procs, got, errors = [], [], []
    first = threading.Event()

    def consume():
        try:
            for times, _ in video.frames(path, info, size=32, fps=24, chunk=16,
                                         process_hook=procs.append):
                got.append(len(times))
                first.set()
        except MediaError as e:
            errors.append(e)
        finally:
            first.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert first.wait(30)
    procs[0].cancel()
    reader.join(10)
    assert not reader.is_alive()
    assert len(errors) == 1 and "cancelled" in str(errors[0])
    assert sum(got) < 14400
    assert gone(procs[0].pid)


def test_cancel_wakes_a_reader_blocked_on_a_silent_ffmpeg():
    # -re: one frame a second, so a read of ten frames blocks until cancelled.
    proc = ffmpeg.Process([ffmpeg.binary(), "-nostdin", "-re", "-f", "lavfi", "-i",
                           "testsrc=size=32x24:rate=1", "-f", "rawvideo", "pipe:"], timeout=30)
    threading.Timer(0.3, proc.cancel).start()
    started = time.monotonic()
    with proc, pytest.raises(MediaError, match="cancelled"):
        proc.read(10 * 32 * 24 * 3)
    assert time.monotonic() - started < 5
    assert gone(proc.pid)


def test_a_failing_ffmpeg_says_why(tmp_path):
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, np.uint8).tobytes())
    with ffmpeg.Process([ffmpeg.binary(), *ffmpeg.GLOBAL_ARGS, "-i", ffmpeg.input_url(path),
                         "-f", "rawvideo", "pipe:"], timeout=30, path=path) as proc:
        assert proc.read(100) == b""
        with pytest.raises(MediaError, match="ffmpeg failed: .*Invalid data found") as error:
            proc.check()
    assert str(tmp_path) not in str(error.value)


def test_a_flood_on_stderr_does_not_block_ffmpeg():
    # showinfo logs a line per frame: ~300 KB of stderr, far over a pipe's 64 KB.
    with ffmpeg.Process([ffmpeg.binary(), "-nostdin", "-f", "lavfi", "-i",
                         "testsrc=size=32x24:rate=100:duration=10,showinfo",
                         "-f", "rawvideo", "pipe:"], timeout=30) as proc:
        data = b""
        while piece := proc.read(1 << 16):
            data += piece
        proc.check()
        assert len(data) == 1000 * 32 * 24 * 3
        assert 0 < len(proc.stderr) <= ffmpeg.STDERR_TAIL and "showinfo" in proc.stderr
