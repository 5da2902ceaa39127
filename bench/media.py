"""Media benchmarks (issue 5): preprocessing speed and memory, encoder throughput, and time to
first token for a question about a long video, cold and from a named cache.

    PYTHONPATH=.:clients python -m bench.media --out bench/results/media.json

1. Video preprocessing (ffmpeg decode at 1 fps + scale, sound at 16 kHz) on generated videos of
   increasing duration (320x240, 25 fps, AAC): speed as a multiple of real time, and peak memory:
   Python's (tracemalloc) and the decoding ffmpeg processes' (VmHWM, sampled from /proc). Flat
   means the peak does not grow with duration.
2. The same videos through the whole media path (decode + encode with the default model's
   encoders): multiple of real time.
3. Images per second (decode + resize in the process pool, then encode) and audio seconds per
   second (decode, resample, log-mel, encode).
4. Time to first token through the real server for a question about a video (default 10 min):
   cold (decode, encode and prefill everything) and with the video in a named cache.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

from preprocess import audio as audio_lib
from preprocess import ffmpeg
from preprocess import image as image_lib
from preprocess import video as video_lib


def make_video(path: Path, seconds: int, size: str = "320x240", fps: int = 25) -> Path:
    if not path.exists():
        subprocess.run([ffmpeg.binary(), "-hide_banner", "-loglevel", "error", "-y",
                        "-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}:duration={seconds}",
                        "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
                        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                        "-c:a", "aac", "-shortest", str(path)], check=True)
    return path


class PeakRss:
    """Peak resident memory (VmHWM) of the ffmpeg processes handed to it, sampled until they end."""

    def __init__(self):
        self.peak_kib, self._pids, self._stop = 0, [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def watch(self, process) -> None:
        self._pids.append(process.pid)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for pid in list(self._pids):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_kib / 1024, 1)


def preprocess_video(path: Path, size: int) -> dict:
    info = video_lib.probe_video(path, "video/mp4")
    rss = PeakRss()
    tracemalloc.start()
    started = time.perf_counter()
    frames = 0
    for _, chunk in video_lib.frames(path, info, size=size, fps=1.0, process_hook=rss.watch):
        frames += len(chunk)
    samples = 0
    for chunk in video_lib.sound(path, info, process_hook=rss.watch):
        samples += len(chunk)
    wall = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"duration_s": info.duration_s, "frames": frames, "sound_s": samples / 16000,
            "wall_s": round(wall, 2), "x_realtime": round(info.duration_s / wall, 1),
            "python_peak_mib": round(peak / 2**20, 2), "ffmpeg_peak_rss_mib": rss.stop()}


def embed_video(embedder, resolver, path: Path) -> dict:
    from server.media import MediaSource, VideoRead
    # As an upload is described; a fresh sha each run so the embedder's cache never answers.
    source = MediaSource("VIDEO", "video/mp4", f"bench-{path.name}-{time.time()}", path=path,
                         video=VideoRead())
    tokens = resolver.describe(source)
    started = time.perf_counter()
    rows = asyncio.run(embedder.embed(tokens))
    wall = time.perf_counter() - started
    return {"duration_s": tokens.duration_s, "prompt_tokens": len(tokens.ids),
            "rows": int(rows.shape[0]), "wall_s": round(wall, 2),
            "x_realtime": round(tokens.duration_s / wall, 1)}


def image_throughput(embedder, count: int = 64) -> dict:
    from PIL import Image
    import io
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(count):
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)).save(out, "JPEG")
        blobs.append(out.getvalue())
    spec = image_lib.ImageSpec(size=embedder.encoder.image_size)
    started = time.perf_counter()
    pixels = np.stack([image_lib.load_image(b, "image/jpeg", spec) for b in blobs])
    decode = time.perf_counter() - started
    started = time.perf_counter()
    embedder.encoder.images(pixels)
    encode = time.perf_counter() - started
    return {"images": count, "size": "640x480 JPEG", "decode_per_s": round(count / decode, 1),
            "encode_per_s": round(count / encode, 1)}


def audio_throughput(embedder, seconds: int = 600) -> dict:
    import io
    import soundfile
    t = np.arange(seconds * 44100) / 44100
    out = io.BytesIO()
    soundfile.write(out, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100,
                    format="FLAC")
    data = out.getvalue()
    started = time.perf_counter()
    windows = list(audio_lib.load_windows(data, "audio/flac", embedder.mel_spec))
    features = time.perf_counter() - started
    started = time.perf_counter()
    embedder.encoder.audio(np.stack(windows))
    encode = time.perf_counter() - started
    return {"audio_s": seconds, "source": "44.1 kHz FLAC",
            "features_x_realtime": round(seconds / features, 1),
            "encode_x_realtime": round(seconds / encode, 1)}


def ttft(video: Path, minutes: float) -> dict:
    """Through the real server: cold question vs question on a named cache."""
    import grpc
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serving import ServerProcess
    from ringserve.v1 import inference_pb2 as pb
    from ringserve.v1 import inference_pb2_grpc as pb_grpc
    server = ServerProcess("--model", "default", "--prefill-chunk", "2048", "--kv-cache-gib", "2")
    try:
        with grpc.insecure_channel(server.target, options=[
                ("grpc.max_send_message_length", 1 << 30)]) as channel:
            stub = pb_grpc.InferenceStub(channel)
            data = video.read_bytes()
            media = stub.UploadMedia(iter(
                [pb.UploadMediaRequest(header=pb.MediaHeader(mime_type="video/mp4",
                                                              size_bytes=len(data)))]
                + [pb.UploadMediaRequest(chunk=data[i:i + (1 << 20)])
                   for i in range(0, len(data), 1 << 20)]))
            part = pb.Part(file_data=pb.FileData(file_uri=media.name))
            config = pb.GenerationConfig(max_output_tokens=1, temperature=0)

            def ask(**request):
                started = time.perf_counter()
                out = list(stub.Generate(pb.GenerateRequest(generation_config=config, **request),
                                         timeout=3600))
                return time.perf_counter() - started, out[-1].usage_metadata

            video_turn = pb.Content(role="user", parts=[pb.Part(text="Watch this."), part])
            question = pb.Content(role="user", parts=[pb.Part(text="What colour is the bar?")])
            cold, usage = ask(contents=[video_turn, question])
            cache = stub.CreateCache(pb.CreateCacheRequest(contents=[video_turn]))
            cached, cached_usage = ask(cached_content=cache.name, contents=[question])
            return {"video_min": minutes, "prompt_tokens": usage.prompt_token_count,
                    "cold_ttft_s": round(cold, 2), "cached_ttft_s": round(cached, 3),
                    "cached_tokens": cached_usage.cached_content_token_count,
                    "cached_share": round(cached / cold, 4)}
    finally:
        server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/media.json")
    parser.add_argument("--minutes", default="1,10,60", help="video durations to preprocess")
    parser.add_argument("--ttft-minutes", type=float, default=10.0)
    parser.add_argument("--workdir", default=None, help="where generated videos are kept")
    args = parser.parse_args()

    from model import checkpoint, presets
    from model.media_encoder import MediaEncoder
    from preprocess.tokenizer import Tokenizer
    from server.media import MediaEmbedder, MediaResolver
    from server.media_store import MediaStore

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ringserve-bench-media-"))
    work.mkdir(parents=True, exist_ok=True)
    directory = presets.ensure_default_checkpoint()
    config, model = checkpoint.load(directory)
    tokenizer = Tokenizer(directory / presets.TOKENIZER_FILE)
    encoder = MediaEncoder(config, model)
    encoder.warmup()
    embedder = MediaEmbedder(encoder)
    resolver = MediaResolver(config, tokenizer, MediaStore(work / "store"))
    results = {"machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
                          f"cores, {platform.python_version()}",
               "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
               "video_preprocess": [], "video_embed": []}
    for minutes in [float(m) for m in args.minutes.split(",")]:
        path = make_video(work / f"video-{minutes:g}min.mp4", int(minutes * 60))
        results["video_preprocess"].append(preprocess_video(path, config.vision.image_size))
        print(results["video_preprocess"][-1], flush=True)
        results["video_embed"].append(embed_video(embedder, resolver, path))
        print(results["video_embed"][-1], flush=True)
    results["images"] = image_throughput(embedder)
    results["audio"] = audio_throughput(embedder)
    print(results["images"], results["audio"], flush=True)
    embedder.close()
    if args.ttft_minutes:
        results["ttft"] = ttft(make_video(work / f"video-{args.ttft_minutes:g}min.mp4",
                                          int(args.ttft_minutes * 60)), args.ttft_minutes)
        print(results["ttft"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
