"""The one serialization seam: JSON only (never pickle), with a size limit, sealed by a codec if set.

A payload (params, a step result, an output, an event payload, a child's
params) is plain JSON unless a ``PayloadCodec`` is configured
(``STEPLINE_CODEC``): then it is stored and sent as an envelope,
``{"$codec": name, "key": key id, "data": base64}``, inside the same JSON
column or message field. ``Payloads`` seals values on the way in and opens
them on the way out; without a codec sealing costs one ``is None`` check.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel

from stepline.shared.errors import (
    BadPayloadError,
    CodecError,
    ConfigError,
    PayloadTooLargeError,
    PayloadUnreadableError,
)

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


def to_payload(value: object) -> JSON:
    """A user's value (params, a result, an output, an event payload, heartbeat details) as a payload.

    ``to_jsonable``, then ``escape``: what every writer of a user's value calls
    once, before sealing it.

    Raises:
        TypeError, ValueError: ``value`` holds something JSON cannot represent.
    """
    return escape(to_jsonable(value))


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


def encode(
    value: JSON, *, limit: int, what: str = "payload", setting: str = "STEPLINE_MAX_PAYLOAD_BYTES"
) -> bytes:
    """Encode JSON data as UTF-8 bytes, refusing more than ``limit`` bytes (the limit ``setting`` sets)."""
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(body) > limit:
        raise PayloadTooLargeError(what, len(body), limit, setting=setting)
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


# ------------------------------------------------------------------ payload codecs

CODEC_FIELD = "$codec"
"""The key that marks a sealed payload: ``{"$codec": name, "key": key id, "data": base64}``."""

ENCRYPTED = "<encrypted>"
"""What a reader without the codec's key shows in place of a sealed payload."""

OFFLOAD_FIELD = "$payload"
"""The key that marks a reference to a payload stored apart: ``{"$payload": id, "bytes": size}``."""

GONE = "<payload gone>"
"""What a reader shows for a reference whose ``payloads`` row is gone."""

PLAIN = "plain"
"""The ``"$codec"`` of a user's dict kept as it is, ``{"$codec": "plain", "value": {...}}`` (``escape``)."""

DEFAULT_OFFLOAD_ABOVE = 256 * 1024
DEFAULT_MAX_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Offloaded:
    """A payload to store apart, in the ``payloads`` table, before the row that refers to it."""

    id: str
    data: bytes
    """The stored value's JSON (sealed first if a codec is set), zlib-compressed."""
    size: int
    """Bytes of JSON before compression."""


def escape(value: JSON) -> JSON:
    """A user's value as stored: a dict with a ``"$codec"`` or ``"$payload"`` key is wrapped.

    Such a dict would read as an envelope or a reference; wrapped as
    ``{"$codec": "plain", "value": <the dict>}``, it reads back as itself
    (``Payloads.open`` and ``show`` unwrap it), sealed by the codec like any
    other value. Nothing is lost and nothing is refused. Only the top level
    matters: nested dicts are never taken for envelopes.
    """
    if type(value) is dict and (CODEC_FIELD in value or OFFLOAD_FIELD in value):
        return {CODEC_FIELD: PLAIN, "value": value}
    return value


def _is_plain(value: JSON) -> bool:
    return type(value) is dict and value.get(CODEC_FIELD) == PLAIN


def is_offloaded(value: JSON) -> bool:
    """Whether ``value`` is a reference to a payload stored apart."""
    return type(value) is dict and OFFLOAD_FIELD in value


def unpack(data: bytes) -> JSON:
    """The stored value of an ``Offloaded.data`` (still sealed if it was)."""
    return json.loads(zlib.decompress(data))


@runtime_checkable
class PayloadCodec(Protocol):
    """Turns a payload's JSON bytes into other bytes and back, naming the key it used.

    ``name`` is written into every envelope (``"$codec"``), so a reader knows
    which codec sealed a payload. ``encode`` returns the id of the key it used
    (the newest) with the encoded bytes; ``decode`` gets that id back, and
    raises ``CodecError`` for a key it does not have or data that does not decode.
    """

    name: str

    def encode(self, data: bytes) -> tuple[str, bytes]:
        """Encode ``data``: the id of the key used, and the encoded bytes."""
        ...

    def decode(self, data: bytes, key_id: str) -> bytes:
        """Decode what ``encode`` made with the key ``key_id``."""
        ...


def is_sealed(value: JSON) -> bool:
    """Whether ``value`` is a codec's envelope, or a reference to a payload stored apart."""
    return type(value) is dict and (CODEC_FIELD in value or OFFLOAD_FIELD in value)


class Payloads:
    """How this process stores payloads: sealed by its codec (if any), and opened again.

    ``Payloads()`` is the plain way (no codec): ``seal`` returns its value as is,
    and ``open`` refuses an envelope (there is no key to open it with).
    ``offload_above`` and ``max_bytes`` bound a step result (see ``prepare``), and
    params and event payloads a client sends (see ``offload``).
    """

    __slots__ = ("codec", "max_bytes", "offload_above")

    def __init__(
        self,
        codec: PayloadCodec | None = None,
        *,
        offload_above: int = DEFAULT_OFFLOAD_ABOVE,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if codec is not None and getattr(codec, "name", None) == PLAIN:
            raise ConfigError(f"configuration error: a payload codec may not be named {PLAIN!r} (reserved)")
        self.codec = codec
        self.offload_above = offload_above
        self.max_bytes = max_bytes

    def prepare(self, value: JSON, body: bytes) -> tuple[JSON, Offloaded | None]:
        """A step result as written (``body``: its JSON), and the payload row to write first, if any.

        Up to ``offload_above`` bytes the result is written in its step row (sealed
        if a codec is set): one length check. Past it, the sealed value is
        compressed into a payload row, and the step row holds only its reference.
        """
        if len(body) <= self.offload_above:
            return self.seal(value), None
        sealed = self.seal(value)
        data = body if sealed is value else _json_bytes(sealed)
        row = Offloaded(uuid.uuid4().hex, zlib.compress(data, 1), len(data))
        return {OFFLOAD_FIELD: row.id, "bytes": row.size}, row

    def offload(self, value: JSON, *, what: str) -> tuple[JSON, Offloaded | None]:
        """Params or an event payload as a message carries it, and the payload row to write first, if any.

        ``value`` is the payload as stored (``to_payload``'d, sealed or not). Up to
        ``offload_above`` bytes of JSON it is returned sealed and travels inline;
        past it, as ``prepare`` does for a step result, it goes to a payload row
        and the message carries only the reference.

        Raises:
            PayloadTooLargeError: over ``max_bytes`` (``STEPLINE_PAYLOAD__MAX_BYTES``).
        """
        body = encode(value, limit=self.max_bytes, what=what, setting="STEPLINE_PAYLOAD__MAX_BYTES")
        return self.prepare(value, body)

    def is_large(self, value: JSON) -> bool:
        """Whether ``value``'s JSON is over ``offload_above`` bytes (it would be stored apart)."""
        return len(_json_bytes(value)) > self.offload_above

    def seal(self, value: JSON) -> JSON:
        """``value`` as it is stored and sent: an envelope if a codec is set, else ``value`` itself.

        A value sealed already (params that came sealed in a start message) is
        left as it is; a user's dict kept plain by ``escape`` is sealed like any value.
        """
        codec = self.codec
        if codec is None or value is None or (is_sealed(value) and not _is_plain(value)):
            return value
        key_id, data = codec.encode(_json_bytes(value))
        return {CODEC_FIELD: codec.name, "key": key_id, "data": base64.b64encode(data).decode("ascii")}

    def open(self, value: JSON, *, instance_id: str, what: str, step: str | None = None) -> JSON:
        """``value`` as the code sees it: an envelope decoded, anything else as it is.

        Raises:
            PayloadUnreadableError: the envelope cannot be decoded (no codec, a key
                this process lacks, a wrong key, corrupt data); the text names the
                instance and ``what``.
        """
        if not is_sealed(value):
            return value
        try:
            return self._decode(value)
        except CodecError as exc:
            raise PayloadUnreadableError(instance_id, what, str(exc), step=step) from None

    def show(self, value: JSON) -> JSON:
        """``value`` for a person to read: decoded if this process can, else ``ENCRYPTED`` (or ``GONE``)."""
        if not is_sealed(value):
            return value
        if OFFLOAD_FIELD in value:
            return GONE  # a reference left: its row was not found
        try:
            return self._decode(value)
        except CodecError:
            return ENCRYPTED

    def _decode(self, envelope: dict[str, JSON]) -> JSON:
        if OFFLOAD_FIELD in envelope:
            # Readers swap references for their rows first (load_history): this one's row is gone.
            raise CodecError(
                f"its offloaded payload {envelope[OFFLOAD_FIELD]!r} is not in the payloads table "
                "(deleted by a prune or by hand)"
            )
        name = envelope.get(CODEC_FIELD)
        if name == PLAIN:
            return envelope.get("value")  # a user's dict that looked like an envelope (``escape``)
        codec = self.codec
        if codec is None:
            raise CodecError(f"it is sealed by codec {name!r} and this process has no codec (STEPLINE_CODEC)")
        if name != codec.name:
            raise CodecError(f"it is sealed by codec {name!r}, this process has {codec.name!r}")
        key_id, data = envelope.get("key"), envelope.get("data")
        if not isinstance(key_id, str) or not isinstance(data, str):
            raise CodecError("its envelope lacks a key id or data")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise CodecError("its data is not base64") from None
        body = codec.decode(raw, key_id)
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise CodecError(f"key {key_id!r} decoded it to something that is not JSON") from None
        return value.get("value") if _is_plain(value) else value


def _json_bytes(value: JSON) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def load_codec(path: str | None, settings: object) -> PayloadCodec | None:
    """The codec ``STEPLINE_CODEC`` names (``package.module:Name`` or ``package.module.Name``); None if unset.

    The named object is called with the settings: its ``from_settings`` if it
    has one (a class such as ``AesGcmCodec``), else itself (a factory function).

    Raises:
        ConfigError: the path does not import, or what it names does not make a codec.
    """
    if not path:
        return None
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"configuration error: STEPLINE_CODEC={path!r} cannot be imported: {type(exc).__name__}: {exc}"
        ) from None
    try:
        codec = getattr(factory, "from_settings", factory)(settings)
    except ConfigError:
        raise
    except Exception as exc:  # the user's factory may raise anything: one clear line at start-up
        raise ConfigError(
            f"configuration error: STEPLINE_CODEC={path!r} failed to make a codec: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(codec, PayloadCodec) or not isinstance(getattr(codec, "name", None), str):
        raise ConfigError(
            f"configuration error: STEPLINE_CODEC={path!r} made a {type(codec).__name__}, "
            "not a payload codec (a name, encode(data) and decode(data, key_id))"
        )
    return codec


def payloads_from_settings(settings: Any) -> Payloads:
    """The ``Payloads`` of ``STEPLINE_CODEC`` (and its settings): plain when it is unset.

    Raises:
        ConfigError: as ``load_codec``.
    """
    return Payloads(
        load_codec(settings.codec, settings),
        offload_above=settings.payload.offload_above,
        max_bytes=settings.payload.max_bytes,
    )
