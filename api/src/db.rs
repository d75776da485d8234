//! Every SQL statement of the api. Each request path is one statement (one round trip).

use std::time::Duration;

use shared::PhoneNumber;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::tokens::PlainToken;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    pub phone_number: String,
    pub created_at: OffsetDateTime,
}

/// The tokens of a new or rotated session, in plaintext, to be shown once.
#[derive(Debug)]
pub struct IssuedSession {
    pub user: User,
    pub new_user: bool,
    pub access_token: PlainToken,
    pub refresh_token: PlainToken,
}

/// The user behind a valid access token, and the family the token belongs to.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user: User,
    pub family_id: Uuid,
}

pub struct TokenLifetimes {
    pub access: Duration,
    pub refresh: Duration,
}

fn interval_secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Finds or creates the user and stores a fresh access and refresh token, in one statement.
pub async fn sign_in(
    pool: &PgPool,
    phone: &PhoneNumber,
    lifetimes: &TokenLifetimes,
) -> sqlx::Result<IssuedSession> {
    let access = PlainToken::generate();
    let refresh = PlainToken::generate();
    // The no-op DO UPDATE makes RETURNING yield the existing row too; xmax = 0 only on insert.
    let row: (Uuid, String, OffsetDateTime, bool) = sqlx::query_as(
        r"
        WITH account AS (
            INSERT INTO users (id, phone_number) VALUES ($1, $2)
            ON CONFLICT (phone_number) DO UPDATE SET phone_number = EXCLUDED.phone_number
            RETURNING id, phone_number, created_at, (xmax = 0) AS new_user
        ), issued AS (
            INSERT INTO tokens (hash, user_id, expiry, scope, family_id)
            SELECT $3, id, now() + make_interval(secs => $4), 'authentication', $7 FROM account
            UNION ALL
            SELECT $5, id, now() + make_interval(secs => $6), 'refresh', $7 FROM account
        )
        SELECT id, phone_number, created_at, new_user FROM account
        ",
    )
    .bind(Uuid::now_v7())
    .bind(phone.as_str())
    .bind(access.hash())
    .bind(interval_secs(lifetimes.access))
    .bind(refresh.hash())
    .bind(interval_secs(lifetimes.refresh))
    .bind(Uuid::now_v7())
    .fetch_one(pool)
    .await?;
    Ok(IssuedSession {
        user: User {
            id: row.0,
            phone_number: row.1,
            created_at: row.2,
        },
        new_user: row.3,
        access_token: access,
        refresh_token: refresh,
    })
}

pub enum RefreshOutcome {
    Rotated(IssuedSession),
    /// Unknown or expired.
    Invalid,
    /// Already rotated: the family has been revoked.
    Reused,
}

/// Rotates a refresh token: marks it used and issues a new pair in the same family, in one
/// statement. Of two concurrent rotations of one token only one can win the UPDATE.
pub async fn refresh(
    pool: &PgPool,
    refresh_hash: &[u8],
    lifetimes: &TokenLifetimes,
) -> sqlx::Result<RefreshOutcome> {
    let access = PlainToken::generate();
    let refresh = PlainToken::generate();
    let row: Option<(Uuid, String, OffsetDateTime)> = sqlx::query_as(
        r"
        WITH old AS (
            UPDATE tokens SET rotated_at = now()
            WHERE hash = $1 AND scope = 'refresh' AND rotated_at IS NULL AND expiry > now()
            RETURNING user_id, family_id
        ), issued AS (
            INSERT INTO tokens (hash, user_id, expiry, scope, family_id)
            SELECT $2, user_id, now() + make_interval(secs => $3), 'authentication', family_id FROM old
            UNION ALL
            SELECT $4, user_id, now() + make_interval(secs => $5), 'refresh', family_id FROM old
        )
        SELECT u.id, u.phone_number, u.created_at FROM old JOIN users u ON u.id = old.user_id
        ",
    )
    .bind(refresh_hash)
    .bind(access.hash())
    .bind(interval_secs(lifetimes.access))
    .bind(refresh.hash())
    .bind(interval_secs(lifetimes.refresh))
    .fetch_optional(pool)
    .await?;
    if let Some((id, phone_number, created_at)) = row {
        return Ok(RefreshOutcome::Rotated(IssuedSession {
            user: User {
                id,
                phone_number,
                created_at,
            },
            new_user: false,
            access_token: access,
            refresh_token: refresh,
        }));
    }
    // Not rotatable. If it was rotated before, someone replayed it: revoke its whole family.
    let revoked = sqlx::query(
        r"
        DELETE FROM tokens WHERE family_id = (
            SELECT family_id FROM tokens
            WHERE hash = $1 AND scope = 'refresh' AND rotated_at IS NOT NULL
        )
        ",
    )
    .bind(refresh_hash)
    .execute(pool)
    .await?;
    Ok(if revoked.rows_affected() > 0 {
        RefreshOutcome::Reused
    } else {
        RefreshOutcome::Invalid
    })
}

/// The user behind an unexpired access token.
pub async fn authenticate(
    pool: &PgPool,
    access_hash: &[u8],
) -> sqlx::Result<Option<Authenticated>> {
    let row: Option<(Uuid, String, OffsetDateTime, Uuid)> = sqlx::query_as(
        r"
        SELECT u.id, u.phone_number, u.created_at, t.family_id
        FROM tokens t JOIN users u ON u.id = t.user_id
        WHERE t.hash = $1 AND t.scope = 'authentication' AND t.expiry > now()
        ",
    )
    .bind(access_hash)
    .fetch_optional(pool)
    .await?;
    Ok(
        row.map(|(id, phone_number, created_at, family_id)| Authenticated {
            user: User {
                id,
                phone_number,
                created_at,
            },
            family_id,
        }),
    )
}

/// Revokes every token of one sign-in (its access tokens and its refresh chain).
pub async fn revoke_family(pool: &PgPool, family_id: Uuid) -> sqlx::Result<u64> {
    let done = sqlx::query("DELETE FROM tokens WHERE family_id = $1")
        .bind(family_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// Revokes every token of the user, on every device.
pub async fn revoke_user(pool: &PgPool, user_id: Uuid) -> sqlx::Result<u64> {
    let done = sqlx::query("DELETE FROM tokens WHERE user_id = $1")
        .bind(user_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// Deletes expired tokens in bounded batches so the purge never holds long locks.
pub async fn purge_expired(pool: &PgPool) -> sqlx::Result<u64> {
    let mut total = 0;
    loop {
        let done = sqlx::query(
            "DELETE FROM tokens WHERE hash IN (SELECT hash FROM tokens WHERE expiry < now() LIMIT 5000)",
        )
        .execute(pool)
        .await?;
        total += done.rows_affected();
        if done.rows_affected() < 5000 {
            return Ok(total);
        }
    }
}
