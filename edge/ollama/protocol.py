"""Ollama bodies: the requests as Ollama's API and its official clients send them (the fields Velesio honours
or refuses by name; others are accepted and logged) and the replies, streamed lines included, as Ollama gives
them. Class names follow Ollama's own (`api.ChatRequest`, `api.ListResponse`, ...) where no other dialect
uses the name, since every dialect's models share one OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from edge.tools import FunctionTool
from edge.wire import Int32, Int64, Reply, WireModel, omitted_when_none

NO_IMAGES = "refused when not empty: no model that takes images is served yet"
# `format`: "json" for any JSON object, or a JSON schema the reply must match; "" (or absent) for free text.
Format = Literal["", "json"] | dict[str, Any] | None


class ModelOptions(WireModel):
    """Ollama's `options` (Modelfile parameters) that map onto velesio.v1 SamplingParams. Load-time options
    (num_gpu, num_thread, use_mmap, ...) and samplers llama.cpp dropped (mirostat, tfs_z) are accepted and
    logged: the worker's command line sets those."""

    num_predict: Int32 | None = Field(None, description="most tokens to generate; 0 or negative: no limit")
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
    stop: str | list[str] | None = None
    num_ctx: Int32 | None = Field(
        None,
        description="accepted and ignored: the context size is the worker's (--n-ctx); /api/show and /api/ps "
        "give it, and a reply that reaches it ends with done_reason 'length'",
    )


class SentFunction(WireModel):
    name: str
    arguments: dict[str, Any] | str | None = Field(None, description="an object (JSON text is accepted too)")


class SentToolCall(WireModel):
    """A call of an earlier assistant message, as Ollama sent it (its `index` is accepted and ignored)."""

    id: str | None = Field(None, description="absent from most clients: the edge then numbers the calls")
    function: SentFunction


class ChatMessage(WireModel):
    role: str
    content: str | None = ""
    images: list[Any] | None = Field(None, description=NO_IMAGES)
    tool_calls: list[SentToolCall] | None = Field(None, description="calls an assistant message made")
    thinking: str | None = Field(None, description="ignored: earlier reasoning is not sent back to the model")
    tool_name: str | None = Field(None, description="the tool whose result a tool message carries")
    tool_call_id: str | None = Field(
        None,
        description="the call a tool message answers; without it, the earliest unanswered call of that "
        "tool_name (or of any tool) is meant",
    )


class GenerationFields(WireModel):
    """What /api/chat and /api/generate share."""

    model: str = Field("", description="a model from /api/tags; empty for the cluster's default text model")
    format: Format = None
    options: ModelOptions | None = None
    stream: bool = True
    keep_alive: float | str | None = Field(None, description="accepted and ignored: models stay loaded")
    think: bool | str | None = Field(None, description="refused unless false: no reasoning is streamed yet")


class ChatRequest(GenerationFields):
    """An empty `messages` only checks that the model is served (Ollama's way to load one): done_reason
    'load'."""

    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[FunctionTool] | None = Field(None, description="functions the model may call, as it decides")


class GenerateRequest(GenerationFields):
    """The prompt is sent as a user message (with `system` before it) through the model's chat template, as
    Ollama does; `raw: true` sends it as it is. An empty prompt only checks that the model is served."""

    prompt: str | None = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = Field(None, description="refused when not empty: no fill-in-the-middle")
    template: str | None = Field(None, description="refused when not empty: the model's own template applies")
    context: list[Any] | None = Field(None, description="refused when not empty: send a chat instead")
    images: list[Any] | None = Field(None, description=NO_IMAGES)


class ShowRequest(WireModel):
    model: str = ""
    name: str = Field("", description="the older spelling of model")
    verbose: bool = False


class EmbedRequest(WireModel):
    model: str = ""
    input: str | list[str] = Field(description="a text or texts")
    truncate: bool = Field(
        True, description="cut inputs longer than the context (Ollama's default) or refuse"
    )
    dimensions: int | None = Field(None, ge=1)
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


class EmbeddingsRequest(WireModel):
    """The older /api/embeddings: one prompt."""

    model: str = ""
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: str | int | float | None = None


# -- replies -----------------------------------------------------------------------------------------------

DoneReason = Literal["stop", "length", "load"]


class Stats(Reply):
    """What the last line of a stream, or a whole reply, adds: durations in nanoseconds. load_duration is the
    time the job waited in its queue (Velesio loads models when a worker starts, not per request)."""

    done_reason: DoneReason | None = omitted_when_none()
    total_duration: int | None = omitted_when_none()
    load_duration: int | None = omitted_when_none()
    prompt_eval_count: int | None = omitted_when_none()
    prompt_eval_duration: int | None = omitted_when_none()
    eval_count: int | None = omitted_when_none()
    eval_duration: int | None = omitted_when_none()


class EmbedResponse(Reply):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(Reply):
    embedding: list[float]


class GeneratedText(Reply):
    model: str
    created_at: str = Field(description="RFC 3339")
    response: str
    done: bool


class GenerateResponse(Stats, GeneratedText):  # Stats first in the bases: its fields come last
    """A whole reply, or one line of a stream: `response` is the new text, and the last line (done true) has
    an empty response and the statistics."""


class ToolCallFunction(Reply):
    index: int = Field(description="which call of the reply, 0-based")
    name: str
    arguments: dict[str, Any]


class OllamaToolCall(Reply):
    id: str | None = omitted_when_none()
    function: ToolCallFunction


class ReplyMessage(Reply):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[OllamaToolCall] | None = omitted_when_none()


class ChatMessageOut(Reply):
    model: str
    created_at: str = Field(description="RFC 3339")
    message: ReplyMessage
    done: bool


class ChatResponse(Stats, ChatMessageOut):
    """A whole reply, or one line of a stream: `message.content` is the new text, and the last line (done
    true) has empty content and the statistics. A streamed call comes whole, in a line of its own
    (`message.tool_calls`); a whole reply lists every call. A reply that called tools ends with done_reason
    'stop', as Ollama's do."""


class ModelDetails(Reply):
    """What is known of a model; Velesio's model list does not carry the GGUF's family, size or quantization
    yet, so those are empty."""

    parent_model: str = ""
    format: str
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListModelResponse(Reply):
    name: str
    model: str
    modified_at: str = Field(description="RFC 3339; Go's zero time (Ollama's 'never') when unknown")
    size: int = 0
    digest: str = ""
    details: ModelDetails


class ListResponse(Reply):
    models: list[ListModelResponse]


class ShowResponse(Reply):
    modelfile: str
    parameters: str
    template: str = Field(description="the model's chat template (Jinja, from the GGUF metadata)")
    details: ModelDetails
    model_info: dict[str, str | int | bool]
    capabilities: list[str]
    modified_at: str


class ProcessModelResponse(Reply):
    name: str
    model: str
    size: int = 0
    digest: str = ""
    details: ModelDetails
    expires_at: str = Field(description="RFC 3339: never, in practice (Ollama's keep_alive -1)")
    size_vram: int = 0
    context_length: int


class ProcessResponse(Reply):
    models: list[ProcessModelResponse]


class VersionResponse(Reply):
    version: str


class OllamaError(Reply):
    """Every error, and the last line of a stream that failed after it began."""

    error: str
