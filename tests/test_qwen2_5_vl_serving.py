"""A Qwen2.5-VL hub directory, as transformers writes it, served by `ringserve serve --model DIR`.

The directory holds a tiny random Qwen2_5_VLForConditionalGeneration, a Qwen2-layout tokenizer
with Qwen2-VL's chat template, and the image processor's preprocessor_config.json; it is served
with the sequence striped over two devices and prefilled in 16-token chunks, so chunks cut
through the images' rows and every chunk carries its own M-RoPE columns. The anchor is
transformers: its image processor makes the patches and grids, the chat template is rendered by
its tokenizer, each <|image_pad|> is expanded to the grid's token count (what
Qwen2_5_VLProcessor does; the processor class itself needs torchvision, absent here), and its
model generates greedily. The server's tokens for the same images must be those tokens.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from ringserve.v1 import inference_pb2 as pb
from serving import hf_greedy, modality_counts, served
from test_chat_template import QWEN2_VL
from test_hf_tokenizer import write_qwen
from test_server_e2e import run, token_ids

pytestmark = pytest.mark.e2e
torch.set_num_threads(2)

STEPS = 10
PATCH, MERGE = 8, 2
VISION = dict(depth=2, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
              temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1], tokens_per_second=2)
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
                "--kv-cache-gib", "0.02", "--prefill-chunk", "16", "--page-len", "4") as stub:
        yield stub


def _parts(items) -> list[pb.Part]:
    return [pb.Part(text=p) if isinstance(p, str) else
            pb.Part(inline_data=pb.Blob(mime_type="image/png", data=_png(p))) for p in items]


def _theirs(hub_dir, turns) -> tuple[list[int], list[int]]:
    """transformers' prompt ids and greedy tokens: turns are (role, [text or PIL image, ...])."""
    _, model, tokenizer, image_processor = hub_dir
    messages = [{"role": "assistant" if role == "model" else role,
                 "content": [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in items]}
                for role, items in turns]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [p for _, items in turns for p in items if not isinstance(p, str)]
    inputs = {}
    if images:
        inputs = dict(image_processor(images=images, return_tensors="pt"))
        counts = (inputs["image_grid_thw"].prod(-1) // MERGE ** 2).tolist()
        pieces = text.split("<|image_pad|>")
        text = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    image_id = model.config.image_token_id
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_id).int())
    return hf_greedy(model, inputs, STEPS)


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
    turns = CASES[name]
    prompt, want = _theirs(hub_dir, turns)
    contents = [pb.Content(role=role, parts=_parts(items)) for role, items in turns]
    counted = stub.CountTokens(pb.CountTokensRequest(contents=contents))
    assert counted.total_tokens == len(prompt)
    assert modality_counts(counted)["IMAGE"] == prompt.count(hub_dir[1].config.image_token_id)
    assert token_ids(_ours(stub, turns)) == want
    assert len(set(want)) > 2  # an answer that moves


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
    video = pb.Part(inline_data=pb.Blob(mime_type="video/mp4", data=b"\0" * 64))
    with pytest.raises(grpc.RpcError) as error:
        stub.CountTokens(pb.CountTokensRequest(contents=[pb.Content(role="user", parts=[video])]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "takes no video" in error.value.details()
    assert len(token_ids(_ours(stub, [("user", ["still here"])]))) == STEPS
