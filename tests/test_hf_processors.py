"""preprocess/ against transformers' own processors, built from config dicts (nothing downloaded).

Gemma 3 and Qwen2-VL images: bit-exact with the PIL-backend processors (Gemma3ImageProcessorPil,
Qwen2VLImageProcessorPil), which are what transformers uses when torchvision is absent, as here.
Qwen2-VL video: transformers 5.x has only a torchvision video processor. Without torchvision the
reference is its PIL image processor per frame, with the temporal patching written out below from
the reference's view + permute; with torchvision, the real video processor is compared too.
Whisper: WhisperFeatureExtractor on librosa-resampled audio; its numpy path to 1e-6, its torch
path (the default when torch is installed) to 1e-4, see whisper_features.py on why.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile
import torch
import transformers
from PIL import Image

from preprocess import (audio, gemma3_image, hf_config, hf_image, image, qwen2_vl_image, qwen2_vl_video,
                        whisper_features)
from preprocess.errors import MediaTooLarge

TOL = 1e-5

# Configs as the released checkpoints ship them (google/gemma-3-4b-it, Qwen/Qwen2.5-VL-7B-Instruct,
# Qwen/Qwen2-Audio-7B-Instruct preprocessor_config.json).
GEMMA3 = {
    "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": 256, "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": None,
    "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
    "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 0.00392156862745098,
    "size": {"height": 896, "width": 896},
}
QWEN25_VL = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
QWEN2_AUDIO = {
    "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
    "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
    "padding_value": 0.0, "processor_class": "Qwen2AudioProcessor", "return_attention_mask": True,
    "sampling_rate": 16000,
}
SMALL_QWEN = {**QWEN25_VL, "max_pixels": 28 * 28 * 64}  # so a 640x480 picture must shrink


def reference(name: str, cfg: dict):
    """transformers' PIL-backend processor `name` (5.x: <name>Pil; 4.x: the slow <name>)."""
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    return cls.from_dict(cfg)


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Gradients, a fine texture, noise and hard edges (every filter tap matters), in `mode`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([127.5 + 127.5 * np.sin(x * 0.9 + y * 0.2), 255 * x / max(width - 1, 1),
                    rng.integers(0, 256, (height, width))], axis=-1)
    rgb[height // 3: height // 2, width // 4: width // 2] = (250, 10, 128)  # an edge-rich block
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB")
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA"):
        # clear at the top, opaque at the bottom
        alpha = Image.fromarray((255 * y / max(height - 1, 1)).astype(np.uint8), "L")
        base = im if mode == "RGBA" else im.convert("L")
        base.putalpha(alpha)
        return base
    if mode == "P":  # a palette with one colour marked transparent
        pal = im.quantize(colors=16)
        pal.info["transparency"] = 3
        return pal
    if mode == "I;16":
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 200)  # Pillow names uint16 "I;16"
    return im.convert(mode)


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# --- shared steps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "I;16", "CMYK", "1"])
def test_to_rgb_is_transformers_convert_to_rgb(mode):
    from transformers.image_transforms import convert_to_rgb
    im = picture(37, 23, mode)
    np.testing.assert_array_equal(hf_image.to_rgb(im), convert_to_rgb(im, return_numpy=True))


def test_transparency_goes_on_white_unlike_the_builtin_pipeline():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert (hf_image.to_rgb(clear) == 255).all()  # image.load_image would give black here


def test_decode_image_keeps_mode_and_orientation():
    im = picture(40, 20, "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 20 x 40
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif)
    out = image.decode_image(buf.getvalue(), "image/png")
    assert out.mode == "RGBA" and out.size == (20, 40)


# --- Gemma 3 --------------------------------------------------------------------------------------

SIZES = [(3, 2), (300, 100), (90, 270), (333, 217), (1201, 901)]  # w, h: tiny, 3:1, tall, odd, large


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_gemma3_matches_reference(size, mode):
    im = picture(*size, mode)
    # The released config's do_convert_rgb is null, which transformers reads as off (see the next
    # test); we always convert, as the reference does with it on.
    ref = reference("Gemma3ImageProcessor", {**GEMMA3, "do_convert_rgb": True})(images=im,
                                                                              return_tensors="np")
    ours = gemma3_image.preprocess(im, gemma3_image.Gemma3ImageConfig.from_dict(GEMMA3))
    assert ours.shape == (3, 896, 896) and ours.dtype == np.float32
    assert max_abs(ours, ref["pixel_values"][0]) <= TOL
    assert list(ref["num_crops"]) == [0]


def test_released_gemma3_config_makes_the_reference_refuse_non_rgb():
    """Null do_convert_rgb: the reference passes RGB through unchanged and fails on anything else."""
    with pytest.raises(ValueError, match="mean must have"):
        reference("Gemma3ImageProcessor", GEMMA3)(images=picture(30, 20, "L"), return_tensors="np")
    cfg = gemma3_image.Gemma3ImageConfig.from_dict(GEMMA3)
    assert cfg.do_convert_rgb and gemma3_image.preprocess(picture(30, 20, "L"), cfg).shape == (3, 896, 896)


def test_gemma3_bicubic_and_other_size():
    cfg = {**GEMMA3, "do_convert_rgb": True, "resample": 3, "size": {"height": 224, "width": 320}}
    im = picture(333, 217, "P")
    ref = reference("Gemma3ImageProcessor", cfg)(images=im, return_tensors="np")["pixel_values"][0]
    ours = gemma3_image.preprocess(im, gemma3_image.Gemma3ImageConfig.from_dict(cfg))
    assert ours.shape == (3, 224, 320) and max_abs(ours, ref) <= TOL


def test_gemma3_array_input_equals_pil_input():
    im = picture(120, 80)
    cfg = gemma3_image.Gemma3ImageConfig.from_dict(GEMMA3)
    np.testing.assert_array_equal(gemma3_image.preprocess(np.asarray(im), cfg),
                                  gemma3_image.preprocess(im, cfg))


def test_gemma3_refuses_pan_and_scan_and_unknown_keys():
    with pytest.raises(ValueError, match="do_pan_and_scan"):
        gemma3_image.Gemma3ImageConfig.from_dict({**GEMMA3, "do_pan_and_scan": True})
    with pytest.raises(ValueError, match="do_magic"):
        gemma3_image.Gemma3ImageConfig.from_dict({**GEMMA3, "do_magic": True})


def test_gemma3_defaults_and_from_dir(tmp_path):
    assert gemma3_image.Gemma3ImageConfig.from_dict({}) == gemma3_image.Gemma3ImageConfig()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(GEMMA3))
    cfg = gemma3_image.Gemma3ImageConfig.from_dir(tmp_path)
    assert cfg.size == (896, 896) and cfg.resample == 2
    # transformers 5 saves processors nested in processor_config.json, which wins.
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"image_processor": {**GEMMA3, "size": {"height": 448, "width": 448}}}))
    assert gemma3_image.Gemma3ImageConfig.from_dir(tmp_path).size == (448, 448)


# --- Qwen2-VL images ------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,size", [
    (QWEN25_VL, (3, 2)),         # min_pixels: grows to 56 x 56
    (QWEN25_VL, (300, 100)),     # 3:1
    (QWEN25_VL, (90, 270)),      # tall
    (QWEN25_VL, (333, 217)),     # odd sides, rounded to multiples of 28
    (SMALL_QWEN, (640, 480)),    # over max_pixels: shrinks
    (SMALL_QWEN, (1201, 37)),    # very wide and over max_pixels
])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_qwen2_vl_image_matches_reference(cfg, size, mode):
    im = picture(*size, mode)
    ref = reference("Qwen2VLImageProcessor", {**cfg, "do_convert_rgb": True})(images=im, return_tensors="np")
    ours = qwen2_vl_image.preprocess(im, qwen2_vl_image.Qwen2VLImageConfig.from_dict(cfg))
    assert ours.grid_thw == tuple(ref["image_grid_thw"][0])
    assert ours.pixel_values.dtype == np.float32 and max_abs(ours.pixel_values, ref["pixel_values"]) <= TOL
    assert ours.grid_thw == qwen2_vl_image.image_grid(size[1], size[0],
                                                      qwen2_vl_image.Qwen2VLImageConfig.from_dict(cfg))


def test_qwen2_vl_image_over_max_pixels_and_token_count():
    im = picture(640, 480)
    cfg = qwen2_vl_image.Qwen2VLImageConfig.from_dict(SMALL_QWEN)
    out = qwen2_vl_image.preprocess(im, cfg)
    _, gh, gw = out.grid_thw
    assert gh * gw * 14 * 14 <= cfg.max_pixels < 640 * 480
    assert out.pixel_values.shape == (gh * gw, 3 * 2 * 14 * 14)
    assert out.num_tokens == gh * gw // 4


def test_qwen2_vl_size_dict_equals_min_max_pixels():
    newer = {k: v for k, v in QWEN25_VL.items() if k not in ("min_pixels", "max_pixels")}
    newer["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    assert (qwen2_vl_image.Qwen2VLImageConfig.from_dict(newer)
            == qwen2_vl_image.Qwen2VLImageConfig.from_dict(QWEN25_VL))
    assert qwen2_vl_image.Qwen2VLImageConfig.from_dict({}) == qwen2_vl_image.Qwen2VLImageConfig()


def test_smart_resize_matches_reference():
    try:  # transformers 5.x keeps a copy in the PIL module (its main module needs torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    rng = np.random.default_rng(0)
    sizes = [(h, w) for h, w in rng.integers(1, 5000, (400, 2)).tolist() if max(h, w) <= 200 * min(h, w)]
    for h, w in [*sizes, (14, 14), (42, 42), (70, 28), (1, 150), (1, 200)]:
        for lo, hi in [(3136, 12845056), (3136, 28 * 28 * 64), (100352, 602112)]:
            assert qwen2_vl_image.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi) == smart_resize(
                h, w, factor=28, min_pixels=lo, max_pixels=hi)
    with pytest.raises(ValueError, match="200"):
        qwen2_vl_image.smart_resize(1, 201, factor=28, min_pixels=3136, max_pixels=12845056)


# --- Qwen2-VL video -------------------------------------------------------------------------------

def video(t: int, width: int, height: int) -> np.ndarray:
    """uint8 [t, height, width, 3], every frame different."""
    return np.stack([np.asarray(picture(width, height, seed=i)) for i in range(t)])


def video_reference(frames: np.ndarray, cfg: dict) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The reference without torchvision: transformers' PIL image processor on each frame (resize,
    normalise, merge-block order), then temporal patches as the video processor's view + permute
    build them: frames padded with the last one, each row = for each channel, tp frames' patch pixels."""
    proc = reference("Qwen2VLImageProcessor", {**cfg, "temporal_patch_size": 1})
    per_frame = [proc(images=Image.fromarray(f), return_tensors="np") for f in frames]
    rows = np.stack([p["pixel_values"] for p in per_frame])  # [T, gh*gw, 3 * p * p]
    tp = cfg["temporal_patch_size"]
    rows = np.concatenate([rows, np.repeat(rows[-1:], -len(rows) % tp, axis=0)])
    t, n, d = rows.shape
    rows = rows.reshape(t // tp, tp, n, 3, d // 3).transpose(0, 2, 3, 1, 4)  # [gt, gh*gw, 3, tp, p*p]
    _, gh, gw = per_frame[0]["image_grid_thw"][0]
    return rows.reshape(t // tp * n, 3 * tp * (d // 3)), (t // tp, int(gh), int(gw))


@pytest.mark.parametrize("t,size", [(9, (168, 112)), (9, (333, 217)), (1, (90, 270)), (4, (640, 480))])
def test_qwen2_vl_video_matches_per_frame_reference(t, size):
    frames = video(t, *size)
    cfg = SMALL_QWEN if size == (640, 480) else QWEN25_VL
    ref_pixels, ref_grid = video_reference(frames, cfg)
    ours = qwen2_vl_video.preprocess(frames, qwen2_vl_video.Qwen2VLVideoConfig.from_dict(cfg), fps=2.0)
    assert ours.grid_thw == ref_grid and ours.grid_thw[0] == -(-t // 2)
    assert max_abs(ours.pixel_values, ref_pixels) <= TOL
    assert ours.second_per_grid_ts == 1.0 and ours.num_tokens == np.prod(ref_grid) // 4


def test_qwen2_vl_still_video_equals_image():
    """Two copies of one frame are what the image processor makes of that frame."""
    frame = np.asarray(picture(333, 217))
    cfg = qwen2_vl_video.Qwen2VLVideoConfig.from_dict(QWEN25_VL)
    vid = qwen2_vl_video.preprocess(np.stack([frame, frame]), cfg, fps=None)
    img = qwen2_vl_image.preprocess(frame, cfg.pixels)
    np.testing.assert_array_equal(vid.pixel_values, img.pixel_values)
    assert vid.grid_thw == img.grid_thw and vid.second_per_grid_ts == 2 / 24


def test_qwen2_vl_video_config_defaults_and_fallback(tmp_path):
    cfg = qwen2_vl_video.Qwen2VLVideoConfig.from_dict({})
    assert (cfg.pixels.min_pixels, cfg.pixels.max_pixels) == (128 * 28 * 28, 768 * 28 * 28)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN25_VL))
    assert qwen2_vl_video.Qwen2VLVideoConfig.from_dir(tmp_path).pixels.max_pixels == 12845056  # Qwen2.5-VL
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"fps": 2.0, "do_sample_frames": True, "min_frames": 4, "max_frames": 768, "size": None}))
    cfg = qwen2_vl_video.Qwen2VLVideoConfig.from_dir(tmp_path)
    assert cfg.fps == 2.0 and cfg.do_sample_frames and cfg.pixels.max_pixels == 768 * 28 * 28


def test_video_grid_and_pixel_cap_by_hand():
    capped = qwen2_vl_video.Qwen2VLVideoConfig(cap_pixels_per_frame=True)
    # No cap: 1080p shrinks to the 602112-pixel default, (560, 1008). With the cap, 400 frames share
    # 90% of 128000 tokens of 28 x 28 pixels: 2 * 90316800 // 400 = 451584 pixels a frame -> (504, 896);
    # 9 frames' share is above 602112, so the per-frame limit still rules.
    assert qwen2_vl_video.frame_size(400, 1080, 1920, qwen2_vl_video.Qwen2VLVideoConfig()) == (560, 1008)
    assert qwen2_vl_video.frame_size(400, 1080, 1920, capped) == (504, 896)
    assert qwen2_vl_video.frame_size(9, 1080, 1920, capped) == (560, 1008)
    assert qwen2_vl_video.video_grid(9, 1080, 1920, capped) == (5, 40, 72)


def test_sample_indices_by_hand():
    cfg = qwen2_vl_video.Qwen2VLVideoConfig()
    # 10 frames at 10 fps sampled at 2 fps: 2 frames, raised to min_frames 4, step 2.5.
    np.testing.assert_array_equal(qwen2_vl_video.sample_indices(10, 10.0, cfg, fps=2.0), [0, 2, 5, 7])
    # 300 frames at 30 fps, 2 fps: 20 frames, every 15th.
    np.testing.assert_array_equal(qwen2_vl_video.sample_indices(300, 30.0, cfg, fps=2.0),
                                  np.arange(0, 300, 15))
    # num_frames=5 with temporal_patch_size 2: round(2.5) is 2 (half to even), so 4 frames, step 1.75.
    np.testing.assert_array_equal(qwen2_vl_video.sample_indices(7, None, cfg, num_frames=5), [0, 1, 3, 5])
    np.testing.assert_array_equal(qwen2_vl_video.sample_indices(5, 25.0, cfg), np.arange(5))  # no rule: all
    # 107 frames at 30 fps, 15 fps: 53.5 -> 52 frames, but 107 / (107 / 52) rounds above 52, so the
    # reference's arange yields 53 positions; so do we (padding then makes 54).
    assert len(qwen2_vl_video.sample_indices(107, 30.0, cfg, fps=15.0)) == 53
    with pytest.raises(ValueError, match="cannot sample"):
        qwen2_vl_video.sample_indices(1, 30.0, cfg, fps=2.0)
    assert qwen2_vl_video.sampled_fps(20, 300, 30.0) == 2.0


def test_sample_positions_match_the_reference_arange():
    """The reference's positions are torch.arange(0, total, total / n).int() (float32)."""
    cfg = qwen2_vl_video.Qwen2VLVideoConfig()
    for total in range(2, 1200, 7):
        for n in range(2, total + 1, 2 * (1 + total // 80)):  # even: num_frames n stays n
            np.testing.assert_array_equal(qwen2_vl_video.sample_indices(total, None, cfg, num_frames=n),
                                          torch.arange(0, total, total / n).int().numpy())


@pytest.fixture
def torchvision_video_processor():
    """transformers 5.x's real Qwen2VLVideoProcessor; it needs torchvision, not in the test extras."""
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    return lambda cfg: Qwen2VLVideoProcessor.from_dict({"cap_pixels_per_frame": False, **cfg})


def test_qwen2_vl_video_matches_torchvision_processor_without_resize(torchvision_video_processor):
    frames = video(9, 168, 112)  # already multiples of 28 within the pixel limits: nothing resamples
    ref = torchvision_video_processor(QWEN25_VL)(videos=frames, return_tensors="np")
    ours = qwen2_vl_video.preprocess(frames, qwen2_vl_video.Qwen2VLVideoConfig.from_dict(QWEN25_VL), fps=2.0)
    assert ours.grid_thw == tuple(ref["video_grid_thw"][0]) == (5, 8, 12)
    assert max_abs(ours.pixel_values, ref["pixel_values_videos"]) <= TOL


def test_qwen2_vl_video_resize_differs_from_torchvision_by_rounding(torchvision_video_processor):
    """Where frames must be resampled, torchvision's uint8 bicubic and Pillow's round differently:
    a few levels of 255 in a small share of pixels (the documented, accepted difference)."""
    frames = video(5, 333, 217)
    cfg = {**QWEN25_VL, "cap_pixels_per_frame": True, "max_video_tokens": 200}  # the cap shrinks frames
    ref = torchvision_video_processor(cfg)(videos=frames, return_tensors="np")
    ours = qwen2_vl_video.preprocess(frames, qwen2_vl_video.Qwen2VLVideoConfig.from_dict(cfg), fps=2.0)
    assert ours.grid_thw == tuple(ref["video_grid_thw"][0])
    diff = np.abs(ours.pixel_values - ref["pixel_values_videos"])
    level = 1 / 255 / min(QWEN25_VL["image_std"])  # one uint8 step after normalising
    assert diff.max() <= 3 * level and (diff > TOL).mean() < 0.02


def test_qwen2_vl_video_grid_matches_torchvision_where_pixels_cannot(torchvision_video_processor):
    """640x480 -> 644x476 (height shrinks, width grows): torch's uint8 kernel strays up to ~25 levels
    from Pillow's here (see qwen2_vl_video.py), but the grid, hence the token count, is the same."""
    frames = video(3, 640, 480)
    ref = torchvision_video_processor({})(videos=frames, return_tensors="np")
    ours = qwen2_vl_video.preprocess(frames, qwen2_vl_video.Qwen2VLVideoConfig.from_dict({}), fps=2.0)
    assert ours.grid_thw == tuple(ref["video_grid_thw"][0]) == (2, 34, 46)
    assert ours.pixel_values.shape == ref["pixel_values_videos"].shape


def test_sample_indices_match_torchvision_processor(torchvision_video_processor):
    from transformers.video_utils import VideoMetadata
    proc = torchvision_video_processor({})
    cfg = qwen2_vl_video.Qwen2VLVideoConfig.from_dict({})
    for total in range(8, 900, 37):
        for video_fps, fps in ((30.0, 2.0), (24.0, 1.0), (25.0, 0.5), (60.0, 4.0)):
            ref = proc.sample_frames(metadata=VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps)
            ours = qwen2_vl_video.sample_indices(total, video_fps, cfg, fps=fps)
            np.testing.assert_array_equal(ours, ref.numpy())


# --- Whisper / Qwen2-Audio ------------------------------------------------------------------------

def tones(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t + 1.0) * (t % 1 < 0.5)
    return (x + 0.03 * rng.standard_normal(t.size)).astype(np.float32)


def whisper_reference(samples16k: np.ndarray, cfg: dict, *, numpy_path: bool, monkeypatch):
    from transformers.models.whisper import feature_extraction_whisper as fe_module
    if numpy_path:  # the extractor picks its torch STFT whenever torch is importable
        monkeypatch.setattr(fe_module, "is_torch_available", lambda: False)
    fe = transformers.WhisperFeatureExtractor.from_dict(cfg)
    return fe(samples16k, sampling_rate=16000, return_attention_mask=True, return_tensors="np")


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_whisper_matches_reference_at_any_rate(rate, monkeypatch):
    x = tones(3.3, rate)
    ours = whisper_features.extract(x, rate, whisper_features.WhisperFeatureConfig.from_dict(QWEN2_AUDIO))
    x16 = librosa_resample(x, rate)
    torch_ref = whisper_reference(x16, QWEN2_AUDIO, numpy_path=False, monkeypatch=monkeypatch)
    numpy_ref = whisper_reference(x16, QWEN2_AUDIO, numpy_path=True, monkeypatch=monkeypatch)
    assert ours.input_features.shape == (128, 3000) and ours.input_features.dtype == np.float32
    assert max_abs(ours.input_features, numpy_ref["input_features"][0]) <= 1e-6
    assert max_abs(ours.input_features, torch_ref["input_features"][0]) <= 1e-4
    np.testing.assert_array_equal(ours.attention_mask, torch_ref["attention_mask"][0])
    assert ours.valid_frames == -(-len(x16) // 160)


def test_whisper_80_bins(monkeypatch):
    x = tones(1.7, 16000, seed=3)
    ours = whisper_features.extract(x, 16000, whisper_features.WhisperFeatureConfig())
    ref = whisper_reference(x, {}, numpy_path=True, monkeypatch=monkeypatch)
    assert ours.input_features.shape == (80, 3000)
    assert max_abs(ours.input_features, ref["input_features"][0]) <= 1e-6


def test_whisper_over_30s_refused_or_truncated_like_reference(monkeypatch):
    x = tones(31.5, 16000, seed=4)
    cfg = whisper_features.WhisperFeatureConfig.from_dict(QWEN2_AUDIO)
    with pytest.raises(MediaTooLarge, match="at most 30 s"):
        whisper_features.extract(x, 16000, cfg)
    ref = whisper_reference(x, QWEN2_AUDIO, numpy_path=True, monkeypatch=monkeypatch)  # keeps the first 30 s
    ours = whisper_features.extract(x, 16000, cfg, truncate=True)
    assert ours.valid_frames == 3000 == ref["attention_mask"].sum()
    assert max_abs(ours.input_features, ref["input_features"][0]) <= 1e-6


def test_server_decoder_resamples_like_librosa():
    """audio.stream_samples (the server's decoder) yields librosa.resample's samples, bar the last zero."""
    x = tones(2.2, 44100, seed=5)
    buf = io.BytesIO()
    soundfile.write(buf, x, 44100, format="WAV", subtype="FLOAT")
    streamed = np.concatenate(list(audio.stream_samples(buf.getvalue(), "audio/wav", block_seconds=0.5)))
    expected = librosa_resample(x, 44100)
    assert 0 <= len(expected) - len(streamed) <= 1
    np.testing.assert_array_equal(streamed, expected[:len(streamed)])
    assert (expected[len(streamed):] == 0).all()


def test_qwen2_audio_token_count():
    assert whisper_features.qwen2_audio_tokens(3000) == 750  # 30 s
    assert whisper_features.qwen2_audio_tokens(330) == 82    # (330 - 1) // 2 + 1 = 165; (165 - 2) // 2 + 1
    assert whisper_features.qwen2_audio_tokens(1) == 0


def test_whisper_config_checks(tmp_path):
    assert whisper_features.WhisperFeatureConfig.from_dict(QWEN2_AUDIO).feature_size == 128
    with pytest.raises(ValueError, match="n_samples"):
        whisper_features.WhisperFeatureConfig.from_dict({**QWEN2_AUDIO, "n_samples": 160000})
    with pytest.raises(ValueError, match="dither"):
        whisper_features.WhisperFeatureConfig.from_dict({**QWEN2_AUDIO, "dither": 1e-4})
    (tmp_path / hf_config.PROCESSOR_FILE).write_text(json.dumps({"audio_processor": QWEN2_AUDIO}))
    assert whisper_features.WhisperFeatureConfig.from_dir(tmp_path).feature_size == 128


def librosa_resample(x: np.ndarray, rate: int) -> np.ndarray:
    import librosa
    return x if rate == 16000 else librosa.resample(x, orig_sr=rate, target_sr=16000)
