"""A Qwen2-Audio hub directory, as transformers writes it, served by `ringserve serve --model DIR`.

The directory holds a tiny random Qwen2AudioForConditionalGeneration, a Qwen2-layout tokenizer,
and the processor's files (preprocessor_config.json, the chat template); it is served on a 2 x 2
sequence/tensor mesh. The anchor is
transformers end to end: its processor renders the same conversation and extracts the features,
its model generates greedily, and the server's tokens for the same audio must be those tokens.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import soundfile
import torch
import transformers

from model.config import ModelConfig
from ringserve.v1 import inference_pb2 as pb
from serving import hf_greedy, modality_counts, served
from server.runtime import load_audio_features
from test_hf_tokenizer import write_qwen
from test_server_e2e import run, token_ids

pytestmark = pytest.mark.e2e
torch.set_num_threads(2)

STEPS = 32
AUDIO_CONFIG = dict(num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                    encoder_ffn_dim=128, max_source_positions=1500)
TEXT_CONFIG = dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                   initializer_range=0.3)  # logits of a few units: greedy tokens that vary


def _clip(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Noise under a rising tone: every frame differs."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (200 + 40 * t) * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)


def _wav(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="WAV", subtype="FLOAT")  # the exact floats
    return out.getvalue()


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """A checkpoint directory as a user downloads one: model, tokenizer, processor files."""
    directory = write_qwen(tmp_path_factory.mktemp("qwen2_audio"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    torch.manual_seed(3)
    config = transformers.Qwen2AudioConfig(
        audio_config=AUDIO_CONFIG, text_config=dict(vocab_size=len(tokenizer), **TEXT_CONFIG),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    model.generation_config.eos_token_id = None  # the server's ignore_eos, on their side
    model.save_pretrained(directory)
    features = transformers.WhisperFeatureExtractor(feature_size=128)
    # No chat_template given: the processor's own (Qwen2-Audio's "Audio N: <|audio_bos|>...").
    processor = transformers.Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer)
    processor.save_pretrained(directory)
    return directory, model, processor


@pytest.fixture(scope="module")
def stub(hub_dir):
    # Sequence- and tensor-sharded over 2 x 2 CPU devices, prefilled in 64-token chunks (across
    # each clip's rows): every answer below must still be transformers'.
    with served("--model", str(hub_dir[0]), "--mesh", "sequence=2,tensor=2", "--max-batch", "2",
                "--kv-cache-gib", "0.05", "--prefill-chunk", "64", "--page-len", "8",
                "--no-warmup") as stub:  # compiles only what the tests use
        yield stub


def _user(*parts) -> pb.Content:
    return pb.Content(role="user", parts=[
        pb.Part(text=p) if isinstance(p, str) else
        pb.Part(inline_data=pb.Blob(mime_type="audio/wav", data=_wav(*p))) for p in parts])


def _theirs(processor, model, parts) -> tuple[list[int], list[int]]:
    """transformers' prompt ids and greedy tokens for the same user turn (audio resampled to
    16 kHz with librosa, as Qwen2-Audio's model card does)."""
    import librosa

    content, audio = [], []
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        else:
            samples, rate = part
            content.append({"type": "audio"})
            audio.append(samples if rate == 16_000 else librosa.resample(samples, orig_sr=rate, target_sr=16_000))
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=text, audio=audio, sampling_rate=16_000, return_tensors="pt")
    return hf_greedy(model, inputs, STEPS)


def test_audio_prompts_answer_with_transformers_tokens(stub, hub_dir):
    """One clip, two clips at other rates in one turn, and a whole 30 s window at 48 kHz: the
    prompt has transformers' ids (CountTokens) and the greedy answer its tokens."""
    _, model, processor = hub_dir
    cases = [
        ["What is this sound?", (_clip(3.0, 16_000, 1), 16_000)],
        [(_clip(2.5, 22_050, 2), 22_050), "Compare it with", (_clip(4.2, 44_100, 3), 44_100), "Which is louder?"],
        ["Summarise the recording.", (_clip(30.0, 48_000, 8), 48_000)],  # one whole 30 s window
    ]
    for parts in cases:
        prompt, want = _theirs(processor, model, parts)
        contents = [_user(*parts)]
        counted = stub.CountTokens(pb.CountTokensRequest(contents=contents))
        assert counted.total_tokens == len(prompt)
        audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
        assert modality_counts(counted)["AUDIO"] == prompt.count(audio_id)
        got = token_ids(run(stub, pb.GenerateRequest(contents=contents, generation_config=pb.GenerationConfig(
            max_output_tokens=STEPS, temperature=0, ignore_eos=True)), timeout=120))
        assert got == want


def test_audio_past_one_window_is_laid_out_window_by_window(stub):
    """40 s: a full 30 s window (750 rows) and a 10 s one (250), set off by <|audio_eos|>
    <|audio_bos|>; the answer runs to its length."""
    short = stub.CountTokens(pb.CountTokensRequest(contents=[_user((_clip(10.0, 16_000, 4), 16_000))]))
    long = stub.CountTokens(pb.CountTokensRequest(contents=[_user((_clip(40.0, 16_000, 4), 16_000))]))
    assert modality_counts(short)["AUDIO"] == 250 and modality_counts(long)["AUDIO"] == 750 + 250
    assert long.total_tokens - short.total_tokens == 750 + 2
    responses = run(stub, pb.GenerateRequest(contents=[_user((_clip(40.0, 16_000, 4), 16_000), "Summarise.")],
                                             generation_config=pb.GenerationConfig(
                                                 max_output_tokens=4, temperature=0, ignore_eos=True)), timeout=180)
    assert len(token_ids(responses)) == 4


def test_bad_audio_is_refused_and_the_server_goes_on(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.CountTokens(pb.CountTokensRequest(contents=[_user((_clip(0.01, 16_000, 5), 16_000))]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents[0].parts[0].inline_data" in error.value.details() and "too short" in error.value.details()
    video = pb.Part(inline_data=pb.Blob(mime_type="video/mp4", data=b"\0" * 64))
    with pytest.raises(grpc.RpcError) as error:
        stub.CountTokens(pb.CountTokensRequest(contents=[pb.Content(role="user", parts=[video])]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "takes no video" in error.value.details()
    ok = stub.CountTokens(pb.CountTokensRequest(contents=[_user("still here")]))
    assert ok.total_tokens > 0


def test_missing_feature_extractor_config_is_named(hub_dir, tmp_path):
    directory = hub_dir[0]
    config = ModelConfig.from_hf_config(__import__("json").loads((directory / "config.json").read_text()))
    assert load_audio_features(directory, config).feature_size == 128
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        load_audio_features(tmp_path, config)


def test_prefix_cache_is_keyed_by_the_audio(stub):
    """The same clip again is served from the prefix cache past its rows; another clip of the
    same length (the same number of rows) is not."""
    def usage(wav: bytes):
        part = pb.Part(inline_data=pb.Blob(mime_type="audio/wav", data=wav))
        request = pb.GenerateRequest(contents=[pb.Content(role="user", parts=[part, pb.Part(text="Describe it.")])],
                                     generation_config=pb.GenerationConfig(max_output_tokens=1, temperature=0))
        return run(stub, request)[-1].usage_metadata

    # Bytes made once: a float WAV's PEAK chunk holds the time it was written.
    clip, other_clip = _wav(_clip(5.0, 16_000, 6), 16_000), _wav(_clip(5.0, 16_000, 7), 16_000)
    first, again, other = usage(clip), usage(clip), usage(other_clip)
    assert modality_counts(first)["AUDIO"] == modality_counts(other)["AUDIO"]
    before_audio = 27  # the system turn, "<|im_start|>user\nAudio 1: <|audio_bos|>"
    assert again.cached_content_token_count >= first.prompt_token_count - 16
    assert first.cached_content_token_count <= before_audio and other.cached_content_token_count <= before_audio


def test_an_uploaded_clip_answers_as_the_inline_one(stub):
    """UploadMedia, then the clip by its id: the same prompt length and greedy tokens as inline."""
    from test_media_e2e import upload

    wav = _wav(_clip(6.0, 22_050, 9), 22_050)
    media = upload(stub, wav, "audio/wav")
    config = pb.GenerationConfig(max_output_tokens=STEPS, temperature=0, ignore_eos=True)
    by_id = pb.Content(role="user", parts=[pb.Part(file_data=pb.FileData(file_uri=media.name)), pb.Part(text="Hm?")])
    inline = pb.Content(role="user", parts=[pb.Part(inline_data=pb.Blob(mime_type="audio/wav", data=wav)),
                                            pb.Part(text="Hm?")])
    try:
        uploaded = run(stub, pb.GenerateRequest(contents=[by_id], generation_config=config), timeout=120)
        direct = run(stub, pb.GenerateRequest(contents=[inline], generation_config=config), timeout=120)
        assert media.token_count == modality_counts(uploaded[-1].usage_metadata)["AUDIO"] + 2
        assert token_ids(uploaded) == token_ids(direct)
        assert uploaded[-1].usage_metadata.prompt_token_count == direct[-1].usage_metadata.prompt_token_count
    finally:
        stub.DeleteMedia(pb.DeleteMediaRequest(name=media.name))
