//! Publishes `OtpRequested` with publisher confirms. Many publishes share one confirm-mode
//! channel and their confirms are awaited concurrently, so throughput is not bound by one round
//! trip per request. The connection is (re)made on demand: an api started while the broker is
//! down keeps serving, answers 503 for OTP requests, and recovers by itself.
//!
//! On a cluster (`AMQP_URL` lists several nodes) the connection goes to the first node that
//! answers, and after that node dies, to the next. A publish that is nacked, times out or loses
//! its connection before the confirm is tried again on a fresh channel: after a quorum queue's
//! leader dies, a channel that saw a nack can keep nacking although the new leader is up. A
//! retried event may be stored twice; the worker's ledger sends its SMS once. Retries back off
//! (50 ms, doubling), because for a moment after a leader dies even a fresh channel is nacked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use shared::amqp::nodes::BrokerNodes;
use shared::amqp::{ConfirmError, event_properties, publish_confirmed};
use shared::event::ROUTING_KEY;
use shared::{OtpRequested, Topology};
use time::OffsetDateTime;

/// Without a quorum majority a confirm never comes; an attempt must not wait forever for it. Short
/// enough that a second attempt fits in the request's publish deadline (5 s).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting to one node (TCP, AMQP handshake, channel, declarations) may take this long.
const CONNECT_TIMEOUT_PER_NODE: Duration = Duration::from_secs(3);
/// Attempts per event: the first, and retries on fresh channels. The request's 5 s publish
/// deadline usually ends them first.
const PUBLISH_ATTEMPTS: u32 = 6;
/// The pause before the first retry, doubled for each next one: for about half a second after
/// a quorum queue's leader dies, even a fresh channel is nacked until the new leader is known.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(50);
/// After a failed connect, fail fast for this long instead of making every request wait for
/// its own connect attempt.
const RECONNECT_COOLDOWN: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(String),
    #[error(transparent)]
    Confirm(#[from] ConfirmError),
    #[error("the OTP expired before it could be published")]
    Expired,
}

/// One AMQP connection and its confirm-mode channel.
struct BrokerConnection {
    connection: Connection,
    channel: Channel,
    /// Which of the nodes it is to.
    node: usize,
}

pub struct Publisher {
    nodes: BrokerNodes,
    /// The node to try first at the next connect.
    first_node: AtomicUsize,
    topology: Topology,
    connection: Mutex<Option<Arc<BrokerConnection>>>,
    connecting: tokio::sync::Mutex<Option<Instant>>,
}

impl Publisher {
    pub fn new(nodes: BrokerNodes, topology: Topology) -> Self {
        Self {
            nodes,
            first_node: AtomicUsize::new(0),
            topology,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Arc<BrokerConnection>> {
        let connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        connection
            .as_ref()
            .filter(|c| c.channel.status().connected())
            .cloned()
    }

    /// A connection with a confirm-mode channel, connecting first if need be (one connect at a
    /// time).
    async fn broker(&self) -> Result<Arc<BrokerConnection>, PublishError> {
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let mut last_failure = self.connecting.lock().await;
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        if last_failure.is_some_and(|at| at.elapsed() < RECONNECT_COOLDOWN) {
            return Err(PublishError::Connect(
                "recently failed; retrying shortly".into(),
            ));
        }
        // Every step bounded: a node that accepts TCP and then says nothing must not hold the
        // connect lock (and every request behind it) for longer than this.
        let deadline = CONNECT_TIMEOUT_PER_NODE * u32::try_from(self.nodes.len()).unwrap_or(1);
        let connected = tokio::time::timeout(deadline, self.connect()).await;
        match connected {
            Ok(Ok(connection)) => {
                *last_failure = None;
                tracing::info!(
                    node = connection.node + 1,
                    nodes = self.nodes.len(),
                    "connected to RabbitMQ"
                );
                let connection = Arc::new(connection);
                *self.connection.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(connection.clone());
                Ok(connection)
            }
            Ok(Err(e)) => {
                *last_failure = Some(Instant::now());
                Err(PublishError::Connect(e.to_string()))
            }
            Err(_) => {
                *last_failure = Some(Instant::now());
                // Start with another node next time.
                let next = (self.first_node.load(Ordering::Relaxed) + 1) % self.nodes.len().max(1);
                self.first_node.store(next, Ordering::Relaxed);
                Err(PublishError::Connect("timed out".into()))
            }
        }
    }

    async fn connect(&self) -> lapin::Result<BrokerConnection> {
        let properties = ConnectionProperties::default().with_connection_name("otp-api".into());
        let from = self.first_node.load(Ordering::Relaxed);
        let (connection, node) = self.nodes.connect(from, properties).await?;
        self.first_node.store(node, Ordering::Relaxed);
        let channel = connection.create_channel().await?;
        self.topology.declare(&connection, &channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(BrokerConnection {
            connection,
            channel,
            node,
        })
    }

    /// Forgets a channel that failed, so the next publish opens a fresh one (a channel can keep
    /// rejecting publishes after a broker restart or a quorum leader change). When the
    /// connection itself is gone, its node probably is too: the next connect starts with the
    /// node after it.
    fn discard(&self, failed: &Arc<BrokerConnection>) {
        let mut current = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        // The very connection that failed: a late failure of an old one must not drop its
        // replacement (their channels share an id).
        if let Some(broker) = current.as_ref().filter(|c| Arc::ptr_eq(c, failed)) {
            if !broker.connection.status().connected() {
                self.first_node.store(
                    (broker.node + 1) % self.nodes.len().max(1),
                    Ordering::Relaxed,
                );
            }
            *current = None;
        }
    }

    /// Returns once the broker has confirmed that the event is stored. The caller bounds the
    /// whole (the request's publish deadline); each attempt is bounded by [`CONFIRM_TIMEOUT`].
    pub async fn publish(&self, event: &OtpRequested) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event).expect("an event always serialises");
        let mut attempt = 1;
        loop {
            let ttl_ms = event.millis_left(OffsetDateTime::now_utc());
            if ttl_ms == 0 {
                return Err(PublishError::Expired);
            }
            let broker = self.broker().await?;
            let result = publish_confirmed(
                &broker.channel,
                &self.topology.events_exchange(),
                ROUTING_KEY,
                &body,
                event_properties(event, ttl_ms),
                CONFIRM_TIMEOUT,
            )
            .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.channel_suspect() => {
                    self.discard(&broker);
                    if attempt == PUBLISH_ATTEMPTS {
                        return Err(e.into());
                    }
                    metrics::counter!(crate::metrics::PUBLISH_RETRIES).increment(1);
                    tracing::info!(event_id = %event.event_id, attempt, error = %e, "publish not confirmed; trying again on a fresh channel");
                    tokio::time::sleep(retry_delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// For `/readyz`: opens the channel if it is not open, and says whether that worked.
    pub async fn ensure_connected(&self) -> Result<(), PublishError> {
        self.broker().await.map(|_| ())
    }
}

/// The pause before publish attempt `attempt + 1`: doubling from [`FIRST_RETRY_DELAY`], half of
/// it fixed and half drawn at random, so that the requests a leader change failed together do
/// not all come back together, while the retries still span the time an election takes.
fn retry_delay(attempt: u32) -> Duration {
    let bound = FIRST_RETRY_DELAY * 2u32.pow(attempt.saturating_sub(1).min(16));
    bound / 2 + (bound / 2).mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_and_spread() {
        for attempt in 1..PUBLISH_ATTEMPTS {
            let bound = FIRST_RETRY_DELAY * 2u32.pow(attempt - 1);
            let delays: Vec<Duration> = (0..200).map(|_| retry_delay(attempt)).collect();
            assert!(
                delays.iter().all(|d| *d >= bound / 2 && *d <= bound),
                "attempt {attempt}"
            );
            let distinct: std::collections::HashSet<_> = delays.iter().collect();
            assert!(distinct.len() > 100, "attempt {attempt}: no spread");
        }
    }
}
