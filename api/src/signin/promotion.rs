//! Making a confirmed code current.
//!
//! The broker's confirm decides an OTP request: from then on the event is stored, a worker will
//! send it, and the request is accepted (SPEC: a 503 leaves nothing half-done, and an SMS that
//! goes is not nothing). Promoting the pending code is a second Redis step after that point, and
//! Redis can fail it (a failover's `MOVED` storm, a timeout) just after the publish went through.
//! Answering 503 then would send the user an SMS for a request they were told failed, with a code
//! that never becomes valid, and hold their number to its resend gap for the retry.
//!
//! So the promotion is retried: within the request first, for as long as one Redis step may
//! take ([`REDIS_DEADLINE`]), and then, if Redis is still away, on a task of its own until the
//! code would have expired. The request is answered 202 either way.

use std::time::Duration;

use shared::{OtpRequested, PhoneNumber};
use time::OffsetDateTime;
use tokio::time::Instant;
use uuid::Uuid;

use super::REDIS_DEADLINE;
use crate::metrics as m;
use crate::state::AppState;

/// The first pause between two tries; it doubles up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// What became of a confirmed code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Promotion {
    /// It is the phone's current code.
    Current,
    /// A newer request's code replaced it while it was pending (or it expired): that newer
    /// code is the one that counts.
    Replaced,
}

/// Makes the confirmed `event`'s code current, within the request if Redis answers in time and
/// otherwise in the background (see the module doc). Never fails the request.
pub async fn make_current(state: &AppState, event: &OtpRequested) {
    let phone = &event.phone_number;
    let within_request = Instant::now() + REDIS_DEADLINE;
    match promote_until(state, phone, event.event_id, within_request).await {
        Some(promotion) => log_promoted(event.event_id, promotion),
        None => {
            tracing::warn!(%phone, event_id = %event.event_id, "the event is confirmed but Redis did not make its code current in time; the request is accepted and the code becomes current once Redis answers");
            let expires_in = Duration::from_millis(event.millis_left(OffsetDateTime::now_utc()));
            let state = state.clone();
            let (phone, event_id) = (phone.clone(), event.event_id);
            tokio::spawn(async move {
                let outcome = match promote_until(
                    &state,
                    &phone,
                    event_id,
                    Instant::now() + expires_in,
                )
                .await
                {
                    Some(Promotion::Current) => {
                        tracing::info!(%phone, %event_id, "Redis answered: the confirmed code is current");
                        "promoted"
                    }
                    Some(Promotion::Replaced) => {
                        log_promoted(event_id, Promotion::Replaced);
                        "replaced"
                    }
                    None => {
                        tracing::error!(%phone, %event_id, "Redis never answered before the code expired: its SMS carries a code that never became valid");
                        "expired"
                    }
                };
                metrics::counter!(m::PROMOTIONS_DEFERRED, "outcome" => outcome).increment(1);
            });
        }
    }
}

fn log_promoted(event_id: Uuid, promotion: Promotion) {
    if promotion == Promotion::Replaced {
        // A newer request for the same number replaced this pending code: its SMS is the one
        // that counts. This one was sent, so it is still an accepted request.
        tracing::info!(%event_id, "a newer code replaced this one before it was confirmed");
    }
}

/// Tries to promote until `deadline`, each try bounded by [`REDIS_DEADLINE`] and the deadline.
/// `None` when no try got an answer from Redis.
async fn promote_until(
    state: &AppState,
    phone: &PhoneNumber,
    event_id: Uuid,
    deadline: Instant,
) -> Option<Promotion> {
    let mut pause = FIRST_PAUSE;
    loop {
        let try_until = deadline.min(Instant::now() + REDIS_DEADLINE);
        let promote = state.otp_store.promote(state.redis(), phone, event_id);
        match tokio::time::timeout_at(try_until, promote).await {
            Ok(Ok(true)) => return Some(Promotion::Current),
            Ok(Ok(false)) => return Some(Promotion::Replaced),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %event_id, "promoting a confirmed code failed; trying again");
            }
            Err(_) => {}
        }
        let next_try = Instant::now() + pause;
        if next_try >= deadline {
            return None;
        }
        tokio::time::sleep_until(next_try).await;
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}
