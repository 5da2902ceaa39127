"""A Gemma 3 multimodal hub directory, as transformers writes it, served by `ringserve serve --model DIR`.

The directory holds a tiny random Gemma3ForConditionalGeneration, a Gemma-3-layout tokenizer with
Gemma 3's chat template, and the processor's files (preprocessor_config.json). transformers is the
anchor end to end: its processor renders the same conversation and makes the pixels, its model
(image tokens attending each other both ways) generates greedily, and the server's prompt ids and
tokens for the same images must be those.
"""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from ringserve.v1 import inference_pb2 as pb
from serving import hf_greedy, modality_counts, served
from test_chat_template import GEMMA3
from test_gemma3_parity import _hf_gemma3
from test_hf_tokenizer import write_gemma
from test_server_e2e import run, token_ids

pytestmark = pytest.mark.e2e
torch.set_num_threads(2)

STEPS = 32
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=2, image_size=32, patch_size=4)
TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, sliding_window=12, sliding_window_pattern=3,
            query_pre_attn_scalar=12, max_position_embeddings=1024)
MM_TOKENS = 16  # more than the sliding window of 12: the window cuts into each image


def _png(seed: int, size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """A checkpoint directory as a user downloads one: model, tokenizer, processor files."""
    directory = write_gemma(tmp_path_factory.mktemp("gemma3"), GEMMA3)
    config_file = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    # How Gemma 3's tokenizer names its image tokens for the processor.
    tokenizer_config["extra_special_tokens"] = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                "image_token": "<image_soft_token>"}
    config_file.write_text(json.dumps(tokenizer_config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("boi_token_index", "<start_of_image>"), ("eoi_token_index", "<end_of_image>"),
        ("image_token_index", "<image_soft_token>"))}
    model = _hf_gemma3("conditional", seed=7, text=dict(TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
                       outer=dict(vision_config=VISION, mm_tokens_per_image=MM_TOKENS, **ids))
    model.generation_config.eos_token_id = None  # the server's ignore_eos, on their side
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    image_processor = transformers.Gemma3ImageProcessor(size={"height": 32, "width": 32})
    processor = transformers.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                             chat_template=GEMMA3, image_seq_length=MM_TOKENS)
    processor.save_pretrained(directory)
    return directory, model, processor


@pytest.fixture(scope="module")
def stub(hub_dir):
    with served("--model", str(hub_dir[0]), "--max-batch", "2", "--kv-cache-gib", "0.05",
                          "--prefill-chunk", "24", "--page-len", "4",
                          "--no-warmup") as stub:  # compiles only what the tests use
        yield stub


def _user(*parts) -> pb.Content:
    return pb.Content(role="user", parts=[
        pb.Part(text=p) if isinstance(p, str) else pb.Part(inline_data=pb.Blob(mime_type="image/png", data=p))
        for p in parts])


def _theirs(processor, model, parts, causal: bool = False) -> tuple[list[int], list[int]]:
    """transformers' prompt ids and greedy tokens for the same user turn (`causal`: without the
    image tokens' two-way attention, which token_type_ids turn on)."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else
               {"type": "image", "image": Image.open(io.BytesIO(p))} for p in parts]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    if causal:
        del inputs["token_type_ids"]
    return hf_greedy(model, inputs, STEPS)


def test_image_prompts_answer_with_transformers_tokens(stub, hub_dir):
    """One image, then two images of other sizes in one turn: the prompt has transformers' ids
    (CountTokens) and the greedy answer its tokens. Prefill runs in 24-token chunks, so the
    scheduler must keep each image's 16 rows in one chunk, and the first answer differs where
    the image tokens attend only causally, so the two-way attention is what it checks."""
    _, model, processor = hub_dir
    cases = [["Look: ", _png(1), "What is it?"],
             [_png(2, (64, 20)), "and", _png(3, (17, 50)), "Which is brighter?"]]
    assert _theirs(processor, model, cases[0], causal=True)[1] != _theirs(processor, model, cases[0])[1]
    for parts in cases:
        prompt, want = _theirs(processor, model, parts)
        contents = [_user(*parts)]
        counted = stub.CountTokens(pb.CountTokensRequest(contents=contents))
        assert counted.total_tokens == len(prompt)
        assert modality_counts(counted)["IMAGE"] == MM_TOKENS * (len(parts) - sum(isinstance(p, str) for p in parts))
        got = token_ids(run(stub, pb.GenerateRequest(contents=contents, generation_config=pb.GenerationConfig(
            max_output_tokens=STEPS, temperature=0, ignore_eos=True)), timeout=120))
        assert got == want


def test_video_and_audio_are_refused(stub):
    for mime in ("video/mp4", "audio/wav"):
        part = pb.Part(inline_data=pb.Blob(mime_type=mime, data=b"\0" * 64))
        with pytest.raises(grpc.RpcError) as error:
            stub.CountTokens(pb.CountTokensRequest(contents=[pb.Content(role="user", parts=[part])]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"takes no {mime.split('/')[0]} input" in error.value.details()
