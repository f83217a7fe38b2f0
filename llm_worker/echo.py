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

from llm_worker.types import Delta, Finish, Finished, GenerateRequest, Message, ModelCard
from mesh.errors import InvalidArgument

WORD = re.compile(r"\s*\S+\s*|\s+")
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def render(messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """What TEMPLATE renders, without needing jinja."""
    text = "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages)
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
        )
        self.slots = slots
        self.threads = 0
        self.delay_s = delay_s

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[Delta | Finished, None]:
        began = time.perf_counter()
        prompt = request.prompt if request.prompt is not None else render(request.messages, True)
        text, reason, stopping_word = truncate(reply_for(request), request)
        for word in WORD.findall(text):
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

    async def tokenize(self, content: str, add_special: bool, parse_special: bool) -> list[int]:
        return [ord(c) for c in content]

    async def token_bytes(self, tokens: Sequence[int]) -> list[bytes]:
        return [chr(t).encode() for t in checked(tokens)]

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(chr(t) for t in checked(tokens))

    async def apply_template(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return render(messages, add_generation_prompt)

    async def close(self) -> None:
        return None
