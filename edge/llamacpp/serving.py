"""llama.cpp server JSON <-> velesio.v1 gRPC: /completion (streamed as `data:` lines), tokenizer, props."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import Response

from edge import sse
from edge.broker import BrokerClient, forwarded_metadata
from edge.embed import embed
from edge.errors import ApiError, bad_request
from edge.jobs import JobStream, TextResult, run_text
from edge.llamacpp.protocol import (
    ApplyTemplateBody,
    CompletionBody,
    CompletionPart,
    CompletionResult,
    DefaultGenerationSettings,
    DetokenizeBody,
    DetokenizeResult,
    EmbeddingBody,
    EmbeddingResult,
    ErrorDetail,
    ErrorResponse,
    GenerationSettings,
    Health,
    Modalities,
    PromptResult,
    Props,
    StopType,
    TemplateResult,
    Timings,
    TokenizeBody,
    TokenizeResult,
    TokenPiece,
    TokenProbability,
    TopProbability,
)
from edge.routing import renderer
from edge.wire import token_id
from mesh.version import VERSION
from velesio.v1 import common_pb2, events_pb2, inference_pb2

STOP_TYPES: dict[int, StopType] = {
    common_pb2.FINISH_REASON_STOP: "eos",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "word",
    common_pb2.FINISH_REASON_LENGTH: "limit",
}
SAMPLING_FIELDS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
    "presence_penalty", "frequency_penalty", "seed",
)  # fmt: skip


def sampling(body: CompletionBody) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        stop=body.stop,
        grammar=body.grammar,
        json_schema=json.dumps(body.json_schema) if body.json_schema else "",
        logprobs=body.n_probs,
        ignore_eos=body.ignore_eos,
        max_tokens=body.n_predict,
    )
    for name in SAMPLING_FIELDS:
        value = getattr(body, name)
        if value is not None:
            setattr(params, name, value)
    bias = body.logit_bias or {}
    pairs = bias.items() if isinstance(bias, dict) else [(p[0], p[1]) for p in bias if len(p) == 2]
    for token, value in pairs:
        number = token_id(token)
        if number is None or isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request("logit_bias takes [token_id, bias] pairs", "logit_bias")
        try:
            bias_value = float(value)
        except OverflowError:  # a JSON integer of hundreds of digits
            raise bad_request("logit_bias values must be finite numbers", "logit_bias") from None
        params.logit_bias[number] = bias_value
    return params


def probabilities(entries: list[events_pb2.TokenLogprob]) -> list[TokenProbability]:
    return [
        TokenProbability(
            id=e.token_id,
            token=e.token,
            bytes=list(e.bytes),
            logprob=e.logprob,
            top_logprobs=[
                TopProbability(id=t.token_id, token=t.token, bytes=list(t.bytes), logprob=t.logprob)
                for t in e.top_logprobs
            ],
        )
        for e in entries
    ]


def final(result: TextResult, body: CompletionBody, prompt: str, content: str) -> CompletionResult:
    done = result.done
    timings = done.timings
    prompt_n = done.usage.prompt_tokens - done.usage.cached_tokens
    predicted_n = done.usage.completion_tokens
    return CompletionResult(
        content=content,
        id_slot=max(body.id_slot, 0),
        model=result.model,
        tokens_predicted=predicted_n,
        tokens_evaluated=done.usage.prompt_tokens,
        tokens_cached=done.usage.cached_tokens,
        prompt=prompt,
        stop_type=STOP_TYPES.get(done.finish_reason, "none"),
        stopping_word=done.stopping_word,
        generation_settings=GenerationSettings(
            n_predict=body.n_predict, seed=body.seed if body.seed is not None else -1
        ),
        timings=Timings(
            prompt_n=prompt_n,
            prompt_ms=timings.prompt_ms,
            prompt_per_token_ms=timings.prompt_ms / prompt_n if prompt_n else 0.0,
            prompt_per_second=timings.prompt_per_second,
            predicted_n=predicted_n,
            predicted_ms=timings.predicted_ms,
            predicted_per_token_ms=timings.predicted_ms / predicted_n if predicted_n else 0.0,
            predicted_per_second=timings.predicted_per_second,
        ),
        completion_probabilities=probabilities(result.logprobs) if body.n_probs else None,
    )


class LlamaCppServing:
    def __init__(self, broker: BrokerClient) -> None:
        self.broker = broker

    async def _prompt_text(self, body: CompletionBody, request: Request) -> str:
        if isinstance(body.prompt, str):
            return body.prompt
        if all(isinstance(p, int) for p in body.prompt):
            reply = await self.broker.stub.Detokenize(
                inference_pb2.DetokenizeRequest(model=body.model, tokens=[int(p) for p in body.prompt]),
                metadata=forwarded_metadata(request),
            )
            return reply.content
        return "".join(str(p) for p in body.prompt)

    async def completion(self, body: CompletionBody, request: Request) -> CompletionResult | Response:
        prompt = await self._prompt_text(body, request)
        options = inference_pb2.JobOptions(cache_prompt=body.cache_prompt)
        if body.id_slot >= 0:
            options.session_id = f"slot-{body.id_slot}"
        call = self.broker.stub.Complete(
            inference_pb2.CompleteRequest(
                model=body.model, prompt=prompt, sampling=sampling(body), options=options
            ),
            metadata=forwarded_metadata(request),
        )
        stream = await JobStream(call).start()
        if body.stream:
            return sse.response(self._stream(stream, body, prompt))
        result = await run_text(stream)
        return final(result, body, prompt, result.text)

    async def _stream(self, stream: JobStream, body: CompletionBody, prompt: str) -> AsyncIterator[str]:
        result = TextResult()
        predicted = 0
        try:
            async for event in stream.events():
                if event.HasField("token"):
                    predicted += len(event.token.token_ids)
                    result.logprobs.extend(event.token.logprobs)
                    part = CompletionPart(
                        content=event.token.text,
                        id_slot=max(body.id_slot, 0),
                        tokens_predicted=predicted,
                        completion_probabilities=(
                            probabilities(list(event.token.logprobs)) if body.n_probs else None
                        ),
                    )
                    yield sse.data(part.model_dump_json())
                elif event.HasField("done"):
                    result.done = event.done
            result.model = stream.model
            yield sse.data(final(result, body, prompt, "").model_dump_json())
        except ApiError as exc:
            yield sse.data(error_body(exc))

    async def embeddings(self, body: EmbeddingBody, request: Request) -> EmbeddingResult:
        reply = await embed(self.broker, request, body.model, [body.content], field="content")
        return EmbeddingResult(embedding=list(reply.embeddings[0].values))

    async def tokenize(self, body: TokenizeBody, request: Request) -> TokenizeResult:
        reply = await self.broker.stub.Tokenize(
            inference_pb2.TokenizeRequest(
                model=body.model,
                content=body.content,
                add_special=body.add_special,
                parse_special=body.parse_special,
                with_pieces=body.with_pieces,
            ),
            metadata=forwarded_metadata(request),
        )
        if body.with_pieces:
            return TokenizeResult(tokens=[TokenPiece(id=p.id, piece=p.piece) for p in reply.pieces])
        return TokenizeResult(tokens=list(reply.tokens))

    async def detokenize(self, body: DetokenizeBody, request: Request) -> DetokenizeResult:
        reply = await self.broker.stub.Detokenize(
            inference_pb2.DetokenizeRequest(model=body.model, tokens=body.tokens),
            metadata=forwarded_metadata(request),
        )
        return DetokenizeResult(content=reply.content)

    async def apply_template(self, body: ApplyTemplateBody, request: Request) -> PromptResult:
        if not body.messages:
            raise bad_request("messages must hold at least one message", "messages")
        reply = await self.broker.stub.ApplyTemplate(
            inference_pb2.ApplyTemplateRequest(
                model=body.model,
                messages=[common_pb2.ChatMessage(role=m.role, content=m.content) for m in body.messages],
            ),
            metadata=forwarded_metadata(request),
        )
        return PromptResult(prompt=reply.prompt)

    async def _text_model(self, request: Request) -> common_pb2.ModelInfo:
        """The text model a request naming none gets (the tenant's default, else the cluster's)."""
        found = await self.broker.text_model(request)
        if found is None:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "no text model is being served")
        return found

    async def template(self, request: Request) -> TemplateResult:
        return TemplateResult(template=(await self._text_model(request)).chat_template)

    async def props(self, request: Request) -> Props:
        model = await self._text_model(request)
        return Props(
            default_generation_settings=DefaultGenerationSettings(
                n_ctx=model.context_size, params={"n_predict": -1}
            ),
            total_slots=1,
            model_path=model.id,
            chat_template=model.chat_template,
            modalities=Modalities(),
            build_info=f"velesio {VERSION}",
        )

    async def health(self) -> Health | Response:
        health = await self.broker.serving(("", "velesio.v1.TextWorker"))
        if all(health.values()):
            return Health()
        return render_error(ApiError(grpc.StatusCode.UNAVAILABLE, "Loading model"))


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}


def error_body(exc: ApiError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(exc.status, "server_error")
    return ErrorResponse(error=ErrorDetail(code=exc.status, message=exc.message, type=kind)).model_dump()


render_error = renderer(error_body)
