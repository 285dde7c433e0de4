"""Events (a transactional outbox) and webhooks: endpoints, deliveries and their attempt log.

Every client-owned row is keyed by (client_id, id) so that a client's rows can live together
when tables are distributed by client id. Event ids are 128 random bits (`evt_` + 32 hex),
indexed but not declared unique (a unique index would have to include client_id once
distributed). Endpoints are the exception to the keying: a global endpoint (no client) receives
every client's events, so endpoints are keyed by their own id (a small table, a reference table
once distributed).

Events are immutable: a trigger refuses UPDATE, TRUNCATE and DELETE, except a DELETE of an event
older than the retention the purge names (`SET LOCAL wallet.events_retention_days`, at least 1).
Each event is queued for fan-out by a trigger in the same transaction (`event_queue`), so no
event is ever missed by the delivery job, whatever order concurrent transactions commit in.

Neither `events` nor `event_queue` has a foreign key: they are written inside the money
statements, and a foreign key check there would lock the client row (KEY SHARE) after the wallet
row, against the lock order the ledger keeps, and cost an index probe per event. The events are
written only by statements about an existing client; a queue row whose event is gone is dropped
by the fan-out.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TYPES = (
    "'wallet.credited', 'wallet.debited', 'order.created', 'order.completed', 'order.failed', "
    "'order.pending', 'order.needs_review', 'order.resolved', 'balance.low', 'api_key.created', "
    "'api_key.revoked', 'webhook_endpoint.disabled'"
)

UPGRADE = rf"""
ALTER TABLE clients ADD COLUMN low_balance_threshold bigint
    CHECK (low_balance_threshold BETWEEN 1 AND 999999999999999);

CREATE TABLE events (
    client_id   text NOT NULL CHECK (client_id ~ '^[A-Za-z0-9_.:-]{{1,64}}$'),
    id          bigint GENERATED ALWAYS AS IDENTITY,
    event_id    text NOT NULL DEFAULT 'evt_' || replace(gen_random_uuid()::text, '-', '')
                CHECK (event_id ~ '^evt_[0-9a-f]{{32}}$'),
    type        text NOT NULL CHECK (type IN ({TYPES})),
    data        jsonb NOT NULL CHECK (jsonb_typeof(data) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (client_id, id)
);

CREATE INDEX events_page ON events (id);

CREATE INDEX events_client_type_page ON events (client_id, type, id);

CREATE INDEX events_event_id ON events (event_id);

CREATE INDEX events_created ON events USING brin (created_at);

CREATE FUNCTION events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    keep_days integer := nullif(current_setting('wallet.events_retention_days', true), '')::integer;
BEGIN
    IF TG_OP = 'DELETE' AND keep_days >= 1
       AND OLD.created_at < statement_timestamp() - make_interval(days => keep_days) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'events are immutable: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_immutable();

CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_immutable();

CREATE TABLE event_queue (
    client_id  text NOT NULL,
    event_no   bigint NOT NULL,
    PRIMARY KEY (client_id, event_no)
);

CREATE INDEX event_queue_order ON event_queue (event_no);

CREATE FUNCTION events_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_queue (client_id, event_no) VALUES (NEW.client_id, NEW.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER events_enqueue AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION events_enqueue();

CREATE TABLE webhook_endpoints (
    endpoint_id       text PRIMARY KEY CHECK (endpoint_id ~ '^we_[0-9a-f]{{24}}$'),
    client_id         text REFERENCES clients (client_id),
    url               text NOT NULL CHECK (url ~ '^https?://' AND length(url) <= 2048),
    event_types       text[] CHECK (cardinality(event_types) > 0 AND event_types <@ ARRAY[{TYPES}]),
    description       text CHECK (length(description) <= 500),
    enabled           boolean NOT NULL DEFAULT true,
    secret            bytea NOT NULL,
    previous_secret   bytea,
    previous_until    timestamptz,
    failing_since     timestamptz,
    disabled_reason   text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((previous_secret IS NULL) = (previous_until IS NULL)),
    CHECK (enabled OR disabled_reason IS NOT NULL)
);

CREATE INDEX webhook_endpoints_client ON webhook_endpoints (client_id);

CREATE TABLE webhook_deliveries (
    client_id        text NOT NULL,
    id               bigint GENERATED ALWAYS AS IDENTITY,
    endpoint_id      text NOT NULL REFERENCES webhook_endpoints (endpoint_id) ON DELETE CASCADE,
    event_no         bigint NOT NULL,
    status           text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz DEFAULT statement_timestamp(),
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT statement_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (client_id, id),
    FOREIGN KEY (client_id, event_no) REFERENCES events (client_id, id) ON DELETE CASCADE,
    CHECK ((status = 'PENDING') = (next_attempt_at IS NOT NULL))
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'PENDING';

CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, status, created_at);

CREATE TABLE webhook_attempts (
    client_id      text NOT NULL,
    id             bigint GENERATED ALWAYS AS IDENTITY,
    delivery_id    bigint NOT NULL,
    endpoint_id    text NOT NULL REFERENCES webhook_endpoints (endpoint_id) ON DELETE CASCADE,
    event_id       text NOT NULL,
    attempted_at   timestamptz NOT NULL,
    status_code    integer CHECK (status_code BETWEEN 100 AND 599),
    latency_ms     integer NOT NULL CHECK (latency_ms >= 0),
    error          text,
    response_body  text CHECK (length(response_body) <= 1024),
    PRIMARY KEY (client_id, id),
    FOREIGN KEY (client_id, delivery_id) REFERENCES webhook_deliveries (client_id, id) ON DELETE CASCADE,
    CHECK (status_code IS NOT NULL OR error IS NOT NULL)
);

CREATE INDEX webhook_attempts_endpoint_page ON webhook_attempts (endpoint_id, id);

CREATE INDEX webhook_attempts_delivery ON webhook_attempts (client_id, delivery_id)
"""

DOWNGRADE = r"""
DROP TABLE webhook_attempts;

DROP TABLE webhook_deliveries;

DROP TABLE webhook_endpoints;

DROP TABLE event_queue;

DROP TABLE events;

DROP FUNCTION events_enqueue();

DROP FUNCTION events_are_immutable();

ALTER TABLE clients DROP COLUMN low_balance_threshold
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
