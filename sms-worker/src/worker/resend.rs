//! What a delivery receipt does (docs/messaging.md#delivery-receipts): it moves the message's
//! status (only forward, only once), feeds the provider's breaker and the metrics, goes into the
//! number's timeline, and when the carrier dropped a code that is still valid, sends that code
//! once more through another provider, at once.
//!
//! The resend is deliberately narrow: only for carrier-side failures (a recipient-side one, a
//! landline or an unknown number, would fail the same way everywhere, and an opt-out must not be
//! routed around), only while the api still holds that very code (not used, not replaced, not
//! expired), and at most once per event however many receipts arrive (the ledger's resend claim).

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use redis::RedisResult;
use shared::PhoneNumber;
use shared::fraud_guard::{FraudGuardMode, GuardVerdict, GuardZone};
use tracing::{info, warn};

use super::budget::MIN_MILLIS_LEFT;
use super::context::Context;
use crate::ledger::{ClaimToken, with_a_few_tries};
use crate::metrics as m;
use crate::provider::breaker::Allowance;
use crate::provider::{Provider, Sms};
use crate::receipts::store::{Applied, ReceiptStore, Recorded};
use crate::receipts::{Receipt, Status};
use crate::trace::{Line, What, unix_ms};

/// What applying a receipt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Receipted {
    /// Applied, or a repeat or an older status that changed nothing.
    Applied,
    /// No message of ours has its id: not ours, older than a day, or not recorded yet (the
    /// record follows the send's ack, and a quick carrier can report before it). Not counted
    /// here: the caller may ask again.
    UnknownMessage,
}

/// Applies one receipt. An error means Redis could not be asked: the provider should send the
/// receipt again later (nothing was changed, or the status was stored and the resend it earned is
/// still owed, which the repeat then finds).
pub(crate) async fn apply(
    context: &Context,
    store: &ReceiptStore,
    receipt: &Receipt,
) -> RedisResult<Receipted> {
    let provider = receipt.provider;
    let recorded = match store.apply(receipt).await? {
        Applied::Changed(recorded) => recorded,
        Applied::Nothing => {
            metrics::counter!(m::RECEIPTS_IGNORED, "provider" => provider, "reason" => "duplicate")
                .increment(1);
            return Ok(Receipted::Applied);
        }
        Applied::Again(recorded) => {
            metrics::counter!(m::RECEIPTS_IGNORED, "provider" => provider, "reason" => "duplicate")
                .increment(1);
            resend_still_owed(context, store, receipt, &recorded).await?;
            return Ok(Receipted::Applied);
        }
        Applied::Unknown => return Ok(Receipted::UnknownMessage),
    };
    let event_id = &recorded.event_id;
    let country = recorded
        .calling_code
        .map_or_else(|| "unknown".to_owned(), |c| c.to_string());
    metrics::counter!(m::RECEIPTS, "provider" => provider, "status" => receipt.status.as_str(), "country" => country)
        .increment(1);

    let breaker = context
        .providers
        .all()
        .iter()
        .find(|p| p.name() == provider)
        .map(|p| &p.breaker);
    match receipt.status {
        Status::Delivered => {
            let seconds = unix_ms().saturating_sub(recorded.sent_at_ms) as f64 / 1_000.0;
            metrics::histogram!(m::DELIVERY_SECONDS, "provider" => provider).record(seconds);
            if let Some(breaker) = breaker {
                breaker.receipt(true).await;
            }
        }
        // Only the carrier's failures say something about the provider's route.
        status if status.is_failure() && receipt.counts_against_route => {
            if let Some(breaker) = breaker {
                breaker.receipt(false).await;
            }
        }
        _ => {}
    }

    let mut lines = vec![receipt_line(receipt, event_id)];
    let mut settled = Settled::Yes;
    if receipt.status.is_failure() {
        if receipt.may_owe_a_resend() {
            info!(
                provider,
                event_id,
                code = receipt.error_code,
                "the carrier dropped an SMS"
            );
            let outcome = resend(context, receipt, &recorded).await;
            settle(store, receipt, &outcome).await;
            settled = outcome.settled;
            lines.push(outcome.line);
        } else {
            info!(
                provider,
                event_id,
                code = receipt.error_code,
                "the SMS could not reach its recipient; not resending"
            );
            lines.push(Line::new(event_id.clone(), What::NotResent).detail(
                "the failure lies with the recipient (landline, unknown or blocked number)",
            ));
        }
    }
    if let Err(e) = context.timelines.append(&recorded.trace_id, &lines).await {
        warn!(error = %e, "could not add the receipt to the number's timeline");
    }
    ask_again_if_redis_was_away(settled)?;
    Ok(Receipted::Applied)
}

/// A resend Redis kept from being decided answers the receipt 503, so that a provider that
/// retries (Infobip does; Twilio as its URL asks) sends it again: the status is stored, and the
/// repeat finds the resend still owed.
fn ask_again_if_redis_was_away(settled: Settled) -> RedisResult<()> {
    if settled == Settled::RedisAway {
        return Err(redis::RedisError::from(std::io::Error::other(
            "Redis could not be asked about the resend",
        )));
    }
    Ok(())
}

/// A carrier-side failure stored before, again, whose resend was not settled then (that copy's
/// answer was lost to a Redis timeout, so the provider sent it again; or Redis failed, or no
/// other provider was open, before the resend). The resend claim says whether another copy made
/// it meanwhile. One made now goes into the timeline with its receipt; one skipped again does
/// not, so a carrier's duplicates add no lines. No breaker sample is taken here: repeats of one
/// receipt must not weigh as many failures.
async fn resend_still_owed(
    context: &Context,
    store: &ReceiptStore,
    receipt: &Receipt,
    recorded: &Recorded,
) -> RedisResult<()> {
    let event_id = &recorded.event_id;
    if context.ledger.resend_claimed(event_id).await? {
        if let Err(e) = store.settle(receipt).await {
            warn!(error = %e, "could not mark a resend settled; a repeat of its receipt will ask again");
        }
        return Ok(());
    }
    let outcome = resend(context, receipt, recorded).await;
    settle(store, receipt, &outcome).await;
    let settled = outcome.settled;
    if outcome.line.what == What::Resent {
        let lines = [receipt_line(receipt, event_id), outcome.line];
        if let Err(e) = context.timelines.append(&recorded.trace_id, &lines).await {
            warn!(error = %e, "could not add the resend to the number's timeline");
        }
    }
    ask_again_if_redis_was_away(settled)
}

/// Marks a settled resend so that repeats of its receipt are plain no-ops. Best effort: the
/// resend claim still keeps a repeat from a second SMS.
async fn settle(store: &ReceiptStore, receipt: &Receipt, outcome: &ResendOutcome) {
    if outcome.settled == Settled::Yes
        && let Err(e) = store.settle(receipt).await
    {
        warn!(error = %e, "could not mark a resend settled; a repeat of its receipt will ask again");
    }
}

/// The timeline's line for `receipt`.
fn receipt_line(receipt: &Receipt, event_id: &str) -> Line {
    Line::new(event_id.to_owned(), What::Receipt)
        .provider(receipt.provider)
        .status(receipt.status.as_str())
        .code(receipt.error_code)
        .message_id(Some(&receipt.message_id))
}

/// What a resend came to: its timeline line, and whether that is settled (made, or skipped for
/// good), so a repeat of its receipt need not ask again.
struct ResendOutcome {
    line: Line,
    settled: Settled,
}

/// Whether a resend's decision stands, or a repeat of its receipt should ask again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Made, or skipped for good (code used, replaced or expired; already resent; no other
    /// provider configured).
    Yes,
    /// Redis could not be asked: the provider should send the receipt again (503).
    RedisAway,
    /// Another provider is configured, but none is open now.
    NoProviderOpen,
}

/// Sends the code once more through another provider, if it is worth it; says what happened.
async fn resend(context: &Context, receipt: &Receipt, recorded: &Recorded) -> ResendOutcome {
    let Recorded {
        event_id,
        calling_code,
        trace_id,
        message,
        ..
    } = recorded;
    let skipped = |reason: &'static str, detail: &str, settled: Settled| {
        metrics::counter!(m::RESENDS_SKIPPED, "reason" => reason).increment(1);
        info!(event_id, reason, "not resending");
        ResendOutcome {
            line: Line::new(event_id.to_owned(), What::NotResent).detail(detail),
            settled,
        }
    };
    let Some(store) = context.receipts.as_ref() else {
        return skipped("unavailable", "receipts are off", Settled::Yes);
    };
    // The sealed copy is kept only until the code expires.
    let Some(message) = message else {
        return skipped("expired", "the code has expired", Settled::Yes);
    };
    let millis_left = || message.expires_ms.saturating_sub(unix_ms());
    let too_late = || millis_left() < MIN_MILLIS_LEFT;
    if too_late() {
        return skipped(
            "expired",
            "the code expires too soon to be of use",
            Settled::Yes,
        );
    }
    let Ok(phone) = PhoneNumber::parse(&message.to) else {
        return skipped(
            "unavailable",
            "the stored message is unreadable",
            Settled::Yes,
        );
    };
    // The receipt's status is stored already, so a provider's retry of it would change nothing:
    // a Redis blip here must not decide that the code is never resent. Both asks are safe to
    // repeat, while the code has time left.
    let code_is_current = with_a_few_tries(too_late, || store.code_is_current(&phone, event_id));
    match code_is_current.await {
        Ok(true) => {}
        Ok(false) => {
            return skipped(
                "code_not_current",
                "the code was used or replaced by a newer one",
                Settled::Yes,
            );
        }
        Err(e) => {
            warn!(error = %e, "Redis did not answer, even when asked again; not resending");
            return skipped("unavailable", "Redis did not answer", Settled::RedisAway);
        }
    }
    let Some((provider, allowance)) = next_provider(context, receipt.provider).await else {
        // None configured stays so; one configured may open again.
        let configured = context
            .providers
            .all()
            .iter()
            .any(|p| p.name() != receipt.provider && !p.logs_only());
        return skipped(
            "no_other_provider",
            "no other provider is configured and open",
            if configured {
                Settled::NoProviderOpen
            } else {
                Settled::Yes
            },
        );
    };
    let claimant = ClaimToken::generate();
    let claim = with_a_few_tries(too_late, || {
        let time_left = Duration::from_millis(millis_left());
        context.ledger.claim_resend(event_id, &claimant, time_left)
    });
    match claim.await {
        Ok(true) => {}
        Ok(false) => {
            return skipped(
                "already_resent",
                "this event was resent already",
                Settled::Yes,
            );
        }
        Err(e) => {
            warn!(error = %e, "Redis did not answer, even when asked again; not resending");
            return skipped("unavailable", "Redis did not answer", Settled::RedisAway);
        }
    }
    let refused = refused_by_the_fraud_guard(context, store, &phone, too_late);
    if let Some(refused) = refused.await {
        return skipped("fraud_guard", refused, Settled::Yes);
    }
    // The asks above may have taken seconds: the SMS says how long the code has now.
    let millis_left = millis_left();
    if millis_left < MIN_MILLIS_LEFT {
        return skipped(
            "expired",
            "the code expires too soon to be of use",
            Settled::Yes,
        );
    }
    let time_left = Duration::from_millis(millis_left);

    let sms = Sms {
        to: &phone,
        body: message.body.clone(),
        masked_body: "(a resent code)".to_owned(),
        expires_at: std::time::Instant::now() + time_left,
        // Not the event id: Infobip would refuse it as a duplicate of the first send.
        message_id: format!("{event_id}-resend"),
        // At most one resend per event, by its claim: nothing to tell anyone.
        request_out: &AtomicBool::new(false),
        // Not a delivery: a resend is held to the stop's deadline, not to the grace period.
        may_start: &|| true,
    };
    let timeout = context.config.send_timeout.min(time_left);
    let result = provider.send(&sms, timeout).await;
    let line = Line::new(event_id.to_owned(), What::Resent).provider(provider.name());
    let line = match result {
        Ok(accepted) => {
            provider.breaker.success(allowance).await;
            metrics::counter!(m::RESENDS, "provider" => provider.name(), "outcome" => "accepted")
                .increment(1);
            info!(
                event_id,
                from = receipt.provider,
                to = provider.name(),
                "resent the code through another provider"
            );
            if let Some(id) = &accepted.message_id
                && let Err(e) = store
                    .record_sent(provider.name(), id, message, *calling_code, trace_id)
                    .await
            {
                warn!(error = %e, "could not record the resend; its receipts will be ignored");
            }
            line.status("accepted")
                .message_id(accepted.message_id.as_deref())
        }
        Err(error) => {
            provider.breaker.failed(allowance, error.kind).await;
            metrics::counter!(m::RESENDS, "provider" => provider.name(), "outcome" => error.kind.as_str())
                .increment(1);
            warn!(event_id, provider = provider.name(), error = %error, "the resend failed");
            line.status(error.kind.as_str())
                .code(error.code.or(error.status.map(i64::from)))
        }
    };
    ResendOutcome {
        line,
        settled: Settled::Yes,
    }
}

/// Says why not to resend if the country's fraud guard is tripped, in `enforce`: a resend
/// is a second paid SMS, and a carrier in on SMS pumping, reporting its numbers' codes
/// undelivered, would earn one for each pumped code. The guard is asked, not counted in (see
/// `shared::fraud_guard`). Asked after the claim, so that a refusal spends it, as a skip for good
/// should. Asked up to three times, as the claim is; Redis still not answering then lets the
/// resend through: the claim already holds it to one. Every ask that finds the guard tripped is
/// counted in `sms_resend_fraud_guard_trips_total`, refused or (in `monitor`) not.
async fn refused_by_the_fraud_guard(
    context: &Context,
    store: &ReceiptStore,
    phone: &PhoneNumber,
    too_late: impl Fn() -> bool,
) -> Option<&'static str> {
    let policy = &context.config.fraud_guard;
    if policy.mode == FraudGuardMode::Off {
        return None;
    }
    // Placing a number walks the numbering plans of the countries sharing its calling code:
    // about 11 µs for a +1 number in a release build, but the first one loads libphonenumber's
    // metadata and compiles patterns (milliseconds), so off the threads that answer receipts.
    let placed = tokio::task::spawn_blocking({
        let phone = phone.clone();
        move || GuardZone::of(&phone)
    });
    let zone = match placed.await {
        Ok(Some(zone)) => zone,
        Ok(None) => GuardZone::CallingCode(phone.calling_code()?),
        Err(e) => {
            warn!(error = %e, "could not place the number for the fraud guard; resending");
            return None;
        }
    };
    let verdict = with_a_few_tries(too_late, || store.peek_fraud_guard(policy, zone));
    let refused = match verdict.await {
        Ok(GuardVerdict::Clear) => return None,
        Ok(GuardVerdict::Tripped) => false,
        Ok(GuardVerdict::Refused { .. }) => true,
        Err(e) => {
            warn!(error = %e, "could not ask the fraud guard about the resend, even when asked again; resending");
            return None;
        }
    };
    metrics::counter!(m::RESEND_FRAUD_GUARD_TRIPS, "country" => zone.to_string(), "refused" => refused.to_string())
        .increment(1);
    if refused {
        return Some("the fraud guard holds this country: its codes are mostly not being used");
    }
    // As often as the resends themselves: the api warns once a minute per country.
    info!(
        country = %zone,
        "resending to a country whose fraud guard is tripped (monitor mode)"
    );
    None
}

/// The first provider in `SMS_PROVIDERS` order, other than the one that dropped the message,
/// that sends real SMS and whose breaker lets this through.
async fn next_provider<'a>(
    context: &'a Context,
    dropped_by: &str,
) -> Option<(&'a Provider, Allowance)> {
    for provider in context.providers.all() {
        if provider.name() == dropped_by || provider.logs_only() {
            continue;
        }
        let allowance = provider.breaker.allows().await;
        if allowance.granted() {
            return Some((provider, allowance));
        }
    }
    None
}
