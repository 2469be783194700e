"""The shipped payload codec: AES-GCM with named keys, the first one encrypting (key rotation).

``STEPLINE_CODEC=stepline.AesGcmCodec`` and ``STEPLINE_CODEC_KEYS=k2:<base64>,k1:<base64>``:
each key is an id and 16, 24 or 32 random bytes in base64. New payloads are
encrypted with the first key; every listed key still decrypts what it
encrypted, so a rotation puts a new key first and drops an old one only once
nothing it sealed is kept (see docs/payloads.md).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stepline.shared.errors import CodecError, ConfigError

NONCE_BYTES = 12
"""GCM's standard nonce: random per payload, stored in front of the ciphertext."""
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
KEY_SIZES = (16, 24, 32)


class AesGcmCodec:
    """AES-GCM (128, 192 or 256-bit keys) over a payload's JSON bytes.

    Each payload gets a fresh random nonce; the key id is bound to the
    ciphertext as associated data, so data relabelled with another key id
    does not decrypt. A tampered or truncated payload fails to authenticate
    instead of decoding to garbage.

    Args:
        keys: key id to key bytes, newest first: the first key encrypts, all decrypt.
    """

    name = "aes-gcm"

    def __init__(self, keys: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        pairs = list(keys.items() if isinstance(keys, Mapping) else keys)
        if not pairs:
            raise ConfigError("configuration error: AesGcmCodec needs at least one key (STEPLINE_CODEC_KEYS)")
        self._keys: dict[str, AESGCM] = {}
        for key_id, key in pairs:
            if not KEY_ID.match(key_id):
                raise ConfigError(
                    f"configuration error: codec key id {key_id!r} is not a key id "
                    "(letters, digits, '_', '.', '-'; at most 64)"
                )
            if key_id in self._keys:
                raise ConfigError(f"configuration error: codec key id {key_id!r} is listed twice")
            if len(key) not in KEY_SIZES:
                raise ConfigError(
                    f"configuration error: codec key {key_id!r} is {len(key)} bytes; "
                    "AES-GCM takes 16, 24 or 32"
                )
            self._keys[key_id] = AESGCM(key)
        self._current = pairs[0][0]

    @classmethod
    def from_text(cls, text: str) -> AesGcmCodec:
        """The codec of ``id:base64key,id:base64key`` (the form of ``STEPLINE_CODEC_KEYS``)."""
        pairs = []
        for item in (part.strip() for part in text.split(",")):
            key_id, colon, encoded = item.partition(":")
            if not colon:
                raise ConfigError(
                    "configuration error: STEPLINE_CODEC_KEYS must be id:base64key pairs, comma-separated"
                )
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                # The key itself is never shown: only its id.
                raise ConfigError(
                    f"configuration error: STEPLINE_CODEC_KEYS: key {key_id.strip()!r} is not base64"
                ) from None
            pairs.append((key_id.strip(), key))
        return cls(pairs)

    @classmethod
    def from_settings(cls, settings: Any) -> AesGcmCodec:
        """The codec of ``STEPLINE_CODEC_KEYS`` (what ``STEPLINE_CODEC=stepline.AesGcmCodec`` calls)."""
        keys = getattr(settings, "codec_keys", None)
        if keys is None:
            raise ConfigError(
                "configuration error: STEPLINE_CODEC is AesGcmCodec but STEPLINE_CODEC_KEYS is not set"
            )
        return cls.from_text(keys.get_secret_value())

    @staticmethod
    def generate_key() -> str:
        """A new random 256-bit key, base64-encoded, for ``STEPLINE_CODEC_KEYS``."""
        return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")

    @property
    def key_ids(self) -> list[str]:
        """The ids of the keys, the encrypting one first."""
        return list(self._keys)

    def encode(self, data: bytes) -> tuple[str, bytes]:
        """Encrypt ``data`` with the first key: its id, and nonce + ciphertext + tag."""
        nonce = os.urandom(NONCE_BYTES)
        key_id = self._current
        return key_id, nonce + self._keys[key_id].encrypt(nonce, data, key_id.encode())

    def decode(self, data: bytes, key_id: str) -> bytes:
        """Decrypt what ``encode`` made with ``key_id``.

        Raises:
            CodecError: no such key here, or the data does not authenticate
                (a wrong key under that id, or corrupt data).
        """
        aead = self._keys.get(key_id)
        if aead is None:
            raise CodecError(
                f"it is encrypted with key {key_id!r}, which this process does not have "
                f"(its keys: {', '.join(self._keys)}; STEPLINE_CODEC_KEYS)"
            )
        if len(data) < NONCE_BYTES + 16:
            raise CodecError(f"its ciphertext under key {key_id!r} is truncated ({len(data)} bytes)")
        try:
            return aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], key_id.encode())
        except InvalidTag:
            raise CodecError(
                f"its ciphertext does not authenticate under key {key_id!r} "
                "(a different key under that id, or corrupt data)"
            ) from None


__all__ = ["AesGcmCodec"]
