-- Add the other secrets a tenant has: OAuth access and refresh tokens and
-- the webhook signing secret (nullable text, stored as Fernet tokens; 0004
-- encrypts whatever plaintext is in them).
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS oauth_access_token text;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS oauth_refresh_token text;
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS webhook_signing_secret text;

-- Adopt the layout of the system that keeps the Gemini key in
-- tenants._gemini_api_key (tokens or plaintext) behind a model property:
-- its values move to gemini_api_key (a rename when 0001 only just added that
-- column, empty), and _gemini_api_key comes back as a read-only copy, so an
-- old application version still running during a rolling deploy keeps
-- reading its keys (as tokens, which it decrypts with the same key); its
-- writes to _gemini_api_key fail until it is replaced. Drop the copy with
-- `ALTER TABLE tenants DROP COLUMN _gemini_api_key` once no old version runs.
-- Naive timestamps become timestamptz (read as the server's time zone), as
-- the Tenant model requires.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'tenants'::regclass AND attname = '_gemini_api_key'
          AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
    ) THEN
        IF NOT EXISTS (SELECT 1 FROM tenants WHERE gemini_api_key IS NOT NULL) THEN
            ALTER TABLE tenants DROP COLUMN gemini_api_key;
            ALTER TABLE tenants RENAME COLUMN _gemini_api_key TO gemini_api_key;
        ELSE
            UPDATE tenants SET gemini_api_key = _gemini_api_key
            WHERE gemini_api_key IS NULL AND _gemini_api_key IS NOT NULL;
            ALTER TABLE tenants DROP COLUMN _gemini_api_key;
        END IF;
        ALTER TABLE tenants ADD COLUMN _gemini_api_key text
            GENERATED ALWAYS AS (gemini_api_key) STORED;
    END IF;
    IF EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'tenants'::regclass AND attname = 'created_at'
          AND atttypid = 'timestamp'::regtype
    ) THEN
        ALTER TABLE tenants ALTER COLUMN created_at TYPE timestamptz;
    END IF;
    IF EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'tenants'::regclass AND attname = 'updated_at'
          AND atttypid = 'timestamp'::regtype
    ) THEN
        ALTER TABLE tenants ALTER COLUMN updated_at TYPE timestamptz;
    END IF;
END
$$;
