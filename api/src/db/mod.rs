//! Every SQL statement of the api. Signing in and checking a token are one statement each (one
//! round trip, the hot paths); refresh and revocation are short transactions around the row of
//! the session they change ([`sessions`]).

pub mod sessions;

use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::tokens::PlainToken;

pub use sessions::{
    Holders, RefreshDeadlines, RefreshOutcome, holders, may_have_committed, refresh,
    revoke_session, revoke_user, session_exists, session_of_refresh_token, sign_in,
};

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
    /// Until each token expires: its lifetime, or less when the session ends sooner.
    pub access_expires_in: Duration,
    pub refresh_expires_in: Duration,
}

/// The user behind a valid access token, and the session (token family) it belongs to.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user: User,
    pub session_id: Uuid,
}

/// The user behind an unexpired access token of a session that was not revoked.
pub async fn authenticate(
    pool: &PgPool,
    access_hash: &[u8],
) -> sqlx::Result<Option<Authenticated>> {
    let row: Option<(Uuid, String, OffsetDateTime, Uuid)> = sqlx::query_as(
        r"
        SELECT u.id, u.phone_number, u.created_at, t.family_id
        FROM tokens t
        JOIN sessions s ON s.id = t.family_id AND s.revoked_at IS NULL
        JOIN users u ON u.id = s.user_id
        WHERE t.hash = $1 AND t.scope = 'authentication' AND t.expiry > now()
        ",
    )
    .bind(access_hash)
    .fetch_optional(pool)
    .await?;
    Ok(
        row.map(|(id, phone_number, created_at, session_id)| Authenticated {
            user: User {
                id,
                phone_number,
                created_at,
            },
            session_id,
        }),
    )
}

/// Deletes expired tokens, and sessions that ended or were revoked a day ago, in bounded batches
/// so the purge never holds long locks. The tokens such sessions still hold go first, in batches
/// of their own: a session whose tokens a revocation could not delete in time (many rows) would
/// otherwise make its session's delete cascade at length, on every run. Each batch may take up
/// to [`PURGE_STATEMENT_TIMEOUT`], not the requests' statement timeout: finding a batch scans
/// `sessions`, which in a large deployment can take longer than a request may, and a purge
/// that always timed out would let the tables grow without end. One statement failing does not
/// keep the others from running.
pub async fn purge_expired(pool: &PgPool) -> sqlx::Result<u64> {
    let mut total = 0;
    let mut failed = None;
    for statement in [
        "DELETE FROM tokens WHERE hash IN (SELECT hash FROM tokens WHERE expiry < now() LIMIT 5000)",
        "DELETE FROM tokens WHERE hash IN (SELECT t.hash FROM tokens t JOIN sessions s ON s.id = t.family_id WHERE s.expires_at < now() OR s.revoked_at < now() - interval '1 day' LIMIT 5000)",
        "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE expires_at < now() OR revoked_at < now() - interval '1 day' LIMIT 5000)",
    ] {
        loop {
            match purge_batch(pool, statement).await {
                Ok(deleted) => {
                    total += deleted;
                    if deleted < 5000 {
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

/// How long one purge batch may take.
const PURGE_STATEMENT_TIMEOUT: &str = "60s";

/// One batch of the purge, in a transaction of its own with its own statement timeout.
async fn purge_batch(pool: &PgPool, statement: &'static str) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(PURGE_STATEMENT_TIMEOUT)
        .execute(&mut *tx)
        .await?;
    let deleted = sqlx::query(statement).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(deleted.rows_affected())
}

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
