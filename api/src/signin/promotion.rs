//! Making a confirmed code current.
//!
//! The broker's confirm decides an OTP request: from then on the event is stored, a worker will
//! send it, and the request is accepted (SPEC: a 503 leaves nothing half-done, and an SMS that
//! goes is not nothing). Promoting the pending code is a second Redis step after that point, and
//! Redis can fail it (a failover, a timeout) just after the publish went through. Answering 503
//! then would send the user an SMS for a request they were told failed, with a code that never
//! becomes valid, and hold their number to its resend gap for the retry.
//!
//! So the promotion is retried: within the request first, for as long as one Redis step may
//! take ([`REDIS_DEADLINE`]) and the request's time allows, and then, if Redis is still away,
//! on a task of its own until the code would have expired. At most [`MAX_DEFERRED`] such tasks
//! run at once, and at most [`RETRIES_AT_ONCE`] retries are sent at once, so that a long Redis
//! brown-out under load cannot pile them onto the Redis that is struggling (a stopping api,
//! which wakes them all, included). The request is answered 202 either way.
//!
//! If the promotion never runs at all (the api killed, or stopped before Redis came back), the
//! code stays pending, and the user's sign-in makes it current itself, since its SMS went
//! (`late_promotion`).

use std::sync::Arc;
use std::time::Duration;

use shared::{OtpRequested, PhoneNumber};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::REDIS_DEADLINE;
use crate::metrics as m;
use crate::otp::store::Promotion;
use crate::state::AppState;

/// The first pause between two tries; it doubles up to [`LONGEST_PAUSE`], each drawn between
/// half and all of that, so that requests that failed together do not retry together.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_secs(10);

/// Background promotions at most, per api process. Past that a confirmed code whose promotion
/// failed within its request is given up on at once (`otp_codes_never_valid_total`, reason
/// `abandoned`).
pub const MAX_DEFERRED: usize = 10_000;

/// How often a background promotion tries once the api is stopping: its last few seconds.
const PAUSE_WHILE_STOPPING: Duration = Duration::from_secs(1);
/// Retried promotions under way at once, per api process (first tries are not counted).
const RETRIES_AT_ONCE: usize = 32;

/// The background promotions under way (a permit each), and whether the api is stopping.
#[derive(Clone)]
pub struct DeferredPromotions {
    permits: Arc<Semaphore>,
    /// Turns for a retry ([`RETRIES_AT_ONCE`]).
    retries: Arc<Semaphore>,
    stopping: tokio::sync::watch::Sender<bool>,
}

impl Default for DeferredPromotions {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(MAX_DEFERRED)),
            retries: Arc::new(Semaphore::new(RETRIES_AT_ONCE)),
            stopping: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl DeferredPromotions {
    fn under_way(&self) -> usize {
        MAX_DEFERRED - self.permits.available_permits()
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// At shutdown: gives the background promotions still under way up to `within` to finish
    /// (Redis may be back by then), each trying again at once and then every
    /// [`PAUSE_WHILE_STOPPING`] rather than waiting out its backoff, [`RETRIES_AT_ONCE`] at a
    /// time. Those left are dropped with
    /// the runtime, each logging its event as never made current.
    pub async fn finish(&self, within: Duration) {
        self.stopping.send_replace(true);
        let under_way = self.under_way();
        if under_way == 0 {
            return;
        }
        tracing::warn!(
            under_way,
            "waiting for Redis to make confirmed codes current before stopping"
        );
        let all = u32::try_from(MAX_DEFERRED).unwrap_or(u32::MAX);
        if tokio::time::timeout(within, self.permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.under_way(),
                "stopping with confirmed codes Redis has not made current: each becomes current only when its user signs in with it, if Redis still holds it pending"
            );
        }
    }
}

/// Makes the confirmed `event`'s code current, within the request (by `answer_by` at the
/// latest) if Redis answers in time, and otherwise in the background (see the module doc).
/// Never fails the request.
pub async fn make_current(state: &AppState, event: &OtpRequested, answer_by: Instant) {
    let phone = &event.phone_number;
    let event_id = event.event_id;
    let within_request = answer_by.min(Instant::now() + REDIS_DEADLINE);
    if let Some(promotion) = promote_until(state, phone, event_id, within_request).await {
        return report(phone, event_id, promotion);
    }
    metrics::counter!(m::PROMOTIONS_DEFERRED).increment(1);
    let deferred = &state.deferred_promotions;
    let Ok(permit) = deferred.permits.clone().try_acquire_owned() else {
        if deferred.is_stopping() {
            // `finish` holds the permits it collected: a request the shutdown cut short.
            tracing::warn!(%phone, %event_id, "the event is confirmed but Redis did not make its code current, and the api is stopping: the code becomes current only when its user signs in with it, if Redis still holds it pending");
            return;
        }
        never_valid("abandoned");
        tracing::error!(%phone, %event_id, "the event is confirmed but Redis did not make its code current, and {MAX_DEFERRED} codes already wait for Redis: this one is given up, and becomes current only when its user signs in with it, if Redis still holds it pending");
        return;
    };
    tracing::warn!(%phone, %event_id, "the event is confirmed but Redis did not make its code current in time; the request is accepted and the code becomes current once Redis answers");
    let expires_in = Duration::from_millis(event.millis_left(OffsetDateTime::now_utc()));
    let state = state.clone();
    let phone = phone.clone();
    let unfinished = Unfinished {
        phone: phone.clone(),
        event_id,
        done: false,
    };
    // The task logs on behalf of the request: it keeps the request's span (and its id).
    let retry = async move {
        // Moved in whole (a closure would take only the field it sets), so that it is dropped
        // with the task if the runtime stops first.
        let mut unfinished = unfinished;
        match promote_until(&state, &phone, event_id, Instant::now() + expires_in).await {
            Some(promotion) => {
                if matches!(promotion, Promotion::Promoted | Promotion::Current) {
                    tracing::info!(%phone, %event_id, "Redis answered: the confirmed code is current");
                }
                report(&phone, event_id, promotion);
            }
            None => {
                never_valid("expired");
                tracing::error!(%phone, %event_id, "Redis never answered before the code expired: its SMS carries a code that never became valid");
            }
        }
        unfinished.done = true;
        drop(permit);
    };
    tokio::spawn(retry.instrument(tracing::Span::current()));
}

/// Logs, when dropped, that the api stopped before a background promotion was done: the
/// runtime drops its tasks at exit, and the code is then made current only by a sign-in with it
/// (`late_promotion`).
struct Unfinished {
    phone: PhoneNumber,
    event_id: Uuid,
    done: bool,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        tracing::warn!(phone = %self.phone, event_id = %self.event_id, "the api stopped before Redis made this confirmed code current: it becomes current only when its user signs in with it, if Redis still holds it pending");
    }
}

fn report(phone: &PhoneNumber, event_id: Uuid, promotion: Promotion) {
    match promotion {
        Promotion::Promoted | Promotion::Current => {}
        // A newer request for the same number replaced this pending code: its SMS is the one
        // that counts. This one was sent, so it is still an accepted request.
        Promotion::Replaced => {
            tracing::info!(%event_id, "a newer code replaced this one before it was confirmed");
        }
        Promotion::Missing => {
            never_valid("lost");
            tracing::error!(%phone, %event_id, "the event is confirmed but its pending code is gone from Redis (lost in a failover or restart, or expired): its SMS carries a code that will not work");
        }
    }
}

fn never_valid(reason: &'static str) {
    metrics::counter!(m::CODES_NEVER_VALID, "reason" => reason).increment(1);
}

/// Tries to promote until `deadline`, each try bounded by [`REDIS_DEADLINE`] and the deadline.
/// `None` when no try got an answer from Redis. The first failure is logged as a warning, the
/// rest at debug: a Redis outage is reported by `/readyz` and the Redis client already.
async fn promote_until(
    state: &AppState,
    phone: &PhoneNumber,
    event_id: Uuid,
    deadline: Instant,
) -> Option<Promotion> {
    // Watched from the first failure on: the usual request succeeds at once.
    let mut stopping = None;
    let mut pause = FIRST_PAUSE;
    let mut failures = 0u32;
    loop {
        // Retries take turns, so that many of them cannot pile onto a Redis that is struggling.
        // A turn is held for the call only, not through the pause after it.
        let turn = if failures > 0 {
            let turn = state.deferred_promotions.retries.acquire();
            match tokio::time::timeout_at(deadline, turn).await {
                Ok(Ok(turn)) => Some(turn),
                _ => return None,
            }
        } else {
            None
        };
        let try_until = deadline.min(Instant::now() + REDIS_DEADLINE);
        let promote = state.otp_store.promote(state.redis(), phone, event_id);
        let tried = tokio::time::timeout_at(try_until, promote).await;
        drop(turn);
        match tried {
            Ok(Ok(promotion)) => return Some(promotion),
            Ok(Err(e)) if failures == 0 => {
                tracing::warn!(error = %e, %event_id, "promoting a confirmed code failed; trying again");
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %event_id, "promoting a confirmed code failed again");
            }
            Err(_) => {}
        }
        failures += 1;
        let stopping =
            stopping.get_or_insert_with(|| state.deferred_promotions.stopping.subscribe());
        if *stopping.borrow_and_update() {
            pause = pause.min(PAUSE_WHILE_STOPPING);
        }
        let next_try = Instant::now() + pause / 2 + (pause / 2).mul_f64(rand::random::<f64>());
        if next_try >= deadline {
            return None;
        }
        // The api starting to stop cuts the pause short: it has only a few seconds left.
        tokio::select! {
            () = tokio::time::sleep_until(next_try) => {}
            _ = stopping.changed() => {}
        }
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}
