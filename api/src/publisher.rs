//! Publishes `OtpRequested` with publisher confirms. Publishes share one connection and their
//! confirms are awaited concurrently, so throughput is not bound by one round trip per request.
//! Each publish has a confirm-mode channel to itself until its confirm comes, taken from a pool:
//! that is what ties a message the broker returns (it reached no queue) to the publish that sent
//! it. lapin hands a returned message to whichever confirm it settles next on the channel, so on
//! a shared channel an unroutable event could be reported as another's, and be answered 202 with
//! no SMS to come. The connection is (re)made on demand: an api started while the broker is
//! down keeps serving, answers 503 for OTP requests, and recovers by itself.
//!
//! On a cluster (`AMQP_URL` lists several nodes) the connection goes to the first node that
//! answers, and after that node dies, to the next. A publish that is nacked, times out or loses
//! its connection before the confirm is tried again on a fresh connection, with fresh channels:
//! after a quorum queue's leader dies, a channel that saw a nack, and idle channels that
//! published to the old leader, can keep nacking although the new leader is up. A
//! retried event may be stored twice; the worker's ledger sends its SMS once. Retries back off
//! (50 ms, doubling), because for a moment after a leader dies even a fresh channel is nacked.
//!
//! While RabbitMQ blocks the connection (a memory or disk alarm: it stops reading what publishing
//! connections send, and lapin stops writing), a request is refused at once, and the connection is
//! kept. Neither waiting out the confirm timeout nor a fresh connection would help: the broker
//! would block the new connection at its first publish, and each discarded one would still hold
//! a socket and memory on a broker already short of it.
//!
//! The caller's deadline bounds the whole publish, and it is passed in rather than imposed by
//! cancelling it, because how a publish failed matters: a refused event (nacked, returned, never
//! written) gives its request's limit slots back, while one that was sent and heard nothing may
//! still be delivered ([`Unpublished::maybe_stored`]): the request must withdraw it before it
//! gives them back (`signin::withdrawal`). So that few end that way, no event is sent with under
//! [`MIN_TIME_FOR_AN_ATTEMPT`] left.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use shared::amqp::alarms::AlarmWatch;
use shared::amqp::nodes::BrokerNodes;
use shared::amqp::{ConfirmError, event_properties, publish_confirmed};
use shared::event::ROUTING_KEY;
use shared::{OtpRequested, Topology};
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Without a quorum majority a confirm never comes; an attempt must not wait forever for it. Short
/// enough that a second attempt usually fits in the request's publish deadline (5 s); opening a
/// channel, when one must be opened, has the same bound of its own.
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
/// Publishes awaiting their confirm at once on a connection, each on a channel of its own; more
/// wait for one to be free. Never more than the connection's `channel_max` allows (RabbitMQ's
/// default is 2,047), less [`CHANNELS_KEPT_FREE`]: a channel refused would cost the connection.
const MAX_CHANNELS: usize = 1_024;
/// Channel ids left for the declaring channel and for channels still closing.
const CHANNELS_KEPT_FREE: usize = 64;
/// Idle channels kept for the next publishes; one freed beyond this is closed, so a burst does not
/// leave a thousand channels open on the broker for the life of the connection.
const MAX_IDLE_CHANNELS: usize = 128;
/// Channels being opened at once on a connection. A new connection starts with one channel, and a
/// burst must not open a thousand together: the broker answers them one after another, the last
/// ones past the attempt's timeout, and the timeouts would discard the new connection in turn.
const MAX_OPENING_CHANNELS: usize = 32;
/// No attempt starts with less of the request's deadline left: one cut short after its event
/// went out leaves the outcome unknown (see [`Unpublished::maybe_stored`]).
const MIN_TIME_FOR_AN_ATTEMPT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(String),
    #[error(transparent)]
    Confirm(#[from] ConfirmError),
    #[error("the OTP expired before it could be published")]
    Expired,
    #[error("no confirm within the request's publish deadline")]
    Deadline,
    #[error("RabbitMQ is blocking publishes (a memory or disk alarm)")]
    Blocked,
}

/// Why an event was not confirmed, and whether the broker may have stored it all the same.
#[derive(Debug, thiserror::Error)]
#[error("the event was not confirmed")]
pub struct Unpublished {
    #[source]
    pub error: PublishError,
    /// An attempt sent the event and then heard neither a confirm nor a refusal (its confirm
    /// timed out, or its connection was lost): the broker may have stored it, and a worker may
    /// send its SMS, unless the request withdraws it first.
    pub maybe_stored: bool,
}

/// How one attempt failed.
enum FailedAttempt {
    /// The request's deadline came before the event was sent. Nothing is wrong with the broker.
    OutOfTime,
    /// The broker blocked the connection while this attempt waited for a channel; nothing sent.
    Blocked,
    /// The broker does not have the event: refused, or never sent.
    NotStored(ConfirmError),
    /// Sent, perhaps, and no answer came: the broker may have it.
    OutcomeUnknown(ConfirmError),
}

/// One AMQP connection and its idle confirm-mode channels.
struct BrokerConnection {
    connection: Connection,
    /// Which of the nodes it is to.
    node: usize,
    /// Channels with nothing in flight. A channel is in here or held by one publish, never both.
    idle: Mutex<Vec<Channel>>,
    /// One permit per publish holding a channel ([`MAX_CHANNELS`]). Closed when the connection is
    /// discarded, so publishes waiting for a channel move to its replacement.
    channels: Arc<Semaphore>,
    /// One permit per channel being opened ([`MAX_OPENING_CHANNELS`]).
    opening: Semaphore,
    /// Reports the broker's alarms (a warning, `amqp_connection_blocked`) while the connection lives.
    _alarms: AlarmWatch,
}

impl BrokerConnection {
    /// Waits until a publish may hold a channel; `None` once the connection was discarded.
    /// Bounded by the caller (the request's publish deadline), and not by an attempt's: waiting
    /// for a free channel says nothing about the broker.
    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.channels.clone().acquire_owned().await.ok()
    }

    /// An idle channel that is still open, if any.
    fn idle_channel(&self) -> Option<Channel> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        std::iter::from_fn(|| idle.pop()).find(|channel| channel.status().connected())
    }

    /// A confirm-mode channel with nothing in flight: an idle one, or a new one. Waiting for a
    /// turn to open one ends by `deadline` (the request's); opening it, within
    /// [`CONFIRM_TIMEOUT`] of the turn.
    async fn lease(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        deadline: tokio::time::Instant,
    ) -> Result<ChannelLease, FailedAttempt> {
        let lease = |channel| ChannelLease {
            channel,
            broker: self.clone(),
            _permit: permit,
        };
        if let Some(channel) = self.idle_channel() {
            return Ok(lease(channel));
        }
        // Opening a channel on a blocked connection would wait out its timeout, and the open
        // would reach the broker when the alarm ends, for nothing.
        if self.blocked() {
            return Err(FailedAttempt::Blocked);
        }
        let Ok(Ok(_turn)) = tokio::time::timeout_at(deadline, self.opening.acquire()).await else {
            return Err(FailedAttempt::OutOfTime);
        };
        // While this publish waited its turn, another may have freed a channel.
        if let Some(channel) = self.idle_channel() {
            return Ok(lease(channel));
        }
        let open_by = deadline.min(tokio::time::Instant::now() + CONFIRM_TIMEOUT);
        match tokio::time::timeout_at(open_by, open_confirm_channel(&self.connection)).await {
            Ok(Ok(channel)) => Ok(lease(channel)),
            Ok(Err(e)) => Err(FailedAttempt::NotStored(ConfirmError::NotSent(e))),
            Err(_) => Err(FailedAttempt::NotStored(ConfirmError::NotSent(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "opening a channel timed out")
                    .into(),
            ))),
        }
    }

    /// Whether RabbitMQ has told this connection it is blocked: nothing sent on it is read.
    fn blocked(&self) -> bool {
        self.connection.status().blocked()
    }

    /// Sends publishes waiting for a channel to the replacement, and closes the idle channels.
    fn retire(&self) {
        self.channels.close();
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// A channel held by one publish. Dropped without [`ChannelLease::settled`] (the publish failed,
/// or its request was cancelled before the confirm), the channel is closed, never reused: a
/// late return on it would be taken for the next publish's.
struct ChannelLease {
    channel: Channel,
    broker: Arc<BrokerConnection>,
    _permit: OwnedSemaphorePermit,
}

impl ChannelLease {
    /// The publish got its confirm, so nothing of it can still arrive: the channel is idle (unless
    /// its connection was discarded meanwhile).
    fn settled(self) {
        let mut idle = self.broker.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_CHANNELS && !self.broker.channels.is_closed() {
            idle.push(self.channel);
        }
    }
}

/// How many publishes may hold a channel at once on `connection`: [`MAX_CHANNELS`], within what
/// the broker and lapin agreed on (`channel_max`).
fn channel_budget(connection: &Connection) -> usize {
    budget_within(connection.configuration().channel_max())
}

fn budget_within(channel_max: u16) -> usize {
    // 0 means no limit in AMQP 0-9-1.
    let allowed = match channel_max {
        0 => usize::MAX,
        limit => usize::from(limit),
    };
    MAX_CHANNELS
        .min(allowed.saturating_sub(CHANNELS_KEPT_FREE))
        .max(1)
}

async fn open_confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

pub struct Publisher {
    nodes: BrokerNodes,
    /// The node to try first at the next connect.
    first_node: AtomicUsize,
    topology: Topology,
    /// `{ns}.events`, named once rather than per publish.
    events_exchange: String,
    connection: Mutex<Option<Arc<BrokerConnection>>>,
    connecting: tokio::sync::Mutex<Option<Instant>>,
}

impl Publisher {
    pub fn new(nodes: BrokerNodes, topology: Topology) -> Self {
        Self {
            nodes,
            first_node: AtomicUsize::new(0),
            events_exchange: topology.events_exchange(),
            topology,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether RabbitMQ blocks the current connection (a memory or disk alarm): a publish now
    /// would be refused. Connects to nothing.
    pub fn blocked(&self) -> bool {
        self.current().is_some_and(|broker| broker.blocked())
    }

    fn current(&self) -> Option<Arc<BrokerConnection>> {
        let connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        connection
            .as_ref()
            .filter(|c| c.connection.status().connected())
            .cloned()
    }

    /// A connection and its channel pool, connecting first if need be (one connect at a time).
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
        let channel = open_confirm_channel(&connection).await?;
        self.topology.declare(&connection, &channel).await?;
        let budget = channel_budget(&connection);
        let alarms = AlarmWatch::start(
            &connection,
            crate::metrics::BROKER_BLOCKED,
            "OTP requests get 503 until it lifts",
        );
        Ok(BrokerConnection {
            connection,
            node,
            idle: Mutex::new(vec![channel]),
            channels: Arc::new(Semaphore::new(budget)),
            opening: Semaphore::new(MAX_OPENING_CHANNELS),
            _alarms: alarms,
        })
    }

    /// Forgets a connection whose publish failed, and its idle channels with it, so the next
    /// publish opens fresh ones (a channel can keep rejecting publishes after a broker restart or
    /// a quorum leader change). When the connection itself is gone, its node probably is too: the
    /// next connect starts with the node after it.
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
        drop(current);
        // Only once it is no longer current: a publish sent back from it must find another.
        failed.retire();
    }

    /// Returns once the broker has confirmed that the event is stored, or by `deadline` (the
    /// request's) with why not. Opening a channel, and then the publish and its confirm, are each
    /// bounded by [`CONFIRM_TIMEOUT`]; no event is sent with less than
    /// [`MIN_TIME_FOR_AN_ATTEMPT`] left.
    pub async fn publish(
        &self,
        event: &OtpRequested,
        deadline: tokio::time::Instant,
    ) -> Result<(), Unpublished> {
        let body = serde_json::to_vec(event).expect("an event always serialises");
        // Once an attempt's outcome is unknown, so is the whole publish's: the event may be
        // stored even if every later attempt is refused.
        let mut maybe_stored = false;
        let fail = |error, maybe_stored| {
            Err(Unpublished {
                error,
                maybe_stored,
            })
        };
        let mut attempt = 1;
        loop {
            let ttl_ms = event.millis_left(OffsetDateTime::now_utc());
            if ttl_ms == 0 {
                return fail(PublishError::Expired, maybe_stored);
            }
            let broker = match tokio::time::timeout_at(deadline, self.broker()).await {
                Ok(Ok(broker)) => broker,
                Ok(Err(e)) => return fail(e, maybe_stored),
                Err(_) => return fail(PublishError::Deadline, maybe_stored),
            };
            if broker.blocked() {
                return fail(PublishError::Blocked, maybe_stored);
            }
            let permit = match tokio::time::timeout_at(deadline, broker.permit()).await {
                Ok(Some(permit)) => permit,
                // The connection was discarded while this publish waited: take its replacement.
                Ok(None) => continue,
                Err(_) => return fail(PublishError::Deadline, maybe_stored),
            };
            let properties = event_properties(event, ttl_ms);
            let e = match self
                .attempt(&broker, permit, &body, properties, deadline)
                .await
            {
                Ok(()) => return Ok(()),
                Err(FailedAttempt::OutOfTime) => return fail(PublishError::Deadline, maybe_stored),
                Err(FailedAttempt::Blocked) => return fail(PublishError::Blocked, maybe_stored),
                Err(FailedAttempt::NotStored(e)) => e,
                Err(FailedAttempt::OutcomeUnknown(e)) => {
                    maybe_stored = true;
                    e
                }
            };
            if !e.channel_suspect() {
                return fail(e.into(), maybe_stored);
            }
            if broker.blocked() {
                // The alarm came while this attempt waited: its frames may be in the broker's
                // socket buffer, unread (so `maybe_stored` stands), and the connection is kept.
                return fail(PublishError::Blocked, maybe_stored);
            }
            self.discard(&broker);
            let pause = tokio::time::Instant::now() + retry_delay(attempt);
            if attempt == PUBLISH_ATTEMPTS || pause + MIN_TIME_FOR_AN_ATTEMPT > deadline {
                return fail(e.into(), maybe_stored);
            }
            metrics::counter!(crate::metrics::PUBLISH_RETRIES).increment(1);
            tracing::info!(event_id = %event.event_id, attempt, error = %e, "publish not confirmed; trying again on a fresh connection");
            tokio::time::sleep_until(pause).await;
            attempt += 1;
        }
    }

    /// One publish on a channel of its own, sent only with [`MIN_TIME_FOR_AN_ATTEMPT`] left.
    async fn attempt(
        &self,
        broker: &Arc<BrokerConnection>,
        permit: OwnedSemaphorePermit,
        body: &[u8],
        properties: lapin::BasicProperties,
        deadline: tokio::time::Instant,
    ) -> Result<(), FailedAttempt> {
        let lease = broker.lease(permit, deadline).await?;
        if broker.blocked() {
            // Blocked while this attempt waited: the event would wait unread, then be withdrawn.
            lease.settled();
            return Err(FailedAttempt::Blocked);
        }
        let now = tokio::time::Instant::now();
        let time_left = deadline.saturating_duration_since(now);
        if time_left < MIN_TIME_FOR_AN_ATTEMPT {
            // Too late to start: one cut short after sending would leave the outcome unknown.
            lease.settled();
            return Err(FailedAttempt::OutOfTime);
        }
        let result = publish_confirmed(
            &lease.channel,
            &self.events_exchange,
            ROUTING_KEY,
            body,
            properties,
            time_left.min(CONFIRM_TIMEOUT),
            // Never past the request's deadline: an event held by a blocked connection is
            // settled through the send ledger instead.
            None,
        )
        .await;
        match result {
            Ok(()) => {
                lease.settled();
                Ok(())
            }
            // Returned, then confirmed: nothing of it is still to come on the channel.
            Err(error @ ConfirmError::Unroutable) => {
                lease.settled();
                Err(FailedAttempt::NotStored(error))
            }
            Err(error @ (ConfirmError::Nacked | ConfirmError::NotSent(_))) => {
                Err(FailedAttempt::NotStored(error))
            }
            Err(
                error @ (ConfirmError::Timeout
                | ConfirmError::Broker(_)
                | ConfirmError::HeldByAlarm),
            ) => Err(FailedAttempt::OutcomeUnknown(error)),
        }
    }

    /// For `/readyz`: connects if there is no connection, and says whether that worked.
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
    fn the_channel_budget_stays_within_channel_max() {
        assert_eq!(budget_within(2_047), MAX_CHANNELS);
        assert_eq!(budget_within(0), MAX_CHANNELS);
        assert_eq!(budget_within(200), 200 - CHANNELS_KEPT_FREE);
        assert_eq!(budget_within(10), 1);
    }

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
