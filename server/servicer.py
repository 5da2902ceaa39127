"""The `ringserve.v1.Inference` service: validation in, events out. No arrays cross this file."""

from __future__ import annotations

import asyncio
import time

import grpc

from ringserve.v1 import inference_pb2 as pb
from ringserve.v1 import inference_pb2_grpc as pb_grpc
from server.errors import RequestError, abort
from server.runtime import Runtime
from server.validation import render_prompt, validate_generate

_FINISH = {name: pb.GenerateResponse.FinishReason.Value(name)
           for name in ("STOP", "MAX_TOKENS", "STOP_SEQUENCE", "CANCELLED")}


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, runtime: Runtime):
        self._rt = runtime

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        received = time.monotonic()
        try:
            # Tokenising a long prompt is CPU work: keep it off the event loop.
            work = await asyncio.to_thread(validate_generate, request, self._rt.tokenizer,
                                           self._rt.limits)
            stream = self._rt.engine_loop.submit(work, received)
        except RequestError as error:
            await abort(context, error)
            return
        ttft = None
        try:
            async for event in stream:
                if event.error is not None:
                    await abort(context, event.error)
                if event.first_token_time is not None:
                    ttft = event.first_token_time - received
                final = event.finish_reason is not None
                if not (final or event.text or event.token_ids):
                    continue
                response = pb.GenerateResponse(request_id=work.request_id, text=event.text,
                                               token_ids=event.token_ids)
                if ttft is not None and (event.first_token_time is not None or final):
                    response.time_to_first_token.FromNanoseconds(int(ttft * 1e9))
                if final:
                    response.finish_reason = _FINISH[event.finish_reason]
                    response.usage_metadata.CopyFrom(pb.UsageMetadata(
                        prompt_token_count=event.prompt_tokens,
                        candidates_token_count=event.generated_tokens,
                        cached_content_token_count=0,
                        total_token_count=event.prompt_tokens + event.generated_tokens))
                yield response
        finally:
            # Client cancel, disconnect, deadline and shutdown all land here: free the slot now.
            stream.cancel()

    async def CountTokens(self, request: pb.CountTokensRequest, context):
        try:
            ids = await asyncio.to_thread(render_prompt, request, self._rt.tokenizer)
        except RequestError as error:
            await abort(context, error)
            return
        return pb.CountTokensResponse(total_tokens=len(ids))

    async def GetModelInfo(self, request, context):
        rt = self._rt
        return pb.ModelInfo(
            name=rt.model_name,
            input_token_limit=rt.limits.context_length,
            output_token_limit=rt.limits.context_length - 1,
            vocab_size=rt.config.vocab_size,
            supported_modalities=[pb.TEXT],
            parameter_count=rt.param_count,
            dtype=rt.config.dtype,
        )

    async def GetStats(self, request, context):
        stats = self._rt.engine_loop.stats()
        return pb.ServerStats(
            running_requests=stats.running,
            waiting_requests=stats.waiting,
            decode_slots=stats.slots,
            prompt_tokens_total=stats.prompt_tokens,
            generated_tokens_total=stats.generated_tokens,
            finished_requests=dict(stats.finished),
        )
