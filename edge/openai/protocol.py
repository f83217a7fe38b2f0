"""OpenAI bodies: the requests (the fields Velesio honours; others are accepted and logged) and the replies,
streamed chunks included, as the OpenAI API documents them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from edge.tools import FunctionTool
from edge.wire import INT32_MAX, INT64_MAX, INT64_MIN, Int64, Reply, WireModel, omitted_when_none


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class FunctionCallIn(BaseModel):
    name: str
    arguments: str = Field("", description="the arguments as JSON text")


class ToolCallIn(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(WireModel):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="calls an assistant message made")
    tool_call_id: str | None = Field(None, description="the call a tool message answers")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(WireModel):
    model: str = ""
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    # choice i samples with seed + i (n <= 16), which must stay an int64
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX - 16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    response_format: ResponseFormat | None = None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            from edge.errors import bad_request

            raise bad_request("only one prompt per request is supported", "prompt")
        return self.prompt[0]


class ImageGenerationRequest(WireModel):
    prompt: str
    model: str = ""
    n: int = Field(1, ge=1, le=8)
    size: str = "512x512"
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1, le=INT32_MAX)
    seed: Int64 | None = None
    user: str | None = None


# -- replies -----------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(Reply):
    cached_tokens: int = 0


class Usage(Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(Reply):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Reply):
    content: list[TokenLogprob] | None


class FunctionCall(Reply):
    name: str
    arguments: str


class ToolCall(Reply):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Reply):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = omitted_when_none()


class ChatChoice(Reply):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(Reply):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(Reply):
    name: str | None = omitted_when_none()
    arguments: str


class ToolCallDelta(Reply):
    """A call's first delta has its id, type and name; later ones more of its arguments."""

    index: int
    id: str | None = omitted_when_none()
    type: Literal["function"] | None = omitted_when_none()
    function: FunctionCallDelta


class ChatDelta(Reply):
    """What a chunk adds to a choice: the role once, at the start, then content or tool calls; `{}` in the
    last chunk."""

    role: Literal["assistant"] | None = omitted_when_none()
    content: str | None = omitted_when_none()
    tool_calls: list[ToolCallDelta] | None = omitted_when_none()


class ChatChunkChoice(Reply):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Reply):
    """One SSE event of a streamed chat completion. `usage` is null in every chunk but a last one with no
    choices, and absent unless `stream_options.include_usage` asked for it."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Reply):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Reply):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(Reply):
    """A text completion, or (with `stream`) one SSE event of one, usage as in ChatCompletionChunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(Reply):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "velesio"
    description: str = ""


class ModelList(Reply):
    object: Literal["list"] = "list"
    data: list[Model]


class Image(Reply):
    b64_json: str
    revised_prompt: str


class ImagesResponse(Reply):
    created: int
    data: list[Image]


class ErrorDetail(Reply):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(Reply):
    error: ErrorDetail


TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class EmbeddingRequest(WireModel):
    input: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="a text, texts, a list of token ids, or lists of token ids"
    )
    model: str = ""
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT32_MAX)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and all(isinstance(i, int) for i in self.input):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]


class EmbeddingData(Reply):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(
        description="floats, or with encoding_format base64 little-endian float32s"
    )


class EmbeddingUsage(Reply):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Reply):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
