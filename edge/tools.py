"""Tool calling as the OpenAI and Ollama dialects share it: the function-tool body both send, and a job's
ToolCallDelta events joined into whole calls."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from edge.errors import bad_request
from edge.wire import WireModel
from velesio.v1 import common_pb2, events_pb2


class Function(WireModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments object")
    strict: bool | None = Field(None, description="accepted: arguments always match the schema (a grammar)")


class FunctionTool(WireModel):
    """`{"type": "function", "function": {...}}`, as OpenAI's and Ollama's `tools` list them."""

    type: Literal["function"] = "function"
    function: Function

    def to_pb(self) -> common_pb2.Tool:
        function = self.function
        parameters = json.dumps(function.parameters) if function.parameters is not None else ""
        return common_pb2.Tool(
            name=function.name, description=function.description or "", parameters=parameters
        )


def tools_pb(tools: list[FunctionTool] | None) -> list[common_pb2.Tool]:
    return [tool.to_pb() for tool in tools or []]


def past_call(
    call_id: str, name: str, arguments: str | dict[str, Any] | None, field: str
) -> common_pb2.ToolCall:
    """A call of an earlier assistant message; its arguments as JSON text (OpenAI sends text, Ollama an
    object). `field` names the arguments in the client's request."""
    if isinstance(arguments, dict):
        text = json.dumps(arguments, ensure_ascii=False)
    else:
        text = arguments or ""
        try:
            parsed = json.loads(text or "{}")
        except (json.JSONDecodeError, RecursionError) as exc:
            raise bad_request(f"{field}: not valid JSON: {exc}", field) from None
        if not isinstance(parsed, dict):
            raise bad_request(f"{field}: must be a JSON object", field)
    return common_pb2.ToolCall(id=call_id, name=name, arguments=text)


class Call(BaseModel):
    """One whole call, from the deltas of its index."""

    id: str = ""
    name: str = ""
    arguments: str = ""

    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as an object; {} for a call cut short before they were whole."""
        try:
            value = json.loads(self.arguments or "{}")
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}


class CallCollector:
    """ToolCallDelta events joined by index into whole calls, in index order."""

    def __init__(self) -> None:
        self._calls: dict[int, Call] = {}

    def add(self, delta: events_pb2.ToolCallDelta) -> None:
        call = self._calls.setdefault(delta.index, Call())
        call.id = call.id or delta.id
        call.name = call.name or delta.name
        call.arguments += delta.arguments

    @property
    def calls(self) -> list[Call]:
        return [self._calls[i] for i in sorted(self._calls)]
