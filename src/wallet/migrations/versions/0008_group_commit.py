"""Group commit: many orders' money moved by one statement (issue #13), and the rules that the
single statements and the batch share, defined once in the database.

- `ledger_entry_content`: the bytes an entry's hash covers (Python twin:
  `chain.canonical_content`). `ledger_chain_hash`: HMAC-SHA256 from HMAC's padded keys, in
  plain SQL. ledger.py's single-movement statements and `ledger_place_orders` both call them,
  so the chain has one definition in SQL.
- `idempotency_claim`: claim a key (or take over an expired record); true when claimed. Used by
  `idempotency.claim` and by the batch.
- `ledger_place_orders`: a batch of orders in arrival order, as one statement. It claims the
  orders' Idempotency-Keys in (caller, key) order, then locks each wallet once in client_id
  order (the same lock order in every batch: no deadlocks between batches, and a single
  order's claim-then-wallet order agrees), applies each wallet's orders in arrival order (a
  refusal refuses only that order), extends each wallet's chain entry by entry, updates each
  wallet row once and bulk-inserts the ledger entries and the PENDING orders. A refused order's
  claim is deleted, as the single path's rollback would have dropped it. Events are written by
  the calling statement in ledger.py (the shapes live in events.py).

Only SQL owned by ledger.py calls the balance-changing function.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from wallet.migrations.script import run

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE FUNCTION ledger_entry_content(
    client_id text, entry_no bigint, type text, amount bigint, balance_before bigint,
    balance_after bigint, reference_id text, description text, created_at timestamptz)
RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE
RETURN convert_to(concat_ws('|', client_id, entry_no, type, amount, balance_before, balance_after,
    coalesce(length(reference_id), -1), coalesce(reference_id, ''),
    coalesce(length(description), -1), coalesce(description, ''),
    (extract(epoch FROM created_at) * 1000000)::bigint), 'UTF8');

CREATE FUNCTION ledger_chain_hash(previous bytea, content bytea, ipad_key bytea, opad_key bytea)
RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN sha256(opad_key || sha256(ipad_key || previous || content));

CREATE FUNCTION idempotency_claim(
    p_tenant text, p_caller text, p_key text, p_fingerprint bytea, p_ttl_hours double precision)
RETURNS boolean LANGUAGE sql VOLATILE
BEGIN ATOMIC
    INSERT INTO idempotency_keys (tenant, caller, key, fingerprint, expires_at)
    VALUES (p_tenant, p_caller, p_key, p_fingerprint, now() + make_interval(secs => p_ttl_hours * 3600))
    ON CONFLICT (tenant, caller, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, order_id = NULL, response_status = NULL,
            response_body = NULL, created_at = now(), expires_at = EXCLUDED.expires_at
        WHERE idempotency_keys.expires_at < now()
    RETURNING true;
END;

CREATE FUNCTION ledger_place_orders(
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
    k record;
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
           array_agg(greatest(statement_timestamp(), l.updated_at) ORDER BY l.client_id),
           array_agg(false ORDER BY l.client_id)
    INTO w_ids, w_balance, w_count, w_head, w_time, w_moved
    FROM (SELECT wallets.client_id, wallets.balance, wallets.entry_count, wallets.head_hash,
                 wallets.updated_at
          FROM wallets WHERE wallets.client_id = ANY (p_client_ids)
          ORDER BY wallets.client_id
          FOR NO KEY UPDATE) AS l;
    FOR i IN 1 .. n LOOP
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

DOWNGRADE = r"""
DROP FUNCTION ledger_place_orders(text[], text[], bigint[], text[], text[], text[], text[], bytea[],
                                  double precision, double precision, text, bytea, bytea);

DROP FUNCTION idempotency_claim(text, text, text, bytea, double precision);

DROP FUNCTION ledger_chain_hash(bytea, bytea, bytea, bytea);

DROP FUNCTION ledger_entry_content(text, bigint, text, bigint, bigint, bigint, text, text, timestamptz)
"""


def upgrade() -> None:
    run(UPGRADE)


def downgrade() -> None:
    run(DOWNGRADE)
