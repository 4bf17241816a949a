-- name: find_table
-- The table named $2 in schema $1 or, when $1 is NULL, the first one on the
-- search path: its oid, schema and kind. Names are values here, compared
-- with the catalog's own, so nothing is parsed or case-folded.
SELECT c.oid, n.nspname::text AS schema, c.relkind::text AS kind
FROM pg_catalog.pg_class AS c
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relname = $2
  AND CASE
      WHEN $1::text IS NULL THEN n.nspname = ANY (current_schemas(false))
      ELSE n.nspname = $1::text
  END
ORDER BY array_position(current_schemas(false), n.nspname::text) NULLS LAST
LIMIT 1;

-- name: table_columns
-- The live columns of the table with oid $1: name, number, base type name,
-- type modifier (varchar's length + 4, or -1) and NOT NULL.
SELECT a.attname::text AS name, a.attnum, t.typname::text AS type, a.atttypmod, a.attnotnull
FROM pg_catalog.pg_attribute AS a
JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid
WHERE a.attrelid = $1
  AND a.attnum > 0
  AND NOT a.attisdropped;

-- name: unique_indexes
-- The valid unique indexes of the table with oid $1 that cover column
-- number $2: how many key columns each has, and whether it is plain (no
-- predicate, no expression), i.e. whether it makes the column unique alone.
SELECT i.indnkeyatts AS columns, i.indpred IS NULL AND i.indexprs IS NULL AS plain
FROM pg_catalog.pg_index AS i
WHERE i.indrelid = $1
  AND i.indisunique
  AND i.indisvalid
  AND $2::smallint = ANY (i.indkey::smallint[]);
