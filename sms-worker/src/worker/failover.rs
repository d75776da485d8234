//! Sending one event through the providers (README.md#providers-and-failover).
//!
//! Each attempt goes to the first provider, in `SMS_PROVIDERS` order, whose breaker lets it
//! through and which has not refused this event for good. What happens after a failure depends
//! on its kind (see [`crate::provider::Failure`]):
//! - retryable (nothing was sent): backoff and try again, within the budget; if the failure
//!   opened the provider's breaker and another provider is open for business, at once there;
//! - provider, route or unrecognised (this provider will not send it): at once through the next
//!   provider; an unrecognised refusal is dead-lettered instead where
//!   `SMS_UNRECOGNISED_REFUSALS=dead_letter`;
//! - recipient (no provider could): dead-lettered;
//! - ambiguous (the request went out, no answer came back): the SMS may be on its way, so it
//!   gets exactly one more attempt, on the next provider where there is one, and never the
//!   retry loop; if that ends without a clear "accepted", whatever it met, or never comes (a
//!   breaker still open when the budget ends, a stop, a claim Redis can no longer renew), the
//!   event ends as sent-unconfirmed. So does a call cut short by the end of a stop's grace
//!   period (see `delivery::send_until_the_grace_ends`). It is never dead-lettered or handed to
//!   another worker: either could lead to a second SMS.
//!
//!   A provider that ignores repeats of a message id (`INFOBIP_IDEMPOTENT`) is asked again
//!   instead, up to [`REPEATS_AFTER_UNANSWERED`] times, with backoff, and the event stays with
//!   it: another provider could send a second SMS, a repeat to it cannot. Its breaker open for
//!   longer than a backoff may last (`SMS_RETRY_MAX_DELAY_MS`), or a `Retry-After` that long,
//!   ends the event sent-unconfirmed at once, rather than hold a worker's slot for it; a
//!   shorter wait for its breaker takes the place of a repeat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shared::OtpRequested;
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use super::budget::{MIN_MILLIS_LEFT, Retries};
use super::context::Context;
use super::lease::Lease;
use super::outcome::Outcome;
use super::sent::SentSms;
use crate::config::UnrecognisedRefusals;
use crate::dead_letter::{DeadLetter, ErrorKind};
use crate::ledger::{ClaimToken, DONE_MARGIN};
use crate::message;
use crate::metrics::{self as m, send_outcome};
use crate::provider::breaker::Allowance;
use crate::provider::{Failure, Provider, SendError, Sms};
use crate::shutdown::ShuttingDown;
use crate::trace::Journal;

/// How many more calls a provider that ignores repeats gets after one it left unanswered: a few,
/// since each may wait out the whole send timeout while the worker's slot is held, and should the
/// provider not ignore repeats after all (its idempotency not enabled, or its window shorter than
/// the retries), each one is a paid SMS.
const REPEATS_AFTER_UNANSWERED: u32 = 2;

/// What this event has been through so far, across the claims its delivery took.
pub(super) struct Tried<'a> {
    /// Provider calls made.
    attempts: u32,
    /// Providers that cannot send this event (they refused it, or were ambiguous about it).
    excluded: Vec<&'static str>,
    /// The provider that left a call unanswered and ignores repeats: every later attempt is
    /// its, since a repeat to it sends nothing more and another provider could.
    stays_with: Option<&'static str>,
    /// Calls made to that provider since, and waits for its breaker.
    repeats: u32,
    /// `name:status:code` per call, for the dead letter.
    calls: Vec<String>,
    /// Calls a provider has not answered; owned by the delivery, which reads it while the send
    /// runs.
    unanswered: &'a Unanswered,
    /// The provider of the call under way: a send cut short then names it in the timeline.
    calling: Option<&'static str>,
    last_error: Option<SendError>,
}

/// Whether an SMS of this event may have gone out without a provider saying so. The end of a
/// stop's grace period reads it while the send runs (see `delivery::send_until_the_grace_ends`):
/// such an event is never handed to another worker nor dead-lettered.
#[derive(Default)]
pub(super) struct Unanswered {
    /// A provider has this call's request, not yet answered: set by the provider as the request
    /// goes out (see [`Sms::request_out`]).
    under_way: AtomicBool,
    /// A call ended without an answer (a timeout, or a reset after the request was written):
    /// the SMS may be on its way, and the next call is the last.
    earlier: AtomicBool,
}

impl Unanswered {
    pub(super) fn any(&self) -> bool {
        self.call_under_way() || self.earlier()
    }

    pub(super) fn call_under_way(&self) -> bool {
        self.under_way.load(Ordering::Relaxed)
    }

    fn earlier(&self) -> bool {
        self.earlier.load(Ordering::Relaxed)
    }

    /// A call ended, `without_an_answer` or with one. Marked before any other await, so that the
    /// end of the grace period never finds an unanswered call forgotten.
    fn call_ended(&self, without_an_answer: bool) {
        if without_an_answer {
            self.earlier.store(true, Ordering::Relaxed);
        }
        self.under_way.store(false, Ordering::Relaxed);
    }
}

impl<'a> Tried<'a> {
    pub(super) fn new(unanswered: &'a Unanswered) -> Self {
        Self {
            attempts: 0,
            excluded: Vec::new(),
            stays_with: None,
            repeats: 0,
            calls: Vec::new(),
            unanswered,
            calling: None,
            last_error: None,
        }
    }

    /// The provider of a call cut short before its answer, if the send was.
    pub(super) fn call_cut_short(&self) -> Option<&'static str> {
        self.calling
    }

    fn record(&mut self, provider: &str, error: &SendError) {
        let dash = || "-".to_owned();
        self.calls.push(format!(
            "{provider}:{}:{}",
            error.status.map_or_else(dash, |s| s.to_string()),
            error.code.map_or_else(dash, |c| c.to_string()),
        ));
        self.last_error = Some(error.clone());
    }

    pub(super) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// A call went out without an answer (this copy's, or one a copy it took over from noted).
    pub(super) fn ambiguous(&self) -> bool {
        self.unanswered.earlier()
    }

    /// The claim was taken over from a worker that left a call unanswered at `provider` (the
    /// ledger noted it): that call is this event's, so the SMS may be on its way. The event
    /// stays with `provider` where it still ignores repeats; else (its settings changed meanwhile)
    /// it gets the one more attempt an unanswered call earns, elsewhere.
    pub(super) fn took_over_unanswered(&mut self, context: &Context, provider: &str) {
        if self.stays_with.is_some() {
            return;
        }
        warn!(
            provider,
            "took over an event whose worker left a call unanswered; the SMS may be on its way"
        );
        self.unanswered.call_ended(true);
        let Some(provider) = context
            .providers
            .all()
            .iter()
            .find(|p| p.name() == provider)
        else {
            return;
        };
        if provider.ignores_repeats() {
            self.stays_with = Some(provider.name());
            // One repeat, to confirm the send: the dead worker may have made its two.
            self.repeats = REPEATS_AFTER_UNANSWERED - 1;
        } else if context.providers.all().len() > 1 {
            self.excluded.push(provider.name());
        }
    }

    /// Whether `provider` may not take the next attempt: it refused the event, or another
    /// provider holds it (see [`Tried::stays_with`]).
    fn rules_out(&self, provider: &str) -> bool {
        self.excluded.contains(&provider) || self.stays_with.is_some_and(|p| p != provider)
    }

    /// Whether, after an unanswered call, `provider`'s `failure` still leaves it to try again:
    /// the event stays with it, and nothing in the answer says the first call was refused.
    fn may_repeat(&self, provider: &str, failure: Failure) -> bool {
        self.stays_with == Some(provider)
            && self.repeats < REPEATS_AFTER_UNANSWERED
            && matches!(
                failure,
                Failure::Ambiguous | Failure::Retryable | Failure::NoTimeLeft | Failure::Withheld
            )
    }

    /// Dead-letters the event: its retry budget ran out.
    fn gave_up(&self, kind: ErrorKind, claim: &ClaimToken) -> Outcome {
        let attempts = self.attempts;
        warn!(attempts, kind = kind.as_str(), "giving up; dead-lettering");
        Outcome::DeadLetter {
            dead_letter: self.dead_letter(kind, &format!("gave up after {attempts} attempts: ")),
            claim: Some(claim.clone()),
        }
    }

    /// Dead-letters the event: Redis stayed away until its budget ran out (`reason` says how).
    /// With the delivery's own claim, which Redis may still hold.
    pub(super) fn gave_up_on_redis(
        &self,
        kind: ErrorKind,
        reason: String,
        claim: &ClaimToken,
    ) -> Outcome {
        warn!(
            attempts = self.attempts,
            kind = kind.as_str(),
            "Redis stayed away; dead-lettering"
        );
        Outcome::DeadLetter {
            dead_letter: DeadLetter {
                error: reason,
                provider_status: None,
                provider_code: None,
                ..self.dead_letter(kind, "")
            },
            claim: Some(claim.clone()),
        }
    }

    fn dead_letter(&self, kind: ErrorKind, prefix: &str) -> DeadLetter {
        let error = self.last_error.as_ref();
        DeadLetter {
            kind,
            error: format!(
                "{prefix}{}",
                error.map_or("no provider could take it", |e| e.message.as_str())
            ),
            attempts: self.attempts,
            provider_status: error.and_then(|e| e.status),
            provider_code: error.and_then(|e| e.code),
            providers: self.calls.clone(),
        }
    }
}

/// Redis could not renew the claim, so no provider call may start (see `claim_in_doubt`): the
/// event waits to be claimed again.
pub(super) struct ClaimInDoubt;

/// Sends the event, failing over between providers, and says how the delivery ends, unless the
/// claim falls in doubt first.
pub(super) async fn send_through_providers(
    context: &Context,
    event: &OtpRequested,
    claim: &ClaimToken,
    lease: &Lease,
    retries: &mut Retries,
    tried: &mut Tried<'_>,
    journal: &mut Journal,
) -> Result<Outcome, ClaimInDoubt> {
    let config = &context.config;
    let code = event.otp.as_deref().unwrap_or_default();
    loop {
        let millis_left = event.millis_left(OffsetDateTime::now_utc());
        if millis_left < MIN_MILLIS_LEFT {
            if tried.ambiguous() {
                return Ok(sent_unconfirmed(journal, Unconfirmed::Unanswered));
            }
            return Ok(Outcome::DeadLetter {
                dead_letter: tried
                    .dead_letter(ErrorKind::Expired, "the OTP expired while retrying: "),
                claim: Some(claim.clone()),
            });
        }
        // Looked at before a breaker's probe is taken, which would be given back for nothing.
        if let Some(outcome) = after_the_grace(context, event, journal, lease, tried, claim).await {
            return Ok(outcome);
        }
        // No provider call may start with the claim in doubt (see `claim_in_doubt`). Looked at
        // first before a breaker's probe is taken, which a claim in doubt would give back.
        if !lease.make_sure().await {
            return claim_in_doubt(journal, lease, tried);
        }
        let Some((provider, allowance)) = choose(context, tried).await else {
            // With the event pinned, how long the provider that holds it stays shut.
            let mut reopens_in = None;
            if let Some(holder) = tried.stays_with {
                // It takes no call now. Open for longer than a backoff may last, or waited for
                // as often as a repeat may be made: waiting on would hold this worker's slot,
                // and the first call may have gone out. Open for less: waited out. Half-open
                // with its probe taken elsewhere, or its state unread (Redis): one backoff.
                // Either wait takes the place of a repeat.
                let shut_for = context
                    .providers
                    .all()
                    .iter()
                    .find(|p| p.name() == holder)
                    .and_then(|p| p.breaker.shut_for());
                if shut_for.is_some_and(|left| left > config.retry_max_delay)
                    || tried.repeats >= REPEATS_AFTER_UNANSWERED
                {
                    return Ok(sent_unconfirmed(journal, Unconfirmed::Unanswered));
                }
                tried.repeats += 1;
                reopens_in = shut_for;
            }
            if all_excluded(context, tried) {
                if tried.ambiguous() {
                    return Ok(sent_unconfirmed(journal, Unconfirmed::Unanswered));
                }
                warn!(attempts = tried.attempts, providers = ?tried.calls, "every provider refused the SMS; dead-lettering it");
                return Ok(Outcome::DeadLetter {
                    dead_letter: tried.dead_letter(ErrorKind::Permanent, ""),
                    claim: Some(claim.clone()),
                });
            }
            // Every remaining provider's breaker is open: wait as for a retryable failure.
            debug!("every provider's breaker is open; waiting");
            match wait(context, retries, reopens_in).await {
                Ok(()) => continue,
                Err(stop) => {
                    lease.stop();
                    return Ok(give_up(context, event, journal, stop, tried, claim).await);
                }
            }
        };
        // Once more: the breakers' state comes from Redis, and reading it may have taken long.
        // A probe taken is given back when `allowance` is dropped here.
        if !lease.make_sure().await {
            return claim_in_doubt(journal, lease, tried);
        }

        // Once more: the grace may have ended while the breakers or the claim were read.
        if let Some(outcome) = after_the_grace(context, event, journal, lease, tried, claim).await {
            return Ok(outcome);
        }

        tried.attempts += 1;
        if tried.stays_with.is_some() {
            tried.repeats += 1;
        }
        let after_an_unanswered_call = tried.ambiguous();
        let sms = Sms {
            to: &event.phone_number,
            body: message::render(&config.message, code, millis_left, event.locale.as_deref()),
            masked_body: message::render_masked(
                &config.message,
                code,
                millis_left,
                event.locale.as_deref(),
            ),
            expires_at: std::time::Instant::now() + Duration::from_millis(millis_left),
            message_id: event.event_id.to_string(),
            request_out: &tried.unanswered.under_way,
            may_start: &|| !context.grace_over.is_over(),
        };
        let timeout = config.send_timeout.min(Duration::from_millis(millis_left));
        tried.calling = Some(provider.name());
        let result = provider.send(&sms, timeout).await;
        tried.calling = None;
        let unanswered = matches!(&result, Err(e) if e.kind == Failure::Ambiguous);
        tried.unanswered.call_ended(unanswered);
        let result = result.map_err(|e| e.masking(code));
        journal.tried(provider.name(), &result);
        let error = match result {
            Ok(accepted) => {
                info!(
                    attempts = tried.attempts,
                    provider = accepted.provider,
                    message_id = accepted.message_id.as_deref().unwrap_or("-"),
                    status = accepted.status.as_deref().unwrap_or("-"),
                    "SMS sent"
                );
                send_outcome("sent");
                // Recording it (and closing a half-open breaker) is left to the delivery, where
                // the end of the grace period cannot cut it short.
                let timeline = journal.end("sent", None);
                let sent = SentSms::accepted(timeline, accepted, allowance, sms.body);
                return Ok(Outcome::Sent(sent));
            }
            Err(error) => error,
        };
        tried.record(provider.name(), &error);
        provider.breaker.failed(allowance, error.kind).await;
        warn!(
            attempts = tried.attempts,
            provider = provider.name(),
            kind = error.kind.as_str(),
            status = error.status,
            code = error.code,
            error = %error,
            "send failed"
        );
        if after_an_unanswered_call && !tried.may_repeat(provider.name(), error.kind) {
            // The one attempt after an ambiguous one is the last, whatever it met. Even a
            // refusal naming the recipient proves little about the first call (it says nothing of
            // what the first provider did), and a dead letter would record `dead` over an SMS
            // that may be on the phone.
            return Ok(sent_unconfirmed(journal, Unconfirmed::Unanswered));
        }
        match error.kind {
            Failure::Recipient => {
                return Ok(dead_letter_now(
                    tried,
                    claim,
                    "it cannot be sent to this recipient",
                ));
            }
            Failure::Unrecognised
                if config.unrecognised_refusals == UnrecognisedRefusals::DeadLetter =>
            {
                let why = "it was refused for a reason the worker cannot place \
                           (SMS_UNRECOGNISED_REFUSALS=dead_letter)";
                return Ok(dead_letter_now(tried, claim, why));
            }
            Failure::Provider | Failure::Route | Failure::Unrecognised => {
                tried.excluded.push(provider.name());
            }
            // The next turn of the loop finds the grace over.
            Failure::Withheld => {}
            // The event's clock, not the provider's fault: no breaker. Nothing went out, so the
            // next provider may take it at once; with none, a backoff within the budget like any
            // retry, so that slow tokens cannot loop the event.
            Failure::NoTimeLeft if has_alternative(context, tried, provider.name()) => {
                tried.excluded.push(provider.name());
            }
            Failure::NoTimeLeft => {
                if let Err(stop) = wait(context, retries, None).await {
                    lease.stop();
                    return Ok(give_up(context, event, journal, stop, tried, claim).await);
                }
            }
            Failure::Ambiguous if provider.ignores_repeats() => {
                // Asked again under the same message id, after a backoff, within the budget: a
                // message it took already is not sent again (the repeat is answered as a
                // duplicate, or accepted and refused as one in a delivery report).
                if tried.stays_with.is_none() {
                    let keep = Duration::from_millis(millis_left) + DONE_MARGIN;
                    let noted =
                        context
                            .ledger
                            .note_unanswered(event.event_id, provider.name(), keep);
                    if let Err(e) = noted.await {
                        warn!(error = %e, "could not note the unanswered call in the ledger; a copy that takes this event over may use the next provider");
                    }
                }
                tried.stays_with = Some(provider.name());
                send_outcome("retried");
                if let Err(stop) = wait(context, retries, None).await {
                    lease.stop();
                    return Ok(give_up(context, event, journal, stop, tried, claim).await);
                }
            }
            Failure::Ambiguous => {
                // The next provider, where there is one; else this one, once.
                if context.providers.all().len() > 1 {
                    tried.excluded.push(provider.name());
                }
            }
            Failure::Retryable
                if tried.stays_with.is_some()
                    && error
                        .retry_after
                        .is_some_and(|after| after > config.retry_max_delay) =>
            {
                // A provider holding the event that asks for a long wait: waited out, it would
                // hold this worker's slot, and the first call may have gone out.
                return Ok(sent_unconfirmed(journal, Unconfirmed::Unanswered));
            }
            Failure::Retryable => {
                let elsewhere =
                    provider.breaker.is_open() && has_alternative(context, tried, provider.name());
                if !elsewhere {
                    send_outcome("retried");
                    match wait(context, retries, error.retry_after).await {
                        Ok(()) => {}
                        // A wait past the budget (a `Retry-After` of minutes) leaves this
                        // provider to the next one while an attempt still fits, rather than
                        // dead-letter an event another provider could send now; only after an
                        // answer that says nothing went out (`surely_unsent`), since no id keeps
                        // two providers from both sending it.
                        Err(Stop::Budget(_))
                            if surely_unsent(&error)
                                && retries.pause(Duration::ZERO).is_ok()
                                && has_alternative(context, tried, provider.name()) =>
                        {
                            tried.excluded.push(provider.name());
                        }
                        Err(stop) => {
                            lease.stop();
                            return Ok(give_up(context, event, journal, stop, tried, claim).await);
                        }
                    }
                }
            }
        }
    }
}

/// The first provider, in order, that is not excluded and whose breaker lets this send through.
async fn choose<'a>(context: &'a Context, tried: &Tried<'_>) -> Option<(&'a Provider, Allowance)> {
    for provider in context.providers.all() {
        if tried.rules_out(provider.name()) {
            continue;
        }
        let allowance = provider.breaker.allows().await;
        if allowance.granted() {
            return Some((provider, allowance));
        }
    }
    None
}

fn all_excluded(context: &Context, tried: &Tried<'_>) -> bool {
    context
        .providers
        .all()
        .iter()
        .all(|p| tried.rules_out(p.name()))
}

/// Whether a retryable failure says for sure that nothing was sent: no answer because no
/// connection (no status), a 429, or a 503 in the provider's own words (its error code). A 500,
/// 502 or 504, or a 503 without the provider's code (a proxy's "upstream reset"), may come from an
/// edge after the provider took the request.
fn surely_unsent(error: &SendError) -> bool {
    match error.status {
        None | Some(429) => true,
        Some(503) => error.code.is_some(),
        Some(_) => false,
    }
}

/// Whether a provider other than `current` could take the next attempt (breakers aside).
fn has_alternative(context: &Context, tried: &Tried<'_>, current: &str) -> bool {
    context
        .providers
        .all()
        .iter()
        .any(|p| p.name() != current && !tried.rules_out(p.name()) && !p.breaker.is_open())
}

/// Why waiting for the next attempt ended the event instead.
enum Stop {
    ShuttingDown,
    Budget(ErrorKind),
}

/// Sleeps the next backoff delay (at least `retry_after`), unless the budget or a shutdown ends
/// the event first.
async fn wait(
    context: &Context,
    retries: &mut Retries,
    retry_after: Option<Duration>,
) -> Result<(), Stop> {
    let delay = retries.next_delay(retry_after).map_err(Stop::Budget)?;
    debug!(
        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        "retrying after a delay"
    );
    if let Err(ShuttingDown) = context.shutdown.sleep(delay).await {
        return Err(Stop::ShuttingDown);
    }
    Ok(())
}

/// Ends this claim's work on an event whose claim Redis could not renew: it may lapse there,
/// and another copy of the event take it and send, so no provider call may start. After an
/// ambiguous call the event is sent-unconfirmed. Otherwise the caller claims the event again,
/// keeping the delivery: a message handed back to a quorum queue counts toward its delivery
/// limit, and its retry budget would start again. The claim is not released: a release that
/// reached Redis late would delete the claim taken again with the same token.
fn claim_in_doubt(
    journal: &mut Journal,
    lease: &Lease,
    tried: &Tried<'_>,
) -> Result<Outcome, ClaimInDoubt> {
    if tried.ambiguous() {
        return Ok(sent_unconfirmed(journal, Unconfirmed::Unanswered));
    }
    warn!(
        attempts = tried.attempts,
        "cannot be sure the event's claim is still this worker's (Redis did not renew it); no provider call until it is claimed again, rather than risk a second SMS"
    );
    send_outcome("claim_in_doubt");
    lease.stop();
    Err(ClaimInDoubt)
}

/// Once the stop's grace period is over, no call starts: cut short, it would leave the event
/// sent-unconfirmed, while another worker can send it at once. Ends the event as a stop does.
async fn after_the_grace(
    context: &Context,
    event: &OtpRequested,
    journal: &mut Journal,
    lease: &Lease,
    tried: &Tried<'_>,
    claim: &ClaimToken,
) -> Option<Outcome> {
    if !context.grace_over.is_over() {
        return None;
    }
    lease.stop();
    Some(give_up(context, event, journal, Stop::ShuttingDown, tried, claim).await)
}

/// Ends an event whose wait for the next attempt was cut short.
async fn give_up(
    context: &Context,
    event: &OtpRequested,
    journal: &mut Journal,
    stop: Stop,
    tried: &Tried<'_>,
    claim: &ClaimToken,
) -> Outcome {
    if tried.ambiguous() {
        // The SMS may be on its way already (the next provider's breaker was open, so the one
        // more attempt never went). Handed to another worker, it would be sent a second time;
        // dead-lettered, the ledger would say `dead`, and a sign-in's late promotion would
        // refuse a code that may be on the phone.
        return sent_unconfirmed(journal, Unconfirmed::Unanswered);
    }
    match stop {
        Stop::ShuttingDown => {
            // Hand it to another worker rather than wait here.
            context
                .ledger
                .release_or_let_lapse(event.event_id, claim)
                .await;
            Outcome::LeaveToRedeliver
        }
        Stop::Budget(kind) => tried.gave_up(kind, claim),
    }
}

/// Ends the event in the dead-letter queue, without another provider: `why` says for the log.
fn dead_letter_now(tried: &Tried<'_>, claim: &ClaimToken, why: &str) -> Outcome {
    warn!(attempts = tried.attempts, "{why}; dead-lettering it");
    Outcome::DeadLetter {
        dead_letter: tried.dead_letter(ErrorKind::Permanent, ""),
        claim: Some(claim.clone()),
    }
}

/// Why an SMS ended sent-unconfirmed: the label `cause` of `sms_ambiguous_total`, so that an
/// operator can tell a provider's trouble from a stop's grace period too short for its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unconfirmed {
    /// A provider left a call unanswered, and no later call settled it.
    Unanswered,
    /// The worker's grace period ended with a call still under way.
    CutAtStop,
}

impl Unconfirmed {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unanswered => m::UNANSWERED,
            Self::CutAtStop => m::CUT_AT_STOP,
        }
    }
}

/// Calls without a clear answer: to be recorded as sent, so no copy sends it again.
pub(super) fn sent_unconfirmed(journal: &mut Journal, cause: Unconfirmed) -> Outcome {
    warn!(
        cause = cause.as_str(),
        "no provider confirmed the SMS, but it may have been sent; not trying again"
    );
    metrics::counter!(m::AMBIGUOUS, "cause" => cause.as_str()).increment(1);
    let timeline = journal.end(
        "sent_unconfirmed",
        Some("no provider confirmed it, and it may have gone out: not tried again".to_owned()),
    );
    Outcome::SentUnconfirmed(SentSms::unconfirmed(timeline))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_say_nothing_went_out_are_surely_unsent() {
        let answered = |status: Option<u16>, code: Option<i64>| SendError {
            kind: Failure::Retryable,
            message: String::new(),
            status,
            code,
            retry_after: None,
        };
        assert!(surely_unsent(&answered(None, None)), "no connection");
        assert!(surely_unsent(&answered(Some(429), None)));
        assert!(
            surely_unsent(&answered(Some(503), Some(20503))),
            "the provider's own 503"
        );
        assert!(
            !surely_unsent(&answered(Some(503), None)),
            "a proxy's bare 503"
        );
        for status in [500, 502, 504] {
            assert!(
                !surely_unsent(&answered(Some(status), Some(20500))),
                "{status}"
            );
        }
    }
}
