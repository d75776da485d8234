//! Sending a code: every limit takes its slot at once, the event is published with a confirm,
//! and only then does the new code replace the old one.

use std::net::IpAddr;

use futures_util::future::join_all;
use shared::fraud_guard::{FraudGuardMode, GuardVerdict, GuardZone};
use shared::{OtpRequested, PhoneNumber};
use tokio::sync::Semaphore;

use super::promotion;
use super::withdrawal::{self, Settled};
use super::{ANSWER_WITHIN, PUBLISH_DEADLINE, redis_step};
use crate::client_ip::ClientKey;
use crate::detached::detached;
use crate::error::{ApiError, Dependency, Limit};
use crate::limits::{Counter, Taken};
use crate::metrics as m;
use crate::otp::store::{IssueOutcome, NewCode};
use crate::otp::{ChallengeId, generate_code};
use crate::phone::Destination;
use crate::publisher::PublishError;
use crate::state::AppState;

/// A code on its way: what the client is told.
pub struct Requested {
    pub phone: PhoneNumber,
    pub challenge_id: String,
}

/// Sends a fresh code to `destination` on behalf of `client`.
pub async fn request_code(
    state: &AppState,
    destination: Destination,
    locale: Option<String>,
    client: IpAddr,
    request_id: &str,
    arrived: tokio::time::Instant,
) -> Result<Requested, ApiError> {
    // Counted from the request's arrival, as the router's timeout is: a client slow to send its
    // body spends its own request's time.
    let answer_by = arrived + ANSWER_WITHIN;
    let policy = &state.config.otp;
    let test_code = state.config.phone.test_code(&destination.phone);
    if test_code.is_none() && state.publisher.blocked() {
        // A RabbitMQ alarm: the publish would be refused after the limits' scripts had run and
        // their slots been given back, so during an alarm the limits would bind nobody while
        // every request still cost Redis its work. Refused first, it costs nothing.
        metrics::counter!(m::OTP_REQUESTS, "outcome" => "unavailable").increment(1);
        return Err(ApiError::unavailable(
            Dependency::RabbitMq,
            anyhow::Error::from(PublishError::Blocked),
        ));
    }
    let code = test_code.map_or_else(|| generate_code(policy.length), str::to_owned);
    let challenge = ChallengeId::generate();
    let event = OtpRequested::valid_for(
        destination.phone.clone(),
        code,
        policy.ttl,
        request_id.to_owned(),
    )
    .in_locale(locale);
    let new_code = NewCode {
        phone: &destination.phone,
        digest: state
            .hasher
            .digest(&destination.phone, event.otp.as_deref().unwrap_or_default()),
        challenge: ChallengeId::fingerprint(challenge.as_str()),
        event_id: event.event_id,
    };
    let slots = match Slots::take(state, &destination, client, &new_code).await {
        Ok(slots) => slots,
        Err(refused) => {
            let outcome = if matches!(refused, ApiError::RateLimited { .. }) {
                "rate_limited"
            } else {
                "unavailable"
            };
            metrics::counter!(m::OTP_REQUESTS, "outcome" => outcome).increment(1);
            return Err(refused);
        }
    };
    let phone = destination.phone.clone();
    if test_code.is_some() {
        // A test number: no SMS, so nothing to wait for; the fixed code is current at once.
        metrics::counter!(m::TEST_NUMBER_USES, "step" => "request").increment(1);
        tracing::warn!(%phone, event_id = %event.event_id, "OTP_TEST_NUMBERS: a code for a test number; no SMS is sent, its fixed code is valid");
        redis_step(
            state
                .otp_store
                .promote(state.redis(), &phone, event.event_id),
        )
        .await?;
        metrics::counter!(m::OTP_REQUESTS, "outcome" => "accepted").increment(1);
        return Ok(Requested {
            phone,
            challenge_id: challenge.into_string(),
        });
    }
    detached(publish_then_promote(state.clone(), event, slots, answer_by)).await?;
    metrics::counter!(m::OTP_REQUESTS, "outcome" => "accepted").increment(1);
    Ok(Requested {
        phone,
        challenge_id: challenge.into_string(),
    })
}

/// The broker's confirm makes the pending code current; a refusal (or no attempt at all) gives
/// every slot back. A publish whose outcome is unknown is settled through the send ledger first
/// (see [`settle_unknown_publish`]).
async fn publish_then_promote(
    state: AppState,
    event: OtpRequested,
    slots: Slots,
    answer_by: tokio::time::Instant,
) -> Result<(), ApiError> {
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + PUBLISH_DEADLINE;
    let published = state.publisher.publish(&event, deadline).await;
    metrics::histogram!(m::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
    if let Err(unpublished) = published {
        let stored_after_all = if unpublished.maybe_stored {
            settle_unknown_publish(&state, &event, slots).await
        } else {
            // The code was never stored: it must not become valid, and the request counts for
            // nothing.
            slots.give_back(&state).await;
            false
        };
        if !stored_after_all {
            metrics::counter!(m::OTP_REQUESTS, "outcome" => "unavailable").increment(1);
            return Err(ApiError::unavailable(
                Dependency::RabbitMq,
                anyhow::Error::from(unpublished),
            ));
        }
    }
    // Confirmed (or taken by a worker): the SMS will go, so the request is accepted.
    promotion::make_current(&state, &event, answer_by).await;
    tracing::info!(phone = %event.phone_number, event_id = %event.event_id, "OTP requested");
    Ok(())
}

/// Settles a publish that was sent and then neither confirmed nor refused (see
/// [`withdrawal`]). Returns whether the event turned out to be stored (a worker already took
/// it), in which case the request is accepted after all; otherwise it is refused. Withdrawn, the slots
/// go back, so a broker outage costs users no place in the limits. When Redis cannot say, they
/// are kept: an SMS may go, and an attacker who makes confirms time out must not send past the
/// limits. Refused, the code stays pending, never made current by this request; only if its SMS
/// goes all the same (Redis could not withdraw it) does a sign-in make it current
/// (`late_promotion`).
async fn settle_unknown_publish(state: &AppState, event: &OtpRequested, slots: Slots) -> bool {
    let settled = withdrawal::withdraw(state, event).await;
    metrics::counter!(m::PUBLISH_OUTCOME_UNKNOWN, "resolution" => settled.label()).increment(1);
    match settled {
        Settled::Taken => {
            tracing::info!(event_id = %event.event_id, "no confirm came, but a worker has the event: accepted");
            return true;
        }
        Settled::Withdrawn => {
            tracing::info!(event_id = %event.event_id, "no confirm came; the event was withdrawn before any worker took it");
            slots.give_back(state).await;
        }
        Settled::DeadLettered => {
            tracing::info!(event_id = %event.event_id, "no confirm came, and a worker dead-lettered the event");
            slots.give_back(state).await;
        }
        Settled::Unsettled => {
            tracing::warn!(event_id = %event.event_id, "no confirm came, and the event could not be withdrawn: it may still be sent, so its limit slots are kept");
        }
    }
    false
}

/// Give-backs after a Redis failure running at once, at most (each waits at most
/// [`super::REDIS_DEADLINE`]).
const GIVE_BACKS_AT_ONCE: usize = 1_024;
static GIVE_BACKS: Semaphore = Semaphore::const_new(GIVE_BACKS_AT_ONCE);

/// One limit a request took a slot on.
enum Slot {
    /// The pending code, with its place in the phone's resend gap and hourly and daily caps.
    Phone,
    Counter(Counter),
    Guard,
}

/// The slots one request took, to give back if the request does not go through.
struct Slots {
    phone: PhoneNumber,
    event_id: uuid::Uuid,
    guard_zone: GuardZone,
    taken: Vec<Slot>,
}

impl Slots {
    /// Takes a slot on every limit at once. When any refuses, or Redis fails, gives back the
    /// ones that were taken and says why (the first refusal in the order phone, client network,
    /// its IPv6 /48, country, overall, fraud guard).
    async fn take(
        state: &AppState,
        destination: &Destination,
        client: IpAddr,
        new_code: &NewCode<'_>,
    ) -> Result<Self, ApiError> {
        let config = &state.config;
        let limits = &config.send_limits;
        let mut counters = vec![
            state
                .limits
                .sends_per_client(&ClientKey::of(client), limits.per_ip_per_hour),
        ];
        if let (Some(cap), Some(site)) = (limits.per_ipv6_48_per_hour, ClientKey::site_of(client)) {
            counters.push(state.limits.sends_per_site(&site, cap));
        }
        if let Some(cap) = limits.per_country_per_hour {
            counters.push(
                state
                    .limits
                    .sends_per_country(destination.calling_code, cap),
            );
        }
        if let Some(cap) = limits.global_per_minute {
            counters.push(state.limits.sends_overall(cap));
        }
        let guard_on = config.fraud_guard.mode != FraudGuardMode::Off;

        let phone = state
            .otp_store
            .issue(state.redis(), &config.otp, limits, new_code);
        let counted = join_all(counters.iter().map(|c| state.limits.take(state.redis(), c)));
        let guard = async {
            if !guard_on {
                return None;
            }
            Some(
                state
                    .limits
                    .guard()
                    .send(state.redis(), &config.fraud_guard, destination.guard_zone)
                    .await,
            )
        };
        let all = tokio::time::timeout(super::REDIS_DEADLINE, async {
            tokio::join!(phone, counted, guard)
        });
        let mut slots = Self {
            phone: destination.phone.clone(),
            event_id: new_code.event_id,
            guard_zone: destination.guard_zone,
            taken: Vec::new(),
        };
        let Ok((phone, counted, guard)) = all.await else {
            // Only the number's part is withdrawn (see below); the rest lapses with its windows.
            slots.taken.push(Slot::Phone);
            slots.give_back_later(state);
            return Err(ApiError::unavailable(
                Dependency::Redis,
                anyhow::anyhow!("Redis did not answer within {:?}", super::REDIS_DEADLINE),
            ));
        };

        let mut refusal = None;
        let mut failure = None;
        match phone {
            Ok(IssueOutcome::Pending) => slots.taken.push(Slot::Phone),
            Ok(IssueOutcome::Refused { limit, retry_after }) => {
                refusal.get_or_insert((limit, retry_after));
            }
            Err(e) => {
                // Redis may have run the script and lost only its answer (a timeout). The
                // number's part is withdrawn by this request's event id, which is safe whether
                // or not it ran, so the user's retry meets no resend gap and no slot of the hour
                // spent by a request that answered 503. A counter's slot is not given back when
                // its answer is missing: one never taken would free someone else's; it lapses
                // with its window.
                slots.taken.push(Slot::Phone);
                failure.get_or_insert(e);
            }
        }
        for (counter, result) in counters.into_iter().zip(counted) {
            match result {
                Ok(Taken::Yes) => slots.taken.push(Slot::Counter(counter)),
                Ok(Taken::No { retry_after }) => {
                    refusal.get_or_insert((counter.limit(), retry_after));
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        match guard {
            None => {}
            Some(Ok(GuardVerdict::Clear)) => slots.taken.push(Slot::Guard),
            Some(Ok(GuardVerdict::Tripped)) => {
                state.fraud_alarm.tripped(destination.guard_zone, false);
                slots.taken.push(Slot::Guard);
            }
            Some(Ok(GuardVerdict::Refused { retry_after })) => {
                state.fraud_alarm.tripped(destination.guard_zone, true);
                refusal.get_or_insert((Limit::FraudGuard, retry_after));
            }
            Some(Err(e)) => {
                failure.get_or_insert(e);
            }
        }

        if failure.is_none() && refusal.is_none() {
            return Ok(slots);
        }
        if let Some(e) = failure {
            slots.give_back_later(state);
            return Err(e.into());
        }
        slots.give_back(state).await;
        let (limit, retry_after) = refusal.expect("checked above");
        tracing::info!(
            phone = %destination.phone,
            ?limit,
            retry_after_ms = retry_after.as_millis(),
            "OTP request refused by a limit"
        );
        Err(ApiError::RateLimited { limit, retry_after })
    }

    /// [`Slots::give_back`] on a task of its own, for a request answering 503 because Redis
    /// failed: the give-back, to the same Redis, must not hold the answer for another deadline.
    /// At most [`GIVE_BACKS_AT_ONCE`] run: past that (a flood of requests while Redis is slow),
    /// the slots lapse with their windows rather than add load to a Redis already failing.
    fn give_back_later(self, state: &AppState) {
        let Ok(permit) = GIVE_BACKS.try_acquire() else {
            tracing::warn!(event_id = %self.event_id, "too many give-backs wait for Redis; this request's slots lapse with their windows");
            return;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            self.give_back(&state).await;
        });
    }

    /// Gives back every slot, so a request that did not go through counts toward nothing.
    async fn give_back(&self, state: &AppState) {
        let config = &state.config;
        let undo = self.taken.iter().map(|slot| async move {
            match slot {
                Slot::Phone => {
                    state
                        .otp_store
                        .withdraw(state.redis(), &self.phone, self.event_id)
                        .await
                }
                Slot::Counter(counter) => state.limits.give_back(state.redis(), counter).await,
                Slot::Guard => {
                    state
                        .limits
                        .guard()
                        .unsend(state.redis(), &config.fraud_guard, self.guard_zone)
                        .await
                }
            }
        });
        match tokio::time::timeout(super::REDIS_DEADLINE, join_all(undo)).await {
            Ok(results) => {
                for e in results.into_iter().filter_map(Result::err) {
                    tracing::warn!(error = %e, event_id = %self.event_id, "could not give back a limit slot; it lapses with its window");
                }
            }
            Err(_) => {
                tracing::warn!(event_id = %self.event_id, "giving back limit slots timed out; they lapse with their windows")
            }
        }
    }
}
