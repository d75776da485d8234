-- A session's daily refresh window (REFRESH_PER_SESSION_PER_DAY), beside the per-minute one:
-- the rotated refresh tokens a session keeps, and so a thief's way of pushing the owner's copy
-- out, are bounded by the refreshes of a day, not only of a minute. Existing sessions start a
-- fresh window. Adding a column with a non-volatile default rewrites no rows.
ALTER TABLE sessions
    ADD COLUMN IF NOT EXISTS refresh_day_started_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN IF NOT EXISTS refreshes_in_day       integer     NOT NULL DEFAULT 0;
