"""Chat templates: the model's own Jinja template from its GGUF metadata, or a named fallback."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import NoReturn

import jinja2
import jinja2.sandbox

from llm_worker.tools import generic_messages, native_messages, renders_tools
from llm_worker.types import Message, ToolUse
from mesh.errors import InvalidArgument

log = logging.getLogger(__name__)

FALLBACKS = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}
DEFAULT_FALLBACK = "chatml"


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: object, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    """Renders messages the way Hugging Face transformers renders the same template."""

    def __init__(self, source: str | None, *, bos_token: str, eos_token: str) -> None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
        env.filters["tojson"] = _tojson
        self.name = "gguf"
        if source:
            try:
                self._template = env.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                log.warning(
                    "the model's chat template does not compile (%s); using %s", exc, DEFAULT_FALLBACK
                )
                source = None
        if not source:
            self.name = DEFAULT_FALLBACK
            source = FALLBACKS[DEFAULT_FALLBACK]
            self._template = env.from_string(source)
        self.source = source
        self.native_tools = renders_tools(source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool, tools: ToolUse | None = None
    ) -> str:
        """The prompt. Tools go through the template when it renders them in the <tool_call> format
        (`llm_worker.tools`), else into the generic instructions of the system message."""
        if not messages:
            raise InvalidArgument("at least one message is needed", field="messages")
        extra = {}
        if self.native_tools:
            rendered = native_messages(messages)
            if tools is not None:
                extra["tools"] = [t.as_openai() for t in tools.tools]
        else:
            rendered = generic_messages(messages, tools)
        try:
            return self._template.render(
                messages=rendered,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except jinja2.TemplateError as exc:
            raise InvalidArgument(
                f"the chat template rejected the messages: {exc}", field="messages"
            ) from exc
