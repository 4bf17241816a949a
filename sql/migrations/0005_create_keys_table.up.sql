-- Create tenantstore_keys: one row per key id that has encrypted (or
-- decrypted) a secret, so operators can see, name and retire keys and an
-- application can find a missing key at start-up. A key id is 12 hex
-- characters of HMAC-SHA256 keyed by the key over a fixed label: it names a
-- key and reveals nothing of it. The table never holds a key in the clear:
-- in envelope mode wrapped_key holds a data key wrapped by the key-encryption
-- key (KEK) named in wrapped_by (an id like pkcs11:token=T;key=K, never a
-- secret), which only the KEK's provider (an HSM) can unwrap.
CREATE TABLE IF NOT EXISTS tenantstore_keys (
    key_id text PRIMARY KEY,
    state text NOT NULL DEFAULT 'decrypt-only',
    first_used_at timestamptz,
    last_used_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    wrapped_key bytea,
    wrapped_by text,
    wrapped_at timestamptz,
    CONSTRAINT tenantstore_keys_key_id_shape CHECK (key_id ~ '^[0-9a-f]{12}$'),
    CONSTRAINT tenantstore_keys_state
        CHECK (state IN ('primary', 'decrypt-only', 'retired')),
    CONSTRAINT tenantstore_keys_wrapped_together
        CHECK ((wrapped_key IS NULL) = (wrapped_by IS NULL)
               AND (wrapped_key IS NULL) = (wrapped_at IS NULL))
);

-- At most one primary key at a time.
CREATE UNIQUE INDEX IF NOT EXISTS tenantstore_keys_one_primary
    ON tenantstore_keys (state) WHERE state = 'primary';
