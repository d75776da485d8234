//! The connection to RabbitMQ and the consume loop: connect, take deliveries, reconnect with
//! backoff whenever the broker goes away, and on shutdown stop taking messages and drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use shared::amqp::alarms::AlarmWatch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::acks::Acks;
use super::context::Context;
use super::queue_depth::DepthGauge;
use super::{broker_copies, delivery};
use crate::dead_letter;
use crate::metrics as m;

/// Connecting (TCP, AMQP handshake, channels, declarations) must not hang forever on a broker that
/// accepts TCP but does not answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Closing politely is best effort; a dead broker must not hold up the exit.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the grace period, how long deliveries have to finish: a provider call under way gets
/// 2 s to answer (`delivery::ANSWER_AFTER_GRACE`), and then the `sent` record gets no new try,
/// and at most 1.5 s for the one under way (`sent::RECORD_AFTER_GRACE`), before it is left to
/// the background; the ack comes right after it, and the breaker and receipts writes after the
/// ack are cut if they take longer. With a connection, it is taken from the close's own time
/// (see `shut_down`), so the stop's worst case does not grow.
const SETTLE_AFTER_GRACE: Duration = CLOSE_TIMEOUT;

/// Connects, consumes, and reconnects with backoff whenever RabbitMQ goes away, until the worker
/// is shut down; then drains the deliveries in flight. Returns the stop's deadline: the end of
/// the grace period and of the close's time after it.
pub(crate) async fn consume_until_shutdown(context: &Arc<Context>) -> tokio::time::Instant {
    let shutdown = &context.shutdown;
    // One set for every connection: tasks of a lost connection keep running (their SMS may be
    // half-sent) and are drained on shutdown like the others.
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut backoff = reconnect_backoff();
    let nodes = &context.config.common.amqp;
    // The node to try first: after a node is lost, the next one (AMQP_URL lists a cluster's).
    let mut first_node = 0;
    let mut retired = RetiredConnections::default();
    while !shutdown.is_shutdown() {
        let opened = tokio::select! {
            opened = tokio::time::timeout(CONNECT_TIMEOUT, BrokerConnection::open(context, first_node)) => opened,
            () = shutdown.recv() => break,
        };
        let mut lost_a_node = false;
        match opened {
            Ok(Ok(mut connection)) => {
                backoff = reconnect_backoff();
                metrics::counter!(m::AMQP_CONNECTS).increment(1);
                info!(queue = %context.topology.sms_queue(), node = connection.node + 1, nodes = nodes.len(), "connected to RabbitMQ; consuming");
                match connection.consume(context, &mut tasks, &mut retired).await {
                    ConsumeEnd::ShuttingDown => {
                        return connection
                            .shut_down(context, &mut tasks, &mut retired)
                            .await;
                    }
                    ConsumeEnd::Lost(reason) => {
                        warn!(%reason, "lost RabbitMQ; reconnecting");
                        context.set_dead_letter_route(None);
                        first_node = (connection.node + 1) % nodes.len().max(1);
                        lost_a_node = nodes.len() > 1;
                        connection.abandon(&mut retired).await;
                    }
                }
            }
            Ok(Err(e)) => warn!(error = %e, "cannot connect to RabbitMQ; retrying"),
            Err(_) => warn!("connecting to RabbitMQ timed out; retrying"),
        }
        // With other nodes to go to, the first attempt after a loss is at once: the cluster is
        // most likely still up. Then, and with one node, back off.
        let delay = if lost_a_node {
            Duration::ZERO
        } else {
            backoff.next().unwrap_or(Duration::from_secs(30))
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.recv() => break,
        }
    }
    // Stopped while disconnected: what is left can finish, but cannot be acknowledged anyway.
    let stop_by = grace_ends(context);
    let grace = stop_by.saturating_duration_since(tokio::time::Instant::now());
    drain(context, &mut tasks, grace).await;
    retired.wait_out(stop_by).await;
    stop_by.max(tokio::time::Instant::now()) + 2 * CLOSE_TIMEOUT
}

/// The end of the stop's grace period, counted from the signal: closing a lost connection, or
/// cancelling the consumers, may have taken some of it.
fn grace_ends(context: &Context) -> tokio::time::Instant {
    let fired_at = context.shutdown.fired_at();
    fired_at.unwrap_or_else(tokio::time::Instant::now) + context.config.shutdown_grace
}

fn reconnect_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(15))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

enum ConsumeEnd {
    ShuttingDown,
    Lost(String),
}

/// Two AMQP connections to one node: one consuming (the work queue and the broker's own dead
/// letters) and acknowledging, and one with a confirm-mode channel for dead letters. Apart
/// because RabbitMQ, during a memory or disk alarm, stops reading from any connection that
/// publishes: one shared connection would stop acknowledging at its first dead letter, and the
/// worker would stall with a full prefetch until the alarm cleared. A consuming connection is
/// never blocked.
struct BrokerConnection {
    connection: Connection,
    channel: Channel,
    dead_letters: DeadLetterConnection,
    consumer: Consumer,
    broker_copies: Consumer,
    /// Acknowledges the consumers' deliveries in batches.
    acks: Acks,
    /// Stops reading the queues' depths when the connection goes.
    _depth: DepthGauge,
    /// Which of the broker's nodes it is to.
    node: usize,
}

impl BrokerConnection {
    /// Connects to the first node that answers, from node `first_node` on.
    async fn open(context: &Context, first_node: usize) -> lapin::Result<Self> {
        let config = &context.config;
        // Named after the namespace, so an operator (or a test) can tell the connections apart.
        let name = format!("sms-worker {}", config.common.namespace);
        let properties = ConnectionProperties::default().with_connection_name(name.clone().into());
        // Without lapin's automatic recovery: a broken connection is replaced by a new one, whose
        // channel starts its delivery tags afresh. Acks and the tasks' check that their channel
        // still holds their delivery (`Acks::channel_connected`) count on a channel that, once
        // closed, stays closed.
        let (connection, node) = config.common.amqp.connect(first_node, properties).await?;
        let channel = connection.create_channel().await?;
        // Prefetch = concurrency: the broker never hands this process more than it works on, so
        // the rest stays available to other replicas.
        channel
            .basic_qos(config.concurrency, BasicQosOptions::default())
            .await?;
        // Declared here too, so the worker can start before the api.
        context.topology.declare(&connection, &channel).await?;
        // To the same node when it answers: the one the consumer's queue is reachable through.
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("{name} dead letters").into());
        let (publishing, _) = config.common.amqp.connect(node, properties).await?;
        let dead_letter_channel = publishing.create_channel().await?;
        dead_letter_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let tag = format!("sms-worker-{}", uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                context.topology.sms_queue().into(),
                tag.clone().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let broker_copies = channel
            .basic_consume(
                context.topology.broker_dead_letter_queue().into(),
                format!("{tag}-dead").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let depth = DepthGauge::start(
            connection.create_channel().await?,
            [
                context.topology.sms_queue(),
                context.topology.dead_letter_queue(),
            ],
        );
        Ok(Self {
            acks: Acks::start(channel.clone(), context.config.concurrency),
            connection,
            channel,
            dead_letters: DeadLetterConnection {
                _alarms: AlarmWatch::start(
                    &publishing,
                    m::AMQP_BLOCKED,
                    "dead letters wait until it lifts",
                ),
                connection: publishing,
                channel: dead_letter_channel,
            },
            consumer,
            broker_copies,
            _depth: depth,
            node,
        })
    }

    /// Hands each delivery to a task of its own until the worker shuts down or the connection is
    /// lost.
    async fn consume(
        &mut self,
        context: &Arc<Context>,
        tasks: &mut JoinSet<()>,
        retired: &mut RetiredConnections,
    ) -> ConsumeEnd {
        context.set_dead_letter_route(Some(dead_letter::Route {
            channel: self.dead_letters.channel.clone(),
            connection: self.dead_letters.connection.status().clone(),
            held: context.held_dead_letters.clone(),
        }));
        context.readiness.set_consuming(true);
        let mut health = tokio::time::interval(Duration::from_secs(1));
        let end = loop {
            tokio::select! {
                () = context.shutdown.recv() => break ConsumeEnd::ShuttingDown,
                delivery = self.consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        self.acks.delivered(delivery.delivery_tag);
                        delivery::spawn(tasks, context.clone(), self.acks.clone(), delivery);
                    }
                    Some(Err(e)) => break ConsumeEnd::Lost(e.to_string()),
                    None => break ConsumeEnd::Lost("the broker cancelled the consumer".to_owned()),
                },
                copy = self.broker_copies.next() => match copy {
                    Some(Ok(copy)) => {
                        self.acks.delivered(copy.delivery_tag);
                        broker_copies::spawn(tasks, context.clone(), self.acks.clone(), copy);
                    }
                    Some(Err(e)) => break ConsumeEnd::Lost(e.to_string()),
                    None => break ConsumeEnd::Lost("the broker cancelled a consumer".to_owned()),
                },
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
                _ = health.tick() => {
                    // Both at every tick: tidying closes what an alarm has let go.
                    let old_ones_held = retired.tidy();
                    if !old_ones_held && !shared::amqp::held_now(self.dead_letters.connection.status()) {
                        context.held_dead_letters.written();
                    }
                    if !self.connection.status().connected()
                        || !self.dead_letters.connection.status().connected()
                        || !self.dead_letters.channel.status().connected()
                    {
                        break ConsumeEnd::Lost("a connection or the dead-letter channel closed".to_owned());
                    }
                }
            }
        };
        context.readiness.set_consuming(false);
        end
    }

    /// SIGTERM: stop taking messages, let in-flight sends finish within the grace period, then
    /// close, which hands every unacknowledged message back to the queue. Returns the stop's
    /// deadline.
    async fn shut_down(
        self,
        context: &Context,
        tasks: &mut JoinSet<()>,
        retired: &mut RetiredConnections,
    ) -> tokio::time::Instant {
        let stop_by = grace_ends(context);
        for consumer in [&self.consumer, &self.broker_copies] {
            let cancel = self
                .channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default());
            if let Err(e) = with_timeout(cancel).await {
                warn!(error = %e, "could not cancel a consumer");
            }
        }
        // What follows the grace period has one deadline in all, the deliveries' last writes
        // included, so that a broker that stopped reading cannot hold the stop past an
        // orchestrator's patience (Compose waits 30 s; the grace is 15 s by default).
        let hard_stop = stop_by.max(tokio::time::Instant::now()) + 2 * CLOSE_TIMEOUT;
        // Until the grace period's end, not a fresh one: cancelling may have taken some of it.
        drain(
            context,
            tasks,
            stop_by.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await;
        let Self {
            connection,
            channel,
            dead_letters,
            acks,
            ..
        } = self;
        let rest = async {
            // What finished during the drain is acknowledged before the channel closes.
            let acknowledged = tokio::time::timeout(CLOSE_TIMEOUT, acks.flush())
                .await
                .is_ok();
            context.set_dead_letter_route(None);
            if acknowledged {
                let _ = with_timeout(channel.close(200, "shutting down".into())).await;
            } else {
                // The broker is not reading: closing each channel politely would only wait out
                // more deadlines; closing the connection ends all.
                warn!(
                    "the last acknowledgements were not sent in time; the broker will redeliver and the copies are skipped"
                );
            }
            // The current dead-letter connection retires like the earlier ones: a stop waits,
            // within the grace period, for the alarm to let each go, so that the copies held
            // there are stored, and closes each once they are confirmed.
            retired.dead_letters.push(dead_letters);
            let (_closed, ()) = tokio::join!(
                with_timeout(connection.close(200, "shutting down".into())),
                retired.wait_out(stop_by)
            );
        };
        if tokio::time::timeout_at(hard_stop, rest).await.is_err() {
            warn!("RabbitMQ did not let the worker finish closing in time; stopping anyway");
        }
        hard_stop
    }

    /// Closes the consuming connection, and retires the dead-letter one: closed once its
    /// confirms are in, or, if an alarm blocks it, kept until the alarm ends, since it holds the
    /// copies of dead letters already acknowledged, which closing it now would lose.
    async fn abandon(self, retired: &mut RetiredConnections) {
        if shared::amqp::held_now(self.dead_letters.connection.status()) {
            warn!(
                "RabbitMQ blocks this dead-letter connection (an alarm): it is kept until the alarm ends, so that the dead letters held there are stored, and closed then"
            );
        }
        retired.dead_letters.push(self.dead_letters);
        retired.tidy();
        let _ = with_timeout(self.connection.close(200, "reconnecting".into())).await;
    }
}

/// Dead-letter connections given up, by a reconnect or by the stop. One that RabbitMQ blocks (an
/// alarm) holds copies of dead letters already acknowledged, written when the alarm ends: it is
/// kept until then. Each is closed once the broker has confirmed what it held. Until none holds
/// copies the held count is not reset, and a stop waits for them within its grace period.
#[derive(Default)]
struct RetiredConnections {
    dead_letters: Vec<DeadLetterConnection>,
    /// Closes under way; a connection blocked again before its copies were confirmed comes back.
    closing: JoinSet<Option<DeadLetterConnection>>,
}

/// The connection dead letters are published on, its confirm-mode channel, and the watch that
/// reports the broker's alarms on it (a warning, `sms_amqp_connection_blocked`).
struct DeadLetterConnection {
    connection: Connection,
    channel: Channel,
    _alarms: AlarmWatch,
}

impl RetiredConnections {
    /// Takes out those the alarm lets go (nothing more is published on them) and forgets those
    /// the broker dropped, with a warning for one that was blocked (its copies are lost).
    fn take_let_go(&mut self) -> Vec<DeadLetterConnection> {
        let (held, let_go): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dead_letters)
            .into_iter()
            .partition(|retired| shared::amqp::held_now(retired.connection.status()));
        self.dead_letters = held;
        let (open, dropped): (Vec<_>, Vec<_>) = let_go
            .into_iter()
            .partition(|retired| retired.connection.status().connected());
        // lapin keeps the blocked flag on a connection that died.
        let lost = dropped
            .iter()
            .filter(|retired| retired.connection.status().blocked())
            .count();
        if lost > 0 {
            warn!(
                connections = lost,
                "a dead-letter connection blocked by an alarm was lost before its alarm ended: the dead letters held there are lost (each was logged with its event id)"
            );
        }
        open
    }

    /// Takes back what finished closing: a connection blocked again is kept once more.
    fn collect(&mut self, joined: Result<Option<DeadLetterConnection>, tokio::task::JoinError>) {
        match joined {
            Ok(Some(retired)) => self.dead_letters.push(retired),
            Ok(None) => {}
            Err(e) if e.is_panic() => error!("closing a dead-letter connection panicked"),
            Err(_) => {}
        }
    }

    /// Starts closing those the alarm lets go. Whether any may still hold copies: kept and
    /// blocked, or closing with copies not yet confirmed.
    fn tidy(&mut self) -> bool {
        while let Some(joined) = self.closing.try_join_next() {
            self.collect(joined);
        }
        for retired in self.take_let_go() {
            self.closing.spawn(close_after_its_copies(retired));
        }
        !self.dead_letters.is_empty() || !self.closing.is_empty()
    }

    /// Waits, until `stop_by` at the latest, for the alarm to let each go, and closes them.
    async fn wait_out(&mut self, stop_by: tokio::time::Instant) {
        let held = self
            .dead_letters
            .iter()
            .filter(|retired| shared::amqp::held_now(retired.connection.status()))
            .count();
        if held > 0 {
            warn!(
                connections = held,
                "RabbitMQ is blocking dead letters (a memory or disk alarm): waiting, within the grace period, for it to end so that those held here are stored"
            );
        }
        for retired in &self.dead_letters {
            shared::amqp::wait_while_held(retired.connection.status(), stop_by).await;
        }
        self.tidy();
        while let Some(joined) = self.closing.join_next().await {
            self.collect(joined);
        }
        if !self.dead_letters.is_empty() {
            warn!(
                "stopping while RabbitMQ still blocks dead letters: those held here are lost (each was logged with its event id)"
            );
        } else if held > 0 {
            info!("RabbitMQ lifted its alarm; the held dead letters went out");
        }
    }
}

/// Closes a dead-letter connection, once the broker has confirmed the copies it held (lapin's
/// close could overtake them). Gives it back if the alarm blocks it again first (alarms come and
/// go), so that it is kept, not closed with its copies.
async fn close_after_its_copies(retired: DeadLetterConnection) -> Option<DeadLetterConnection> {
    match tokio::time::timeout(CLOSE_TIMEOUT, retired.channel.wait_for_confirms()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "dead letters were not confirmed before the close; they may be lost");
        }
        Err(_) if shared::amqp::held_now(retired.connection.status()) => return Some(retired),
        Err(_) => {
            warn!("dead letters were not confirmed in time before the close; they may be lost");
        }
    }
    let _ = with_timeout(retired.connection.close(200, "retired".into())).await;
    None
}

async fn with_timeout<T>(future: impl Future<Output = lapin::Result<T>>) -> Result<T, String> {
    match tokio::time::timeout(CLOSE_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Waits for the tasks, at most `grace`. Then it tells those left that the grace is over:
/// a delivery whose request no provider has stops, its claim released and its message left to
/// return to the queue when the channel closes; one with a call unanswered ends as
/// sent-unconfirmed, as any call without an answer does (see
/// `delivery::send_until_the_grace_ends`). A delivery past its provider's answer goes on to
/// record the SMS and be acknowledged: handed back, it would be sent again. Whatever has not
/// finished [`SETTLE_AFTER_GRACE`] later is aborted.
async fn drain(context: &Context, tasks: &mut JoinSet<()>, grace: Duration) {
    if tasks.is_empty() {
        return;
    }
    info!(
        in_flight = tasks.len(),
        grace_secs = grace.as_secs_f64(),
        "waiting for in-flight sends"
    );
    if join_all_within(tasks, grace).await {
        return;
    }
    warn!(
        left = tasks.len(),
        "grace period over; stopping the sends that have no answer from a provider yet"
    );
    context.grace_over.fire();
    if join_all_within(tasks, SETTLE_AFTER_GRACE).await {
        return;
    }
    warn!(
        left = tasks.len(),
        "deliveries still settling after the grace period; abandoning them"
    );
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Joins tasks until none is left (true) or `limit` has passed (false).
async fn join_all_within(tasks: &mut JoinSet<()>, limit: Duration) -> bool {
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => log_join(joined),
                None => return true,
            },
            () = &mut deadline => return false,
        }
    }
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && e.is_panic()
    {
        error!("a delivery task panicked");
    }
}
