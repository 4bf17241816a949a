-- Statements about the connection itself (tenantstore.pooling).

-- name: backend_pid
-- The process id of the server backend running this statement.
SELECT pg_backend_pid();
