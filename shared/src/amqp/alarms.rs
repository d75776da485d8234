//! RabbitMQ's memory and disk alarms, as a connection hears of them. During an alarm the broker
//! stops reading from every connection that publishes and tells it so (`connection.blocked`,
//! then `connection.unblocked`); lapin then holds everything the connection would send. Code
//! that publishes reads `Connection::status().blocked()` itself; this only makes the alarm
//! visible: a warning in the log, and a gauge that counts the process's blocked connections.

use futures_util::StreamExt as _;
use lapin::{Connection, Event};
use tokio::sync::oneshot;

/// Reports one connection's blocks until dropped (keep it beside the connection).
pub struct AlarmWatch {
    _stop: oneshot::Sender<()>,
}

impl AlarmWatch {
    /// Starts reporting `connection`'s blocks: it counts in `gauge` while it is blocked (so an
    /// old connection ending does not clear its replacement's block), and the log says so, with
    /// `effect`: what the alarm stops meanwhile.
    pub fn start(connection: &Connection, gauge: &'static str, effect: &'static str) -> Self {
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(report(connection.events_listener(), stopped, gauge, effect));
        Self { _stop: stop }
    }
}

async fn report(
    events: impl futures_util::Stream<Item = Event>,
    mut stopped: oneshot::Receiver<()>,
    gauge: &'static str,
    effect: &'static str,
) {
    let mut events = std::pin::pin!(events);
    let mut blocked = false;
    loop {
        let event = tokio::select! {
            _ = &mut stopped => break,
            event = events.next() => event,
        };
        match event {
            None => break,
            Some(Event::ConnectionBlocked(reason)) => {
                if !blocked {
                    metrics::gauge!(gauge).increment(1.0);
                }
                blocked = true;
                tracing::warn!(%reason, effect, "RabbitMQ blocked publishing on this connection (a memory or disk alarm)");
            }
            Some(Event::ConnectionUnblocked) => {
                if blocked {
                    metrics::gauge!(gauge).decrement(1.0);
                }
                blocked = false;
                tracing::info!("RabbitMQ unblocked publishing on this connection");
            }
            // A connection that died while blocked is no longer blocked by an alarm; its
            // replacement reports its own state. (lapin keeps the flag set on a dead connection.)
            Some(Event::Error(_)) => {
                if blocked {
                    metrics::gauge!(gauge).decrement(1.0);
                }
                blocked = false;
            }
            Some(_) => {}
        }
    }
    // The connection is gone; its replacement reports its own state.
    if blocked {
        metrics::gauge!(gauge).decrement(1.0);
    }
}
