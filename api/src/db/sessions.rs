//! Sign-in sessions: creating one, rotating its refresh token, revoking it (docs/api.md#tokens).
//!
//! Every token belongs to a session row. Rotation and revocation both lock that row first:
//! a revocation that starts while a rotation is under way waits for it, then deletes what it
//! inserted (its delete is a later statement, so it sees the rotation's rows); a rotation that
//! starts after a revocation finds the session revoked and issues nothing. Under READ COMMITTED
//! without that lock, a logout's delete could miss the pair a concurrent refresh was inserting.

use std::time::Duration;

use tokio::time::Instant;

use shared::PhoneNumber;
use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{IssuedSession, User, secs};
use crate::config::SessionPolicy;
use crate::tokens::PlainToken;

/// Finds or creates the user and opens a session with a fresh access and refresh token, in one
/// statement.
/// Stores a new session `session_id` for the user of `phone` (created if new), with its first
/// pair of tokens. One statement: written whole or not at all.
pub async fn sign_in(
    pool: &PgPool,
    phone: &PhoneNumber,
    policy: &SessionPolicy,
    session_id: Uuid,
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
        ), session AS (
            INSERT INTO sessions (id, user_id, expires_at)
            SELECT $7, id, now() + make_interval(secs => $8) FROM account
            RETURNING id, user_id
        ), issued AS (
            INSERT INTO tokens (hash, user_id, expiry, scope, family_id, pair_id)
            SELECT $3, user_id, now() + make_interval(secs => $4), 'authentication', id, $9 FROM session
            UNION ALL
            SELECT $5, user_id, now() + make_interval(secs => $6), 'refresh', id, $9 FROM session
        )
        SELECT id, phone_number, created_at, new_user FROM account
        ",
    )
    .bind(Uuid::now_v7())
    .bind(phone.as_str())
    .bind(access.hash())
    .bind(secs(policy.access_ttl.min(policy.max_lifetime)))
    .bind(refresh.hash())
    .bind(secs(policy.refresh_ttl.min(policy.max_lifetime)))
    .bind(session_id)
    .bind(secs(policy.max_lifetime))
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
        access_expires_in: policy.access_ttl.min(policy.max_lifetime),
        refresh_expires_in: policy.refresh_ttl.min(policy.max_lifetime),
    })
}

/// Whether a failed write (a [`sign_in`], a rotation's commit) may have been stored all the
/// same: the statement was sent and its answer lost with the connection, or the server ended the
/// connection itself (SQLSTATE classes 08 and 57: a shutdown or a terminated backend, which may
/// come after the commit). PostgreSQL's refusal of the statement (a timeout, a lock, a
/// constraint) rolled it back, and a statement that never got a connection was never sent.
/// Asking costs one lookup.
pub fn may_have_committed(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(e) => e
            .code()
            // 57014 is a cancelled statement (`statement_timeout`): rolled back.
            .is_some_and(|code| {
                code.starts_with("08") || (code.starts_with("57") && code != "57014")
            }),
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => false,
        _ => true,
    }
}

/// Whether session `session_id` was stored (revoked or not).
pub async fn session_exists(pool: &PgPool, session_id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM sessions WHERE id = $1)")
        .bind(session_id)
        .fetch_one(pool)
        .await
}

pub enum RefreshOutcome {
    Rotated(IssuedSession),
    /// Unknown, expired, revoked, or the session outlived `SESSION_MAX_LIFETIME_SECS`.
    Invalid,
    /// Rotated before, outside the reuse grace: the session has been revoked.
    Reused,
    /// The session refreshed too often in the last minute.
    RateLimited {
        retry_after: Duration,
    },
    /// The statements before the commit did not end in time (a lock, a busy database): rolled
    /// back, nothing rotated.
    OutOfTime,
    /// The commit was sent, and whether it landed is not known within the request's time (no
    /// answer, or one lost that PostgreSQL could not settle): a token may have rotated, or a
    /// replayed session been revoked.
    CommitUnanswered,
}

/// When a rotation must be done by, from the refresh's start.
#[derive(Debug, Clone, Copy)]
pub struct RefreshDeadlines {
    /// Its statements before the commit: past it they are dropped and rolled back.
    pub statements_by: Instant,
    /// The commit's answer, once the commit is sent: past it the outcome is unknown.
    pub committed_by: Instant,
}

/// What the refresh token's row and its session say, read under the session's lock.
#[derive(sqlx::FromRow)]
struct Presented {
    session_id: Uuid,
    pair_id: Option<Uuid>,
    user_id: Uuid,
    phone_number: String,
    user_created_at: OffsetDateTime,
    usable: bool,
    /// Seconds since the token was rotated; `None` if it never was.
    rotated_secs_ago: Option<f64>,
    /// Seconds left before the session's absolute end.
    session_secs_left: f64,
    window_secs: f64,
    refreshes_in_window: i32,
}

/// Rotated refresh tokens a session keeps, newest first, so that presenting one again is seen
/// as a replay. Deleting them sooner let a thief who refreshed a stolen token twice make the
/// owner's copy an unknown token, which revokes nothing. Past this many, the oldest go, but only
/// once rotated for [`ROTATED_REFRESH_TOKENS_KEPT_SECS`], so a session keeps this many plus a
/// day's refreshes at most. At the default `REFRESH_PER_SESSION_PER_DAY` (100), a thief needs
/// 30 days of refreshing to push an offline owner's copy out, by when the refresh lifetime's
/// default (30 days) has expired it anyway. They are trimmed at most once a minute per session.
const ROTATED_REFRESH_TOKENS_KEPT: i64 = 3_000;
/// Live (never rotated) refresh tokens a session keeps, newest first, counted at each trim: a
/// client has one, and two tabs refreshing at once leave two. Older ones are retired as if
/// rotated, so presenting one revokes the session.
const LIVE_REFRESH_TOKENS_KEPT: i64 = 100;
/// A day: the owner's app refreshes within it, in any deployment that has not set access tokens
/// to live longer, and so is seen presenting its copy.
const ROTATED_REFRESH_TOKENS_KEPT_SECS: f64 = 86_400.0;

/// Exchanges a refresh token for a new pair (docs/api.md#tokens):
/// - a live, unrotated token is rotated: marked used, its own access token deleted, a new pair
///   issued in the same session;
/// - a token rotated less than `REFRESH_REUSE_GRACE_SECS` ago (a client retrying after a lost
///   answer, or two tabs refreshing at once) gets another new pair; nothing is revoked;
/// - a token rotated longer ago is a replay: the whole session is revoked. Rotated tokens are kept
///   for this until they expire ([`ROTATED_REFRESH_TOKENS_KEPT`] at most).
pub async fn refresh(
    pool: &PgPool,
    refresh_hash: &[u8],
    policy: &SessionPolicy,
    deadlines: RefreshDeadlines,
) -> sqlx::Result<RefreshOutcome> {
    // Only the statements before the commit are cut short: dropped, their transaction rolls
    // back, and nothing rotated. A commit once sent is waited for, since a commit cut short may
    // still land, rotating the token of a client told 503 (with no reuse grace, its retry would
    // then revoke the session).
    let statements = tokio::time::timeout_at(
        deadlines.statements_by,
        rotation(pool, refresh_hash, policy),
    );
    let (pending, outcome) = match statements.await {
        Err(_) => return Ok(RefreshOutcome::OutOfTime),
        Ok(prepared) => prepared?,
    };
    let Some(Pending { tx, rotation }) = pending else {
        return Ok(outcome);
    };
    let Ok(committed) = tokio::time::timeout_at(deadlines.committed_by, tx.commit()).await else {
        // Rare: a commit slower than the request's time (a stalled synchronous standby).
        return Ok(commit_unanswered("it did not answer"));
    };
    match (committed, rotation) {
        (Ok(()), _) => Ok(outcome),
        // The answer was lost with the connection: PostgreSQL tells what became of the
        // rotation's transaction. Its new token alone would not: a commit under way (flushing,
        // waiting for a standby) is invisible until it ends, and it ends all the same.
        (Err(e), Some(rotation)) if may_have_committed(&e) => {
            match commit_fate(pool, &rotation, deadlines.committed_by).await {
                CommitFate::Committed => {
                    tracing::info!(error = %e, "a rotation's commit lost its answer but landed; answering with its tokens");
                    Ok(outcome)
                }
                CommitFate::Aborted => Err(e),
                CommitFate::Unknown => Ok(commit_unanswered(
                    "it lost its answer, and PostgreSQL could not say whether it landed",
                )),
            }
        }
        (Err(e), _) => Err(e),
    }
}

/// Warned here, as it is found: the router's timeout may answer the client before the error
/// reaches the request's own log line.
fn commit_unanswered(why: &str) -> RefreshOutcome {
    tracing::warn!(
        "a refresh's commit is unsettled within the request's time ({why}); it may have landed: a token rotated, or a replayed session revoked"
    );
    RefreshOutcome::CommitUnanswered
}

/// A refresh's writes, awaiting their commit.
struct Pending {
    tx: Transaction<'static, Postgres>,
    /// What tells whether a rotation landed, should its commit's answer be lost; `None` for a
    /// revocation, whose late landing signs out no one its answer would not have.
    rotation: Option<RotationIds>,
}

struct RotationIds {
    /// The transaction's id (`pg_current_xact_id`).
    xid: String,
    /// The hash of the new refresh token it stores.
    new_refresh: Vec<u8>,
}

enum CommitFate {
    Committed,
    Aborted,
    /// Still under way, or PostgreSQL could not be asked, by the deadline.
    Unknown,
}

/// What became of `rotation`'s transaction: asked every 50 ms, then less often (up to 400 ms),
/// until it has ended or `by` has passed.
///
/// `pg_xact_status` reads the commit log, which says committed before the transaction stops
/// looking in progress to other sessions (a commit waiting for a synchronous standby is marked
/// there, and not yet visible). So a commit counts only once its new token can be seen, asked in
/// a statement of its own after the status, with a newer snapshot; until then it is waited for.
/// That also keeps a crash that lost the commit from passing for it: the server may give the same
/// id to another transaction, which committed, but stored no such token. An id the server has not
/// yet given out (22023, "in the future") is a commit that never reached it.
async fn commit_fate(pool: &PgPool, rotation: &RotationIds, by: Instant) -> CommitFate {
    let ask = async {
        let mut pause = Duration::from_millis(50);
        loop {
            let status: sqlx::Result<Option<String>> =
                sqlx::query_scalar("SELECT pg_xact_status($1::xid8)")
                    .bind(&rotation.xid)
                    .fetch_one(pool)
                    .await;
            match status.as_ref().map(Option::as_deref) {
                Ok(Some("committed")) => {
                    if let Ok(true) = token_stored(pool, &rotation.new_refresh).await {
                        return CommitFate::Committed;
                    }
                }
                Ok(Some("aborted")) => return CommitFate::Aborted,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("22023") => {
                    return CommitFate::Aborted;
                }
                // In progress, or not asked (a new connection failing during a failover).
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "could not ask what became of a rotation's commit");
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
    };
    tokio::time::timeout_at(by, ask)
        .await
        .unwrap_or(CommitFate::Unknown)
}

/// Whether a token with this hash can be seen.
async fn token_stored(pool: &PgPool, hash: &[u8]) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tokens WHERE hash = $1)")
        .bind(hash)
        .fetch_one(pool)
        .await
}

/// A refresh's statements up to its commit: the outcome, and the writes to commit when there are
/// any (a rotation, a revocation); `None` when it only read (rolled back on drop).
async fn rotation(
    pool: &PgPool,
    refresh_hash: &[u8],
    policy: &SessionPolicy,
) -> sqlx::Result<(Option<Pending>, RefreshOutcome)> {
    let mut tx = pool.begin().await?;
    // Lock first, read second. The read must be a later statement than the lock: under READ
    // COMMITTED a statement that waited for a lock still sees the other tables as they were
    // when it started, so a combined statement would miss a rotation committed meanwhile.
    let locked: Option<Uuid> = sqlx::query_scalar(
        r"
        SELECT id FROM sessions
        WHERE id = (SELECT family_id FROM tokens WHERE hash = $1 AND scope = 'refresh')
        FOR UPDATE
        ",
    )
    .bind(refresh_hash)
    .fetch_optional(&mut *tx)
    .await?;
    if locked.is_none() {
        return Ok((None, RefreshOutcome::Invalid));
    }
    let presented: Option<Presented> = sqlx::query_as(
        r"
        SELECT s.id AS session_id, t.pair_id, u.id AS user_id, u.phone_number,
               u.created_at AS user_created_at,
               (t.expiry > now() AND s.expires_at > now() AND s.revoked_at IS NULL) AS usable,
               extract(epoch FROM now() - t.rotated_at)::float8 AS rotated_secs_ago,
               extract(epoch FROM s.expires_at - now())::float8 AS session_secs_left,
               extract(epoch FROM now() - s.refresh_window_started_at)::float8 AS window_secs,
               s.refreshes_in_window
        FROM tokens t
        JOIN sessions s ON s.id = t.family_id
        JOIN users u ON u.id = s.user_id
        WHERE t.hash = $1 AND t.scope = 'refresh'
        ",
    )
    .bind(refresh_hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(presented) = presented.filter(|p| p.usable) else {
        return Ok((None, RefreshOutcome::Invalid));
    };
    let grace = policy.reuse_grace.as_secs_f64();
    if let Some(ago) = presented.rotated_secs_ago
        && (policy.reuse_grace.is_zero() || ago > grace)
    {
        revoke(&mut tx, presented.session_id).await?;
        let revocation = Pending { tx, rotation: None };
        return Ok((Some(revocation), RefreshOutcome::Reused));
    }
    // At most `refreshes_per_minute` in a fixed window that restarts a minute after it began.
    let restart_window = presented.window_secs >= 60.0;
    if !restart_window && presented.refreshes_in_window >= policy.refreshes_per_minute as i32 {
        let retry_after = Duration::from_secs_f64((60.0 - presented.window_secs).max(1.0));
        return Ok((None, RefreshOutcome::RateLimited { retry_after }));
    }

    let access = PlainToken::generate();
    let refresh = PlainToken::generate();
    let session_left = Duration::from_secs_f64(presented.session_secs_left.max(0.0));
    let access_ttl = policy.access_ttl.min(session_left);
    let refresh_ttl = policy.refresh_ttl.min(session_left);
    // The transaction's id comes back with the rows, for a commit whose answer is lost.
    let xid: String = sqlx::query_scalar(
        r"
        WITH used AS (
            -- The clock, not the transaction's start: a rotation that waited for the session's
            -- lock starts its reuse grace when it happens, not seconds before.
            UPDATE tokens SET rotated_at = clock_timestamp() WHERE hash = $1 AND rotated_at IS NULL
        ), retired AS (
            -- The rotated token's own access token.
            DELETE FROM tokens
            WHERE pair_id = $3 AND family_id = $2 AND scope = 'authentication'
        ), trimmed AS (
            -- Rotated refresh tokens past the newest $11 (this one, not yet rotated in this
            -- statement's snapshot, makes $11 + 1) that were rotated more than $12 seconds ago.
            -- It reads and sorts all of the session's rotated tokens (no index orders them by
            -- rotation), up to 3,000 plus a day's refreshes (3,200 at the default cap), so only
            -- a refresh that starts a rate window ($9), at most one a minute, trims.
            DELETE FROM tokens
            WHERE $9 AND family_id = $2 AND scope = 'refresh'
              AND rotated_at < now() - make_interval(secs => $12) AND hash IN (
                  SELECT hash FROM tokens
                  WHERE family_id = $2 AND scope = 'refresh' AND rotated_at IS NOT NULL
                  ORDER BY rotated_at DESC
                  OFFSET $11
              )
        ), surplus AS (
            -- Live refresh tokens past the newest $13 are retired as if rotated past the reuse
            -- grace ($14 seconds ago), their access tokens deleted below. Only a refresh retried
            -- within the grace leaves a second live one, so a client never holds this many; a
            -- thief alternating rotations and grace refreshes would otherwise pile up live
            -- tokens for the refresh lifetime (about 400,000 in 30 days), which every trim and a
            -- revocation read. Retired, not deleted: whoever presents one (the owner, whose
            -- token a thief's newer ones pushed out) is seen replaying it, and the session is
            -- revoked, where a deleted one would be refused quietly as unknown. The rotated trim
            -- bounds them from then on. The presented token is being rotated: not surplus.
            UPDATE tokens SET rotated_at = now() - make_interval(secs => $14)
            WHERE $9 AND family_id = $2 AND scope = 'refresh' AND rotated_at IS NULL
              AND hash <> $1 AND hash IN (
                  SELECT hash FROM tokens
                  WHERE family_id = $2 AND scope = 'refresh' AND rotated_at IS NULL
                  ORDER BY created_at DESC, hash
                  OFFSET $13
              )
            RETURNING pair_id
        ), surplus_access AS (
            DELETE FROM tokens
            WHERE family_id = $2 AND scope = 'authentication'
              AND pair_id IN (SELECT pair_id FROM surplus)
        ), counted AS (
            UPDATE sessions SET
                refresh_window_started_at = CASE WHEN $9 THEN now() ELSE refresh_window_started_at END,
                refreshes_in_window = CASE WHEN $9 THEN 1 ELSE refreshes_in_window + 1 END
            WHERE id = $2
        )
        -- Stamped with the clock, not the transaction's start: rotations of one session run in
        -- the order of its lock, and which of its live tokens is newest must follow that order
        -- (`holders`), even when one waited for the lock.
        INSERT INTO tokens (hash, user_id, expiry, scope, family_id, pair_id, created_at)
        VALUES ($4, $10, now() + make_interval(secs => $5), 'authentication', $2, $8, clock_timestamp()),
               ($6, $10, now() + make_interval(secs => $7), 'refresh', $2, $8, clock_timestamp())
        RETURNING pg_current_xact_id()::text
        ",
    )
    .bind(refresh_hash)
    .bind(presented.session_id)
    .bind(presented.pair_id)
    .bind(access.hash())
    .bind(secs(access_ttl))
    .bind(refresh.hash())
    .bind(secs(refresh_ttl))
    .bind(Uuid::now_v7())
    .bind(restart_window)
    .bind(presented.user_id)
    .bind(ROTATED_REFRESH_TOKENS_KEPT - 1)
    .bind(ROTATED_REFRESH_TOKENS_KEPT_SECS)
    .bind(LIVE_REFRESH_TOKENS_KEPT)
    .bind(policy.reuse_grace.as_secs_f64() + 1.0)
    .fetch_one(&mut *tx)
    .await?;
    let issued = IssuedSession {
        user: User {
            id: presented.user_id,
            phone_number: presented.phone_number,
            created_at: presented.user_created_at,
        },
        new_user: false,
        access_token: access,
        refresh_token: refresh,
        access_expires_in: access_ttl,
        refresh_expires_in: refresh_ttl,
    };
    let rotation = RotationIds {
        xid,
        new_refresh: issued.refresh_token.hash(),
    };
    let pending = Pending {
        tx,
        rotation: Some(rotation),
    };
    Ok((Some(pending), RefreshOutcome::Rotated(issued)))
}

/// The session a refresh token belongs to, whatever its state; `None` for an unknown token.
pub async fn session_of_refresh_token(
    pool: &PgPool,
    refresh_hash: &[u8],
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar("SELECT family_id FROM tokens WHERE hash = $1 AND scope = 'refresh'")
        .bind(refresh_hash)
        .fetch_optional(pool)
        .await
}

/// Who holds a session, as far as a refresh token presented at its daily cap tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holders {
    /// The token, or its session, can no longer be used (expired, ended, revoked, unknown).
    Unusable,
    /// One client alone: it presents its newest live refresh token, never rotated.
    One,
    /// Two: the token was already rotated (a replay, or a retry), or the session has a live
    /// refresh token newer than it (a chain forked within the reuse grace, refreshed since).
    Two,
}

/// [`Holders`] for the refresh token `refresh_hash`. Live tokens older than the presented one do
/// not count: they are what a client's own retries within the grace leave behind, and in a real
/// fork whichever side presents the older chain is seen. One statement; the `EXISTS` reads the
/// session's rows only until it finds a newer live token.
pub async fn holders(pool: &PgPool, refresh_hash: &[u8]) -> sqlx::Result<Holders> {
    let row: Option<(bool, bool)> = sqlx::query_as(
        r"
        SELECT (t.expiry > now() AND s.expires_at > now() AND s.revoked_at IS NULL),
               t.rotated_at IS NOT NULL OR EXISTS (
                   SELECT 1 FROM tokens o
                   WHERE o.family_id = t.family_id AND o.scope = 'refresh'
                     AND o.rotated_at IS NULL AND o.expiry > now()
                     AND o.created_at > t.created_at
               )
        FROM tokens t
        JOIN sessions s ON s.id = t.family_id
        WHERE t.hash = $1 AND t.scope = 'refresh'
        ",
    )
    .bind(refresh_hash)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((true, false)) => Holders::One,
        Some((true, true)) => Holders::Two,
        Some((false, _)) | None => Holders::Unusable,
    })
}

/// Marks the session revoked and deletes its tokens. The caller holds the session's lock, or
/// this statement takes it.
async fn revoke(tx: &mut Transaction<'_, Postgres>, session_id: Uuid) -> sqlx::Result<u64> {
    sqlx::query("UPDATE sessions SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1")
        .bind(session_id)
        .execute(&mut **tx)
        .await?;
    // A separate statement, so it sees tokens a rotation committed while we waited for the lock.
    let delete = sqlx::query("DELETE FROM tokens WHERE family_id = $1").bind(session_id);
    delete_revoked_tokens(tx, delete, &session_id.to_string()).await
}

/// Deletes the tokens of sessions just revoked in `tx` (`revoked`: which, for the log). From then
/// no token of theirs works (every use joins a session not revoked), so this is tidying, and a
/// delete that runs out of time (sessions holding many rows, past the statement timeout, or
/// waiting on a lock) must not undo the revocation: it runs in a savepoint, and what it leaves
/// goes in the purge. Any other failure (the connection lost) fails the revocation, as before.
async fn delete_revoked_tokens(
    tx: &mut Transaction<'_, Postgres>,
    delete: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    revoked: &str,
) -> sqlx::Result<u64> {
    let mut tidying = sqlx::Connection::begin(&mut **tx).await?;
    match delete.execute(&mut *tidying).await {
        Ok(deleted) => {
            tidying.commit().await?;
            Ok(deleted.rows_affected())
        }
        Err(sqlx::Error::Database(e))
            if e.code()
                .is_some_and(|c| matches!(&*c, "57014" | "55P03" | "40P01")) =>
        {
            tracing::warn!(error = %e, revoked, "revoked, but could not delete the tokens in time; the purge will");
            tidying.rollback().await?;
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

/// Revokes one sign-in: its session and every token of it.
pub async fn revoke_session(pool: &PgPool, session_id: Uuid) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    let revoked = revoke(&mut tx, session_id).await?;
    tx.commit().await?;
    Ok(revoked)
}

/// Revokes every session of the user, on every device.
pub async fn revoke_user(pool: &PgPool, user_id: Uuid) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL")
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    // Through the sessions (sessions_user_id_idx, then tokens_family_id_idx), the way who a token
    // belongs to is read everywhere else, so that tokens.user_id's foreign key and index can go
    // in a later release (BENCHMARKS.md, issue 12, round 4).
    let delete = sqlx::query(
        "DELETE FROM tokens WHERE family_id IN (SELECT id FROM sessions WHERE user_id = $1)",
    )
    .bind(user_id);
    let deleted = delete_revoked_tokens(&mut tx, delete, &format!("user {user_id}")).await?;
    tx.commit().await?;
    Ok(deleted)
}
