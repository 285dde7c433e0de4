"""An entry is dated once its wallet's row lock is granted, not when its statement began.

A movement that waited for a wallet's lock (another batch, an operator's open transaction) was
dated at its statement's start and committed up to a lock deadline later: a statement or a
balance at a moment read in the meantime changed afterwards (an entry appeared before a `to`
already read). ledger.py's single movements now read the clock in a CTE after the lock
(`ledger._stamped`); here `ledger_place_orders` reads it once every wallet of the batch is
locked. Still never before the wallet's previous entry, so a chain's times never go back.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# The function of migration 0008, with the three places that date the batch marked.
_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_place_orders(
    p_client_ids text[], p_order_ids text[], p_amounts bigint[], p_descriptions text[],
    p_request_ids text[], p_idem_callers text[], p_idem_keys text[], p_idem_fingerprints bytea[],
    p_idem_ttl_hours double precision, p_lease_seconds double precision,
    p_key_id text, p_ipad_key bytea, p_opad_key bytea)
RETURNS TABLE (ord integer, outcome text, balance_before bigint, balance_after bigint, placed orders)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    n integer := cardinality(p_order_ids);
    claimed boolean[] := array_fill(true, ARRAY[n]);
    outcomes text[] := array_fill(NULL::text, ARRAY[n]);
    befores bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    afters bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    entry_nos bigint[] := array_fill(NULL::bigint, ARRAY[n]);
    hashes bytea[] := array_fill(NULL::bytea, ARRAY[n]);
    times timestamptz[] := array_fill(NULL::timestamptz, ARRAY[n]);
    w_ids text[];
    w_balance bigint[];
    w_count bigint[];
    w_head bytea[];
    w_time timestamptz[];
    w_moved boolean[];
    k record;@DECLARE@
    i integer;
    w integer;
BEGIN
    FOR k IN
        SELECT a.i, a.caller, a.key, a.fingerprint
        FROM unnest(p_idem_callers, p_idem_keys, p_idem_fingerprints)
             WITH ORDINALITY AS a(caller, key, fingerprint, i)
        WHERE a.key IS NOT NULL
        ORDER BY a.caller, a.key, a.i
    LOOP
        claimed[k.i] := coalesce(
            idempotency_claim(p_client_ids[k.i], k.caller, k.key, k.fingerprint, p_idem_ttl_hours), false);
    END LOOP;
    SELECT array_agg(l.client_id ORDER BY l.client_id), array_agg(l.balance ORDER BY l.client_id),
           array_agg(l.entry_count ORDER BY l.client_id), array_agg(l.head_hash ORDER BY l.client_id),
           array_agg(@TIME@ ORDER BY l.client_id),
           array_agg(false ORDER BY l.client_id)
    INTO w_ids, w_balance, w_count, w_head, w_time, w_moved
    FROM (SELECT wallets.client_id, wallets.balance, wallets.entry_count, wallets.head_hash,
                 wallets.updated_at
          FROM wallets WHERE wallets.client_id = ANY (p_client_ids)
          ORDER BY wallets.client_id
          FOR NO KEY UPDATE) AS l;
@RESTAMP@    FOR i IN 1 .. n LOOP
        w := array_position(w_ids, p_client_ids[i]);
        IF NOT claimed[i] THEN
            outcomes[i] := 'claimed';
        ELSIF w IS NULL THEN
            outcomes[i] := 'no_wallet';
        ELSIF w_balance[w] < p_amounts[i] THEN
            outcomes[i] := 'refused';
            befores[i] := w_balance[w];
        ELSE
            outcomes[i] := 'placed';
            befores[i] := w_balance[w];
            afters[i] := w_balance[w] - p_amounts[i];
            entry_nos[i] := w_count[w] + 1;
            times[i] := w_time[w];
            hashes[i] := ledger_chain_hash(w_head[w],
                ledger_entry_content(p_client_ids[i], entry_nos[i], 'ORDER_DEDUCTION', p_amounts[i],
                                     befores[i], afters[i], p_order_ids[i], p_descriptions[i], times[i]),
                p_ipad_key, p_opad_key);
            w_balance[w] := afters[i];
            w_count[w] := entry_nos[i];
            w_head[w] := hashes[i];
            w_moved[w] := true;
        END IF;
    END LOOP;
    UPDATE wallets
    SET balance = m.balance, entry_count = m.entry_count, head_hash = m.head_hash,
        updated_at = m.at
    FROM unnest(w_ids, w_balance, w_count, w_head, w_time, w_moved)
         AS m(client_id, balance, entry_count, head_hash, at, moved)
    WHERE wallets.client_id = m.client_id AND m.moved;
    INSERT INTO ledger_entries (client_id, entry_no, type, amount, balance_before, balance_after,
                                reference_id, description, created_at, hash, key_id)
    SELECT e.client_id, e.entry_no, 'ORDER_DEDUCTION', e.amount, e.before, e.after, e.order_id,
           e.description, e.at, e.hash, p_key_id
    FROM unnest(outcomes, p_client_ids, entry_nos, p_amounts, befores, afters, p_order_ids,
                p_descriptions, times, hashes)
         WITH ORDINALITY AS e(outcome, client_id, entry_no, amount, before, after, order_id,
                              description, at, hash, i)
    WHERE e.outcome = 'placed'
    ORDER BY e.i;
    RETURN QUERY
    WITH made AS (
        INSERT INTO orders AS o (order_id, client_id, amount, status, next_attempt_at, sent_by,
                                 request_id, created_at, updated_at)
        SELECT e.order_id, e.client_id, e.amount, 'PENDING',
               e.at + make_interval(secs => p_lease_seconds),
               e.at + make_interval(secs => p_lease_seconds), e.request_id, e.at, e.at
        FROM unnest(outcomes, p_client_ids, p_order_ids, p_amounts, p_request_ids, times)
             WITH ORDINALITY AS e(outcome, client_id, order_id, amount, request_id, at, i)
        WHERE e.outcome = 'placed'
        ORDER BY e.i
        RETURNING o
    ), attached AS (
        UPDATE idempotency_keys k
        SET order_id = (made.o).order_id
        FROM unnest(p_client_ids, p_idem_callers, p_idem_keys, outcomes, p_order_ids)
             AS a(tenant, caller, key, outcome, order_id)
        JOIN made ON (made.o).order_id = a.order_id
        WHERE k.tenant = a.tenant AND k.caller = a.caller AND k.key = a.key AND a.outcome = 'placed'
    ), dropped AS (
        DELETE FROM idempotency_keys k
        USING unnest(p_client_ids, p_idem_callers, p_idem_keys, outcomes)
              AS a(tenant, caller, key, outcome)
        WHERE k.tenant = a.tenant AND k.caller = a.caller AND k.key = a.key
          AND a.outcome IN ('refused', 'no_wallet')
    )
    SELECT r.i::integer, r.outcome, r.before, r.after, made.o
    FROM unnest(outcomes, befores, afters, p_order_ids)
         WITH ORDINALITY AS r(outcome, before, after, order_id, i)
    LEFT JOIN made ON (made.o).order_id = r.order_id AND r.outcome = 'placed'
    ORDER BY r.i;
END
$$
"""

UPGRADE = (
    _FUNCTION.replace("@TIME@", "l.updated_at")
    .replace("@DECLARE@", "\n    locked_at timestamptz;")
    .replace(
        "@RESTAMP@",
        "    locked_at := clock_timestamp();  -- every wallet of the batch is locked now\n"
        "    FOR w IN 1 .. coalesce(cardinality(w_ids), 0) LOOP\n"
        "        w_time[w] := greatest(locked_at, w_time[w]);\n"
        "    END LOOP;\n",
    )
)
DOWNGRADE = (
    _FUNCTION.replace("@TIME@", "greatest(statement_timestamp(), l.updated_at)")
    .replace("@DECLARE@", "")
    .replace("@RESTAMP@", "")
)


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
