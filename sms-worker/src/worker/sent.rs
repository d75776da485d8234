//! What follows an SMS that went out (or may have): its `sent` record in the send ledger, its
//! timeline, and, with receipts on, the message its receipts will look for.

use std::time::Duration;

use shared::OtpRequested;
use time::OffsetDateTime;
use tracing::{error, info, warn};

use super::context::Context;
use crate::ledger::with_a_few_tries;
use crate::provider::Accepted;
use crate::receipts::store::SentMessage;
use crate::shutdown::ShuttingDown;
use crate::trace::Line;

/// After the first quick tries, how long the next try waits; twice as long each time, up to
/// [`RECORD_RETRY_MAX`].
const RECORD_RETRY_FIRST: Duration = Duration::from_millis(500);
const RECORD_RETRY_MAX: Duration = Duration::from_secs(5);

/// Records the send in the ledger, and writes the number's timeline, ended, alongside: on one
/// Redis server both usually leave in one write. The timeline is written on a task of its own
/// and not waited for: on a Redis Cluster it lives on another node than the ledger record, and a
/// sick node there must not hold this delivery's ack (and its prefetch slot) for a diagnostic.
pub(super) async fn record_sent(context: &Context, event: &OtpRequested, timeline: Vec<Line>) {
    let trace_id = context.timelines.trace_id(event.phone_number.as_str());
    context.timelines.append_detached(trace_id, timeline);
    record_in_ledger(context, event).await;
}

/// Writes `sent`, waiting for Redis if need be, the delivery unacknowledged meanwhile: without
/// the record, a copy of the event could be sent again once the claim lapses, and a sign-in
/// holding a code whose request the api could not confirm in time (a pending code) would be
/// refused, the SMS on the phone. The wait ends when the code expires (no copy is sent after
/// that, and no sign-in succeeds) or the worker stops.
async fn record_in_ledger(context: &Context, event: &OtpRequested) {
    let ledger = &context.ledger;
    let time_left = || Duration::from_millis(event.millis_left(OffsetDateTime::now_utc()));
    let mut answer = with_a_few_tries(|| ledger.record_sent(event.event_id, time_left())).await;
    let mut pause = RECORD_RETRY_FIRST;
    let mut waited = false;
    while let Err(e) = &answer {
        if time_left().is_zero() {
            warn!(error = %e, "sent, but could not record it in Redis before the code expired");
            return;
        }
        if !waited {
            waited = true;
            warn!(error = %e, "sent, but could not record it in Redis; trying until Redis answers or the code expires");
        }
        if let Err(ShuttingDown) = context.shutdown.sleep(pause).await {
            warn!(error = %e, "sent, but could not record it in Redis before the worker stopped; a copy of the event could be sent again");
            return;
        }
        pause = (pause * 2).min(RECORD_RETRY_MAX);
        answer = ledger.record_sent(event.event_id, time_left()).await;
        if answer.is_ok() {
            info!("recorded the send once Redis answered");
        }
    }
    if let Ok(true) = answer {
        // Its claim was lost while it sent, and the api, hearing no confirm in time, withdrew
        // the event and refused the request: an SMS went whose code will not work, and the
        // request gave its limit slots back.
        metrics::counter!(crate::metrics::SENDS, "outcome" => "sent_after_withdrawal").increment(1);
        error!("sent an event the api had withdrawn: its claim was lost while it was being sent");
    }
}

/// With receipts on, remembers the accepted message (its body sealed) so that its receipts find
/// it and a carrier-side failure can be resent.
pub(super) async fn await_receipts(
    context: &Context,
    event: &OtpRequested,
    accepted: &Accepted,
    body: String,
) {
    let (Some(store), Some(message_id)) = (&context.receipts, &accepted.message_id) else {
        return;
    };
    let expires_ms =
        u64::try_from(event.expires_at.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let message = SentMessage {
        event_id: event.event_id,
        to: event.phone_number.as_str().to_owned(),
        body,
        expires_ms,
    };
    let trace_id = context.timelines.trace_id(event.phone_number.as_str());
    let calling_code = event.phone_number.calling_code();
    if let Err(e) = store
        .record_sent(
            accepted.provider,
            message_id,
            &message,
            calling_code,
            &trace_id,
        )
        .await
    {
        warn!(error = %e, "could not remember the message for its receipts; they will be ignored");
    }
}
