-- name: get_tenant
-- Fetch one tenant by primary key.
SELECT tenant_id, name, gemini_api_key, created_at, updated_at
FROM tenants
WHERE tenant_id = $1;

-- name: get_tenants
-- Fetch the tenants whose ids are in the array $1; unknown ids are absent.
SELECT tenant_id, name, gemini_api_key, created_at, updated_at
FROM tenants
WHERE tenant_id = ANY($1::text[]);

-- name: create_tenant
-- Insert a tenant; a duplicate id raises unique_violation.
INSERT INTO tenants (tenant_id, name, gemini_api_key)
VALUES ($1, $2, $3)
RETURNING tenant_id, name, gemini_api_key, created_at, updated_at;

-- name: set_gemini_api_key
-- Replace one tenant's stored secret (a token or NULL) and bump updated_at.
UPDATE tenants
SET gemini_api_key = $2, updated_at = now()
WHERE tenant_id = $1;

-- name: delete_tenant
-- Delete one tenant.
DELETE FROM tenants
WHERE tenant_id = $1;

-- name: first_page_tenants
-- The first keyset page in tenant_id order: at most $1 tenants.
SELECT tenant_id, name, gemini_api_key, created_at, updated_at
FROM tenants
ORDER BY tenant_id
LIMIT $1;

-- name: next_page_tenants
-- The keyset page after tenant_id $1 (never OFFSET): at most $2 tenants.
SELECT tenant_id, name, gemini_api_key, created_at, updated_at
FROM tenants
WHERE tenant_id > $1
ORDER BY tenant_id
LIMIT $2;
