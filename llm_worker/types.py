"""Domain types of the text worker. Engines see these, never protobuf; `server.py` translates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mesh.errors import InvalidArgument
from velesio.v1 import common_pb2, events_pb2, workers_pb2

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1
    stop: tuple[str, ...] = ()
    max_tokens: int = -1
    grammar: str = ""
    json_schema: str = ""
    logprobs: int = 0
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_pb(cls, pb: common_pb2.SamplingParams) -> Sampling:
        defaults = cls()
        optional = {
            name: getattr(pb, name) if pb.HasField(name) else getattr(defaults, name)
            for name in (
                "temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
                "presence_penalty", "frequency_penalty", "seed", "max_tokens",
            )
        }  # fmt: skip
        return cls(
            **optional,
            stop=tuple(pb.stop),
            grammar=pb.grammar,
            json_schema=pb.json_schema,
            logprobs=pb.logprobs,
            ignore_eos=pb.ignore_eos,
            logit_bias=tuple(sorted(pb.logit_bias.items())),
        )


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: its id, the tool's name and the arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""

    @classmethod
    def from_pb(cls, pb: common_pb2.ChatMessage) -> Message:
        calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in pb.tool_calls)
        return cls(pb.role, pb.content, pb.name, calls, pb.tool_call_id)


class Choice(StrEnum):
    AUTO = "auto"
    NONE = "none"
    REQUIRED = "required"

    @classmethod
    def from_pb(cls, mode: common_pb2.ToolChoiceMode.ValueType) -> Choice:
        modes = {
            common_pb2.TOOL_CHOICE_MODE_NONE: cls.NONE,
            common_pb2.TOOL_CHOICE_MODE_REQUIRED: cls.REQUIRED,
        }
        return modes.get(mode, cls.AUTO)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    @classmethod
    def from_pb(cls, pb: common_pb2.Tool) -> Tool:
        try:
            parameters = json.loads(pb.parameters) if pb.parameters else ANY_OBJECT
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"not valid JSON: {exc}", field=f"tools[{pb.name}].parameters") from None
        if not isinstance(parameters, dict):
            raise InvalidArgument("must be a JSON object", field=f"tools[{pb.name}].parameters")
        return cls(pb.name, pb.description, parameters)

    def as_openai(self) -> dict[str, Any]:
        """The {"type": "function", "function": {...}} shape that Hugging Face chat templates iterate."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """A chat's tools and how the model may use them. `function`: the one tool the model must call."""

    tools: tuple[Tool, ...]
    choice: Choice = Choice.AUTO
    function: str = ""
    parallel: bool = True

    @classmethod
    def from_pb(
        cls, tools: Sequence[common_pb2.Tool], choice: common_pb2.ToolChoice, parallel: bool
    ) -> ToolUse | None:
        """None when the model is to see no tools: none were given, or the choice is NONE."""
        mode = Choice.from_pb(choice.mode)
        if not tools or mode is Choice.NONE:
            return None
        if choice.function:
            mode = Choice.REQUIRED
        use = cls(tuple(Tool.from_pb(t) for t in tools), mode, choice.function, parallel)
        if choice.function and choice.function not in {t.name for t in use.tools}:
            raise InvalidArgument(f"no tool is named {choice.function!r}", field="tool_choice.function")
        return use

    @property
    def many(self) -> bool:
        """Whether a reply may hold several calls: parallel calls allowed, and no one tool named."""
        return self.parallel and not self.function

    @property
    def callable(self) -> tuple[Tool, ...]:
        """The tools a call may name."""
        return tuple(t for t in self.tools if t.name == self.function) if self.function else self.tools


@dataclass(frozen=True)
class GenerateRequest:
    job_id: str
    prompt: str | None
    messages: tuple[Message, ...]
    sampling: Sampling
    cache_prompt: bool = True
    session_id: str = ""
    tools: ToolUse | None = None
    resume_tokens: tuple[int, ...] = ()  # an earlier run delivered these: go on after them
    resume_text: str = ""  # and this text of theirs

    @classmethod
    def from_pb(cls, pb: workers_pb2.TextWorkerGenerateRequest) -> GenerateRequest:
        is_chat = pb.WhichOneof("input") == "chat"
        chat = pb.chat
        return cls(
            job_id=pb.job_id,
            prompt=None if is_chat else pb.prompt,
            messages=tuple(Message.from_pb(m) for m in chat.messages) if is_chat else (),
            sampling=Sampling.from_pb(pb.sampling),
            cache_prompt=pb.cache_prompt,
            session_id=pb.session_id,
            tools=ToolUse.from_pb(chat.tools, chat.tool_choice, chat.parallel_tool_calls)
            if is_chat
            else None,
            resume_tokens=tuple(pb.resume.tokens),
            resume_text=pb.resume.text,
        )


@dataclass(frozen=True)
class TopLogprob:
    """One likely alternative at a position: token id, its text and raw bytes, natural-log probability."""

    token_id: int
    token: str
    logprob: float
    raw: bytes = b""

    def to_pb(self) -> events_pb2.TopLogprob:
        return events_pb2.TopLogprob(
            token_id=self.token_id, token=self.token, logprob=self.logprob, bytes=self.raw
        )


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a generated token and the most likely alternatives at its position."""

    token_id: int
    token: str
    logprob: float
    raw: bytes = b""
    top: tuple[TopLogprob, ...] = ()

    def to_pb(self) -> events_pb2.TokenLogprob:
        return events_pb2.TokenLogprob(
            token_id=self.token_id,
            token=self.token,
            logprob=self.logprob,
            bytes=self.raw,
            top_logprobs=[t.to_pb() for t in self.top],
        )


@dataclass(frozen=True)
class Delta:
    """New text, the tokens it covers and, when asked for, their log-probabilities."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()

    def joined(self, later: Delta) -> Delta:
        return Delta(self.text + later.text, self.token_ids + later.token_ids, self.logprobs + later.logprobs)

    def to_pb(self) -> workers_pb2.TextWorkerGenerateResponse:
        return workers_pb2.TextWorkerGenerateResponse(
            token=events_pb2.TokenDelta(
                text=self.text, token_ids=self.token_ids, logprobs=[lp.to_pb() for lp in self.logprobs]
            )
        )


class Finish(StrEnum):
    STOP = "stop"  # end of sequence
    STOP_SEQUENCE = "stop_sequence"
    LENGTH = "length"
    CANCELLED = "cancelled"
    TOOL_CALLS = "tool_calls"

    def to_pb(self) -> common_pb2.FinishReason.ValueType:
        return common_pb2.FinishReason.Value(f"FINISH_REASON_{self.name}")


@dataclass(frozen=True)
class Finished:
    reason: Finish
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    stopping_word: str = ""

    def to_pb(self) -> workers_pb2.TextWorkerGenerateResponse:
        def per_second(count: int, ms: float) -> float:
            return count / ms * 1000 if ms > 0 else 0.0

        done = events_pb2.JobDone(
            finish_reason=self.reason.to_pb(),
            stopping_word=self.stopping_word,
            usage=common_pb2.Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                cached_tokens=self.cached_tokens,
            ),
            timings=common_pb2.Timings(
                prompt_ms=self.prompt_ms,
                prompt_per_second=per_second(self.prompt_tokens - self.cached_tokens, self.prompt_ms),
                predicted_ms=self.predicted_ms,
                predicted_per_second=per_second(self.completion_tokens, self.predicted_ms),
            ),
        )
        return workers_pb2.TextWorkerGenerateResponse(done=done)


class Pooling(StrEnum):
    """How token vectors become one embedding; MODEL: the model's own (mean when it defines none)."""

    MODEL = "model"
    MEAN = "mean"
    CLS = "cls"
    LAST = "last"

    @classmethod
    def from_pb(cls, pb: common_pb2.Pooling.ValueType) -> Pooling:
        return {
            common_pb2.POOLING_MEAN: cls.MEAN,
            common_pb2.POOLING_CLS: cls.CLS,
            common_pb2.POOLING_LAST: cls.LAST,
        }.get(pb, cls.MODEL)


@dataclass(frozen=True)
class EmbedRequest:
    """Inputs (text, or token ids) to embed, each into one vector."""

    job_id: str
    inputs: tuple[str | tuple[int, ...], ...]
    pooling: Pooling = Pooling.MODEL
    normalize: bool = True
    truncate: bool = False

    @classmethod
    def from_pb(cls, pb: workers_pb2.TextWorkerEmbedRequest) -> EmbedRequest:
        params = pb.params
        inputs = (i.text if i.WhichOneof("input") == "text" else tuple(i.tokens.ids) for i in pb.inputs)
        return cls(
            job_id=pb.job_id,
            inputs=tuple(inputs),
            pooling=Pooling.from_pb(params.pooling),
            normalize=params.normalize if params.HasField("normalize") else True,
            truncate=params.truncate if params.HasField("truncate") else False,
        )


@dataclass(frozen=True)
class Vector:
    """The embedding of the input at `index`, made of `tokens` tokens."""

    index: int
    values: tuple[float, ...]
    tokens: int

    def to_pb(self) -> common_pb2.Embedding:
        return common_pb2.Embedding(index=self.index, values=self.values, tokens=self.tokens)


@dataclass(frozen=True)
class ModelCard:
    """What a text engine serves, as the registry and ListModels show it."""

    id: str
    description: str
    context_size: int
    chat_template: str = ""
    filename: str = ""
    test_only: bool = False
    capabilities: tuple[str, ...] = field(default=("chat",))
    embedding_size: int = 0
    vocab_size: int = 0

    def to_pb(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            id=self.id,
            kind=common_pb2.JOB_KIND_TEXT,
            description=self.description,
            test_only=self.test_only,
            context_size=self.context_size,
            chat_template=self.chat_template,
            filename=self.filename,
            capabilities=self.capabilities,
            embedding_size=self.embedding_size,
            vocab_size=self.vocab_size,
        )
