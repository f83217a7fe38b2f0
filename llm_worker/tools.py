"""Tool calling: tools into the prompt, a grammar for the calls, and the calls out of the generated text.

One output format for every model, the Hermes one that Qwen 2.5/3 and Hermes templates are trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A model whose own Jinja template renders `tools` in that format gets them through its template. Any other
model gets the documented generic rendering (`GENERIC_INSTRUCTIONS`): the tools and the format in the system
message, earlier calls as <tool_call> blocks in the assistant's text, tool results as <tool_response> blocks
in a user message (templates that know no "tool" role stay happy).

The grammar (`tool_grammar`) makes every call parse and match its tool's schema: for `required` (or one named
tool) it holds from the first token; for `auto` it is lazy, free text until the model writes "<tool_call>".
`ToolCallReader` then splits the output into text and calls, streaming each call's arguments as they come.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import secrets
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from llama_cpp import llama_grammar

from llm_worker.detok import partial_suffix
from llm_worker.sampling import Grammar
from llm_worker.types import Choice, Delta, Finish, Finished, Message, TokenLogprob, ToolCall, ToolUse
from mesh.errors import InvalidArgument
from velesio.v1 import events_pb2, workers_pb2

SchemaConverter: Any = llama_grammar.SchemaConverter  # untyped
OPEN, CLOSE = "<tool_call>", "</tool_call>"


# -- into the prompt ---------------------------------------------------------------------------------------

GENERIC_INSTRUCTIONS = """\
You can call functions to answer the user. They are described with JSON Schema inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-json-object>}}
</tool_call>
{rule}
The results of your calls come back inside <tool_response></tool_response> tags."""


def _rule(use: ToolUse) -> str:
    if use.function:
        return f"Call the function {use.function} now."
    many = "one or more functions, each in its own <tool_call> block" if use.many else "exactly one function"
    if use.choice is Choice.REQUIRED:
        return f"You must call {many}."
    return f"If a function helps, call {many}; otherwise answer in text."


def call_text(call: ToolCall) -> str:
    """An earlier call as the model writes one."""
    return f'{OPEN}\n{{"name": {json.dumps(call.name)}, "arguments": {call.arguments or "{}"}}}\n{CLOSE}'


def generic_messages(messages: Sequence[Message], use: ToolUse | None) -> list[dict[str, Any]]:
    """The conversation for a template that knows nothing of tools: the instructions in the system message,
    calls as text of the assistant, results as <tool_response> blocks of a user message."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "tool":
            block = f"<tool_response>\n{message.content}\n</tool_response>"
            if rendered and rendered[-1].get("tool_results"):
                rendered[-1]["content"] += "\n" + block  # results of one round share one user message
            else:
                rendered.append({"role": "user", "content": block, "tool_results": True})
            continue
        content = message.content
        if message.tool_calls:
            calls = "\n".join(call_text(c) for c in message.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        rendered.append(
            {"role": message.role, "content": content} | ({"name": message.name} if message.name else {})
        )
    for entry in rendered:
        entry.pop("tool_results", None)
    if use is not None:
        listing = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in use.tools)
        instructions = GENERIC_INSTRUCTIONS.format(tools=listing, rule=_rule(use))
        if rendered and rendered[0]["role"] == "system":
            rendered[0]["content"] = f"{rendered[0]['content']}\n\n{instructions}"
        else:
            rendered.insert(0, {"role": "system", "content": instructions})
    return rendered


def _arguments(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text


def native_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The conversation in the shape Hugging Face tool-calling templates read (arguments as objects)."""
    rendered: list[dict[str, Any]] = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            entry["name"] = m.name
        if m.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": _arguments(c.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            entry["tool_call_id"] = m.tool_call_id
        rendered.append(entry)
    return rendered


def renders_tools(template_source: str) -> bool:
    """Whether a Jinja chat template renders `tools` itself, in the <tool_call> format this module reads."""
    return bool(re.search(r"\btools\b", template_source)) and OPEN in template_source


# -- the grammar -------------------------------------------------------------------------------------------


def _literal(text: str) -> str:
    return json.dumps(text)  # JSON string escapes are GBNF's


OPENING = '<tool_call>\n{"name": "'
CLOSING = "}\n</tool_call>"
OWN_RULES = ("root", "tool-call", "tool-call-rest")


def _arguments_rules(use: ToolUse) -> tuple[list[str], dict[str, str]]:
    """Per callable tool the rule of its arguments, and every rule they need. One converter per tool: a
    converter names a `$defs` entry after the end of its path, so two tools' `Item`s must not share one."""
    names: list[str] = []
    rules: dict[str, str] = {}
    for i, tool in enumerate(use.callable):
        converter: Any = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        field = f"tools[{tool.name}].parameters"
        try:
            schema = converter.resolve_refs(copy.deepcopy(tool.parameters), tool.name)
            names.append(converter.visit(schema, f"arguments-{i}"))
        except Exception as exc:  # the converter raises whatever its schema walk hits
            raise InvalidArgument(
                f"cannot turn the schema into a grammar: {type(exc).__name__}: {exc}", field=field
            ) from exc
        for name, body in converter._rules.items():
            if name in OWN_RULES or rules.get(name, body) != body:
                raise InvalidArgument(
                    f"defines {name!r} differently from another tool's schema; rename it in one of them",
                    field=field,
                )
            rules[name] = body
    return names, rules


def tool_grammar(use: ToolUse) -> Grammar:
    """Calls in the one format, naming a callable tool, with arguments that match that tool's schema.

    What the choice leaves the model no say in is its `prefix`, written into the prompt rather than
    decoded token by token: for one named tool everything up to its arguments, for `required` the opening
    of the first call up to the tool's name. `auto` has no prefix: its grammar is lazy, and holds once the
    model writes "<tool_call>"."""
    arguments, rules = _arguments_rules(use)
    after_names = (_literal(f'{tool.name}", "arguments": ') for tool in use.callable)
    rests = " | ".join(f"{after} {rule}" for after, rule in zip(after_names, arguments, strict=True))
    more = ' ("\\n" tool-call)*' if use.many else ""
    own = [
        f"tool-call-rest ::= ({rests}) {_literal(CLOSING)}",
        f"tool-call ::= {_literal(OPENING)} tool-call-rest",
    ]
    body = "\n".join([*own, *(f"{name} ::= {rule}" for name, rule in sorted(rules.items()))])
    if use.function:
        root = f'root ::= " "? {arguments[0]} {_literal(CLOSING)}'
        return Grammar(f"{root}\n{body}", prefix=f'{OPENING}{use.function}", "arguments":', field="tools")
    if use.choice is Choice.REQUIRED:
        return Grammar(f"root ::= tool-call-rest{more}\n{body}", prefix=OPENING, field="tools")
    return Grammar(f"root ::= tool-call-rest{more}\n{body}", trigger=OPEN, opening=OPENING, field="tools")


# -- out of the output -------------------------------------------------------------------------------------

HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')


@dataclass(frozen=True)
class CallPiece:
    """A new call (with id and name) or more of a call's arguments."""

    index: int
    arguments: str
    id: str = ""
    name: str = ""

    def to_pb(self) -> workers_pb2.TextWorkerGenerateResponse:
        return workers_pb2.TextWorkerGenerateResponse(
            tool_call=events_pb2.ToolCallDelta(
                index=self.index, id=self.id, name=self.name, arguments=self.arguments
            )
        )


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _Scanner:
    """Finds where a JSON value written in pieces ends: counts brackets outside strings."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def end(self, text: str) -> int | None:
        """The index just past the value's end in `text`, or None when the value goes on."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


class ToolCallReader:
    """Splits generated text into text and tool calls, piece by piece as it streams.

    Text outside <tool_call> blocks streams on, less a tail that could be the start of "<tool_call>". Inside a
    block, once `{"name": "...", "arguments": ` has come, the call is announced and its arguments stream as
    they are written. A block in another shape (keys in another order, no grammar) is parsed whole at its
    closing tag; a block that is no call at all is given back as text."""

    def __init__(self) -> None:
        self.calls = 0
        self._buffer = ""
        self._state = "text"  # text, head, arguments, tail
        self._scanner = _Scanner()

    def feed(self, text: str) -> list[str | CallPiece]:
        self._buffer += text
        out: list[str | CallPiece] = []
        while self._buffer:
            before = (self._state, len(self._buffer))
            getattr(self, f"_{self._state}")(out)
            if (self._state, len(self._buffer)) == before:
                break  # needs more text
        return out

    def close(self) -> list[str | CallPiece]:
        """At the end of the output: held text, or a block that never closed given back as text."""
        rest, self._buffer = self._buffer, ""
        if self._state == "text":
            return [rest] if rest else []
        if self._state == "head":
            return [OPEN + rest]
        return []  # a call cut short (max_tokens): what was streamed of it stays

    def _text(self, out: list[str | CallPiece]) -> None:
        at = self._buffer.find(OPEN)
        cut = at if at >= 0 else len(self._buffer) - partial_suffix(self._buffer, OPEN)
        emit, self._buffer = self._buffer[:cut], self._buffer[cut:]
        if emit and not (self.calls and emit.isspace()):
            out.append(emit)
        if at >= 0:
            self._buffer = self._buffer[len(OPEN) :]
            self._state = "head"

    def _head(self, out: list[str | CallPiece]) -> None:
        match = HEAD.match(self._buffer)
        if match is not None:
            name = json.loads(match[1])
            out.append(CallPiece(self.calls, "", id=new_call_id(), name=name))
            self._buffer = self._buffer[match.end() :]
            self._scanner = _Scanner()
            self._state = "arguments"
            return
        closing = self._buffer.find(CLOSE)
        if closing < 0:
            return
        block, self._buffer = self._buffer[:closing], self._buffer[closing + len(CLOSE) :]
        self._state = "text"
        call = _whole_call(block)
        if call is None:
            out.append(OPEN + block + CLOSE)
            return
        name, arguments = call
        out.append(CallPiece(self.calls, arguments, id=new_call_id(), name=name))
        self.calls += 1

    def _arguments(self, out: list[str | CallPiece]) -> None:
        end = self._scanner.end(self._buffer)
        piece = self._buffer if end is None else self._buffer[:end]
        self._buffer = "" if end is None else self._buffer[end:]
        if piece:
            out.append(CallPiece(self.calls, piece))
        if end is not None:
            self.calls += 1  # a call is whole once its arguments are
            self._state = "tail"

    def _tail(self, out: list[str | CallPiece]) -> None:
        closing = self._buffer.find(CLOSE)
        if closing < 0:
            self._buffer = self._buffer[-len(CLOSE) :]  # only "}" and white space come before the tag
            return
        self._buffer = self._buffer[closing + len(CLOSE) :]
        self._state = "text"


def _whole_call(block: str) -> tuple[str, str] | None:
    try:
        value = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


async def with_tool_calls(
    output: AsyncGenerator[Delta | Finished, None],
) -> AsyncGenerator[Delta | CallPiece | Finished, None]:
    """An engine's output with its tool calls read out; a reply that called a tool finishes TOOL_CALLS.
    Closing this closes the engine's output at once (which stops the work)."""
    reader = ToolCallReader()
    ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    async with contextlib.aclosing(output) as items:
        async for item in items:
            if isinstance(item, Finished):
                for piece in reader.close():
                    yield Delta(piece, ids, logprobs) if isinstance(piece, str) else piece
                    ids, logprobs = (), ()
                if reader.calls and item.reason is Finish.STOP:
                    item = replace(item, reason=Finish.TOOL_CALLS)
                yield item
                continue
            # Tokens whose text is held back (a possible "<tool_call>") go with the next text sent; tokens
            # that became a call go with none: the call's text is not the reply's content.
            ids, logprobs = ids + item.token_ids, logprobs + item.logprobs
            for piece in reader.feed(item.text):
                yield Delta(piece, ids, logprobs) if isinstance(piece, str) else piece
                ids, logprobs = (), ()
