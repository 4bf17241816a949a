-- Drop tenantstore_keys. Refused while it holds wrapped data keys (envelope
-- mode: without them every secret encrypted under them is lost), unless
-- confirmed; key-use records alone are only information and go without asking.
-- tenantstore: drops-column tenantstore_keys.wrapped_key
DROP TABLE IF EXISTS tenantstore_keys;
