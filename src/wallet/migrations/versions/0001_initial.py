"""Initial schema: clients, wallets, an append-only hash-chained ledger, orders, idempotency
records and client API keys. Money invariants are CHECK constraints, not only code.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE clients (
    client_id   text PRIMARY KEY CHECK (client_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    name        text,
    email       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE wallets (
    client_id    text PRIMARY KEY REFERENCES clients (client_id),
    balance      bigint NOT NULL DEFAULT 0 CHECK (balance BETWEEN 0 AND 999999999999999),
    entry_count  bigint NOT NULL DEFAULT 0 CHECK (entry_count >= 0),
    head_hash    bytea  NOT NULL DEFAULT decode(repeat('00', 32), 'hex')
                        CHECK (length(head_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger_entries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id       text   NOT NULL REFERENCES wallets (client_id),
    entry_no        bigint NOT NULL CHECK (entry_no > 0),
    type            text   NOT NULL CHECK (type IN ('CREDIT', 'DEBIT', 'ORDER_DEDUCTION', 'ORDER_REFUND')),
    amount          bigint NOT NULL CHECK (amount > 0),
    balance_before  bigint NOT NULL CHECK (balance_before BETWEEN 0 AND 999999999999999),
    balance_after   bigint NOT NULL CHECK (balance_after BETWEEN 0 AND 999999999999999),
    reference_id    text,
    description     text,
    created_at      timestamptz NOT NULL,
    hash            bytea  NOT NULL CHECK (length(hash) = 32),
    UNIQUE (client_id, entry_no),
    CHECK (
        (type IN ('CREDIT', 'ORDER_REFUND') AND balance_after = balance_before + amount)
        OR (type IN ('DEBIT', 'ORDER_DEDUCTION') AND balance_after = balance_before - amount)
    )
);

CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();

CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_is_append_only();

CREATE TABLE orders (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id        text   NOT NULL UNIQUE CHECK (order_id ~ '^ORD-[0-9]{13}-[0-9a-f]{8}$'),
    client_id       text   NOT NULL REFERENCES wallets (client_id),
    amount          bigint NOT NULL CHECK (amount > 0),
    status          text   NOT NULL CHECK (status IN ('PENDING', 'COMPLETED', 'FAILED')),
    fulfillment_id  text,
    failure         text   CHECK (failure IN ('PROVIDER_ERROR', 'UNREACHABLE')),
    lease_until     timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    request_id      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'PENDING') = (lease_until IS NOT NULL)),
    CHECK ((status = 'COMPLETED') = (fulfillment_id IS NOT NULL)),
    CHECK ((status = 'FAILED') = (failure IS NOT NULL))
);

CREATE INDEX orders_client_page ON orders (client_id, id);


CREATE INDEX orders_client_status_page ON orders (client_id, status, id);


CREATE INDEX orders_pending_lease ON orders (lease_until) WHERE status = 'PENDING';


CREATE TABLE idempotency_keys (
    caller           text NOT NULL,
    key              text NOT NULL,
    fingerprint      bytea NOT NULL,
    order_id         text UNIQUE REFERENCES orders (order_id),
    response_status  integer,
    response_body    bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (caller, key),
    CHECK ((response_status IS NULL) = (response_body IS NULL))
);

CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);


CREATE TABLE api_keys (
    key_id      text PRIMARY KEY,
    client_id   text NOT NULL REFERENCES clients (client_id),
    key_hash    bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE INDEX api_keys_client ON api_keys (client_id);

"""

DOWNGRADE = """
DROP TABLE api_keys;

DROP TABLE idempotency_keys;

DROP TABLE orders;

DROP TABLE ledger_entries;

DROP FUNCTION ledger_is_append_only();

DROP TABLE wallets;

DROP TABLE clients;

"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
