"""What every dialect's protocol models build on: request bodies that accept unknown fields, integers bounded
to the protobuf field they end up in, token ids as clients spell them, and reply bodies."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

# protobuf refuses integers outside a field's range (ValueError); bounding the wire models with them makes
# such a value a 400 naming the field, and the OpenAPI schema states the range.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
_TOKEN_ID = re.compile(r"-?[0-9]{1,10}")


def token_id(value: object) -> int | None:
    """A token id given as a JSON number or a string of ASCII digits, or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not _TOKEN_ID.fullmatch(str(value)):
        return None
    number = int(value)
    return number if INT32_MIN <= number <= INT32_MAX else None


def lone_surrogate(value: object, at: str = "") -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate ("\\ud800" is valid JSON, but neither
    protobuf nor a UTF-8 reply can carry it), or None."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return at or "the body"
    elif isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate(key, at) or lone_surrogate(item, f"{at}.{key}" if at else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if found := lone_surrogate(item, f"{at}[{index}]"):
                return found
    return None


class WireModel(BaseModel):
    """Base of request bodies: unknown fields are accepted and logged, never rejected; text that is not
    valid Unicode is refused (400 naming the field) before it reaches protobuf."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if found := lone_surrogate(data):
            raise ValueError(f"{found}: not valid Unicode text (a lone surrogate)")
        return data

    @model_validator(mode="after")
    def _log_unknown(self) -> Any:
        if self.model_extra:
            log.info("%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra))
        return self


class Reply(BaseModel):
    """Base of reply bodies: exactly the fields declared, so that /docs and the OpenAPI document show what a
    client gets back."""

    model_config = ConfigDict(extra="forbid")


def _is_none(value: object) -> bool:
    return value is None


def omitted_when_none() -> Any:
    """A reply field that defaults to None and is then left out rather than sent as null, for shapes whose
    clients tell 'absent' from 'null' (an OpenAI stream's final delta is `{}`)."""
    return Field(None, exclude_if=_is_none)
