-- name: count_rows
-- How many tenants hold a non-empty secret in shard $2 of $1 (every row when $1 = 1).
SELECT count(*)
FROM tenants
WHERE gemini_api_key <> ''
  AND ($1::integer = 1 OR (hashtextextended(tenant_id, 0) % $1 + $1) % $1 = $2::integer);

-- name: first_page
-- The first keyset page of non-empty secrets in shard $3 of $2: at most $1 rows.
SELECT tenant_id, gemini_api_key
FROM tenants
WHERE gemini_api_key <> ''
  AND ($2::integer = 1 OR (hashtextextended(tenant_id, 0) % $2 + $2) % $2 = $3::integer)
ORDER BY tenant_id
LIMIT $1;

-- name: next_page
-- The keyset page after tenant_id $4 (never OFFSET); otherwise as first_page.
SELECT tenant_id, gemini_api_key
FROM tenants
WHERE tenant_id > $4
  AND gemini_api_key <> ''
  AND ($2::integer = 1 OR (hashtextextended(tenant_id, 0) % $2 + $2) % $2 = $3::integer)
ORDER BY tenant_id
LIMIT $1;

-- name: write_batch
-- Store new values for a batch in one statement (one short transaction), each
-- guarded by compare-and-swap on the value read: a row the application changed
-- meanwhile is left alone and counted as changed concurrently.
-- $4 and $5 are the batch's first and last tenant_id. They change no result but
-- bound the index scan: without them a custom plan (asyncpg's first five
-- executions, or every one behind PgBouncer) merge-joins from the start of the
-- table, and a pass over the table turns quadratic.
UPDATE tenants AS t
SET gemini_api_key = u.new
FROM unnest($1::text[], $2::text[], $3::text[]) AS u (tenant_id, old, new)
WHERE t.tenant_id = u.tenant_id
  AND t.gemini_api_key = u.old
  AND t.tenant_id >= $4
  AND t.tenant_id <= $5;

-- name: current_values
-- The stored values of the tenants in $1 now, in keyset order: the rows a
-- batch write found changed are read again and planned anew.
SELECT tenant_id, gemini_api_key
FROM tenants
WHERE tenant_id = ANY($1::text[])
ORDER BY tenant_id;
