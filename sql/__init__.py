"""SQL shipped with tenantstore, importable as `tenantstore.sql` for importlib.resources."""
