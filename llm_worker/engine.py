"""What the text worker needs from an engine. `echo` and llama.cpp both provide it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from llm_worker.types import Delta, Finished, GenerateRequest, Message, ModelCard


class TextEngine(Protocol):
    card: ModelCard
    slots: int
    threads: int  # CPU threads the engine computes with; 0 when it does not compute

    def generate(self, request: GenerateRequest) -> AsyncGenerator[Delta | Finished, None]:
        """Streams deltas, then one Finished. Closing the iterator early stops the work and frees the slot."""
        ...

    async def tokenize(self, content: str, add_special: bool, parse_special: bool) -> list[int]: ...

    async def token_bytes(self, tokens: Sequence[int]) -> list[bytes]: ...

    async def detokenize(self, tokens: Sequence[int]) -> str: ...

    async def apply_template(self, messages: Sequence[Message], add_generation_prompt: bool) -> str: ...

    async def close(self) -> None: ...
