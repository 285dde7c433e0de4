"""Events about the platform itself, and a page key for webhook endpoints.

Operator events: the disabling of a global endpoint (one with no client) is an event like any
other, but it belongs to no client. It is stored under the client id `*`, which no client can
have (client ids are `[A-Za-z0-9_.:-]`), so no client's feed or endpoint can ever see it; the
admin's feed and the global endpoints (which receive every event) do. The events' client id
check widens to allow exactly that one value (re-checking every event: one scan of the table,
under the migration's lock).

webhook_endpoints.id: a bigint identity, so endpoint lists are keyset-paged newest first like
every other list (the cursor is an integer key); existing endpoints are numbered in table order.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE events DROP CONSTRAINT events_client_id_check;

ALTER TABLE events ADD CONSTRAINT events_client_id_check
    CHECK (client_id ~ '^[A-Za-z0-9_.:-]{1,64}$' OR client_id = '*');

ALTER TABLE webhook_endpoints ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY;

CREATE UNIQUE INDEX webhook_endpoints_page ON webhook_endpoints (id);

CREATE INDEX webhook_endpoints_client_page ON webhook_endpoints (client_id, id);

DROP INDEX webhook_endpoints_client
"""

# Operator events already written stay (events are immutable): the old check comes back
# NOT VALID, enforced for new rows only.
DOWNGRADE = r"""
CREATE INDEX webhook_endpoints_client ON webhook_endpoints (client_id);

DROP INDEX webhook_endpoints_client_page;

DROP INDEX webhook_endpoints_page;

ALTER TABLE webhook_endpoints DROP COLUMN id;

ALTER TABLE events DROP CONSTRAINT events_client_id_check;

ALTER TABLE events ADD CONSTRAINT events_client_id_check
    CHECK (client_id ~ '^[A-Za-z0-9_.:-]{1,64}$') NOT VALID
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
