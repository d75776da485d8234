//! Draining `{ns}.sms.dead`: what RabbitMQ dead-lettered itself (an OTP that expired in the
//! queue, a message over the delivery limit) arrives there as it was, code included, and goes
//! on into the dead-letter queue with the code removed. The broker's `x-death` stays, so
//! `sms-worker dlq list` shows why it died.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use tokio::task::JoinSet;
use tracing::warn;

use super::acks::Acks;
use super::context::Context;
use crate::dead_letter::{self, PublishError};

/// Forwards `delivery` on a task of its own; acknowledged only once the copy is confirmed.
pub(crate) fn spawn(
    tasks: &mut JoinSet<()>,
    context: Arc<Context>,
    acks: Acks,
    delivery: Delivery,
) {
    tasks.spawn(async move {
        let forwarded = match context.dead_letter_route() {
            Some(route) => {
                // In an alarm the copy would only wait in this process's memory, where a
                // restart loses it; unforwarded, the broker keeps it. So a short alarm is waited
                // out (no provider call or claim is at stake). Not a long one: the delivery's
                // tag, unsettled, holds back the batched acks of the whole channel.
                if !wait_out_a_short_alarm(&route, &context, &acks).await {
                    return;
                }
                dead_letter::forward_broker_copy(
                    &route,
                    &context.topology.dead_letter_queue(),
                    &delivery.properties,
                    &delivery.data,
                )
                .await
            }
            None => Err(PublishError::NoChannel),
        };
        match forwarded {
            Ok(()) => {
                metrics::counter!(crate::metrics::DEAD_LETTERS, "kind" => "broker").increment(1);
                // A lost ack means the copy is forwarded again: a second dead letter, no SMS.
                acks.finished(delivery.delivery_tag);
            }
            Err(e) => {
                if matches!(e, PublishError::Full) {
                    // Each one comes back every few seconds while the alarm lasts.
                    tracing::debug!(error = %e, "returning a broker dead letter");
                } else {
                    warn!(error = %e, "could not forward a broker dead letter; returning it");
                }
                // A pause, so that a broken route does not become a busy loop.
                if let Ok(()) = context.shutdown.sleep(Duration::from_secs(1)).await {
                    let _ = delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await;
                    acks.settled(delivery.delivery_tag);
                }
            }
        }
    });
}

/// How long a broker dead letter waits for an alarm to end before it is forwarded anyway (and
/// held in this process until the alarm ends): as long as a dead letter's confirm may take.
const LONGEST_WAIT_FOR_AN_ALARM: Duration = Duration::from_secs(10);

/// Waits while the broker blocks the dead-letter connection (a memory or disk alarm), at most
/// [`LONGEST_WAIT_FOR_AN_ALARM`]. `false` when the copy is not to be forwarded: shutdown came,
/// or the channel it came on is gone (the broker has put it back in its queue, for another
/// task to take).
async fn wait_out_a_short_alarm(
    route: &dead_letter::Route,
    context: &Context,
    acks: &Acks,
) -> bool {
    if !shared::amqp::held_now(&route.connection) {
        return true;
    }
    // The alarm itself is logged once, by the connection's alarm watch.
    tracing::debug!(
        "RabbitMQ is blocking dead letters: this broker dead letter waits in its queue"
    );
    let give_up_at = tokio::time::Instant::now() + LONGEST_WAIT_FOR_AN_ALARM;
    route
        .wait_out_alarm(Some(give_up_at), &context.shutdown, || {
            acks.channel_connected()
        })
        .await
}
