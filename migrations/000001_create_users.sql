-- One row per phone number that has signed in at least once.
CREATE TABLE IF NOT EXISTS users (
    id           uuid        PRIMARY KEY,
    -- E.164, normalised by the api before it gets here.
    phone_number text        NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);
