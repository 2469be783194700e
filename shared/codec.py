"""The one serialization seam: JSON only (never pickle), with a size limit."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from stepline.shared.errors import BadPayloadError, PayloadTooLargeError

JSON = Any
"""Untyped JSON data: the one alias behind which ``Any`` lives."""


def to_jsonable(value: object) -> JSON:
    """Turn ``value`` (JSON data or pydantic models, also nested) into plain JSON data.

    Raises:
        TypeError: ``value`` holds something JSON cannot represent.
    """
    # A round trip both validates and normalises (tuples become lists, models dump,
    # NaN and infinities are refused as JSON has no such numbers).
    return json.loads(json.dumps(value, default=_default, allow_nan=False))


def _default(value: object) -> JSON:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def scrub_nul(value: JSON) -> JSON:
    """Replace U+0000 in every string with the text ``\\u0000``.

    PostgreSQL ``jsonb`` rejects NUL characters; storing them escaped keeps a
    step result or error text from leaving a message that can never be acked.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000") if "\x00" in value else value
    if isinstance(value, list):
        return [scrub_nul(item) for item in value]
    if isinstance(value, dict):
        return {scrub_nul(key): scrub_nul(item) for key, item in value.items()}
    return value


def encode(value: JSON, *, limit: int, what: str = "payload") -> bytes:
    """Encode JSON data as UTF-8 bytes, refusing more than ``limit`` bytes."""
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(body) > limit:
        raise PayloadTooLargeError(what, len(body), limit)
    return body


def decode(body: bytes, *, limit: int, what: str = "message") -> JSON:
    """Decode a JSON message body, refusing more than ``limit`` bytes or anything not JSON."""
    if len(body) > limit:
        raise PayloadTooLargeError(what, len(body), limit)
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadPayloadError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise BadPayloadError(f"{what} is nested too deeply") from None


def _refuse_constant(name: str) -> JSON:
    # NaN and Infinity are not JSON, and PostgreSQL jsonb would refuse them later.
    raise ValueError(f"{name} is not a JSON number")
