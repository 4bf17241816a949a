-- Drop the tenants table (the runner refuses while it holds rows, unless confirmed).
-- tenantstore: drops tenants
DROP TABLE IF EXISTS tenants;
