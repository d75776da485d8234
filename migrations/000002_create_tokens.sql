-- Opaque bearer tokens. Only the SHA-256 of the token text is stored; the token itself is shown
-- to the client once.
CREATE TABLE IF NOT EXISTS tokens (
    hash       bytea       PRIMARY KEY,
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expiry     timestamptz NOT NULL,
    scope      text        NOT NULL CHECK (scope IN ('authentication', 'refresh')),
    -- Every token issued from one sign-in, through all its refresh rotations, shares a family:
    -- logout and refresh-token reuse revoke the whole family.
    family_id  uuid        NOT NULL,
    -- Set when a refresh token is rotated. The row stays until it expires so that presenting it
    -- again is recognised as reuse.
    rotated_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- logout with {"all": true}
CREATE INDEX IF NOT EXISTS tokens_user_id_idx ON tokens (user_id);
-- logout, reuse detection
CREATE INDEX IF NOT EXISTS tokens_family_id_idx ON tokens (family_id);
-- the purge of expired tokens
CREATE INDEX IF NOT EXISTS tokens_expiry_idx ON tokens (expiry);
