-- The batch runner's statements over any declared EncryptedTable. These are
-- templates: {table}, {key}, {columns} and the like are filled with quoted
-- identifiers from a declaration checked against the catalog, and {key_type}
-- with a type name from a fixed list; every value is a $n parameter.

-- name: present
-- Fragment: the secret column holds a value (OR-ed over the run's columns).
{column} <> ''

-- name: count_rows
-- How many rows hold a secret in shard $2 of $1 (every row when $1 = 1).
SELECT count(*)
FROM {table}
WHERE ({any_present})
  AND ($1::integer = 1 OR (hashtextextended({key}::text, 0) % $1 + $1) % $1 = $2::integer);

-- name: first_page
-- The first keyset page of rows holding a secret, in shard $3 of $2: at most $1 rows.
SELECT {key}, {columns}
FROM {table}
WHERE ({any_present})
  AND ($2::integer = 1 OR (hashtextextended({key}::text, 0) % $2 + $2) % $2 = $3::integer)
ORDER BY {key}
LIMIT $1;

-- name: next_page
-- The keyset page after key $4 (never OFFSET); otherwise as first_page.
SELECT {key}, {columns}
FROM {table}
WHERE {key} > $4
  AND ({any_present})
  AND ($2::integer = 1 OR (hashtextextended({key}::text, 0) % $2 + $2) % $2 = $3::integer)
ORDER BY {key}
LIMIT $1;

-- name: write_assignment
-- Fragment of write_page: one column's compare-and-swap. The new value goes
-- in only where the runner planned one and the column still holds the value
-- it read; otherwise the column keeps what it holds.
{column} = CASE WHEN u.{new} IS NOT NULL AND t.{column} = u.{old} THEN u.{new} ELSE t.{column} END

-- name: write_swapped
-- Fragment of write_page: this column of the row is to be swapped.
(u.{new} IS NOT NULL AND t.{column} = u.{old})

-- name: write_written
-- Fragment of write_page's RETURNING (which sees the row as written): this column was swapped.
(u.{new} IS NOT NULL AND t.{column} = u.{new})

-- name: write_page
-- Store a page's new values in one statement (one short transaction),
-- compare-and-swap per column: a value the application changed meanwhile is
-- left alone, and the row's other columns are still written. Rows with
-- nothing to swap are not touched. Returns, per written row, which columns
-- were swapped. $2 and $3 are the page's first and last key: they change no
-- result but bound the index scan, without which a custom plan (asyncpg's
-- first five executions, or every one behind PgBouncer) merge-joins from
-- the start of the table and a pass over the table turns quadratic.
UPDATE {table} AS t
SET {assignments}
FROM unnest($1::{key_type}[], {arrays}) AS u (k, {pairs})
WHERE t.{key} = u.k
  AND ({any_swapped})
  AND t.{key} >= $2
  AND t.{key} <= $3
RETURNING u.k, {written};

-- name: current_values
-- The stored values of the rows with keys in $1 now, in key order: cells a
-- page write found changed are read again and planned anew.
SELECT {key}, {columns}
FROM {table}
WHERE {key} = ANY ($1::{key_type}[])
ORDER BY {key};
