"""Events are queued for disabled endpoints too, so that what an endpoint missed while it was off
is among its failed deliveries (delivery.py's fan-out makes them FAILED at once), and the
recovery the README gives (fix the receiver, enable the endpoint, replay since) sends it. Before,
a disabled endpoint's events were never queued for it and only a replay by event id, one at a
time, could reach them. A platform with no endpoints at all still pays one probe per statement.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def _enqueue(enabled_only: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION events_enqueue_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM webhook_endpoints WHERE true {enabled_only}) THEN
        RETURN NULL;  -- no webhooks anywhere: one probe for the whole statement
    END IF;
    INSERT INTO event_queue (client_id, event_no)
    SELECT e.client_id, e.id FROM inserted e
    WHERE EXISTS (SELECT 1 FROM webhook_endpoints w
                  WHERE (w.client_id = e.client_id OR w.client_id IS NULL) {enabled_only}
                    AND (w.event_types IS NULL OR e.type = ANY (w.event_types)));
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    run(_enqueue(""))


def downgrade() -> None:
    run(_enqueue("AND enabled"))
