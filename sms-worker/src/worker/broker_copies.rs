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
                // restart loses it; unforwarded, the broker keeps it. Waiting costs no provider
                // call and no claim, and this queue's own prefetch bounds how many wait.
                if !until_unblocked(&route, &context).await {
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
        let forwarded = match forwarded {
            Err(e) if e.stored_when_the_alarm_ends() => {
                metrics::counter!(crate::metrics::DEAD_LETTERS_HELD).increment(1);
                warn!(
                    "RabbitMQ is blocking dead letters (a memory or disk alarm): this broker dead letter is stored when the alarm ends; acknowledging the original now"
                );
                Ok(())
            }
            forwarded => forwarded,
        };
        match forwarded {
            Ok(()) => {
                metrics::counter!(crate::metrics::DEAD_LETTERS, "kind" => "broker").increment(1);
                // A lost ack means the copy is forwarded again: a second dead letter, no SMS.
                acks.finished(delivery.delivery_tag);
            }
            Err(e) => {
                warn!(error = %e, "could not forward a broker dead letter; returning it");
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

/// Waits while the broker blocks the dead-letter connection (a memory or disk alarm). `false`
/// when shutdown came first: the delivery is then left unacknowledged, and goes back to the
/// queue with the connection.
async fn until_unblocked(route: &dead_letter::Route, context: &Context) -> bool {
    if !shared::amqp::held_now(&route.connection) {
        return true;
    }
    // The alarm itself is logged once, by the connection's alarm watch.
    tracing::debug!(
        "RabbitMQ is blocking dead letters: this broker dead letter waits in its queue"
    );
    while shared::amqp::held_now(&route.connection) {
        if context
            .shutdown
            .sleep(Duration::from_millis(200))
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}
