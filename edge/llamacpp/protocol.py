"""llama.cpp server bodies: requests as LLM for Unity (2.x and 3.x) and other llama.cpp clients send them, and
the replies as llama.cpp's server gives them (the fields Velesio fills)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from edge.wire import INT32_MAX, Int32, Int64, Reply, WireModel, omitted_when_none


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


class EmbeddingBody(WireModel):
    """LLM for Unity's embeddings request: one text."""

    content: str = Field(min_length=1)
    model: str = ""


class Message(WireModel):
    role: str
    content: str = ""


class ApplyTemplateBody(WireModel):
    messages: list[Message] = Field(default_factory=list)
    model: str = ""


# -- replies -----------------------------------------------------------------------------------------------


StopType = Literal["eos", "word", "limit", "none"]


class TopProbability(Reply):
    id: int
    token: str
    bytes: list[int]
    logprob: float


class TokenProbability(TopProbability):
    top_logprobs: list[TopProbability]


class GenerationSettings(Reply):
    n_predict: int
    seed: int


class Timings(Reply):
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class CompletionPart(Reply):
    """One `data:` line of a streamed completion before the last."""

    content: str
    stop: Literal[False] = False
    id_slot: int
    tokens_predicted: int
    completion_probabilities: list[TokenProbability] | None = omitted_when_none()  # with n_probs


class CompletionResult(Reply):
    """A whole completion, or the last `data:` line of a streamed one (its `content` is then empty)."""

    content: str
    id_slot: int
    stop: Literal[True] = True
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    prompt: str
    truncated: bool = False
    stop_type: StopType
    stopping_word: str
    generation_settings: GenerationSettings
    timings: Timings
    completion_probabilities: list[TokenProbability] | None = omitted_when_none()  # with n_probs


class EmbeddingResult(Reply):
    embedding: list[float]


class TokenPiece(Reply):
    id: int
    piece: str


class TokenizeResult(Reply):
    tokens: list[int] | list[TokenPiece]


class DetokenizeResult(Reply):
    content: str


class PromptResult(Reply):
    prompt: str


class TemplateResult(Reply):
    template: str


class DefaultGenerationSettings(Reply):
    n_ctx: int
    params: dict[str, Any]


class Modalities(Reply):
    vision: bool = False
    audio: bool = False


class Props(Reply):
    default_generation_settings: DefaultGenerationSettings
    total_slots: int
    model_path: str
    chat_template: str
    modalities: Modalities
    build_info: str


class Health(Reply):
    status: Literal["ok"] = "ok"


class ErrorDetail(Reply):
    code: int
    message: str
    type: str


class ErrorResponse(Reply):
    error: ErrorDetail
