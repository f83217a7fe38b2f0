"""llama.cpp server request bodies, as LLM for Unity (2.x and 3.x) and other llama.cpp clients send them."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from edge.routing import INT32_MAX, Int32, Int64, WireModel


class CompletionBody(WireModel):
    prompt: str | list[Int32 | str] = ""
    model: str = ""
    n_predict: int = Field(-1, ge=-1, le=INT32_MAX)
    temperature: float | None = None
    top_k: Int32 | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: Int32 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int64 | None = None
    stop: list[str] = Field(default_factory=list)
    grammar: str = ""
    json_schema: dict[str, Any] | None = None
    ignore_eos: bool = False
    n_probs: int = Field(0, ge=0, le=20)
    id_slot: int = -1
    cache_prompt: bool = True
    stream: bool = False
    logit_bias: list[list[Any]] | dict[str, float] | None = None


class TokenizeBody(WireModel):
    content: str = ""
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False
    model: str = ""


class DetokenizeBody(WireModel):
    tokens: list[Int32] = Field(default_factory=list)
    model: str = ""


class Message(WireModel):
    role: str
    content: str = ""


class ApplyTemplateBody(WireModel):
    messages: list[Message] = Field(default_factory=list)
    model: str = ""
