//! The send path of one event: claim it in the ledger, send with retries within a budget, and
//! record the result.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use shared::OtpRequested;
use time::OffsetDateTime;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::context::Context;
use super::outcome::Outcome;
use crate::dead_letter::{DeadLetter, ErrorKind};
use crate::ledger::{Claim, ClaimToken, Finished, SendLedger};
use crate::message;
use crate::metrics::send_outcome;
use crate::provider::{SendError, Sms};
use crate::shutdown::ShuttingDown;

/// How often a copy that found its event claimed by another worker looks again.
const CLAIM_POLL: Duration = Duration::from_millis(100);
/// Below this, an OTP is as good as expired: Twilio's smallest ValidityPeriod is one second.
const MIN_MILLIS_LEFT: u64 = 1_000;

/// Sends the event's SMS, retrying what can be retried, and says how the delivery ends.
/// Acknowledging is the caller's job.
pub(crate) async fn send_otp(context: &Context, event: &OtpRequested) -> Outcome {
    let config = &context.config;
    let started = Instant::now();

    // A copy of an event that was already handled is acknowledged whatever its age.
    match context.ledger.finished(event.event_id).await {
        Ok(Some(finished)) => return Outcome::AlreadyHandled(finished),
        Ok(None) => {}
        // Claiming below retries within the budget.
        Err(e) => debug!(error = %e, "Redis did not answer"),
    }

    let millis_left = event.millis_left(OffsetDateTime::now_utc());
    if millis_left < MIN_MILLIS_LEFT {
        info!("the OTP expired before it could be sent; dead-lettering it");
        return Outcome::DeadLetter {
            dead_letter: DeadLetter::new(
                ErrorKind::Expired,
                "the OTP expired before it could be sent",
                0,
            ),
            claim: None,
        };
    }
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

    let claim = match claim(context, event.event_id, started, &mut retries).await {
        Ok(claim) => claim,
        Err(outcome) => return outcome,
    };
    let _lease = Lease::keep(
        context.ledger.clone(),
        event.event_id,
        claim.clone(),
        config.claim_lease,
    );
    send_with_retries(context, event, claim, &mut retries).await
}

/// Takes the event's claim, so that no other copy sends it at the same time. A copy that finds
/// the claim held waits for the holder to finish.
async fn claim(
    context: &Context,
    event_id: Uuid,
    started: Instant,
    retries: &mut Retries,
) -> Result<ClaimToken, Outcome> {
    let config = &context.config;
    let token = ClaimToken::generate();
    // A copy that waits for another is bounded by the other's budget, plus its lease lapsing.
    let wait_limit = config.retry_max_elapsed + config.send_timeout + config.claim_lease * 2;
    let mut waiting = false;
    loop {
        match context
            .ledger
            .claim(event_id, &token, config.claim_lease)
            .await
        {
            Ok(Claim::Acquired) => return Ok(token),
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
                if let Err(ShuttingDown) = context.shutdown.sleep(CLAIM_POLL).await {
                    return Err(Outcome::LeaveToRedeliver);
                }
            }
            Err(e) => {
                warn!(error = %e, "Redis unavailable: cannot tell whether this event was already sent; not sending blindly");
                let error = format!("Redis unavailable, so the duplicate check could not run: {e}");
                match retries.next_delay(None) {
                    Ok(delay) => {
                        if let Err(ShuttingDown) = context.shutdown.sleep(delay).await {
                            return Err(Outcome::LeaveToRedeliver);
                        }
                    }
                    Err(kind) => {
                        return Err(Outcome::DeadLetter {
                            dead_letter: DeadLetter::new(kind, error, 0),
                            claim: None,
                        });
                    }
                }
            }
        }
    }
}

/// Calls the provider, retrying connect errors, timeouts, 429 and 5xx with backoff.
async fn send_with_retries(
    context: &Context,
    event: &OtpRequested,
    claim: ClaimToken,
    retries: &mut Retries,
) -> Outcome {
    let config = &context.config;
    let code = event.otp.as_deref().unwrap_or_default();
    let mut attempts: u32 = 0;
    loop {
        let millis_left = event.millis_left(OffsetDateTime::now_utc());
        if millis_left < MIN_MILLIS_LEFT {
            let dead_letter = DeadLetter::new(
                ErrorKind::Expired,
                "the OTP expired while retrying",
                attempts,
            );
            return Outcome::DeadLetter {
                dead_letter,
                claim: Some(claim),
            };
        }
        attempts += 1;
        let sms = Sms {
            to: &event.phone_number,
            body: message::render(&config.message, code, millis_left),
            masked_body: message::render_masked(&config.message, code, millis_left),
            validity_secs: millis_left / 1_000,
        };
        let timeout = config.send_timeout.min(Duration::from_millis(millis_left));
        let error = match context.provider.send(&sms, timeout).await {
            Ok(accepted) => {
                info!(
                    attempts,
                    sid = accepted.sid.as_deref().unwrap_or("-"),
                    status = accepted.status.as_deref().unwrap_or("-"),
                    "SMS sent"
                );
                send_outcome("sent");
                record_sent(&context.ledger, event).await;
                return Outcome::Sent;
            }
            Err(error) => error,
        };
        if !error.retryable {
            warn!(
                attempts,
                status = error.status,
                code = error.code,
                error = %error,
                "the provider refused the SMS; dead-lettering it"
            );
            return Outcome::DeadLetter {
                dead_letter: provider_dead_letter(ErrorKind::Permanent, &error, attempts, ""),
                claim: Some(claim),
            };
        }
        match retries.next_delay(error.retry_after) {
            Ok(delay) => {
                send_outcome("retried");
                warn!(
                    attempts,
                    status = error.status,
                    code = error.code,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    error = %error,
                    "send failed; retrying"
                );
                if let Err(ShuttingDown) = context.shutdown.sleep(delay).await {
                    // Shutting down: hand it to another worker rather than wait here.
                    if let Err(e) = context.ledger.release(event.event_id, &claim).await {
                        debug!(error = %e, "could not release the claim; it will lapse");
                    }
                    return Outcome::LeaveToRedeliver;
                }
            }
            Err(kind) => {
                warn!(attempts, error = %error, kind = kind.as_str(), "giving up; dead-lettering");
                let prefix = format!("gave up after {attempts} attempts: ");
                return Outcome::DeadLetter {
                    dead_letter: provider_dead_letter(kind, &error, attempts, &prefix),
                    claim: Some(claim),
                };
            }
        }
    }
}

fn provider_dead_letter(
    kind: ErrorKind,
    error: &SendError,
    attempts: u32,
    prefix: &str,
) -> DeadLetter {
    DeadLetter {
        kind,
        error: format!("{prefix}{}", error.message),
        attempts,
        provider_status: error.status,
        provider_code: error.code,
    }
}

/// Records the send; a few quick tries, since a missing record could let a redelivered copy
/// send the SMS again.
async fn record_sent(ledger: &SendLedger, event: &OtpRequested) {
    let ttl = Duration::from_millis(event.millis_left(OffsetDateTime::now_utc()));
    for attempt in 1..=3 {
        match ledger.finish(event.event_id, Finished::Sent, ttl).await {
            Ok(()) => return,
            Err(e) if attempt == 3 => {
                warn!(error = %e, "sent, but could not record it in Redis; a redelivered copy could be sent again")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The backoff of one event and the budget it must stay within.
struct Retries {
    budget: Budget,
    backoff: ExponentialBackoff,
}

impl Retries {
    fn next_delay(&mut self, retry_after: Option<Duration>) -> Result<Duration, ErrorKind> {
        self.budget.next_delay(&mut self.backoff, retry_after)
    }
}

/// Retrying ends at `RETRY_MAX_ELAPSED_SECS` or at the OTP's expiry, whichever is first.
struct Budget {
    retry_deadline: Instant,
    expires: Instant,
}

impl Budget {
    /// The next backoff delay, at least `retry_after`; or, when the next attempt would come too
    /// late, why retrying stops.
    fn next_delay(
        &self,
        backoff: &mut ExponentialBackoff,
        retry_after: Option<Duration>,
    ) -> Result<Duration, ErrorKind> {
        let delay = backoff.next().unwrap_or(Duration::from_secs(20));
        let delay = retry_after.map_or(delay, |after| after.max(delay));
        let next_attempt = Instant::now() + delay;
        // The next attempt also needs a moment before the OTP expires to be worth it.
        if next_attempt + Duration::from_millis(MIN_MILLIS_LEFT) > self.expires {
            Err(ErrorKind::Expired)
        } else if next_attempt > self.retry_deadline {
            Err(ErrorKind::RetriesExhausted)
        } else {
            Ok(delay)
        }
    }
}

/// Keeps renewing a claim's lease until dropped.
struct Lease(tokio::task::JoinHandle<()>);

impl Lease {
    fn keep(ledger: SendLedger, event_id: Uuid, token: ClaimToken, lease: Duration) -> Self {
        Self(tokio::spawn(async move {
            let every = lease / 3;
            loop {
                tokio::time::sleep(every).await;
                match ledger.renew(event_id, &token, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(%event_id, "lost the claim on this event (its lease lapsed)");
                        return;
                    }
                    Err(e) => debug!(%event_id, error = %e, "could not renew the claim"),
                }
            }
        }))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_ends_at_expiry_or_the_retry_limit() {
        let now = Instant::now();
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .without_max_times()
            .build();
        let budget = Budget {
            retry_deadline: now + Duration::from_secs(60),
            expires: now + Duration::from_secs(600),
        };
        assert_eq!(
            budget.next_delay(&mut backoff, None),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(
            budget.next_delay(&mut backoff, Some(Duration::from_secs(3))),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(
            budget.next_delay(&mut backoff, Some(Duration::from_secs(61))),
            Err(ErrorKind::RetriesExhausted)
        );

        let budget = Budget {
            retry_deadline: now + Duration::from_secs(60),
            expires: now + Duration::from_secs(5),
        };
        assert_eq!(
            budget.next_delay(&mut backoff, Some(Duration::from_secs(10))),
            Err(ErrorKind::Expired)
        );
    }
}
