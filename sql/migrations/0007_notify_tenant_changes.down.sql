-- Stop notifying tenantstore_tenants. A LiveCache still running refuses to
-- serve from memory once it notices the triggers are gone (within its health
-- check interval).
DROP TRIGGER IF EXISTS tenantstore_notify_insert ON tenants;
DROP TRIGGER IF EXISTS tenantstore_notify_update ON tenants;
DROP TRIGGER IF EXISTS tenantstore_notify_delete ON tenants;
DROP TRIGGER IF EXISTS tenantstore_notify_truncate ON tenants;
DROP FUNCTION IF EXISTS tenantstore_notify_tenant_changes();
