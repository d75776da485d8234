//! One delivery's life: read the event, send it (see [`super::send`]), then settle the message
//! with the broker: acknowledge, dead-letter or give it back.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use lapin::message::Delivery;
use lapin::options::{BasicNackOptions, BasicRejectOptions};
use shared::OtpRequested;
use shared::amqp::headers::header_str;
use time::OffsetDateTime;
use tokio::task::JoinSet;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::acks::Acks;
use super::context::Context;
use super::failover::{Tried, Unanswered, Unconfirmed, sent_unconfirmed};
use super::lease::Lease;
use super::outcome::Outcome;
use super::send::{leave_to_redeliver, send_otp};
use super::sent::SentSms;
use crate::dead_letter::{self, DeadLetter, ErrorKind, PublishError};
use crate::ledger::{ClaimToken, Finished, with_a_few_tries};
use crate::metrics::{self as m, InFlight, send_outcome};
use crate::trace::Journal;

/// Once a stop's grace period is over, how long a provider call under way may still take to
/// answer before its event ends as sent-unconfirmed: most answers come within it, and each one
/// that does spares a user a code that may never come. What follows (the record's last try, the
/// ack) fits in the rest of `connection::SETTLE_AFTER_GRACE`.
const ANSWER_AFTER_GRACE: Duration = Duration::from_secs(2);

/// Handles `delivery` on a task of its own. A panic returns the message to the queue.
pub(crate) fn spawn(
    tasks: &mut JoinSet<()>,
    context: Arc<Context>,
    acks: Acks,
    delivery: Delivery,
) {
    let acker = delivery.acker.clone();
    let tag = delivery.delivery_tag;
    tasks.spawn(async move {
        let handled = AssertUnwindSafe(handle(context, &acks, delivery))
            .catch_unwind()
            .await;
        if handled.is_err() {
            // Back to the queue. basic.reject (not nack) is what every RabbitMQ version counts
            // toward a quorum queue's delivery limit, so a message that keeps crashing the
            // handler is dead-lettered by the broker instead of looping.
            error!("handling a message panicked; returning it to the queue");
            // Unless it was settled before the panic: settling a tag twice closes the channel.
            if acks.is_open(tag) {
                let _ = acker.reject(BasicRejectOptions { requeue: true }).await;
                acks.settled(tag);
            }
        }
    });
}

async fn handle(context: Arc<Context>, acks: &Acks, delivery: Delivery) {
    let _in_flight = InFlight::start();
    let request_id = request_id(&delivery);
    match parse(&delivery.data) {
        Err(reason) => {
            let span = info_span!("sms", %request_id, event_id = tracing::field::Empty);
            async {
                warn!(error = %reason, "unreadable message; dead-lettering it as it came");
                let outcome = Outcome::DeadLetter {
                    dead_letter: DeadLetter::new(ErrorKind::InvalidMessage, reason, 0),
                    claim: None,
                };
                settle(&context, acks, &delivery, None, outcome).await;
            }
            .instrument(span)
            .await;
        }
        Ok(event) => {
            let span = info_span!(
                "sms",
                event_id = %event.event_id,
                %request_id,
                to = %event.phone_number,
            );
            async {
                let mut journal = Journal::new(&event);
                let outcome = send_until_the_grace_ends(&context, acks, &event, &mut journal).await;
                let ended = ending(&outcome);
                settle(&context, acks, &delivery, Some(&event), outcome).await;
                if let Some((how, detail)) = ended {
                    let lines = journal.end(how, detail);
                    let trace_id = context.timelines.trace_id(event.phone_number.as_str());
                    if let Err(e) = context.timelines.append(&trace_id, &lines).await {
                        debug!(error = %e, "could not write the number's timeline");
                    }
                }
            }
            .instrument(span)
            .await;
        }
    }
}

/// Sends the event (see [`send_otp`]) until the end of a stop's grace period, if that comes
/// first. Only the send is cut short then: what follows an outcome (recording an SMS,
/// acknowledging) runs to its end, since a message that went out and was not acknowledged would
/// be sent again.
///
/// A provider call under way then gets [`ANSWER_AFTER_GRACE`] more to answer (no other call
/// starts meanwhile). When the send is cut short with a call unanswered (that one, or one that
/// got no answer earlier), the SMS may have gone out: the event ends as sent-unconfirmed, as
/// after any call without an answer, rather than go to another worker, which would send it
/// again. Otherwise nothing went out: the claim is released, so that another worker need not
/// wait for it to lapse, and the message goes back to the queue when the channel closes.
async fn send_until_the_grace_ends(
    context: &Context,
    acks: &Acks,
    event: &OtpRequested,
    journal: &mut Journal,
) -> Outcome {
    let token = ClaimToken::generate();
    let unanswered = Unanswered::default();
    let mut tried = Tried::new(&unanswered);
    // Whether a provider call had its request out when the grace period ended (not one still
    // fetching a token before it): only such a call is cut by the stop.
    let under_way;
    {
        let sending = send_otp(context, acks, event, &token, &mut tried, journal);
        tokio::pin!(sending);
        tokio::select! {
            biased;
            outcome = &mut sending => return outcome,
            () = context.grace_over.recv() => {}
        }
        under_way = unanswered.call_under_way();
        if under_way
            && let Ok(outcome) = tokio::time::timeout(ANSWER_AFTER_GRACE, &mut sending).await
        {
            return outcome;
        }
    }
    if unanswered.any() {
        // A call cut here is the stop's doing; an earlier one left unanswered, the provider's.
        let cause = match tried.call_cut_short() {
            Some(provider) if under_way => {
                journal.cut_short(provider);
                Unconfirmed::CutAtStop
            }
            _ => Unconfirmed::Unanswered,
        };
        warn!(
            "the grace period ended with a provider call unanswered; the SMS may have gone out, so the event is not handed to another worker"
        );
        return sent_unconfirmed(journal, cause);
    }
    info!("the grace period ended before the SMS was sent; the message goes back to the queue");
    leave_to_redeliver(context, event.event_id, &token).await
}

/// How the delivery ended, for the number's timeline; `None` for a copy of an event that was
/// handled already (its story is told by the copy that handled it), and for an SMS that went
/// out, whose timeline was ended when the send was recorded (see `sent::record_sent`). An
/// event the api withdrew has no other story: it gets its ending here.
fn ending(outcome: &Outcome) -> Option<(&'static str, Option<String>)> {
    Some(match outcome {
        Outcome::AlreadyHandled(Finished::Withdrawn) => (
            "withdrawn",
            Some("the api never heard the broker's confirm and refused the request".to_owned()),
        ),
        Outcome::Sent(_) | Outcome::SentUnconfirmed(_) | Outcome::AlreadyHandled(_) => {
            return None;
        }
        Outcome::DeadLetter { dead_letter, .. } => (
            "dead_lettered",
            Some(format!(
                "{}: {}",
                dead_letter.kind.as_str(),
                dead_letter.error
            )),
        ),
        Outcome::LeaveToRedeliver | Outcome::Requeue => ("returned_to_queue", None),
    })
}

/// The api's request id, for the log lines of this delivery. Only an id belongs here; anything
/// else is cut short rather than logged whole.
fn request_id(delivery: &Delivery) -> String {
    header_str(
        delivery.properties.headers().as_ref(),
        shared::event::REQUEST_ID_HEADER,
    )
    .unwrap_or_default()
    .chars()
    .filter(|c| c.is_ascii_graphic())
    .take(128)
    .collect()
}

/// The event, or why it cannot be handled. The reason never quotes the body: it could hold the
/// code or the number.
fn parse(data: &[u8]) -> Result<OtpRequested, String> {
    let event: OtpRequested = serde_json::from_slice(data).map_err(|e| {
        format!(
            "the body is not an OtpRequested event ({} at line {} column {})",
            scrub(&e.to_string()),
            e.line(),
            e.column()
        )
    })?;
    if event.version != shared::event::EVENT_VERSION {
        return Err(format!("unsupported event version {}", event.version));
    }
    match event.otp.as_deref() {
        None | Some("") => return Err("the event carries no code".to_owned()),
        // Whatever is in `otp` goes out under our sender ID: only a code may.
        Some(code)
            if !(4..=10).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) =>
        {
            return Err("the event's code is not 4 to 10 digits".to_owned());
        }
        Some(_) => {}
    }
    Ok(event)
}

/// serde's messages quote the offending value; a value here could be a code or a number.
fn scrub(text: &str) -> String {
    let text = text.split(" at line ").next().unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut in_quotes = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                if in_quotes {
                    out.push_str("\"…\"");
                }
            }
            _ if in_quotes => {}
            c if c.is_ascii_digit() => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Acknowledges, dead-letters or returns the delivery.
async fn settle(
    context: &Context,
    acks: &Acks,
    delivery: &Delivery,
    event: Option<&OtpRequested>,
    outcome: Outcome,
) {
    match outcome {
        Outcome::Sent(sms) => record_and_acknowledge(context, acks, delivery, event, sms).await,
        Outcome::SentUnconfirmed(sms) => {
            send_outcome("sent_unconfirmed");
            record_and_acknowledge(context, acks, delivery, event, sms).await;
        }
        Outcome::AlreadyHandled(Finished::Withdrawn) => {
            info!(
                "the api withdrew this event (its publish was never confirmed, and the request was refused); acknowledging it without sending"
            );
            send_outcome("withdrawn");
            acks.finished(delivery.delivery_tag);
        }
        Outcome::AlreadyHandled(finished) => {
            info!(already = ?finished, "this event was already handled; acknowledging the copy without sending");
            send_outcome("duplicate_skipped");
            acks.finished(delivery.delivery_tag);
        }
        Outcome::LeaveToRedeliver => {
            debug!("left for the broker to hand to another worker");
            send_outcome("requeued");
        }
        Outcome::Requeue => {
            send_outcome("requeued");
            nack_requeue(acks, delivery).await;
        }
        Outcome::DeadLetter { dead_letter, claim } => {
            // The claim stays this task's while the dead letter may wait (for room, during an
            // alarm) and until the ledger has it: lapsed, another copy of the event could claim
            // it and try to send.
            let lease = event.zip(claim.as_ref()).map(|(event, claim)| {
                Lease::keep(
                    context.ledger.clone(),
                    event.event_id,
                    claim.clone(),
                    context.config.claim_lease,
                )
            });
            let published = publish_dead_letter(context, acks, delivery, event, &dead_letter).await;
            match published {
                Ok(()) => {
                    if let Some(event) = event {
                        record_dead_letter(context, event, claim.as_ref()).await;
                    }
                    drop(lease);
                    send_outcome("dead_lettered");
                    metrics::counter!(m::DEAD_LETTERS, "kind" => dead_letter.kind.as_str())
                        .increment(1);
                    info!(
                        kind = dead_letter.kind.as_str(),
                        attempts = dead_letter.attempts,
                        "dead-lettered"
                    );
                    acks.finished(delivery.delivery_tag);
                }
                Err(e) => {
                    drop(lease);
                    // Never drop: the original goes back to the queue and is tried again.
                    warn!(error = %e, "could not dead-letter the message; returning it to the queue");
                    if let (Some(event), Some(claim)) = (event, claim) {
                        context
                            .ledger
                            .release_or_let_lapse(event.event_id, &claim)
                            .await;
                    }
                    send_outcome("requeued");
                    // A short pause, so that a broken dead-letter route does not turn into a
                    // busy loop of redeliveries.
                    if let Ok(()) = context.shutdown.sleep(Duration::from_secs(1)).await {
                        nack_requeue(acks, delivery).await;
                    }
                }
            }
        }
    }
}

/// Records an SMS that went out (or may have) in the send ledger, acknowledges it, and only then
/// does the rest (its provider's breaker, its receipts): after the end of a stop's grace period
/// a delivery has seconds, and the ack must not wait behind writes it can do without.
async fn record_and_acknowledge(
    context: &Context,
    acks: &Acks,
    delivery: &Delivery,
    event: Option<&OtpRequested>,
    sms: SentSms,
) {
    let Some(event) = event else {
        acks.finished(delivery.delivery_tag);
        return;
    };
    let accepted = sms.record(context, event).await;
    acks.finished(delivery.delivery_tag);
    if let Some(accepted) = accepted {
        accepted.follow_up(context, event).await;
    }
}

/// Records in the send ledger that the event was dead-lettered, with a few quick tries as for a
/// sent SMS (one once a stop's grace period is over).
async fn record_dead_letter(context: &Context, event: &OtpRequested, claim: Option<&ClaimToken>) {
    let time_left = Duration::from_millis(event.millis_left(OffsetDateTime::now_utc()));
    let recorded = with_a_few_tries(
        || context.grace_over.is_over(),
        || {
            context
                .ledger
                .record_dead_letter(event.event_id, claim, time_left)
        },
    )
    .await;
    match recorded {
        Ok(None) => {}
        Ok(Some(stands)) => warn!(
            stands,
            "dead-lettered, but the send ledger holds another outcome or another copy's claim for this event, which stands"
        ),
        Err(e) => {
            warn!(error = %e, "dead-lettered, but could not record it in Redis; another copy of the event could still be sent");
        }
    }
}

/// Publishes the dead letter: the event without its code, or an unreadable body as it came.
async fn publish_dead_letter(
    context: &Context,
    acks: &Acks,
    delivery: &Delivery,
    event: Option<&OtpRequested>,
    dead_letter: &DeadLetter,
) -> Result<(), PublishError> {
    context
        .held_dead_letters
        .wait_for_room(&context.shutdown, || acks.channel_connected())
        .await?;
    // Read after the wait: a reconnect meanwhile brings a new route.
    let route = context.dead_letter_route().ok_or(PublishError::NoChannel)?;
    let body = match event {
        Some(event) => serde_json::to_vec(&event.without_code()).unwrap_or_default(),
        // Unreadable as an event, but maybe JSON with a real code beside a bad field.
        None => dead_letter::without_code(&delivery.data),
    };
    dead_letter::publish(
        &route,
        &context.topology.dead_letter_queue(),
        &delivery.properties,
        &body,
        dead_letter,
    )
    .await
}

async fn nack_requeue(acks: &Acks, delivery: &Delivery) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.nack(options).await {
        warn!(error = %e, "could not return the message; the broker returns it when the channel closes");
    }
    acks.settled(delivery.delivery_tag);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_never_quote_the_body() {
        let body = br#"{"version":1,"event_id":"not-a-uuid-123456","phone_number":"+14155550100","otp":"123456"}"#;
        let err = parse(body).unwrap_err();
        assert!(!err.contains("123456"), "{err}");
        assert!(!err.contains("4155550100"), "{err}");

        let body = br#"{"version":1,"phone_number":14155550100}"#;
        let err = parse(body).unwrap_err();
        assert!(!err.contains("4155550100"), "{err}");

        assert!(
            parse(b"not json")
                .unwrap_err()
                .contains("not an OtpRequested")
        );
    }

    #[test]
    fn refuses_anything_but_a_code_and_an_e164_number() {
        let body = |phone: &str, otp: &str| {
            format!(
                r#"{{"version":1,"event_id":"0192f0c4-1c2b-7cc3-a5b1-2f0f6c1d9e11","phone_number":"{phone}","otp":"{otp}","expires_at":"2030-01-01T00:00:00Z","requested_at":"2026-01-01T00:00:00Z","request_id":"r"}}"#
            )
        };
        assert!(parse(body("+14155550100", "123456").as_bytes()).is_ok());
        for otp in [
            "000000. Your account is locked; confirm at https://evil.example/x",
            "12a456",
            "123",
            "12345678901",
            "１２３４５６",
        ] {
            let err = parse(body("+14155550100", otp).as_bytes()).unwrap_err();
            assert!(!err.contains("evil"), "{err}");
        }
        for phone in [
            "+1234",
            "14155550100",
            "+1 415 555 0100",
            "tel:+14155550100",
        ] {
            let err = parse(body(phone, "123456").as_bytes()).unwrap_err();
            assert!(!err.contains("415"), "{err}");
        }
    }

    #[test]
    fn refuses_other_versions_and_missing_codes() {
        let event = OtpRequested::new(
            shared::PhoneNumber::parse("+14155550100").unwrap(),
            "123456".into(),
            OffsetDateTime::now_utc() + time::Duration::minutes(5),
            "req".into(),
        );
        assert!(parse(&serde_json::to_vec(&event).unwrap()).is_ok());
        let mut v2 = event.clone();
        v2.version = 2;
        assert!(
            parse(&serde_json::to_vec(&v2).unwrap())
                .unwrap_err()
                .contains("version 2")
        );
        assert!(
            parse(&serde_json::to_vec(&event.without_code()).unwrap())
                .unwrap_err()
                .contains("no code")
        );
    }
}
