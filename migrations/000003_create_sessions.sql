-- One row per sign-in (the family every token of that sign-in belongs to). Rotation and
-- revocation both lock it, so a refresh racing a logout can never leave a live token behind,
-- and authentication checks it. It also carries the session's absolute end and its refresh
-- rate window.
CREATE TABLE IF NOT EXISTS sessions (
    id                        uuid        PRIMARY KEY,
    user_id                   uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at                timestamptz NOT NULL DEFAULT now(),
    -- SESSION_MAX_LIFETIME_SECS after sign-in: refresh fails after it.
    expires_at                timestamptz NOT NULL,
    revoked_at                timestamptz,
    refresh_window_started_at timestamptz NOT NULL DEFAULT now(),
    refreshes_in_window       integer     NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS sessions_user_id_idx ON sessions (user_id);

-- Sign-ins made before this migration keep working, with the default 90-day lifetime.
INSERT INTO sessions (id, user_id, created_at, expires_at)
SELECT family_id, (array_agg(user_id))[1], min(created_at), min(created_at) + interval '90 days'
FROM tokens
GROUP BY family_id
ON CONFLICT (id) DO NOTHING;

ALTER TABLE tokens
    ADD CONSTRAINT tokens_family_id_fkey FOREIGN KEY (family_id) REFERENCES sessions (id) ON DELETE CASCADE;

-- An access token and the refresh token issued with it share a pair id: rotating the refresh
-- token retires exactly its own access token.
ALTER TABLE tokens ADD COLUMN IF NOT EXISTS pair_id uuid;
CREATE INDEX IF NOT EXISTS tokens_pair_id_idx ON tokens (pair_id);
