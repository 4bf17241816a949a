-- Create the tenants table.
-- IF NOT EXISTS lets `migrate up` adopt a table made earlier by another
-- system (tenant_id, name, plaintext gemini_api_key); the ALTERs below add
-- whatever columns such a table lacks, without touching existing rows.
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
