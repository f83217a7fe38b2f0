"""`velesio.v1.TextWorker`: protobuf <-> domain types around a `TextEngine`, and slot accounting."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator

from llm_worker.engine import TextEngine
from llm_worker.tools import CallPiece, with_tool_calls
from llm_worker.types import Delta, EmbedRequest, Finished, GenerateRequest, Message, ToolUse
from mesh.errors import InvalidArgument
from mesh.server import Context
from mesh.slots import Slots
from mesh.version import VERSION
from observability.work import TextJobTelemetry, slot_gauges
from velesio.v1 import common_pb2, events_pb2, workers_pb2, workers_pb2_grpc

log = logging.getLogger(__name__)


class TextWorkerServicer(workers_pb2_grpc.TextWorkerServicer):
    def __init__(self, engine: TextEngine, worker_id: str) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.slots = Slots(engine.slots, slot_gauges("text", engine.card.id, engine.slots))

    def _check_model(self, model: str) -> None:
        if model and model != self.engine.card.id:
            raise InvalidArgument(f"this worker serves {self.engine.card.id!r}, not {model!r}", field="model")

    async def Generate(
        self, request: workers_pb2.TextWorkerGenerateRequest, context: Context
    ) -> AsyncIterator[workers_pb2.TextWorkerGenerateResponse]:
        self._check_model(request.model)
        if request.WhichOneof("input") is None:
            raise InvalidArgument("set prompt or chat", field="input")
        job = TextJobTelemetry(self.engine.card.id)
        generate = GenerateRequest.from_pb(request)
        with self.slots.claim() as slot:
            engine_output = self.engine.generate(generate)
            output: AsyncGenerator[Delta | CallPiece | Finished, None] = (
                engine_output if generate.tools is None else with_tool_calls(engine_output)
            )
            # aclosing: however this handler ends, the engine hears at once that nobody listens any more.
            async with contextlib.aclosing(output) as items:
                async for item in items:
                    if isinstance(item, Finished):
                        slot.release()  # before the broker hears "done" and sends the next job here
                        job.finished(item.prompt_tokens, item.completion_tokens, item.cached_tokens)
                    elif isinstance(item, Delta):
                        job.tokens(len(item.token_ids) or 1)
                    yield item.to_pb()

    async def Embed(
        self, request: workers_pb2.TextWorkerEmbedRequest, context: Context
    ) -> AsyncIterator[workers_pb2.TextWorkerEmbedResponse]:
        self._check_model(request.model)
        if not request.inputs:
            raise InvalidArgument("must hold at least one input", field="inputs")
        began, tokens = time.perf_counter(), 0
        with self.slots.claim() as slot:
            async with contextlib.aclosing(self.engine.embed(EmbedRequest.from_pb(request))) as batches:
                async for batch in batches:
                    tokens += sum(v.tokens for v in batch)
                    embeddings = events_pb2.Embeddings(embeddings=[v.to_pb() for v in batch])
                    yield workers_pb2.TextWorkerEmbedResponse(embeddings=embeddings)
            slot.release()
        took_ms = (time.perf_counter() - began) * 1000
        done = events_pb2.JobDone(
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=tokens),
            timings=common_pb2.Timings(
                prompt_ms=took_ms, prompt_per_second=tokens / took_ms * 1000 if took_ms else 0
            ),
        )
        yield workers_pb2.TextWorkerEmbedResponse(done=done)

    async def Tokenize(
        self, request: workers_pb2.TextWorkerTokenizeRequest, context: Context
    ) -> workers_pb2.TextWorkerTokenizeResponse:
        tokens = await self.engine.tokenize(request.content, request.add_special, request.parse_special)
        reply = workers_pb2.TextWorkerTokenizeResponse(tokens=tokens)
        if request.with_pieces:
            for token, raw in zip(tokens, await self.engine.token_bytes(tokens), strict=True):
                reply.pieces.add(id=token, piece=raw.decode(errors="replace"), bytes=raw)
        return reply

    async def Detokenize(
        self, request: workers_pb2.TextWorkerDetokenizeRequest, context: Context
    ) -> workers_pb2.TextWorkerDetokenizeResponse:
        return workers_pb2.TextWorkerDetokenizeResponse(content=await self.engine.detokenize(request.tokens))

    async def ApplyTemplate(
        self, request: workers_pb2.TextWorkerApplyTemplateRequest, context: Context
    ) -> workers_pb2.TextWorkerApplyTemplateResponse:
        messages = [Message.from_pb(m) for m in request.messages]
        tools = ToolUse.from_pb(request.tools, request.tool_choice, request.parallel_tool_calls)
        prompt = await self.engine.apply_template(messages, request.add_generation_prompt, tools)
        return workers_pb2.TextWorkerApplyTemplateResponse(prompt=prompt)

    async def Info(
        self, request: workers_pb2.TextWorkerInfoRequest, context: Context
    ) -> workers_pb2.TextWorkerInfoResponse:
        return workers_pb2.TextWorkerInfoResponse(
            worker_id=self.worker_id,
            model=self.engine.card.to_pb(),
            slots_total=self.engine.slots,
            slots_busy=self.slots.busy,
            threads=self.engine.threads,
            version=VERSION,
        )
