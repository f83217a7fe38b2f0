"""The llama.cpp text engine: the event-loop face of the engine thread (`batcher.Batcher`).

Every llama.cpp call runs on that one thread; methods here only render chat templates, convert JSON
schemas, post messages to the thread and await what it sends back, so the event loop never blocks.

Context: each of the `slots` sequences has a KV cache of its own, `ctx_size // slots` tokens, that a
request may use (prompt and output together). A running request can never run out of KV cells because
of its neighbours, nor attend over theirs; finished requests may leave their cells behind as a prompt
cache, which stays within that same cache.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TypeVar

from llm_worker.batcher import Batcher, StepStats
from llm_worker.chat import ChatTemplate
from llm_worker.embedder import Embedder, Prepared
from llm_worker.llama_model import LlamaConfig, LlamaModel
from llm_worker.mailbox import Call, Cancel, Item, Message, Sink, Stop, Submit, settle_threadsafe
from llm_worker.sampling import grammar_for
from llm_worker.tools import tool_grammar
from llm_worker.types import Delta, EmbedRequest, Finished, GenerateRequest, ModelCard, ToolUse, Vector
from llm_worker.types import Message as ChatMessage
from mesh.errors import InvalidArgument, Unavailable, VelesioError

T = TypeVar("T")

CAPABILITIES = ("generate", "chat", "tools", "grammar", "logprobs", "embed", "resume")
EMBEDDING_ONLY = ("embed",)


class LlamaEngine:
    """A GGUF model served to `slots` requests at once with continuous batching. Build with `start()`."""

    def __init__(self, config: LlamaConfig, batcher: Batcher, thread: threading.Thread) -> None:
        model = batcher.model
        assert model is not None
        self.config = config
        self.slots = config.slots
        self.threads = config.threads
        self._batcher = batcher
        self._thread = thread
        self._ids = itertools.count(1)
        self._closed = False
        self._embedder: Embedder | None = None  # made on the engine thread at the first embedding job
        self._embedder_made = asyncio.Lock()
        self.template = ChatTemplate(model.chat_template, bos_token=model.bos_text, eos_token=model.eos_text)
        self.context_per_slot = batcher.n_ctx_seq
        self.context = model.context
        self.context_trained = model.n_ctx_train
        self.generates = model.generates
        what = (
            f"chat template: {self.template.name}" if self.generates else "an embedding model (no generation)"
        )
        self.card = ModelCard(
            id=config.model_id or config.path.stem.lower(),
            description=(
                f"{model.name} ({config.path.name}) on llama.cpp: {config.slots} slots of "
                f"{batcher.n_ctx_seq} tokens, {what}"
            ),
            context_size=batcher.n_ctx_seq,
            chat_template=self.template.source,
            filename=str(config.path),
            capabilities=CAPABILITIES if self.generates else EMBEDDING_ONLY,
            embedding_size=model.n_embd_out,
            vocab_size=model.n_vocab,
        )

    @classmethod
    async def start(cls, config: LlamaConfig) -> LlamaEngine:
        """Starts the engine thread and waits until it has loaded the model (ModelLoadError if it cannot)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        batcher = Batcher(config)

        def report(error: BaseException | None) -> None:
            settle_threadsafe(loop, ready, None, error)

        thread = threading.Thread(target=batcher.run, args=(report,), name="llama-engine", daemon=True)
        thread.start()
        try:
            await ready
        except BaseException:
            batcher.inbox.put(Stop())  # cancelled while loading: the thread frees the model once it has it
            raise
        return cls(config, batcher, thread)

    def _send(self, message: Message) -> None:
        if self._closed or not self._thread.is_alive():
            raise Unavailable("the text engine has stopped")
        self._batcher.inbox.put(message)

    async def _on_thread(self, fn: Callable[[LlamaModel], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._send(Call(fn, loop, future))
        return await future

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Delta | Finished, None]:
        if not self.generates:
            raise InvalidArgument(
                f"{self.card.id!r} is an embedding model: it cannot generate", field="model"
            )
        if request.prompt is not None:
            prompt, is_chat = request.prompt, False
        else:
            prompt, is_chat = self.template.render(request.messages, True, request.tools), True
        grammar = grammar_for(request.sampling)
        if request.tools is not None:
            if grammar is not None:
                raise InvalidArgument(
                    "tools cannot be combined with a grammar or a JSON schema", field="tools"
                )
            grammar = tool_grammar(request.tools)
        forced = grammar.prefix if grammar is not None else ""
        prompt += forced
        rid = next(self._ids)
        results: asyncio.Queue[Item] = asyncio.Queue()
        self._send(Submit(rid, request, prompt, is_chat, grammar, Sink(asyncio.get_running_loop(), results)))
        over = False
        try:
            while not over:
                for item in gathered(await results.get(), results):
                    if isinstance(item, VelesioError):
                        over = True
                        raise item
                    over = isinstance(item, Finished)
                    if forced:  # the output's start, in the prompt: told once the request is running
                        yield Delta(forced)
                        forced = ""
                    yield item
        finally:
            if not over and self._thread.is_alive():
                # Closed early (the client went away): the sequence stops at the next step and frees its slot.
                self._batcher.inbox.put(Cancel(rid))

    async def embed(self, request: EmbedRequest) -> AsyncGenerator[list[Vector], None]:
        """One engine-thread call per batch of inputs: generation steps run between them."""
        async with self._embedder_made:
            if self._embedder is None:
                # Inputs up to a slot's context, and never past the positions the model was trained on.
                n_ctx = min(self.context_per_slot, self.context_trained or self.context_per_slot)
                step_tokens = self.config.batch_size
                self._embedder = await self._on_thread(lambda m: Embedder(m, n_ctx, step_tokens))
        embedder = self._embedder
        prepared = await self._on_thread(lambda _: embedder.prepare(request.inputs, request.truncate))
        for batch in embedder.batches(prepared):

            def run(_: LlamaModel, batch: list[Prepared] = batch) -> list[Vector]:
                return embedder.run(batch, request.pooling, request.normalize)

            yield await self._on_thread(run)

    async def tokenize(self, content: str, add_special: bool, parse_special: bool) -> list[int]:
        return await self._on_thread(lambda m: m.tokenize(content, add_special, parse_special))

    async def token_bytes(self, tokens: Sequence[int]) -> list[bytes]:
        return await self._on_thread(lambda m: [m.piece(t, special=True) for t in m.checked(tokens)])

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return await self._on_thread(lambda m: m.detokenize(m.checked(tokens)))

    def step_stats(self) -> StepStats:
        """The engine thread's time so far: steps, decoded entries, and llama_decode's share (a snapshot)."""
        return self._batcher.stats.copy()

    async def slots_in_use(self) -> int:
        """Slots holding a request, as the engine thread sees them (the servicer's count frees earlier)."""
        return await self._on_thread(lambda _: sum(slot.job is not None for slot in self._batcher.slots))

    async def apply_template(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool, tools: ToolUse | None = None
    ) -> str:
        prompt = self.template.render(messages, add_generation_prompt, tools)
        if tools is not None and add_generation_prompt:
            prompt += tool_grammar(tools).prefix  # as generate() does
        return prompt

    async def close(self) -> None:
        if not self._closed:
            embedder = self._embedder
            if embedder is not None and self._thread.is_alive():
                await self._on_thread(lambda _: embedder.close())
            self._closed = True
            self._batcher.inbox.put(Stop())
            await asyncio.to_thread(self._thread.join)


def gathered(first: Item, results: asyncio.Queue[Item]) -> list[Item]:
    """`first` and whatever else the engine thread has put meanwhile, consecutive deltas joined: while the
    caller was busy sending (a slow stream, a loaded broker), tokens become one message instead of many."""
    items = [first]
    while not results.empty():
        item = results.get_nowait()
        previous = items[-1]
        if isinstance(item, Delta) and isinstance(previous, Delta):
            items[-1] = previous.joined(item)
        else:
            items.append(item)
    return items
