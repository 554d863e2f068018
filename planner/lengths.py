"""Parsing of sequence lengths given by people: 4096, "32k", "128K", "1M" (k = 1024, M = 1024²)."""
from __future__ import annotations

import re
from typing import Union

from passes.errors import InvalidArgumentError

_UNITS = {"": 1, "k": 1024, "m": 1024**2}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(value: Union[int, str], *, name: str = "max_len") -> int:
    """Return the number of tokens that `value` names; raise InvalidArgumentError with what is accepted."""
    accepted = "accepted: a positive int, or a string such as '4096', '32k', '128k', '1M' (k = 1024, M = 1024²)"
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name}={value!r} is not a length; {accepted}")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidArgumentError(f"{name}={value} must be positive; {accepted}")
        return value
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            tokens = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if tokens >= 1 and tokens == int(tokens):
                return int(tokens)
    raise InvalidArgumentError(f"{name}={value!r} is not a length; {accepted}")


def format_length(tokens: int) -> str:
    """131072 -> '128k', 1048576 -> '1M', 5000 -> '5000'."""
    for suffix, unit in (("M", 1024**2), ("k", 1024)):
        if tokens >= unit and tokens % unit == 0:
            return f"{tokens // unit}{suffix}"
    return str(tokens)
