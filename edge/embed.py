"""Embeddings as every dialect asks for them: inputs (text or token ids) to one Embed call on the broker."""

from __future__ import annotations

import array
import base64
from collections.abc import Sequence

from fastapi import Request

from edge.broker import BrokerClient, forwarded_metadata
from edge.errors import bad_request
from velesio.v1 import common_pb2, inference_pb2

Input = str | Sequence[int]


async def embed(
    broker: BrokerClient,
    request: Request,
    model: str,
    inputs: Sequence[Input],
    *,
    field: str,
    truncate: bool = False,
    normalize: bool = True,
) -> inference_pb2.EmbedResponse:
    """The embeddings of `inputs` (the model's pooling; normalised unless not asked), in input order;
    `field` names the request field they came from in a client's error."""
    if not inputs:
        raise bad_request("must hold at least one input", field)
    items = []
    for index, item in enumerate(inputs):
        if not item:
            raise bad_request(f"{field}[{index}] must not be empty", field)
        if isinstance(item, str):
            items.append(common_pb2.EmbedInput(text=item))
        else:
            items.append(common_pb2.EmbedInput(tokens=common_pb2.TokenIds(ids=item)))
    params = common_pb2.EmbedParams(truncate=truncate, normalize=normalize)
    call = inference_pb2.EmbedRequest(model=model, inputs=items, params=params)
    return await broker.stub.Embed(call, metadata=forwarded_metadata(request))


async def embedding_size(broker: BrokerClient, request: Request, model: str) -> int | None:
    """The size of the vectors `model` (or the caller's default text model) makes; None when unknown."""
    info = await broker.text_model(request, model)
    return info.embedding_size or None if info is not None else None


def base64_floats(values: Sequence[float]) -> str:
    """Little-endian float32s in base64, as OpenAI's `encoding_format: base64` sends them."""
    packed = array.array("f", values)
    if packed.itemsize != 4 or array.array("H", [1]).tobytes() != b"\x01\x00":
        raise RuntimeError("base64 embeddings need a little-endian float32 platform")
    return base64.b64encode(packed.tobytes()).decode()
