-- Drop the OAuth and webhook secret columns (refused while any holds a
-- value, unless confirmed) and the read-only _gemini_api_key copy, if any.
-- tenantstore: drops-column tenants.oauth_access_token
-- tenantstore: drops-column tenants.oauth_refresh_token
-- tenantstore: drops-column tenants.webhook_signing_secret
ALTER TABLE tenants DROP COLUMN IF EXISTS oauth_access_token;
ALTER TABLE tenants DROP COLUMN IF EXISTS oauth_refresh_token;
ALTER TABLE tenants DROP COLUMN IF EXISTS webhook_signing_secret;
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'tenants'::regclass AND attname = '_gemini_api_key'
          AND attnum > 0 AND NOT attisdropped AND attgenerated <> ''
    ) THEN
        ALTER TABLE tenants DROP COLUMN _gemini_api_key;
    END IF;
END
$$;
