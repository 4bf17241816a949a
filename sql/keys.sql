-- The key table's statements (tenantstore_keys, migration 0005): key use,
-- key states, wrapped data keys, and the canary sample of `keys check`.
-- Every value is a $n parameter; never a key in the clear.

-- name: keys_table_exists
-- Whether tenantstore_keys exists on the search path (migration 0005 applied).
SELECT to_regclass('tenantstore_keys') IS NOT NULL;

-- name: record_key_use
-- Record that key $1 was used, as the writer's primary key when $2: set its
-- first and last use. A new primary demotes the previous primary to
-- decrypt-only in the same statement (the demotion runs first: the INSERT
-- reads its count). Wrapped data keys (envelope mode) are made primary only
-- by `keys new-data-key`, so a key is not promoted when it is wrapped or a
-- wrapped key is primary; a retired key that is used again goes back to
-- decrypt-only. Returns the key's state before ($1 new: NULL) and after.
WITH before AS (
    SELECT state, wrapped_key IS NOT NULL AS wrapped
    FROM tenantstore_keys
    WHERE key_id = $1
),
target AS (
    SELECT $2::boolean
        AND NOT EXISTS (SELECT 1 FROM before WHERE before.wrapped)
        AND NOT EXISTS (
            SELECT 1 FROM tenantstore_keys
            WHERE state = 'primary' AND wrapped_key IS NOT NULL AND key_id <> $1
        ) AS promote
),
demoted AS (
    UPDATE tenantstore_keys AS k
    SET state = 'decrypt-only'
    FROM target
    WHERE target.promote AND k.state = 'primary' AND k.key_id <> $1
    RETURNING k.key_id
)
INSERT INTO tenantstore_keys AS k (key_id, state, first_used_at, last_used_at)
SELECT $1, CASE WHEN target.promote THEN 'primary' ELSE 'decrypt-only' END, now(), now()
FROM target, (SELECT count(*) FROM demoted) AS d
ON CONFLICT (key_id) DO UPDATE SET
    first_used_at = coalesce(k.first_used_at, excluded.first_used_at),
    last_used_at = greatest(k.last_used_at, excluded.last_used_at),
    state = CASE
        WHEN excluded.state = 'primary' THEN 'primary'
        WHEN k.state = 'retired' THEN 'decrypt-only'
        ELSE k.state
    END
RETURNING (SELECT state FROM before) AS was, k.state AS state;

-- name: list_keys
-- Every key the database knows, primary first, then decrypt-only, then
-- retired, most recently used first; never the wrapped key itself.
SELECT key_id, state, first_used_at, last_used_at, created_at,
       wrapped_key IS NOT NULL AS wrapped, wrapped_by, wrapped_at
FROM tenantstore_keys
ORDER BY array_position(ARRAY['primary', 'decrypt-only', 'retired'], state),
         last_used_at DESC NULLS LAST, created_at DESC, key_id;

-- name: key_state
-- The state of key $1 and whether it is wrapped, locking its row until the transaction ends.
SELECT state, wrapped_key IS NOT NULL AS wrapped
FROM tenantstore_keys
WHERE key_id = $1
FOR UPDATE;

-- name: retire_key
-- Mark key $1 retired (a key the database never saw gets a row saying so).
INSERT INTO tenantstore_keys (key_id, state)
VALUES ($1, 'retired')
ON CONFLICT (key_id) DO UPDATE SET state = 'retired';

-- name: wrapped_keys
-- The wrapped data keys a process loads at start-up: not retired, primary
-- first, then the newest.
SELECT key_id, state, wrapped_key, wrapped_by
FROM tenantstore_keys
WHERE wrapped_key IS NOT NULL AND state <> 'retired'
ORDER BY state = 'primary' DESC, created_at DESC, key_id;

-- name: store_data_key
-- Store data key $1 wrapped ($2) by KEK $3; as the new primary when $4, the
-- previous primary becoming decrypt-only in the same statement. A key the
-- database already holds wrapped keeps its wrapping (nothing is returned then).
WITH demoted AS (
    UPDATE tenantstore_keys
    SET state = 'decrypt-only'
    WHERE $4::boolean AND state = 'primary' AND key_id <> $1
      AND NOT EXISTS (
          SELECT 1 FROM tenantstore_keys WHERE key_id = $1 AND wrapped_key IS NOT NULL
      )
    RETURNING key_id
)
INSERT INTO tenantstore_keys AS k (key_id, state, wrapped_key, wrapped_by, wrapped_at)
SELECT $1, CASE WHEN $4::boolean THEN 'primary' ELSE 'decrypt-only' END, $2, $3, now()
FROM (SELECT count(*) FROM demoted) AS d
ON CONFLICT (key_id) DO UPDATE SET
    wrapped_key = excluded.wrapped_key,
    wrapped_by = excluded.wrapped_by,
    wrapped_at = excluded.wrapped_at,
    state = CASE WHEN $4::boolean THEN 'primary' WHEN k.state = 'retired' THEN 'retired'
                 ELSE 'decrypt-only' END
WHERE k.wrapped_key IS NULL
RETURNING k.key_id;

-- name: count_wrapped_keys
-- How many data keys are stored wrapped (retired ones included).
SELECT count(*) FROM tenantstore_keys WHERE wrapped_key IS NOT NULL;

-- name: rewrap_candidates
-- The wrapped data keys (retired ones included) not yet wrapped by KEK $1.
SELECT key_id
FROM tenantstore_keys
WHERE wrapped_key IS NOT NULL AND wrapped_by <> $1
ORDER BY key_id;

-- name: lock_wrapped_key
-- Data key $1's wrapping, locked until the transaction ends.
SELECT wrapped_key, wrapped_by
FROM tenantstore_keys
WHERE key_id = $1 AND wrapped_key IS NOT NULL
FOR UPDATE;

-- name: rewrap_key
-- Replace data key $1's wrapping by $2 under KEK $3, if KEK $4 still wraps it.
UPDATE tenantstore_keys
SET wrapped_key = $2, wrapped_by = $3, wrapped_at = now()
WHERE key_id = $1 AND wrapped_by = $4;

-- name: sample_tokens
-- Template: up to $1 stored values of one secret column, for the canary
-- decrypt of `keys check` (the first found: cheap, no sort).
SELECT {column}
FROM {table}
WHERE {column} <> ''
LIMIT $1;
