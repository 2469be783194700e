"""The payload codec: sealing, opening, key rotation, and each bad key or ciphertext named clearly."""

from __future__ import annotations

import base64
import json

import pytest

from stepline import AesGcmCodec, PayloadCodec, PayloadUnreadableError, Producer
from stepline.shared.codec import (
    ENCRYPTED,
    GONE,
    Payloads,
    escape,
    is_offloaded,
    is_sealed,
    load_codec,
    payloads_from_settings,
    to_payload,
    unpack,
)
from stepline.shared.errors import ConfigError, PayloadTooLargeError
from stepline.shared.settings import Settings

SECRET = {"card": "4111-1111-1111-1111", "note": "naïve ✓"}


def _key() -> bytes:
    return base64.b64decode(AesGcmCodec.generate_key())


def _open(payloads: Payloads, value: object) -> object:
    return payloads.open(value, instance_id="order-7", what="the result of 'charge'", step="charge")


def test_a_sealed_value_is_an_envelope_without_the_plaintext_and_opens_back() -> None:
    payloads = Payloads(AesGcmCodec({"k1": _key()}))
    sealed = payloads.seal(SECRET)
    assert is_sealed(sealed)
    assert sealed["$codec"] == "aes-gcm"
    assert sealed["key"] == "k1"
    assert "4111" not in json.dumps(sealed)
    assert _open(payloads, sealed) == SECRET
    assert payloads.seal(sealed) is sealed  # sealed once: a child's params are not sealed twice


def test_without_a_codec_sealing_is_the_identity() -> None:
    payloads = Payloads()
    assert payloads.seal(SECRET) is SECRET
    assert _open(payloads, SECRET) is SECRET


def test_new_writes_use_the_first_key_and_every_listed_key_still_reads() -> None:
    old, new = _key(), _key()
    before = Payloads(AesGcmCodec({"k1": old})).seal(SECRET)
    rotated = Payloads(AesGcmCodec([("k2", new), ("k1", old)]))
    assert _open(rotated, before) == SECRET
    after = rotated.seal(SECRET)
    assert after["key"] == "k2"
    assert _open(rotated, after) == SECRET


def test_a_key_the_process_lacks_names_instance_step_and_key() -> None:
    sealed = Payloads(AesGcmCodec({"k1": _key()})).seal(SECRET)
    with pytest.raises(PayloadUnreadableError) as raised:
        _open(Payloads(AesGcmCodec({"k2": _key()})), sealed)
    text = str(raised.value)
    assert "order-7" in text and "'charge'" in text and "'k1'" in text and "k2" in text
    assert raised.value.step == "charge"


def test_a_wrong_key_under_the_same_id_and_a_corrupt_ciphertext_fail_to_authenticate() -> None:
    sealed = Payloads(AesGcmCodec({"k1": _key()})).seal(SECRET)
    with pytest.raises(PayloadUnreadableError, match="does not authenticate under key 'k1'"):
        _open(Payloads(AesGcmCodec({"k1": _key()})), sealed)
    payloads = Payloads(AesGcmCodec({"k1": _key()}))
    sealed = payloads.seal(SECRET)
    data = bytearray(base64.b64decode(sealed["data"]))
    data[-1] ^= 1
    corrupt = {**sealed, "data": base64.b64encode(bytes(data)).decode()}
    with pytest.raises(PayloadUnreadableError, match=r"order-7.*does not authenticate"):
        _open(payloads, corrupt)
    with pytest.raises(PayloadUnreadableError, match="not base64"):
        _open(payloads, {**sealed, "data": "!!"})


def test_a_process_without_the_codec_shows_encrypted_and_refuses_to_open() -> None:
    sealed = Payloads(AesGcmCodec({"k1": _key()})).seal(SECRET)
    assert Payloads().show(sealed) == ENCRYPTED
    assert Payloads(AesGcmCodec({"k9": _key()})).show(sealed) == ENCRYPTED
    assert Payloads().show(SECRET) is SECRET
    with pytest.raises(PayloadUnreadableError, match="no codec"):
        _open(Payloads(), sealed)


def test_the_codec_loads_from_settings_by_import_path() -> None:
    key = AesGcmCodec.generate_key()
    settings = Settings(codec="stepline.AesGcmCodec", codec_keys=f"k2:{key}, k1:{AesGcmCodec.generate_key()}")
    payloads = payloads_from_settings(settings)
    assert isinstance(payloads.codec, AesGcmCodec)
    assert isinstance(payloads.codec, PayloadCodec)
    assert payloads.codec.key_ids == ["k2", "k1"]
    same = load_codec("stepline.shared.aes_gcm:AesGcmCodec", settings)
    assert isinstance(same, AesGcmCodec)
    assert payloads_from_settings(Settings()).codec is None


@pytest.mark.parametrize(
    ("path", "keys", "expected"),
    [
        ("no_such_module.Codec", None, "STEPLINE_CODEC='no_such_module.Codec' cannot be imported"),
        ("stepline.NoSuchCodec", None, "cannot be imported"),
        ("json.dumps", None, "failed to make a codec: TypeError"),
        ("builtins.dict", None, "not a payload codec"),
        ("stepline.AesGcmCodec", None, "STEPLINE_CODEC_KEYS is not set"),
        ("stepline.AesGcmCodec", "k1", "id:base64key pairs"),
        ("stepline.AesGcmCodec", "k1:not-base64!", "key 'k1' is not base64"),
        ("stepline.AesGcmCodec", "k1:" + base64.b64encode(b"short").decode(), "'k1' is 5 bytes"),
        ("stepline.AesGcmCodec", "bad id:" + base64.b64encode(bytes(32)).decode(), "is not a key id"),
    ],
)
def test_a_codec_that_does_not_load_is_a_clear_config_error(
    path: str, keys: str | None, expected: str
) -> None:
    settings = Settings(codec=path, codec_keys=keys)
    with pytest.raises(ConfigError, match="configuration error") as raised:
        payloads_from_settings(settings)
    assert expected in str(raised.value)
    if keys and ":" in keys:
        assert keys.split(":", 1)[1] not in str(raised.value)  # key material is never shown


def test_a_small_result_stays_in_its_row_and_a_large_one_is_stored_apart_compressed() -> None:
    plain = Payloads(offload_above=1024)
    small = {"n": 1}
    assert plain.prepare(small, json.dumps(small).encode()) == (small, None)
    large = {"blob": "x" * 5000}
    body = json.dumps(large, separators=(",", ":")).encode()
    stored, row = plain.prepare(large, body)
    assert row is not None and stored == {"$payload": row.id, "bytes": len(body)}
    assert len(row.data) < len(body) // 10
    assert unpack(row.data) == large


def test_a_large_result_is_sealed_then_stored_apart() -> None:
    payloads = Payloads(AesGcmCodec({"k1": _key()}), offload_above=1024)
    large = {"card": SECRET["card"], "blob": "x" * 5000}
    stored, row = payloads.prepare(large, json.dumps(large).encode())
    assert row is not None and is_offloaded(stored)
    sealed = unpack(row.data)
    assert sealed["key"] == "k1" and "4111" not in json.dumps(sealed)
    assert _open(payloads, sealed) == large


def test_a_reference_whose_row_is_gone_is_a_clear_error_and_shows_as_gone() -> None:
    reference = {"$payload": "abc123", "bytes": 9000}
    with pytest.raises(
        PayloadUnreadableError, match="offloaded payload 'abc123' is not in the payloads table"
    ):
        _open(Payloads(), reference)
    assert Payloads().show(reference) == GONE
    assert Payloads(AesGcmCodec({"k1": _key()})).seal(reference) is reference


@pytest.mark.parametrize(
    "value",
    [
        {"$codec": "aes-gcm", "key": "k1", "data": "AAAA"},
        {"$payload": "5f0c", "bytes": 12},
        {"$codec": "plain", "value": "a user's, not an escape"},
        {"$codec": {"$codec": "nested"}},
    ],
)
@pytest.mark.parametrize("codec", [None, "aes-gcm"])
def test_a_users_dict_with_the_reserved_keys_is_escaped_and_reads_back_as_itself(
    value: dict[str, object], codec: str | None
) -> None:
    payloads = Payloads(AesGcmCodec({"k1": _key()}) if codec else None)
    stored = payloads.seal(to_payload(value))
    assert stored != value  # never stored as it is: it would read as an envelope or a reference
    if codec:
        assert stored["$codec"] == "aes-gcm" and "user" not in json.dumps(stored)  # sealed as any value
    assert _open(payloads, stored) == value
    assert payloads.show(stored) == value
    assert escape({"$codec": 1}) != escape(escape({"$codec": 1}))  # each layer its own: none is lost


def test_a_value_without_the_reserved_keys_is_not_escaped_and_a_codec_may_not_be_named_plain() -> None:
    for value in (SECRET, [{"$codec": "in a list"}], {"nested": {"$codec": "x"}}, "$codec", None):
        assert to_payload(value) == value
    plain = AesGcmCodec({"k1": _key()})
    plain.name = "plain"
    with pytest.raises(ConfigError, match="may not be named 'plain'"):
        Payloads(plain)


def test_params_over_the_largest_payload_are_refused_naming_the_setting() -> None:
    payloads = Payloads(offload_above=1024, max_bytes=4096)
    carried, row = payloads.offload({"blob": "x" * 2000}, what="the start's params")
    assert row is not None and carried == {"$payload": row.id, "bytes": row.size}
    with pytest.raises(
        PayloadTooLargeError, match=r"the start's params is \d+ bytes, over the 4096-byte limit"
    ) as raised:
        payloads.offload({"blob": "x" * 5000}, what="the start's params")
    assert "STEPLINE_PAYLOAD__MAX_BYTES" in str(raised.value)


async def test_the_producer_refuses_params_over_the_message_limit_pointing_at_the_client() -> None:
    # Nothing is connected: the limit is checked before anything is sent.
    producer = Producer("amqp://guest:guest@127.0.0.1:1/none", max_payload_bytes=1024)
    with pytest.raises(PayloadTooLargeError) as raised:
        await producer.start("orders", {"blob": "x" * 2000})
    text = str(raised.value)
    assert "over the 1024-byte limit (STEPLINE_MAX_PAYLOAD_BYTES)" in text, text
    assert "Client.start stores larger params in the database" in text, text
