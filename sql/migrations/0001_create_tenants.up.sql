-- Create the tenants table.
-- IF NOT EXISTS lets `migrate up` adopt a table made earlier by another
-- system (tenant_id, name, plaintext gemini_api_key); the statements below
-- add whatever such a table lacks, without touching existing rows.
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id text PRIMARY KEY,
    name text NOT NULL,
    gemini_api_key text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE tenants ADD COLUMN IF NOT EXISTS gemini_api_key text;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now();

-- Every reader pages by tenant_id, so an adopted table must have it unique and
-- NOT NULL, or rows would be skipped silently. Make it the primary key (or,
-- if the table has another one, unique and NOT NULL); duplicates or NULLs
-- make this fail, and with it the whole migration, before anything changes.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index AS i
        JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = 'tenants'::regclass
          AND i.indisunique
          AND i.indnkeyatts = 1
          AND i.indpred IS NULL
          AND a.attname = 'tenant_id'
          AND a.attnotnull
    ) THEN
        IF EXISTS (SELECT 1 FROM pg_index WHERE indrelid = 'tenants'::regclass AND indisprimary) THEN
            ALTER TABLE tenants ALTER COLUMN tenant_id SET NOT NULL;
            ALTER TABLE tenants ADD CONSTRAINT tenants_tenant_id_key UNIQUE (tenant_id);
        ELSE
            ALTER TABLE tenants ADD PRIMARY KEY (tenant_id);
        END IF;
    END IF;
END
$$;
