-- Drop the audit log (the runner refuses while it holds rows, unless confirmed).
-- tenantstore: drops tenantstore_audit
-- tenantstore: drops tenantstore_audit_sessions
DROP TABLE IF EXISTS tenantstore_audit;
DROP TABLE IF EXISTS tenantstore_audit_sessions;
DROP FUNCTION IF EXISTS tenantstore_audit_prune(timestamptz);
DROP FUNCTION IF EXISTS tenantstore_audit_guard();
