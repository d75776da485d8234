//! The depth of the work queue and the dead-letter queue as gauges (`sms_queue_depth`), so that
//! a backlog or a growing DLQ can be alerted on from the worker's own `/metrics`
//! (monitoring/alerts.yml) without scraping RabbitMQ.

use std::time::Duration;

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::metrics as m;

/// How often the depths are read: a passive declare per queue, cheap for the broker.
const EVERY: Duration = Duration::from_secs(5);

/// Reads the depths every [`EVERY`] on a channel of its own (a failed passive declare closes
/// its channel), until dropped or the channel closes; the next connection starts another.
pub(crate) struct DepthGauge(JoinHandle<()>);

impl DepthGauge {
    pub(crate) fn start(channel: Channel, queues: [String; 2]) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            while channel.status().connected() {
                tick.tick().await;
                for queue in &queues {
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    };
                    match channel
                        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                        .await
                    {
                        Ok(declared) => {
                            metrics::gauge!(m::QUEUE_DEPTH, "queue" => queue.clone())
                                .set(f64::from(declared.message_count()));
                        }
                        Err(e) => debug!(error = %e, queue, "could not read the queue's depth"),
                    }
                }
            }
        }))
    }
}

impl Drop for DepthGauge {
    fn drop(&mut self) {
        self.0.abort();
    }
}
