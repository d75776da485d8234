//! `POST /v1/token/refresh`, `POST /v1/logout` and `GET /v1/me`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::AuthUser;
use crate::db::{self, Holders, RefreshDeadlines, RefreshOutcome};
use crate::detached::detached;
use crate::error::{ApiError, Dependency, Limit};
use crate::extract::{ApiJson, Arrived};
use crate::limits::{Counter, Taken};
use crate::metrics as m;
use crate::router::REQUEST_TIMEOUT;
use crate::routes::{SessionView, UserView};
use crate::state::AppState;
use crate::tokens;

#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshBody {
    pub refresh_token: String,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct LogoutBody {
    /// Sign out everywhere: revoke every token of the user.
    #[serde(default)]
    pub all: bool,
}

/// Exchanges a refresh token for a new pair of tokens.
///
/// The old refresh token and its access token stop working. Within `REFRESH_REUSE_GRACE_SECS`
/// of a rotation, presenting the just-rotated refresh token again (a retry after a lost answer,
/// two tabs at once) gives another new pair; after that, it revokes the whole sign-in and
/// answers 401. A sign-in cannot be refreshed past `SESSION_MAX_LIFETIME_SECS`, nor more than
/// `REFRESH_PER_SESSION_PER_DAY` times in a day (429; or 401, revoked, if it has two holders).
#[utoipa::path(post, path = "/v1/token/refresh", tag = "session", request_body = RefreshBody,
    responses(
        (status = 200, description = "New session", body = SessionView),
        (status = 401, description = "`invalid_refresh_token`: unknown, expired, revoked or reused; or the session, with two holders, used up its daily refreshes, which revokes it"),
        (status = 429, description = "`rate_limited`: this session refreshes too often (this minute, or today)"),
        (status = 503, description = "`unavailable`"),
    ))]
pub async fn refresh(
    Arrived(arrived): Arrived,
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<Json<SessionView>, ApiError> {
    if !tokens::is_well_formed(&body.refresh_token) {
        return Err(ApiError::InvalidRefreshToken);
    }
    let hash = tokens::hash(&body.refresh_token);
    // Within the request's time, counted from its arrival as the router's timeout is. A refresh
    // stuck on a busy database is rolled back before the client is told 503, and a commit once
    // sent is waited for, so a token the client was told nothing of is never rotated behind its
    // back (with no reuse grace, its retry would revoke the session).
    let deadlines = RefreshDeadlines {
        statements_by: arrived + STATEMENTS_WITHIN,
        committed_by: arrived + COMMIT_ANSWERED_WITHIN,
    };
    // Looked up by the request itself, lock-free: a token that names no session (a flood of
    // random ones) costs one indexed read that ends with the request, and starts no task.
    let lookup = db::session_of_refresh_token(state.db()?, &hash);
    let outcome = match tokio::time::timeout_at(deadlines.statements_by, lookup).await {
        Err(_) => return Err(out_of_time()),
        Ok(found) => match found? {
            None => RefreshOutcome::Invalid,
            // On a task of its own: nothing that drops the request (the router's timeout, a
            // server that stops serving a client that hung up) can stop it between its count
            // against the daily cap and the rotation, or the give-back or revocation that
            // follows.
            Some(session_id) => {
                detached(refresh_within_daily_cap(state, session_id, hash, deadlines)).await?
            }
        },
    };
    match outcome {
        RefreshOutcome::Rotated(session) => {
            metrics::counter!(m::TOKEN_REFRESHES, "outcome" => "rotated").increment(1);
            Ok(Json(SessionView::new(session)))
        }
        RefreshOutcome::RateLimited { retry_after } => {
            metrics::counter!(m::TOKEN_REFRESHES, "outcome" => "rate_limited").increment(1);
            Err(ApiError::RateLimited {
                limit: Limit::RefreshesPerSessionPerMinute,
                retry_after,
            })
        }
        RefreshOutcome::Reused => {
            metrics::counter!(m::TOKEN_REFRESHES, "outcome" => "reused").increment(1);
            tracing::warn!(
                "a rotated refresh token was presented again after the grace; its session is revoked"
            );
            Err(ApiError::InvalidRefreshToken)
        }
        RefreshOutcome::Invalid => {
            metrics::counter!(m::TOKEN_REFRESHES, "outcome" => "invalid").increment(1);
            Err(ApiError::InvalidRefreshToken)
        }
        RefreshOutcome::OutOfTime => Err(out_of_time()),
        RefreshOutcome::CommitUnanswered => {
            metrics::counter!(m::TOKEN_REFRESHES, "outcome" => "commit_unanswered").increment(1);
            Err(ApiError::unavailable(
                Dependency::Postgres,
                anyhow::anyhow!("a refresh's commit is unsettled (warned above)"),
            ))
        }
    }
}

/// The refresh's statements before its commit, the token's lookup included, end within this of
/// its arrival, or roll back: room is left for the commit's answer before the router's timeout.
const STATEMENTS_WITHIN: Duration = Duration::from_secs(7);
/// A commit once sent is waited for until this after the refresh's arrival, just under the
/// router's timeout, so that the client hears what it came to.
const COMMIT_ANSWERED_WITHIN: Duration = REQUEST_TIMEOUT.saturating_sub(Duration::from_millis(250));

/// A refresh the database did not finish in time (its lookup, its statements, or its answer at
/// the daily cap), counted.
fn out_of_time() -> ApiError {
    metrics::counter!(m::TOKEN_REFRESHES, "outcome" => "out_of_time").increment(1);
    ApiError::unavailable(
        Dependency::Postgres,
        anyhow::anyhow!("the refresh did not finish within the request's time"),
    )
}

/// Counts the refresh against its session's daily cap, then rotates the token. Every refresh
/// attempted counts, retries within the grace too (or a thief alternating the two would rotate
/// without bound); one that then rotates nothing (expired, replayed, over the minute's limit) is
/// given back; an unknown token never gets here. Counted before the rotation's transaction, so
/// that no PostgreSQL lock or connection waits on Redis. At the cap ([`db::holders`]):
/// - a session with two holders (its token already rotated, or a newer live token: a chain
///   forked within the reuse grace) is revoked, answering `invalid_refresh_token`: reuse
///   detection never sees a fork, and this signs the thief out with the owner rather than let
///   either spend the other's refreshes;
/// - one client alone (presenting its newest live token) gets `429` until the sliding day frees
///   a refresh: its token stays unrotated and keeps working, so a client refreshing in a loop is
///   slowed, not signed out;
/// - a token that can no longer be used answers `invalid_refresh_token`, as below the cap.
async fn refresh_within_daily_cap(
    state: AppState,
    session_id: uuid::Uuid,
    hash: Vec<u8>,
    deadlines: RefreshDeadlines,
) -> Result<RefreshOutcome, ApiError> {
    let pool = state.db()?;
    let counter = state
        .limits
        .refreshes_per_session(session_id, state.config.sessions.refreshes_per_day);
    match count_refresh(&state, session_id, &counter).await {
        DailyCount::Counted => {
            // Given back should the refresh run out of its request's time before it is known
            // whether it rotated: a client retrying through a slow database spends nothing.
            let held = CountHeld {
                state: &state,
                counter: &counter,
                settled: false,
            };
            let outcome = db::refresh(pool, &hash, &state.config.sessions, deadlines).await;
            // A commit whose outcome is unknown most likely landed: the cap bounds rotations,
            // so it stays counted.
            let may_have_rotated = matches!(
                outcome,
                Ok(RefreshOutcome::Rotated(_) | RefreshOutcome::CommitUnanswered)
            );
            held.settle(may_have_rotated).await;
            Ok(outcome?)
        }
        DailyCount::Uncounted => {
            Ok(db::refresh(pool, &hash, &state.config.sessions, deadlines).await?)
        }
        DailyCount::UsedUp { retry_after } => {
            // A revocation that lands after the client heard 503 only signs out what its
            // answer would have.
            let at_the_cap = at_the_daily_cap(pool, &hash, session_id, retry_after);
            tokio::time::timeout_at(deadlines.committed_by, at_the_cap)
                .await
                .unwrap_or_else(|_| Err(out_of_time()))
        }
    }
}

/// The answer to a refresh over its session's daily cap (see [`refresh_within_daily_cap`]).
async fn at_the_daily_cap(
    pool: &sqlx::PgPool,
    hash: &[u8],
    session_id: uuid::Uuid,
    retry_after: Duration,
) -> Result<RefreshOutcome, ApiError> {
    match db::holders(pool, hash).await? {
        Holders::Unusable => {
            metrics::counter!(m::TOKEN_REFRESHES, "outcome" => "invalid").increment(1);
            Err(ApiError::InvalidRefreshToken)
        }
        Holders::One => {
            metrics::counter!(m::TOKEN_REFRESHES, "outcome" => "daily_cap").increment(1);
            Err(ApiError::RateLimited {
                limit: Limit::RefreshesPerSessionPerDay,
                retry_after,
            })
        }
        Holders::Two => {
            // Recorded first: a revocation that fails (503) must not hide that the cap was hit.
            metrics::counter!(m::TOKEN_REFRESHES, "outcome" => "over_daily_cap").increment(1);
            tracing::warn!(
                %session_id,
                "a session with two holders used up its refreshes of the day (REFRESH_PER_SESSION_PER_DAY); it is revoked"
            );
            db::revoke_session(pool, session_id).await?;
            Err(ApiError::InvalidRefreshToken)
        }
    }
}

/// What counting a refresh against its session's daily cap came to.
enum DailyCount {
    Counted,
    /// Redis failed or did not answer in time: the refresh goes ahead uncounted.
    Uncounted,
    UsedUp {
        retry_after: Duration,
    },
}

/// Counts one refresh against `REFRESH_PER_SESSION_PER_DAY` (a sliding day, in Redis:
/// PostgreSQL's schema gains no column within a release, docs/operations.md). Redis away or slow
/// lets the refresh through, counted in `token_refreshes_uncounted_total`, with a warning every
/// few seconds: the cap bounds rotations (a session's rows, a thief's pace), and refresh must
/// not depend on Redis.
async fn count_refresh(state: &AppState, session_id: uuid::Uuid, counter: &Counter) -> DailyCount {
    // On a task of its own, which gives its count back itself when no one waits for it any more:
    // Redis answered after the deadline (within its 2 s command timeout, when the task ends), or
    // the refresh ran out of its request's time meanwhile. A refresh let through uncounted then
    // usually counts nothing, and a slow Redis rarely holds a client to its cap early. A count
    // answered later still, one past the room for give-backs (Redis slow for many refreshes at
    // once), or one whose give-back fails, stays and lapses with the day.
    metrics::counter!(m::TOKEN_REFRESH_CAP_CHECKS).increment(1);
    let (answer, answered) = tokio::sync::oneshot::channel();
    tokio::spawn({
        let state = state.clone();
        let counter = counter.clone();
        async move {
            let taken = state.limits.take(state.redis(), &counter).await;
            if let Err(Ok(Taken::Yes)) = answer.send(taken)
                && let Ok(_room) = state.late_refresh_counts.try_acquire()
            {
                give_back_refresh(&state, &counter).await;
            }
        }
    });
    let why_uncounted = match tokio::time::timeout(REFRESH_CAP_DEADLINE, answered).await {
        Ok(Ok(Ok(Taken::Yes))) => return DailyCount::Counted,
        Ok(Ok(Ok(Taken::No { retry_after }))) => return DailyCount::UsedUp { retry_after },
        Ok(Ok(Err(e))) => e.to_string(),
        Ok(Err(_)) => "the count's task ended without an answer".to_owned(),
        Err(_) => format!("Redis did not answer within {REFRESH_CAP_DEADLINE:?}"),
    };
    metrics::counter!(m::TOKEN_REFRESHES_UNCOUNTED).increment(1);
    if let Some(held_back) = state.refresh_cap_warnings.let_through() {
        tracing::warn!(
            %session_id,
            error = %why_uncounted,
            held_back,
            "could not count a refresh against the daily cap; letting it through (one such warning per 10 s: held_back counts the others)"
        );
    }
    DailyCount::Uncounted
}

/// A refresh counted against its daily cap, until it is known whether it rotated.
struct CountHeld<'a> {
    state: &'a AppState,
    counter: &'a Counter,
    settled: bool,
}

impl CountHeld<'_> {
    /// Keeps the count when the refresh may have rotated, else gives it back. Waited for (at most
    /// 0.5 s), so that the client's next refresh finds it given back.
    async fn settle(mut self, may_have_rotated: bool) {
        self.settled = true;
        if !may_have_rotated {
            give_back_refresh(self.state, self.counter).await;
        }
    }
}

impl Drop for CountHeld<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let state = self.state.clone();
            let counter = self.counter.clone();
            tokio::spawn(async move { give_back_refresh(&state, &counter).await });
        }
    }
}

/// Uncounts a refresh that rotated nothing, or one Redis counted after it had been let through
/// uncounted. Best effort: one not given back lapses with the day.
async fn give_back_refresh(state: &AppState, counter: &Counter) {
    let given = tokio::time::timeout(
        REFRESH_CAP_DEADLINE,
        state.limits.give_back(state.redis(), counter),
    );
    if !matches!(given.await, Ok(Ok(()))) {
        tracing::debug!(
            "could not give back a refresh that rotated nothing; it lapses with the day"
        );
    }
}

/// How long a refresh waits for Redis to count it: well under Redis's 2 s command timeout, so that
/// while Redis is away each refresh is slower by at most this, not by the whole timeout.
const REFRESH_CAP_DEADLINE: Duration = Duration::from_millis(500);

/// Signs out: revokes this session's tokens, or with `{"all": true}` every token of the user.
#[utoipa::path(post, path = "/v1/logout", tag = "session", request_body(content = Option<LogoutBody>, description = "Optional"),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Signed out"),
        (status = 400, description = "Malformed body"),
        (status = 401, description = "`unauthorized`"),
    ))]
pub async fn logout(
    State(state): State<AppState>,
    AuthUser(caller): AuthUser,
    body: Option<ApiJson<LogoutBody>>,
) -> Result<StatusCode, ApiError> {
    let request = body.map(|ApiJson(body)| body).unwrap_or_default();
    let pool = state.db()?;
    let revoked = if request.all {
        db::revoke_user(pool, caller.user.id).await
    } else {
        db::revoke_session(pool, caller.session_id).await
    }?;
    tracing::info!(user_id = %caller.user.id, all = request.all, revoked, "signed out");
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in user.
#[utoipa::path(get, path = "/v1/me", tag = "session", security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller", body = UserView),
        (status = 401, description = "`unauthorized`"),
    ))]
pub async fn me(AuthUser(caller): AuthUser) -> Json<UserView> {
    Json(caller.user.into())
}
