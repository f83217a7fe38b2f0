"""The `echo` engine: no model. It streams back the prompt (or the last user message of a chat), one
word per delta at a set pace, honouring max_tokens and stop strings. It exists to test and measure the
mesh (broker, queue, streaming, cancel) without model cost; ListModels labels it test-only.

Its tokenizer maps each Unicode character to its code point, so token counts are character counts.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Sequence

from llm_worker.tools import generic_messages
from llm_worker.types import (
    Delta,
    EmbedRequest,
    Finish,
    Finished,
    GenerateRequest,
    Message,
    ModelCard,
    Pooling,
    ToolUse,
    Vector,
)
from mesh.errors import InvalidArgument

WORD = re.compile(r"\s*\S+\s*|\s+")
EMBED_DIMENSIONS = 32
EMBED_BATCH = 16  # inputs per streamed batch
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render(messages: Sequence[Message], add_generation_prompt: bool, tools: ToolUse | None = None) -> str:
    """What TEMPLATE renders, without needing jinja (tools as `llm_worker.tools` renders them for templates
    that know none)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in generic_messages(messages, tools))
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def reply_for(request: GenerateRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    users = [m.content for m in request.messages if m.role == "user"]
    return users[-1] if users else request.messages[-1].content


def truncate(text: str, request: GenerateRequest) -> tuple[str, Finish, str]:
    """The text to stream and why it ends: the first stop string, else max_tokens characters, else EOS."""
    sampling = request.sampling
    cut, reason, word = len(text), Finish.STOP, ""
    for stop in sampling.stop:
        at = text.find(stop)
        if 0 <= at < cut:
            cut, reason, word = at, Finish.STOP_SEQUENCE, stop
    if 0 < sampling.max_tokens < cut:
        cut, reason, word = sampling.max_tokens, Finish.LENGTH, ""
    return text[:cut], reason, word


def checked(tokens: Sequence[int]) -> Sequence[int]:
    """The tokens, when each is a Unicode scalar value (a code point that is not a surrogate)."""
    wrong = [t for t in tokens if not (0 <= t < 0xD800 or 0xE000 <= t <= 0x10FFFF)]
    if wrong:
        raise InvalidArgument(f"echo token ids are Unicode code points; got {wrong[:5]}", field="tokens")
    return tokens


class EchoEngine:
    def __init__(self, *, model_id: str = "echo", slots: int = 4, delay_s: float = 0.02) -> None:
        self.card = ModelCard(
            id=model_id,
            description="echo test engine: streams the prompt back; no model, for tests and mesh benchmarks",
            context_size=1_000_000,
            chat_template=TEMPLATE,
            test_only=True,
            capabilities=("generate", "chat", "tools", "embed", "resume"),
            embedding_size=EMBED_DIMENSIONS,
            vocab_size=0x110000,  # token ids are Unicode code points
        )
        self.slots = slots
        self.threads = 0
        self.delay_s = delay_s

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Delta | Finished, None]:
        began = time.perf_counter()
        prompt = (
            request.prompt if request.prompt is not None else render(request.messages, True, request.tools)
        )
        text, reason, stopping_word = truncate(reply_for(request), request)
        # Resumed: an earlier run delivered the first characters (its tokens are code points).
        for word in WORD.findall(text[len(request.resume_tokens) :]):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            else:
                await asyncio.sleep(0)  # still a point where cancellation lands
            yield Delta(word, tuple(ord(c) for c in word))
        yield Finished(
            reason=reason,
            prompt_tokens=len(prompt),
            completion_tokens=len(text),
            predicted_ms=(time.perf_counter() - began) * 1000,
            stopping_word=stopping_word,
        )

    async def embed(self, request: EmbedRequest) -> AsyncGenerator[list[Vector], None]:
        """Deterministic vectors of the code points (each token a one-hot of its code point modulo
        EMBED_DIMENSIONS), pooled as asked; in batches of EMBED_BATCH inputs."""
        batch: list[Vector] = []
        for index, item in enumerate(request.inputs):
            tokens = [ord(c) for c in item] if isinstance(item, str) else list(checked(item))
            picked = {Pooling.CLS: tokens[:1], Pooling.LAST: tokens[-1:]}.get(request.pooling, tokens)
            values = [0.0] * EMBED_DIMENSIONS
            for token in picked:
                values[token % EMBED_DIMENSIONS] += 1 / len(picked)
            if request.normalize:
                norm = sum(v * v for v in values) ** 0.5
                values = [v / norm for v in values]
            batch.append(Vector(index, tuple(values), len(tokens)))
            if len(batch) == EMBED_BATCH:
                yield batch
                batch = []
                await asyncio.sleep(self.delay_s)  # where cancellation lands
        if batch:
            yield batch

    async def tokenize(self, content: str, add_special: bool, parse_special: bool) -> list[int]:
        return [ord(c) for c in content]

    async def token_bytes(self, tokens: Sequence[int]) -> list[bytes]:
        return [chr(t).encode() for t in checked(tokens)]

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in checked(tokens))

    async def apply_template(
        self, messages: Sequence[Message], add_generation_prompt: bool, tools: ToolUse | None = None
    ) -> str:
        return render(messages, add_generation_prompt, tools)

    async def close(self) -> None:
        return None
