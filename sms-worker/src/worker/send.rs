//! The send path of one event: claim it in the ledger so no other copy sends it, then hand it to
//! [`super::failover`], which sends it through the providers within a budget. When Redis cannot
//! renew the claim mid-send, the event is claimed again, in the same delivery and budget.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use shared::OtpRequested;
use time::OffsetDateTime;
use tracing::{info, warn};
use uuid::Uuid;

use super::acks::Acks;
use super::budget::{Budget, MIN_MILLIS_LEFT, Retries};
use super::context::Context;
use super::failover::{ClaimInDoubt, Tried, send_through_providers};
use super::lease::Lease;
use super::outcome::Outcome;
use crate::dead_letter::{DeadLetter, ErrorKind};
use crate::ledger::{Claim, ClaimToken};
use crate::shutdown::ShuttingDown;
use crate::trace::Journal;

/// How often a copy that found its event claimed by another worker looks again.
const CLAIM_POLL: Duration = Duration::from_millis(100);
/// How long a delivery whose claim fell in doubt waits before it claims the event again.
const CLAIM_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// Sends the event's SMS, retrying what can be retried, and says how the delivery ends. Every
/// claim it takes is `token`'s: a claim it could not release (Redis away) is its own to take
/// again, and the caller's to release if this is cut short. What it went through is kept in
/// `tried`. Recording the SMS and acknowledging (on the channel of `acks`) are the caller's job.
pub(super) async fn send_otp(
    context: &Context,
    acks: &Acks,
    event: &OtpRequested,
    token: &ClaimToken,
    tried: &mut Tried<'_>,
    journal: &mut Journal,
) -> Outcome {
    let config = &context.config;
    let started = Instant::now();

    let millis_left = event.millis_left(OffsetDateTime::now_utc());
    let mut retries = Retries {
        budget: Budget {
            retry_deadline: started + config.retry_max_elapsed,
            expires: started + Duration::from_millis(millis_left),
        },
        backoff: ExponentialBuilder::default()
            .with_min_delay(config.retry_min_delay)
            .with_max_delay(config.retry_max_delay)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build(),
    };

    loop {
        // The claim comes first, in one round trip that also says whether the event was handled
        // already: a copy of a handled event is acknowledged whatever its age.
        let claiming = claim(
            context,
            acks,
            event.event_id,
            token,
            started,
            tried,
            &mut retries,
        );
        let claimed_at = match claiming.await {
            Ok(claimed_at) => claimed_at,
            Err(outcome) => return outcome,
        };
        // Not after a call a worker it took over from left unanswered: the SMS may be on the
        // phone, and `dead` would say otherwise (see `failover`).
        if tried.attempts() == 0
            && !tried.ambiguous()
            && event.millis_left(OffsetDateTime::now_utc()) < MIN_MILLIS_LEFT
        {
            info!("the OTP expired before it could be sent; dead-lettering it");
            return Outcome::DeadLetter {
                dead_letter: DeadLetter::new(
                    ErrorKind::Expired,
                    "the OTP expired before it could be sent",
                    0,
                ),
                claim: Some(token.clone()),
            };
        }
        let lease = Lease::keep_from(
            context.ledger.clone(),
            event.event_id,
            token.clone(),
            config.claim_lease,
            claimed_at,
        );
        let sending =
            send_through_providers(context, event, token, &lease, &mut retries, tried, journal);
        match sending.await {
            // The claim stays renewed until the SMS is recorded, after the send: lapsed before,
            // a copy of the event could take it and send it again.
            Ok(Outcome::Sent(sms)) => return Outcome::Sent(sms.keeping(lease)),
            Ok(Outcome::SentUnconfirmed(sms)) => {
                return Outcome::SentUnconfirmed(sms.keeping(lease));
            }
            Ok(outcome) => return outcome,
            Err(ClaimInDoubt) => {
                drop(lease);
                // Redis failed to renew the claim a moment ago: claim the event again, with the
                // duplicate check, after a pause (the claim's own retries take over from there).
                match retries.pause(CLAIM_AGAIN_AFTER) {
                    Ok(pause) => {
                        if let Err(ShuttingDown) = context.shutdown.sleep(pause).await {
                            return leave_to_redeliver(context, event.event_id, token).await;
                        }
                    }
                    Err(kind) => {
                        let reason = "Redis could not keep the send claim, so no provider call could start before the retry budget ran out";
                        return tried.gave_up_on_redis(kind, reason.to_owned(), token);
                    }
                }
            }
        }
    }
}

/// Takes the event's claim, so that no other copy sends it at the same time. A copy that finds
/// the claim held waits for the holder to finish, unless its own delivery is taken back meanwhile
/// (its channel closed, `acks`): the broker hands that copy out again, and the new one waits
/// instead. This one would poll Redis until the holder finished, up to minutes, for an
/// acknowledgement it can no longer send.
async fn claim(
    context: &Context,
    acks: &Acks,
    event_id: Uuid,
    token: &ClaimToken,
    started: Instant,
    tried: &mut Tried<'_>,
    retries: &mut Retries,
) -> Result<Instant, Outcome> {
    let config = &context.config;
    // A copy that waits for another is bounded by the other's budget, plus its lease lapsing.
    let wait_limit = config.retry_max_elapsed + config.send_timeout + config.claim_lease * 2;
    let mut waiting = false;
    loop {
        // The lease runs from when the claim was asked for, at the latest.
        let asked_at = Instant::now();
        match context
            .ledger
            .claim(event_id, token, config.claim_lease)
            .await
        {
            Ok(Claim::Acquired { unanswered_at }) => {
                if let Some(provider) = unanswered_at {
                    tried.took_over_unanswered(context, &provider);
                }
                return Ok(asked_at);
            }
            Ok(Claim::Finished(finished)) => return Err(Outcome::AlreadyHandled(finished)),
            Ok(Claim::HeldElsewhere) => {
                if !waiting {
                    info!("another copy of this event is being sent; waiting for it to finish");
                    waiting = true;
                }
                if started.elapsed() > wait_limit {
                    warn!("the other copy never finished; returning this one to the queue");
                    return Err(Outcome::Requeue);
                }
                if !acks.channel_connected() {
                    info!(
                        "this copy's channel closed while it waited for another copy; the broker hands it out again, and that delivery waits instead"
                    );
                    return Err(Outcome::LeaveToRedeliver);
                }
                if let Err(ShuttingDown) = context.shutdown.sleep(CLAIM_POLL).await {
                    return Err(Outcome::LeaveToRedeliver);
                }
            }
            Err(_) if !acks.channel_connected() => {
                info!(
                    "this copy's channel closed while Redis was away; the broker hands it out again"
                );
                return Err(leave_to_redeliver(context, event_id, token).await);
            }
            Err(e) => {
                warn!(error = %e, "Redis unavailable: cannot tell whether this event was already sent; not sending blindly");
                let error = format!("Redis unavailable, so the duplicate check could not run: {e}");
                match retries.next_delay(None) {
                    Ok(delay) => {
                        if let Err(ShuttingDown) = context.shutdown.sleep(delay).await {
                            // A claim that fell in doubt earlier may still be this delivery's.
                            return Err(leave_to_redeliver(context, event_id, token).await);
                        }
                    }
                    Err(kind) => return Err(tried.gave_up_on_redis(kind, error, token)),
                }
            }
        }
    }
}

/// The worker is stopping: releases the delivery's claim where Redis answers, so that another
/// worker need not wait for it to lapse, and leaves the message to be redelivered.
pub(super) async fn leave_to_redeliver(
    context: &Context,
    event_id: Uuid,
    token: &ClaimToken,
) -> Outcome {
    context.ledger.release_or_let_lapse(event_id, token).await;
    Outcome::LeaveToRedeliver
}
