"""Request validation: everything wrong with a request is found here, before anything is queued, and
reported as INVALID_ARGUMENT naming the field (in the request's own field path)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema

from mesh.errors import InvalidArgument
from velesio.v1 import common_pb2, inference_pb2

MAX_STOP = 16
MAX_STOP_CHARS = 512
MAX_LOGPROBS = 20
MAX_GRAMMAR_CHARS = 200_000
EVENT_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")  # a Redis stream id: "<ms>-<seq>"


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_chars: int = 1_000_000
    max_image_bytes: int = 20 * 1024 * 1024
    max_steps: int = 150
    max_image_side: int = 2048
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_init_images: int = 4


def _in_range(value: float, low: float, high: float, field: str) -> None:
    if math.isnan(value) or not low <= value <= high:
        raise InvalidArgument(f"{value:g} is out of range [{low:g}, {high:g}]", field=field)


Bounds = tuple[tuple[str, float, float], ...]


def _check_bounds(
    message: common_pb2.SamplingParams | common_pb2.ImageParams, bounds: Bounds, field: str
) -> None:
    """Checks the optional numeric fields that are set against their [low, high] range."""
    for name, low, high in bounds:
        if message.HasField(name):  # type: ignore[arg-type]
            _in_range(getattr(message, name), low, high, f"{field}.{name}")


SAMPLING_BOUNDS: Bounds = (
    ("temperature", 0, 5),
    ("top_k", 0, 100_000),
    ("top_p", 0, 1),
    ("min_p", 0, 1),
    ("typical_p", 0, 1),
    ("repeat_penalty", 0, 10),
    ("repeat_last_n", -1, 1_000_000),
    ("presence_penalty", -2, 2),
    ("frequency_penalty", -2, 2),
    ("seed", -1, 2**63 - 1),
    ("max_tokens", -1, 1_000_000),
)


def check_sampling(sampling: common_pb2.SamplingParams, field: str = "sampling") -> None:
    _check_bounds(sampling, SAMPLING_BOUNDS, field)
    if sampling.HasField("max_tokens") and sampling.max_tokens == 0:
        raise InvalidArgument("must be -1 (no limit) or at least 1", field=f"{field}.max_tokens")
    if len(sampling.stop) > MAX_STOP:
        raise InvalidArgument(f"at most {MAX_STOP} stop strings", field=f"{field}.stop")
    for i, stop in enumerate(sampling.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise InvalidArgument(f"must be 1 to {MAX_STOP_CHARS} characters", field=f"{field}.stop[{i}]")
    _in_range(sampling.logprobs, 0, MAX_LOGPROBS, f"{field}.logprobs")
    _check_constraints(sampling, field)


def _check_constraints(sampling: common_pb2.SamplingParams, field: str) -> None:
    for token, bias in sampling.logit_bias.items():
        if token < 0:
            raise InvalidArgument(f"token id {token} is negative", field=f"{field}.logit_bias")
        _in_range(bias, -100, 100, f"{field}.logit_bias[{token}]")
    if sampling.grammar and sampling.json_schema:
        raise InvalidArgument("give grammar or json_schema, not both", field=f"{field}.grammar")
    if len(sampling.grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidArgument(f"longer than {MAX_GRAMMAR_CHARS} characters", field=f"{field}.grammar")
    if sampling.ignore_eos and (sampling.grammar or sampling.json_schema):
        raise InvalidArgument(
            "cannot be combined with a grammar or a JSON schema: a finished grammar allows only the end",
            field=f"{field}.ignore_eos",
        )
    if sampling.json_schema:
        json_object(sampling.json_schema, f"{field}.json_schema")


def json_object(text: str, field: str, what: str = "a JSON object") -> dict[str, Any]:
    """`text` parsed, when it is a JSON object; else INVALID_ARGUMENT about `field`."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"not valid JSON: {exc}", field=field) from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"must be {what}", field=field)
    return value


def check_options(options: inference_pb2.JobOptions, field: str = "options") -> None:
    _in_range(options.priority, -100, 100, f"{field}.priority")
    if options.timeout_ms < 0:
        raise InvalidArgument("must not be negative", field=f"{field}.timeout_ms")
    if len(options.session_id) > 256:
        raise InvalidArgument("longer than 256 characters", field=f"{field}.session_id")


def check_complete(request: inference_pb2.CompleteRequest, limits: RequestLimits) -> None:
    if not request.prompt:
        raise InvalidArgument("must not be empty", field="prompt")
    if len(request.prompt) > limits.max_prompt_chars:
        raise InvalidArgument(
            f"{len(request.prompt)} characters; the limit is {limits.max_prompt_chars}", field="prompt"
        )
    check_sampling(request.sampling)
    check_options(request.options)


def check_messages(messages: Sequence[common_pb2.ChatMessage]) -> None:
    if not messages:
        raise InvalidArgument("must hold at least one message", field="messages")
    for i, message in enumerate(messages):
        if not message.role:
            raise InvalidArgument("must not be empty", field=f"messages[{i}].role")


def check_chat(request: inference_pb2.ChatRequest, limits: RequestLimits) -> None:
    check_messages(request.messages)
    total = sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in request.messages) + sum(
        len(t.description) + len(t.parameters) for t in request.tools
    )
    if total > limits.max_prompt_chars:
        raise InvalidArgument(f"{total} characters; the limit is {limits.max_prompt_chars}", field="messages")
    check_sampling(request.sampling)
    check_tools(request)
    check_options(request.options)


MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_tools(request: inference_pb2.ChatRequest) -> None:
    """Tools with unique names and JSON Schemas for arguments, a tool_choice that names one of them, and a
    conversation whose tool results answer calls made before them."""
    if len(request.tools) > MAX_TOOLS:
        raise InvalidArgument(f"at most {MAX_TOOLS} tools", field="tools")
    names: set[str] = set()
    for i, tool in enumerate(request.tools):
        if not TOOL_NAME.fullmatch(tool.name):
            raise InvalidArgument(
                f"{tool.name!r} is no tool name: 1 to 64 letters, digits, underscores, dots or dashes",
                field=f"tools[{i}].name",
            )
        if tool.name in names:
            raise InvalidArgument(f"two tools are named {tool.name!r}", field=f"tools[{i}].name")
        names.add(tool.name)
        _check_parameters(tool.parameters, f"tools[{i}].parameters")
    choice = request.tool_choice
    if choice.function:
        if choice.mode not in (common_pb2.TOOL_CHOICE_MODE_UNSPECIFIED, common_pb2.TOOL_CHOICE_MODE_REQUIRED):
            raise InvalidArgument(
                "a named function must be called: mode must be required", field="tool_choice.mode"
            )
        if choice.function not in names:
            known = ", ".join(sorted(names)) or "none"
            raise InvalidArgument(
                f"no tool is named {choice.function!r}; the request's tools: {known}",
                field="tool_choice.function",
            )
    if choice.mode == common_pb2.TOOL_CHOICE_MODE_REQUIRED and not request.tools:
        raise InvalidArgument("a tool call is required but the request has no tools", field="tool_choice")
    sampling = request.sampling
    if request.tools and choice.mode != common_pb2.TOOL_CHOICE_MODE_NONE:
        if sampling.grammar or sampling.json_schema:
            raise InvalidArgument(
                "tools cannot be combined with a grammar or a JSON schema (a response format)", field="tools"
            )
        if sampling.ignore_eos:
            raise InvalidArgument("cannot be combined with tools", field="sampling.ignore_eos")
    _check_conversation(request.messages)


def _check_parameters(parameters: str, field: str) -> None:
    if not parameters:
        return
    schema = json_object(parameters, field, "a JSON Schema object")
    if schema.get("type", "object") != "object":
        raise InvalidArgument(f'must describe an object (type "object"), not {schema["type"]!r}', field=field)
    if not isinstance(schema.get("$schema", ""), str):
        raise InvalidArgument("$schema must be a URI", field=field)
    try:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidArgument(
            f"not a JSON Schema: {exc.message}" + (f" (at {where})" if where else ""), field=field
        ) from None
    except (RecursionError, ValueError, TypeError, LookupError) as exc:
        raise InvalidArgument(f"not a usable JSON Schema: {type(exc).__name__}: {exc}", field=field) from None


def _check_conversation(messages: Sequence[common_pb2.ChatMessage]) -> None:
    calls: set[str] = set()
    for i, message in enumerate(messages):
        if message.tool_calls and message.role != "assistant":
            raise InvalidArgument(
                "only assistant messages carry tool calls", field=f"messages[{i}].tool_calls"
            )
        ids: set[str] = set()  # unique in a message; clients may number each turn's calls from 0 again
        for j, call in enumerate(message.tool_calls):
            _check_call(call, ids, f"messages[{i}].tool_calls[{j}]")
            ids.add(call.id)
        calls |= ids
        field = f"messages[{i}].tool_call_id"
        if message.role != "tool":
            if message.tool_call_id:
                raise InvalidArgument("only tool messages answer a tool call", field=field)
        elif not message.tool_call_id:
            raise InvalidArgument("a tool message must name the call it answers", field=field)
        elif message.tool_call_id not in calls:
            raise InvalidArgument(
                f"no earlier assistant message made a tool call with id {message.tool_call_id!r}", field=field
            )


def _check_call(call: common_pb2.ToolCall, siblings: set[str], field: str) -> None:
    if not call.id:
        raise InvalidArgument("a tool call needs an id", field=f"{field}.id")
    if call.id in siblings:
        raise InvalidArgument(f"the message has two calls with the id {call.id!r}", field=f"{field}.id")
    if not call.name:
        raise InvalidArgument("must not be empty", field=f"{field}.name")
    if call.arguments:
        json_object(call.arguments, f"{field}.arguments")


MAX_EMBED_INPUTS = 2048


def check_embed(request: inference_pb2.EmbedRequest, limits: RequestLimits) -> None:
    if not request.inputs:
        raise InvalidArgument("must hold at least one input", field="inputs")
    if len(request.inputs) > MAX_EMBED_INPUTS:
        raise InvalidArgument(
            f"{len(request.inputs)} inputs; the limit is {MAX_EMBED_INPUTS}", field="inputs"
        )
    total = 0
    for i, item in enumerate(request.inputs):
        which = item.WhichOneof("input")
        if (
            which is None
            or (which == "text" and not item.text)
            or (which == "tokens" and not item.tokens.ids)
        ):
            raise InvalidArgument("must not be empty", field=f"inputs[{i}]")
        if which == "tokens" and min(item.tokens.ids) < 0:
            raise InvalidArgument("token ids must not be negative", field=f"inputs[{i}]")
        total += len(item.text) if which == "text" else len(item.tokens.ids)
    if total > limits.max_prompt_chars:
        raise InvalidArgument(f"{total} characters; the limit is {limits.max_prompt_chars}", field="inputs")
    check_options(request.options)


def _check_image_bytes(data: bytes, field: str, limits: RequestLimits) -> None:
    if not data:
        raise InvalidArgument("is empty", field=field)
    if len(data) > limits.max_image_bytes:
        raise InvalidArgument(f"{len(data)} bytes; the limit is {limits.max_image_bytes}", field=field)


def check_image(request: inference_pb2.GenerateImageRequest, limits: RequestLimits) -> None:
    params = request.params
    if len(params.prompt) + len(params.negative_prompt) > limits.max_prompt_chars:
        raise InvalidArgument(f"longer than {limits.max_prompt_chars} characters", field="params.prompt")
    bounds: Bounds = (
        ("steps", 1, limits.max_steps),
        ("cfg_scale", 0, 30),
        ("width", 64, limits.max_image_side),
        ("height", 64, limits.max_image_side),
        ("seed", -1, 2**32 - 1),
        ("batch_size", 1, limits.max_batch_size),
        ("n_iter", 1, limits.max_n_iter),
        ("denoising_strength", 0, 1),
        ("mask_blur", 0, 64),
        ("inpaint_full_res_padding", 0, 256),
    )
    _check_bounds(params, bounds, "params")
    for side in ("width", "height"):
        if params.HasField(side) and getattr(params, side) % 8:
            raise InvalidArgument(f"{getattr(params, side)} is not a multiple of 8", field=f"params.{side}")
    _check_image_inputs(params, limits)
    check_options(request.options)


def _check_image_inputs(params: common_pb2.ImageParams, limits: RequestLimits) -> None:
    if len(params.init_images) > limits.max_init_images:
        raise InvalidArgument(f"at most {limits.max_init_images} init images", field="params.init_images")
    for i, image in enumerate(params.init_images):
        _check_image_bytes(image, f"params.init_images[{i}]", limits)
    if params.mask:
        if not params.init_images:
            raise InvalidArgument("a mask needs init_images to inpaint", field="params.mask")
        _check_image_bytes(params.mask, "params.mask", limits)
    if params.preview_every < 0:
        raise InvalidArgument("must not be negative", field="params.preview_every")
    for i, lora in enumerate(params.loras):
        if not lora.name:
            raise InvalidArgument("must not be empty", field=f"params.loras[{i}].name")
        if lora.HasField("weight"):
            _in_range(lora.weight, -10, 10, f"params.loras[{i}].weight")


def check_event_id(event_id: str, field: str = "after_event_id") -> None:
    """Empty, or an event id as events carry them (Redis refuses anything else with an error)."""
    match = EVENT_ID.fullmatch(event_id)
    if event_id and (match is None or any(int(part) >= 2**64 for part in match.groups() if part)):
        raise InvalidArgument(
            f"{event_id[:40]!r} is not an event id (they look like 1700000000000-0)", field=field
        )
