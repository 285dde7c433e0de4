"""Every key leads with the client: the schema as Citus's multi-tenant model needs it
(distribution column = client_id; docs/scaling.md lists each rule and how it is met).

ledger_entries: the primary key is (client_id, entry_no), what the chain's unique key already was
(no extra index on the hottest table); `id` keeps a plain index for verify's newest-entry probe.
Both indexes are rebuilt under the table's lock: about 10-20 s per 10M entries, during which
writes wait (README: migrations at start).
orders: primary key (client_id, id), which also serves the client's pages (orders_client_page
goes); order ids are unique per client; plain indexes on id (admin lists, the resolver) and
order_id (lookups by id alone). idempotency_keys: a stored client_id, derived from the caller
('client:<id>'; NULL for the admin, whose records never name an order), so that the record's
order is referenced by (client_id, order_id). api_keys: primary key (client_id, key_id), hashes
unique per client, a plain index for the lookup by hash. No SQL of the service changes.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE ledger_entries
    DROP CONSTRAINT ledger_entries_pkey,
    DROP CONSTRAINT ledger_entries_client_id_entry_no_key,
    ADD CONSTRAINT ledger_entries_pkey PRIMARY KEY (client_id, entry_no);

CREATE INDEX ledger_entries_id ON ledger_entries (id);

ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_order_id_fkey,
    DROP CONSTRAINT idempotency_keys_order_id_key;

ALTER TABLE orders DROP CONSTRAINT orders_pkey, DROP CONSTRAINT orders_order_id_key;

ALTER TABLE orders
    ADD CONSTRAINT orders_pkey PRIMARY KEY (client_id, id),
    ADD CONSTRAINT orders_client_order_key UNIQUE (client_id, order_id);

DROP INDEX orders_client_page;

CREATE INDEX orders_id ON orders (id);

CREATE INDEX orders_order_id ON orders (order_id);

ALTER TABLE idempotency_keys
    ADD COLUMN client_id text GENERATED ALWAYS AS (
        CASE WHEN caller LIKE 'client:%' THEN substr(caller, 8) END) STORED,
    ADD CONSTRAINT idempotency_keys_order_has_client CHECK (order_id IS NULL OR client_id IS NOT NULL),
    ADD CONSTRAINT idempotency_keys_order_key UNIQUE (client_id, order_id),
    ADD CONSTRAINT idempotency_keys_order_fkey
        FOREIGN KEY (client_id, order_id) REFERENCES orders (client_id, order_id);

ALTER TABLE api_keys
    DROP CONSTRAINT api_keys_pkey,
    DROP CONSTRAINT api_keys_key_hash_key,
    ADD CONSTRAINT api_keys_pkey PRIMARY KEY (client_id, key_id),
    ADD CONSTRAINT api_keys_key_hash_key UNIQUE (client_id, key_hash);

DROP INDEX api_keys_client;

CREATE INDEX api_keys_hash ON api_keys (key_hash)
"""

DOWNGRADE = r"""
DROP INDEX api_keys_hash;

CREATE INDEX api_keys_client ON api_keys (client_id);

ALTER TABLE api_keys
    DROP CONSTRAINT api_keys_key_hash_key,
    DROP CONSTRAINT api_keys_pkey,
    ADD CONSTRAINT api_keys_pkey PRIMARY KEY (key_id),
    ADD CONSTRAINT api_keys_key_hash_key UNIQUE (key_hash);

ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_order_fkey,
    DROP CONSTRAINT idempotency_keys_order_key,
    DROP CONSTRAINT idempotency_keys_order_has_client,
    DROP COLUMN client_id;

DROP INDEX orders_order_id;

DROP INDEX orders_id;

CREATE INDEX orders_client_page ON orders (client_id, id);

ALTER TABLE orders
    DROP CONSTRAINT orders_client_order_key,
    DROP CONSTRAINT orders_pkey,
    ADD CONSTRAINT orders_pkey PRIMARY KEY (id),
    ADD CONSTRAINT orders_order_id_key UNIQUE (order_id);

ALTER TABLE idempotency_keys
    ADD CONSTRAINT idempotency_keys_order_id_key UNIQUE (order_id),
    ADD CONSTRAINT idempotency_keys_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders (order_id);

DROP INDEX ledger_entries_id;

ALTER TABLE ledger_entries
    DROP CONSTRAINT ledger_entries_pkey,
    ADD CONSTRAINT ledger_entries_pkey PRIMARY KEY (id),
    ADD CONSTRAINT ledger_entries_client_id_entry_no_key UNIQUE (client_id, entry_no)
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
