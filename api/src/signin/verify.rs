//! Checking a code: the client network's wrong-guess budget first, then the code itself, then
//! the session in PostgreSQL, putting the code back if the session cannot be stored.

use std::net::IpAddr;

use crate::client_ip::ClientKey;
use crate::db::{self, IssuedSession};
use crate::detached::detached;
use crate::error::{ApiError, Limit};
use crate::limits::{Counter, Taken};
use crate::metrics as m;
use crate::otp::store::{CheckOutcome, CheckedGuess};
use crate::otp::{self, ChallengeId};
use crate::phone::Destination;
use crate::state::AppState;

use super::{late_promotion, redis_step};

/// One guess, as the client sent it (the number already normalised).
pub struct Guess {
    pub destination: Destination,
    pub code: String,
    /// The `challenge_id` of the code, when the client has it.
    pub challenge_id: Option<String>,
    pub client: IpAddr,
}

/// Signs in with `guess`, creating the user on first success.
pub async fn verify_code(state: &AppState, guess: Guess) -> Result<IssuedSession, ApiError> {
    let policy = &state.config.otp;
    if !otp::is_well_formed(&guess.code, policy.length) {
        return Err(ApiError::InvalidOtpFormat {
            length: policy.length,
        });
    }
    // Fail before consuming the code if the session could not be stored anyway.
    state.db()?;
    if state
        .config
        .phone
        .test_code(&guess.destination.phone)
        .is_some()
    {
        metrics::counter!(m::TEST_NUMBER_USES, "step" => "verify").increment(1);
        tracing::warn!(phone = %guess.destination.phone, "OTP_TEST_NUMBERS: a sign-in attempt with a test number");
    }
    // Every guess takes a slot in its client network's budget before it is checked, so
    // concurrent guesses cannot overrun it; a right guess gives its slot back.
    let fails = state.limits.fails_per_client(
        &ClientKey::of(guess.client),
        state.config.verify_limits.fails_per_ip_per_hour,
    );
    let slot = match redis_step(state.limits.take(state.redis(), &fails)).await? {
        Taken::Yes => Some(fails),
        // Past the budget, a guess that names its code's challenge is still checked: it counts
        // against that code's own attempts (`OTP_MAX_ATTEMPTS`), and a wrong challenge_id is
        // not checked at all. Strangers sharing the address (a carrier's NAT, an office) must
        // not lock out a user who has the code.
        Taken::No { .. } if guess.challenge_id.is_some() => None,
        Taken::No { retry_after } => {
            metrics::counter!(m::OTP_VERIFICATIONS, "outcome" => "rate_limited").increment(1);
            return Err(ApiError::RateLimited {
                limit: Limit::VerifyFailsPerIp,
                retry_after,
            });
        }
    };
    detached(check_then_sign_in(state.clone(), guess, slot)).await
}

/// Checks the guess and signs in; `fails` is the slot it took in its network's budget, if any,
/// given back unless the guess was wrong.
async fn check_then_sign_in(
    state: AppState,
    guess: Guess,
    fails: Option<Counter>,
) -> Result<IssuedSession, ApiError> {
    let config = &state.config;
    let phone = &guess.destination.phone;
    let digest = state.hasher.digest(phone, &guess.code);
    let challenge = guess.challenge_id.as_deref().map(ChallengeId::fingerprint);
    let checked = late_promotion::check_guess(
        &state,
        phone,
        &CheckedGuess {
            digest: &digest,
            challenge: challenge.as_deref(),
            max_attempts: config.otp.max_attempts,
            fails_per_phone_per_day: config.verify_limits.fails_per_phone_per_day,
        },
    )
    .await;
    let consumed = match checked {
        Ok(CheckOutcome::Accepted(consumed)) => consumed,
        Ok(CheckOutcome::Rejected | CheckOutcome::Pending { .. }) => {
            metrics::counter!(m::OTP_VERIFICATIONS, "outcome" => "invalid").increment(1);
            tracing::info!(%phone, bound = guess.challenge_id.is_some(), "OTP rejected");
            return Err(ApiError::InvalidOtp);
        }
        Ok(CheckOutcome::Unchecked) => {
            // A challenge_id that is not this code's: nothing was guessed, nothing is counted.
            give_back(&state, fails.as_ref()).await;
            metrics::counter!(m::OTP_VERIFICATIONS, "outcome" => "invalid").increment(1);
            return Err(ApiError::InvalidOtp);
        }
        Ok(CheckOutcome::Burned) => {
            give_back(&state, fails.as_ref()).await;
            metrics::counter!(m::OTP_VERIFICATIONS, "outcome" => "burned").increment(1);
            tracing::info!(%phone, bound = guess.challenge_id.is_some(), "the code is burned by wrong guesses; a new one must be requested");
            return Err(ApiError::TooManyAttempts);
        }
        Ok(CheckOutcome::PhoneFailsExhausted { retry_after }) => {
            give_back(&state, fails.as_ref()).await;
            metrics::counter!(m::OTP_VERIFICATIONS, "outcome" => "rate_limited").increment(1);
            tracing::info!(%phone, "too many wrong guesses for this number today; guesses without the challenge_id wait");
            return Err(ApiError::RateLimited {
                limit: Limit::VerifyFailsPerPhone,
                retry_after,
            });
        }
        Err(e) => {
            give_back(&state, fails.as_ref()).await;
            return Err(e);
        }
    };
    let pool = state.db()?;
    let session_id = uuid::Uuid::now_v7();
    match db::sign_in(pool, phone, &config.sessions, session_id).await {
        Ok(session) => {
            metrics::counter!(m::OTP_VERIFICATIONS, "outcome" => "accepted").increment(1);
            tracing::info!(user_id = %session.user.id, new_user = session.new_user, "signed in");
            // Bookkeeping the user need not wait for.
            let guard_zone = guess.destination.guard_zone;
            let state = state.clone();
            let bookkeeping = async move {
                // Both at once: they leave in one write to Redis.
                let guard = async {
                    if state.config.fraud_guard.mode != crate::config::FraudGuardMode::Off
                        && let Err(e) = state
                            .limits
                            .guard()
                            .verified(state.redis(), &state.config.fraud_guard, guard_zone)
                            .await
                    {
                        tracing::debug!(error = %e, "could not count a verified code in the fraud guard");
                    }
                };
                tokio::join!(give_back(&state, fails.as_ref()), guard);
            };
            tokio::spawn(tracing::Instrument::in_current_span(bookkeeping));
            Ok(session)
        }
        Err(e) => {
            // Nothing half-done: give the code back so the user can retry once PostgreSQL is back,
            // unless the session was stored after all (its answer lost with the connection): a
            // code signs in once.
            if stored_after_all(pool, &e, session_id).await {
                tracing::warn!(
                    %session_id,
                    "a sign-in was stored, but its answer was lost with the connection; its code is used up"
                );
            } else if let Err(undo) =
                redis_step(state.otp_store.restore(state.redis(), phone, &consumed)).await
            {
                tracing::warn!(error = %undo, "could not restore a consumed OTP");
            }
            give_back(&state, fails.as_ref()).await;
            Err(e.into())
        }
    }
}

/// Whether the failed sign-in of `session_id` is in the database all the same. When PostgreSQL
/// cannot be asked (still away), it is taken as not stored and its code is put back: a user
/// locked out of their code by an outage is the likelier harm than a code that could sign in
/// twice after a failover's lost answer.
async fn stored_after_all(
    pool: &sqlx::PgPool,
    error: &sqlx::Error,
    session_id: uuid::Uuid,
) -> bool {
    if !db::may_have_committed(error) {
        return false;
    }
    // Within a second: past it the code is put back, as when PostgreSQL cannot be asked, so
    // that a client retrying its right code is not told it is wrong meanwhile.
    let asked = tokio::time::timeout(
        STORED_AFTER_ALL_WITHIN,
        db::session_exists(pool, session_id),
    );
    matches!(asked.await, Ok(Ok(true)))
}

/// How long a failed sign-in waits to learn whether it was stored after all.
const STORED_AFTER_ALL_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

async fn give_back(state: &AppState, fails: Option<&Counter>) {
    let Some(fails) = fails else { return };
    if let Err(e) = redis_step(state.limits.give_back(state.redis(), fails)).await {
        tracing::debug!(error = %e, "could not give back a wrong-guess slot; it lapses with its window");
    }
}
