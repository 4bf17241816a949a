-- The repository's statements over the tenants table. Templates: {table},
-- {key}, {columns} (every field of the Tenant model, in order), {secrets}
-- and the like are filled with quoted identifiers derived from the model
-- (tenantstore.models.TENANTS); every value is a $n parameter.

-- name: get_tenant
-- Fetch one tenant by key.
SELECT {columns}
FROM {table}
WHERE {key} = $1;

-- name: get_tenants
-- Fetch the tenants whose keys are in the array $1; unknown keys are absent.
SELECT {columns}
FROM {table}
WHERE {key} = ANY ($1::text[]);

-- name: create_tenant
-- Insert a tenant with its name ($2) and secrets (tokens or NULL); a
-- duplicate key raises unique_violation.
INSERT INTO {table} ({key}, name, {secrets})
VALUES ($1, $2, {secret_values})
RETURNING {columns};

-- name: set_secret
-- Fragment of set_secrets: one secret column takes a token or NULL.
{column} = {value}

-- name: set_secrets
-- Replace some of a tenant's secrets in one statement and bump updated_at.
UPDATE {table}
SET {assignments}, updated_at = now()
WHERE {key} = $1;

-- name: delete_tenant
-- Delete one tenant.
DELETE FROM {table}
WHERE {key} = $1;

-- name: first_page_tenants
-- The first keyset page in key order: at most $1 tenants.
SELECT {columns}
FROM {table}
ORDER BY {key}
LIMIT $1;

-- name: next_page_tenants
-- The keyset page after key $1 (never OFFSET): at most $2 tenants.
SELECT {columns}
FROM {table}
WHERE {key} > $1
ORDER BY {key}
LIMIT $2;
