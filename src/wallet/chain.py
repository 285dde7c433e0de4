"""The ledger's hash chain, defined once: what an entry's content is and how it is hashed.

    hash = HMAC-SHA256(LEDGER_KEY, previous_hash || canonical_content(entry))

The first entry of a wallet chains from GENESIS_HASH. Each entry names its key (`key_id`) so
keys can rotate; entries written before migration 0003 have no key id and an unkeyed
sha256(previous_hash || content). The movement statements in ledger.py compute the same thing in
SQL (`ledger_entry_content`, `ledger_chain_hash`, migration 0008), HMAC written out in plain SQL
as sha256(opad_key || sha256(ipad_key || message)) from the padded keys that
`LedgerKey.sql_params` sends as parameters, so the key never reaches a table; `chain_hash` is
the Python twin that `wallet verify` recomputes them with.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

GENESIS_HASH = bytes(32)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def canonical_content(
    *,
    client_id: str,
    entry_no: int,
    type: str,
    amount: int,
    balance_before: int,
    balance_after: int,
    reference_id: str | None,
    description: str | None,
    created_at: datetime,
) -> bytes:
    """Length-prefixed text fields keep the encoding unambiguous whatever they contain."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    parts = [
        client_id,
        str(entry_no),
        type,
        str(amount),
        str(balance_before),
        str(balance_after),
        str(-1 if reference_id is None else len(reference_id)),
        reference_id or "",
        str(-1 if description is None else len(description)),
        description or "",
        str(micros),
    ]
    return "|".join(parts).encode()


KEY_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,32}$"
_BLOCK = 64  # SHA-256 block size, for HMAC's padded keys


@dataclass(frozen=True, slots=True)
class LedgerKey:
    """The chain's HMAC key (`LEDGER_KEY`, id `LEDGER_KEY_ID`) and the retired keys that older
    entries were written with (`LEDGER_OLD_KEYS`). Built once from settings; never stored."""

    key_id: str
    secret: bytes = field(repr=False)
    old: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    _params: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # What a movement statement needs to compute HMAC in SQL: the key id and the key padded
        # and XORed with HMAC's ipad and opad (RFC 2104). Computed once.
        key = self.secret if len(self.secret) <= _BLOCK else hashlib.sha256(self.secret).digest()
        key = key.ljust(_BLOCK, b"\0")
        params = {
            "key_id": self.key_id,
            "ipad_key": bytes(b ^ 0x36 for b in key),
            "opad_key": bytes(b ^ 0x5C for b in key),
        }
        object.__setattr__(self, "_params", params)

    def secret_for(self, key_id: str) -> bytes | None:
        return self.secret if key_id == self.key_id else self.old.get(key_id)

    def sql_params(self) -> dict[str, Any]:
        return self._params


def chain_hash(previous: bytes, content: bytes, secret: bytes | None) -> bytes:
    """An entry's hash: HMAC-SHA256 with its key, or plain SHA-256 for a legacy (pre-0003) one."""
    if secret is None:
        return hashlib.sha256(previous + content).digest()
    return hmac.digest(secret, previous + content, "sha256")
