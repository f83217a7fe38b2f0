"""What the text worker needs from an engine. `echo` and llama.cpp both provide it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from llm_worker.types import (
    Delta,
    EmbedRequest,
    Finished,
    GenerateRequest,
    Message,
    ModelCard,
    ToolUse,
    Vector,
)


class TextEngine(Protocol):
    card: ModelCard
    slots: int
    threads: int  # CPU threads the engine computes with; 0 when it does not compute

    def generate(self, request: GenerateRequest) -> AsyncGenerator[Delta | Finished, None]:
        """Streams deltas, then one Finished. Closing the iterator early stops the work and frees the slot."""
        ...

    def embed(self, request: EmbedRequest) -> AsyncGenerator[list[Vector], None]:
        """Streams the inputs' vectors in batches, each input once. Raises InvalidArgument for an input the
        model cannot take (too long without truncate, a token id outside the vocabulary); Unimplemented when
        the engine does not embed."""
        ...

    async def tokenize(self, content: str, add_special: bool, parse_special: bool) -> list[int]: ...

    async def token_bytes(self, tokens: Sequence[int]) -> list[bytes]: ...

    async def detokenize(self, tokens: Sequence[int]) -> str: ...

    async def apply_template(
        self, messages: Sequence[Message], add_generation_prompt: bool, tools: ToolUse | None = None
    ) -> str:
        """The prompt a chat job with these messages (and tools) would feed the model."""
        ...

    async def close(self) -> None: ...
