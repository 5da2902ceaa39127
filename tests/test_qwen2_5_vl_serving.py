"""A Qwen2.5-VL hub directory, as transformers writes it, served by `ringserve serve --model DIR`.

The directory holds a tiny random Qwen2_5_VLForConditionalGeneration, a Qwen2-layout tokenizer
with Qwen2-VL's chat template, and the image processor's preprocessor_config.json; it is served
with the sequence striped over two devices and prefilled in 16-token chunks, so chunks cut
through the images' rows and every chunk carries its own M-RoPE columns. The anchor is
transformers: its image processor makes the patches and grids, the chat template is rendered by
its tokenizer, each <|image_pad|> is expanded to the grid's token count (what
Qwen2_5_VLProcessor does; the processor class itself needs torchvision, absent here), and its
model generates greedily. The server's tokens for the same images must be those tokens.
Videos: the frames the server samples (its ffmpeg reader at the request's fps) go through
preprocess/qwen2_vl_video.py (checked against transformers in test_hf_processors.py) into
transformers' model with their grid and seconds per temporal patch.
"""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from _media import video
from preprocess import qwen2_vl_video
from preprocess import video as video_lib
from ringserve.v1 import inference_pb2 as pb
from serving import hf_greedy, modality_counts, served
from test_chat_template import QWEN2_VL
from test_hf_tokenizer import write_qwen
from test_server_e2e import run, token_ids

pytestmark = pytest.mark.e2e
torch.set_num_threads(2)

STEPS = 32
PATCH, MERGE = 8, 2
VISION = dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
              temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1], tokens_per_second=1)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.3,
            rope_parameters=dict(rope_type="default", rope_theta=10_000.0, mrope_section=[1, 1, 2]))
PROCESSOR = dict(min_pixels=PATCH * PATCH * 4, max_pixels=(PATCH * MERGE) ** 2 * 24, patch_size=PATCH,
                 temporal_patch_size=2, merge_size=MERGE)


def _picture(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """A checkpoint directory as a user downloads one: model, tokenizer and template, processor."""
    directory = write_qwen(tmp_path_factory.mktemp("qwen2_5_vl"), chat_template=QWEN2_VL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
           for name in ("image_pad", "video_pad", "vision_start", "vision_end")}
    torch.manual_seed(5)
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(out_hidden_size=TEXT["hidden_size"], **VISION),
        text_config=dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=ids["vision_end"], **TEXT),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tower's biases and norms too: rows that differ
            if "visual" in name:
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
        model.lm_head.weight.mul_(0.5)
    model.generation_config.eos_token_id = None  # the server's ignore_eos, on their side
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    image_processor = transformers.Qwen2VLImageProcessorPil.from_dict(PROCESSOR)
    image_processor.save_pretrained(directory)
    return directory, model, tokenizer, image_processor


@pytest.fixture(scope="module")
def stub(hub_dir):
    with served("--model", str(hub_dir[0]), "--mesh", "sequence=2", "--max-batch", "2",
                "--kv-cache-gib", "0.02", "--prefill-chunk", "16", "--page-len", "4",
                "--no-warmup") as stub:  # compiles only what the tests use
        yield stub


FPS = 4.0  # the videos' sampling rate, as requests ask for it


def _part(item) -> pb.Part:
    if isinstance(item, str):
        return pb.Part(text=item)
    if isinstance(item, Path):
        return pb.Part(inline_data=pb.Blob(mime_type="video/mp4", data=item.read_bytes()),
                       video_metadata=pb.VideoMetadata(fps=FPS))
    return pb.Part(inline_data=pb.Blob(mime_type="image/png", data=_png(item)))


def _parts(items) -> list[pb.Part]:
    return [_part(p) for p in items]


def _video_inputs(directory: Path, path: Path) -> dict:
    """transformers' video inputs for the frames the server samples from `path`."""
    info = video_lib.probe_video(path, "video/mp4")
    frames = np.concatenate([chunk for _, chunk in video_lib.frames(path, info, size=None, fps=FPS)])
    patches = qwen2_vl_video.preprocess(frames, qwen2_vl_video.Qwen2VLVideoConfig.from_dir(directory), fps=FPS)
    return dict(pixel_values_videos=torch.from_numpy(patches.pixel_values),
                video_grid_thw=torch.tensor([patches.grid_thw]),
                second_per_grid_ts=torch.tensor([patches.second_per_grid_ts]))


def _theirs(hub_dir, turns) -> tuple[list[int], list[int]]:
    """transformers' prompt ids and greedy tokens: turns are (role, [text or PIL image, ...])."""
    directory, model, tokenizer, image_processor = hub_dir

    def kind(p):
        return "text" if isinstance(p, str) else "video" if isinstance(p, Path) else "image"

    messages = [{"role": "assistant" if role == "model" else role,
                 "content": [{"type": "text", "text": p} if kind(p) == "text" else {"type": kind(p)} for p in items]}
                for role, items in turns]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    items = [p for _, turn in turns for p in turn]
    inputs = {}
    images = [p for p in items if kind(p) == "image"]
    if images:
        inputs.update(image_processor(images=images, return_tensors="pt"))
        text = _expand(text, "<|image_pad|>", inputs["image_grid_thw"])
    videos = [p for p in items if kind(p) == "video"]
    if videos:
        assert len(videos) == 1
        inputs.update(_video_inputs(directory, videos[0]))
        text = _expand(text, "<|video_pad|>", inputs["video_grid_thw"])
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    config = model.config
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=((ids == config.image_token_id) * 1 + (ids == config.video_token_id) * 2).int())
    return hf_greedy(model, inputs, STEPS)


def _expand(text: str, token: str, grids: torch.Tensor) -> str:
    """What Qwen2_5_VLProcessor does to the rendered template: the i-th `token` becomes as many
    as the i-th grid has merged patches."""
    counts = (grids.prod(-1) // MERGE ** 2).tolist()
    pieces = text.split(token)
    return pieces[0] + "".join(token * n + rest for n, rest in zip(counts, pieces[1:]))


def _ours(stub, turns, **request) -> list[pb.GenerateResponse]:
    contents = [pb.Content(role=role, parts=_parts(items)) for role, items in turns]
    return run(stub, pb.GenerateRequest(contents=contents, generation_config=pb.GenerationConfig(
        max_output_tokens=STEPS, temperature=0, ignore_eos=True), **request), timeout=120)


CASES = {
    "one image": [("user", [_picture(64, 48, 1), "What is in the picture?"])],
    "two sizes, text between": [("user", ["Compare", _picture(40, 80, 2), "with", _picture(72, 56, 3), "please."])],
    "the same image twice, two turns": [
        ("user", [_picture(48, 48, 4), "Describe it."]), ("model", ["A square."]),
        ("user", ["And this one?", _picture(48, 48, 4)])],
}


@pytest.mark.parametrize("name", list(CASES))
def test_image_prompts_answer_with_transformers_tokens(stub, hub_dir, name):
    """The prompt has transformers' ids (CountTokens, by modality) and the greedy answer its
    tokens: M-RoPE positions through chunked, striped prefill and decode."""
    _check(stub, hub_dir, CASES[name])


def _check(stub, hub_dir, turns) -> None:
    prompt, want = _theirs(hub_dir, turns)
    contents = [pb.Content(role=role, parts=_parts(items)) for role, items in turns]
    counted = stub.CountTokens(pb.CountTokensRequest(contents=contents))
    assert counted.total_tokens == len(prompt)
    config = hub_dir[1].config
    counts = modality_counts(counted)
    assert counts.get("IMAGE", 0) == prompt.count(config.image_token_id)
    assert counts.get("VIDEO", 0) == prompt.count(config.video_token_id)
    assert token_ids(_ours(stub, turns)) == want
    assert len(set(want)) > 2  # an answer that moves


def test_a_video_answers_with_transformers_tokens(stub, hub_dir, tmp_path):
    """A 5 s clip sampled at 4 fps: 20 frames in ten temporal patches of two, whose temporal
    positions are tokens_per_second (1) x 0.5 s x i, truncated (0, 0, 1, 1, ..., 4); text
    before and after it. The frame's merged grid is 4 x 6, so the last temporal position stays
    under 6, where transformers 5.3+ and Qwen's rule resume the text alike (model/qwen2_5_vl.py)."""
    clip = video(tmp_path / "clip.mp4", 5.0, fps=8, size="96x64")
    _check(stub, hub_dir, [("user", ["Watch", clip, "What moves?"])])


def test_a_cached_image_context_answers_as_the_whole_prompt(stub, hub_dir):
    """A named cache holding an image, then a question on it: the cache's pinned pages carry the
    image's M-RoPE positions, and the question's tokens turn after them as in one prompt."""
    image = _picture(56, 64, 6)
    cache = stub.CreateCache(pb.CreateCacheRequest(contents=[pb.Content(role="user", parts=_parts([image, "Look."]))]))
    try:
        question = [("model", ["I see it."]), ("user", ["What colour dominates?"])]
        got = _ours(stub, question, cached_content=cache.name)
        _, want = _theirs(hub_dir, [("user", [image, "Look."]), *question])
        assert token_ids(got) == want
        assert got[-1].usage_metadata.cached_content_token_count >= cache.pinned_token_count > 0
    finally:
        stub.DeleteCache(pb.DeleteCacheRequest(name=cache.name))


def test_bad_media_is_refused_and_the_server_goes_on(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.CountTokens(pb.CountTokensRequest(contents=[pb.Content(role="user", parts=_parts([_picture(800, 2, 7)]))]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents[0].parts[0].inline_data" in error.value.details() and "aspect" in error.value.details()
    sound = pb.Part(inline_data=pb.Blob(mime_type="audio/wav", data=b"\0" * 64))
    with pytest.raises(grpc.RpcError) as error:
        stub.CountTokens(pb.CountTokensRequest(contents=[pb.Content(role="user", parts=[sound])]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "takes no audio" in error.value.details()
    assert len(token_ids(_ours(stub, [("user", ["still here"])]))) == STEPS


def test_a_processor_that_cuts_other_patches_is_named(hub_dir, tmp_path):
    import json
    import shutil

    from model import qwen2_5_vl
    from server.runtime import load_image_processor, load_video_processor

    directory = tmp_path / "model"
    shutil.copytree(hub_dir[0], directory)
    config = qwen2_5_vl.model_config(json.loads((directory / "config.json").read_text()))
    assert load_image_processor(directory, config).patch_size == PATCH
    assert load_video_processor(directory, config).pixels.merge_size == MERGE
    raw = json.loads((directory / "preprocessor_config.json").read_text())
    (directory / "preprocessor_config.json").write_text(json.dumps({**raw, "patch_size": 14}))
    with pytest.raises(ValueError, match=r"image processor cuts .* \(14, 2, 2\); the vision tower takes \(8, 2, 2\)"):
        load_image_processor(directory, config)
    with pytest.raises(ValueError, match="video processor cuts"):
        load_video_processor(directory, config)
