"""Automatic1111 infotext: what its PNGs carry in the "parameters" text chunk, written and parsed.

a red cat
Negative prompt: blurry
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, ...
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

NEGATIVE = "Negative prompt: "
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _value(value: object) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text)
    return text


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The infotext A1111 writes; `params` in its order ("Steps", "Sampler", ...), None values left out."""
    line = ", ".join(f"{key}: {_value(value)}" for key, value in params.items() if value is not None)
    negative = f"\n{NEGATIVE}{negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, parameters as strings): the inverse of `format_infotext`, and what A1111's
    own parser reads from its PNGs (a prompt and negative prompt over several lines included)."""
    *lines, last = text.strip().split("\n")
    found = _PARAM.findall(last)
    if len(found) < 3:  # not a parameter line: all of it is prompt
        lines.append(last)
        found = []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE) :]
        (negative if in_negative else prompt).append(line)
    params: dict[str, str] = {}
    for key, value in found:
        value = value.strip()
        if len(value) > 1 and value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        params[key] = value
    return "\n".join(prompt), "\n".join(negative), params
