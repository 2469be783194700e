"""The codec: JSON only, pydantic models allowed, NUL scrubbed, size limited."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from stepline.shared import codec
from stepline.shared.errors import BadPayloadError, PayloadTooLargeError


class Address(BaseModel):
    street: str
    tags: tuple[str, ...] = ()


class Customer(BaseModel):
    name: str
    address: Address
    score: float = 0.0


def test_pydantic_model_becomes_plain_json() -> None:
    customer = Customer(name="Ada", address=Address(street="Main St", tags=("home", "billing")))
    assert codec.to_jsonable(customer) == {
        "name": "Ada",
        "address": {"street": "Main St", "tags": ["home", "billing"]},
        "score": 0.0,
    }


def test_models_nested_in_plain_data_are_dumped() -> None:
    value = {"customers": [Customer(name="Ada", address=Address(street="Main St"))], "count": 1}
    assert codec.to_jsonable(value) == {
        "customers": [{"name": "Ada", "address": {"street": "Main St", "tags": []}, "score": 0.0}],
        "count": 1,
    }


def test_tuples_become_lists_also_nested() -> None:
    assert codec.to_jsonable((1, (2, 3), {"a": (4,)})) == [1, [2, 3], {"a": [4]}]


def test_plain_json_is_unchanged() -> None:
    value = {"a": [1, 2.5, "x", None, True, {"b": []}]}
    assert codec.to_jsonable(value) == value


@pytest.mark.parametrize(
    ("value", "type_name"),
    [(object(), "object"), ({"s": {1, 2}}, "set"), ([b"raw"], "bytes")],
)
def test_non_serialisable_value_raises_type_error_naming_the_type(value: object, type_name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{type_name} is not JSON-serialisable$"):
        codec.to_jsonable(value)


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        {"x": [float("inf")]},
        {"m": Customer(name="x", address=Address(street="y"), score=float("nan"))},
    ],
)
def test_nan_and_infinity_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        codec.to_jsonable(value)


def test_nan_in_a_top_level_model_is_refused() -> None:
    with pytest.raises(ValueError):
        codec.to_jsonable(Customer(name="x", address=Address(street="y"), score=float("nan")))


def test_scrub_nul_replaces_nul_in_nested_strings_and_keys() -> None:
    value = {"a\x00b": ["x\x00", {"k\x00": "\x00\x00"}], "n": 1, "none": None, "ok": "plain"}
    assert codec.scrub_nul(value) == {
        "a\\u0000b": ["x\\u0000", {"k\\u0000": "\\u0000\\u0000"}],
        "n": 1,
        "none": None,
        "ok": "plain",
    }


def test_scrubbed_value_holds_no_nul_once_encoded() -> None:
    body = codec.encode(codec.scrub_nul({"error": "bad\x00byte"}), limit=1000)
    assert b"\x00" not in body
    assert json.loads(body) == {"error": "bad\\u0000byte"}


def test_encode_is_compact_utf8_json() -> None:
    assert codec.encode({"a": [1, 2], "b": "é"}, limit=100) == '{"a":[1,2],"b":"é"}'.encode()


def test_encode_refuses_more_than_the_limit_and_names_it() -> None:
    value = {"blob": "x" * 200}
    size = len(codec.encode(value, limit=10_000))
    with pytest.raises(PayloadTooLargeError) as caught:
        codec.encode(value, limit=100, what="the result of step 'a'")
    error = caught.value
    assert (error.size, error.limit) == (size, 100)
    assert str(error) == (
        f"the result of step 'a' is {size} bytes, over the 100-byte limit (STEPLINE_MAX_PAYLOAD_BYTES)"
    )
    assert isinstance(error, BadPayloadError)


def test_encode_accepts_exactly_the_limit() -> None:
    body = codec.encode("abc", limit=5)
    assert body == b'"abc"'


def test_decode_round_trips_encode() -> None:
    value = {"a": [1, {"b": None}], "c": "ü"}
    assert codec.decode(codec.encode(value, limit=1000), limit=1000) == value


@pytest.mark.parametrize("body", [b"", b"{not json", b"\xff\xfe", b'{"a": 1'])
def test_decode_of_invalid_json_raises_bad_payload(body: bytes) -> None:
    with pytest.raises(BadPayloadError, match=r"^message is not valid JSON: ") as caught:
        codec.decode(body, limit=1000)
    assert caught.value.reason.startswith("message is not valid JSON")


def test_decode_names_what_it_decodes() -> None:
    with pytest.raises(BadPayloadError, match=r"^start event is not valid JSON"):
        codec.decode(b"nope", limit=100, what="start event")


def test_decode_refuses_a_body_over_the_limit_before_parsing() -> None:
    with pytest.raises(PayloadTooLargeError, match=r"^message is 13 bytes, over the 10-byte limit"):
        codec.decode(b"not even json", limit=10)


def test_decode_refuses_nan() -> None:
    with pytest.raises(BadPayloadError):
        codec.decode(b'{"x": NaN}', limit=100)


def test_decode_of_deeply_nested_json_is_a_bad_payload() -> None:
    with pytest.raises(BadPayloadError):
        codec.decode(b"[" * 100_000, limit=1_000_000)
