"""A job as the broker handles it: its form (complete, chat or image), kind, model, options and prompt,
read once from the `SubmitRequest` that every Inference call becomes and that the queue stores."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from broker import validate
from mesh.errors import InvalidArgument
from velesio.v1 import common_pb2, inference_pb2

Kind = Literal["text", "image"]
Body = (
    inference_pb2.CompleteRequest
    | inference_pb2.ChatRequest
    | inference_pb2.GenerateImageRequest
    | inference_pb2.EmbedRequest
)
Form = Literal["complete", "chat", "image", "embed"]

KINDS: dict[common_pb2.JobKind.ValueType, Kind] = {
    common_pb2.JOB_KIND_TEXT: "text",
    common_pb2.JOB_KIND_IMAGE: "image",
}
AFFINITY_PREFIX_CHARS = 512


def kind_name(kind: common_pb2.JobKind.ValueType) -> Kind:
    name = KINDS.get(kind)
    if name is None:
        raise InvalidArgument(f"unknown job kind {kind}", field="kind")
    return name


def kind_filter(kind: common_pb2.JobKind.ValueType) -> Kind | None:
    """A request's kind filter: None (every kind) when unspecified."""
    return None if kind == common_pb2.JOB_KIND_UNSPECIFIED else kind_name(kind)


def kind_pb(kind: str) -> common_pb2.JobKind.ValueType:
    return common_pb2.JOB_KIND_IMAGE if kind == "image" else common_pb2.JOB_KIND_TEXT


@dataclass(frozen=True)
class JobSpec:
    """What was asked for. `body` is the request's complete, chat, image or embed message itself (not a copy):
    the broker fills in its resolved model there before the job is stored."""

    request: inference_pb2.SubmitRequest
    form: Form

    @classmethod
    def of(cls, request: inference_pb2.SubmitRequest) -> JobSpec:
        form = request.WhichOneof("job")
        if form is None:
            raise InvalidArgument("set one of complete, chat, image or embed", field="job")
        return cls(request, form)

    @property
    def kind(self) -> Kind:
        return "image" if self.form == "image" else "text"

    @property
    def body(self) -> Body:
        return getattr(self.request, self.form)  # type: ignore[no-any-return]

    @property
    def model(self) -> str:
        return self.body.model

    @property
    def options(self) -> inference_pb2.JobOptions:
        return self.body.options

    def check(self, limits: validate.RequestLimits) -> None:
        """Raises InvalidArgument (naming the field) for what no worker could run."""
        if self.form == "complete":
            validate.check_complete(self.request.complete, limits)
        elif self.form == "chat":
            validate.check_chat(self.request.chat, limits)
        elif self.form == "embed":
            validate.check_embed(self.request.embed, limits)
        else:
            validate.check_image(self.request.image, limits)

    @property
    def uses_tools(self) -> bool:
        """A chat whose model is to see tools (it has some, and the choice is not NONE)."""
        chat = self.request.chat
        return (
            self.form == "chat"
            and bool(chat.tools)
            and chat.tool_choice.mode != common_pb2.TOOL_CHOICE_MODE_NONE
        )

    @property
    def resumable(self) -> bool:
        """A text job that can go on after a failure from what it delivered: a completion or a chat (one
        with tools delivers calls, not tokens, and is not resumed)."""
        return self.form == "complete" or (self.form == "chat" and not self.uses_tools)

    @property
    def exact_resume(self) -> bool:
        """Whether a resumed run makes what the failed one would have: greedy decoding."""
        sampling = self.body.sampling  # type: ignore[union-attr]
        return sampling.HasField("temperature") and sampling.temperature <= 0

    def prompt_text(self) -> str:
        """The prompt as text: a completion's prompt, a chat's messages joined, an image's prompt, the texts
        to embed joined."""
        if self.form == "complete":
            return self.request.complete.prompt
        if self.form == "chat":
            return "".join(f"{m.role}\n{m.content}\n" for m in self.request.chat.messages)
        if self.form == "embed":
            return "\n".join(i.text for i in self.request.embed.inputs)
        return self.request.image.params.prompt

    def token_ids(self) -> list[tuple[str, int]]:
        """(field, id) of every token id the job's inputs give, for the model's vocabulary check."""
        if self.form != "embed":
            return []
        return [
            (f"inputs[{i}]", token)
            for i, item in enumerate(self.request.embed.inputs)
            if item.WhichOneof("input") == "tokens"
            for token in item.tokens.ids
        ]

    def affinity(self, tenant: str) -> str:
        """Jobs with the same key prefer the same worker: a named session, or a long shared text prompt
        prefix (what the worker's prompt cache can reuse)."""
        if self.options.session_id:
            return f"session:{tenant}:{self.options.session_id}"
        text = self.prompt_text() if self.form in ("complete", "chat") else ""
        if len(text) >= AFFINITY_PREFIX_CHARS:
            digest = hashlib.sha256(text[:AFFINITY_PREFIX_CHARS].encode()).hexdigest()[:24]
            return f"prefix:{digest}"
        return ""
