"""The SDK's media parts and uploads against the real server (tests/test_client_media.py covers
request building against a wire-level fake)."""

from __future__ import annotations

import asyncio
import math

import pytest

import _media
import ringserve
from ringserve import Audio, Image, Video


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdk-media")
    (root / "cat.png").write_bytes(_media.png(seed=5))
    (root / "tone.wav").write_bytes(_media.wav(140.0))  # 4.5 MB: above the inline budget
    _media.video(root / "clip.mp4", 6)
    return root


def test_parts_inline_and_uploaded(server_target, files):
    with ringserve.Client(server_target, timeout=120) as client:
        info = client.model_info()
        tpi, tps = info.tokens_per_image, info.audio_tokens_per_second
        cat = Image.from_file(files / "cat.png")
        tone = Audio.from_file(files / "tone.wav")
        clip = Video.from_file(files / "clip.mp4", start_offset=1, end_offset=5, fps=2)

        detail = client.count_tokens_detail([["Look and listen:", cat, tone, clip]])
        assert detail.prompt_tokens_details["IMAGE"] == tpi
        assert detail.prompt_tokens_details["AUDIO"] == 140 * tps + 4 * tps
        assert detail.prompt_tokens_details["VIDEO"] == 8 * tpi
        assert sum(detail.prompt_tokens_details.values()) == detail.total_tokens
        # The large sound went up once as an upload; the image and the clip went inline.
        uploads = client.list_media()
        assert [m.modality for m in uploads] == ["AUDIO"]
        assert math.isclose(uploads[0].duration, 140.0, abs_tol=0.01)

        result = client.generate_text([["Look and listen:", cat, tone, clip]],
                                      max_output_tokens=4, temperature=0)
        assert result.usage.prompt_token_count == detail.total_tokens
        assert result.usage.prompt_tokens_details == detail.prompt_tokens_details
        assert len(client.list_media()) == 1  # reused, not uploaded again
        client.delete_media(uploads[0])
        assert client.list_media() == []


def test_async_upload_and_generate(server_target, files):
    async def main():
        async with ringserve.AsyncClient(server_target, timeout=120) as client:
            info = await client.upload_media(files / "clip.mp4", display_name="clip")
            assert info.modality == "VIDEO" and info.width == 64 and info.height == 48
            assert math.isclose(info.duration, 6.0, abs_tol=0.05)
            clip = Video.from_upload(info, fps=1)
            result = await client.generate_text([[clip, "What is shown?"]], max_output_tokens=3,
                                                temperature=0)
            await client.delete_media(info)
            return info, result

    info, result = asyncio.run(main())
    assert result.usage.prompt_tokens_details["VIDEO"] == 6 * 16
    assert result.finish_reason == "MAX_TOKENS"
    assert info.token_count > 6 * 16


def test_bad_media_is_invalid_argument(server_target, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with ringserve.Client(server_target, timeout=60) as client:
        with pytest.raises(ringserve.errors.InvalidArgument, match=r"parts\[1\]"):
            client.count_tokens([["See:", Image.from_file(broken)]])
