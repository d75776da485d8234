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

/// Connects, consumes, and reconnects with backoff whenever RabbitMQ goes away, until the worker
/// is shut down; then drains the deliveries in flight.
pub(crate) async fn consume_until_shutdown(context: &Arc<Context>) {
    let shutdown = &context.shutdown;
    // One set for every connection: tasks of a lost connection keep running (their SMS may be
    // half-sent) and are drained on shutdown like the others.
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut backoff = reconnect_backoff();
    let nodes = &context.config.common.amqp;
    // The node to try first: after a node is lost, the next one (AMQP_URL lists a cluster's).
    let mut first_node = 0;
    let mut left_blocked = LeftBlocked::default();
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
                match connection
                    .consume(context, &mut tasks, &mut left_blocked)
                    .await
                {
                    ConsumeEnd::ShuttingDown => {
                        connection
                            .shut_down(context, &mut tasks, &mut left_blocked)
                            .await;
                        return;
                    }
                    ConsumeEnd::Lost(reason) => {
                        warn!(%reason, "lost RabbitMQ; reconnecting");
                        context.set_dead_letter_route(None);
                        first_node = (connection.node + 1) % nodes.len().max(1);
                        lost_a_node = nodes.len() > 1;
                        connection.abandon(&mut left_blocked).await;
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
    let stop_by = tokio::time::Instant::now() + context.config.shutdown_grace;
    drain(&mut tasks, context.config.shutdown_grace).await;
    left_blocked.wait_out(stop_by).await;
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
    /// The publishing connection, for dead letters only.
    publishing: Connection,
    /// Reports the broker's alarms on it (a warning, `sms_amqp_connection_blocked`).
    _alarms: AlarmWatch,
    dead_letter_channel: Channel,
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
            _alarms: AlarmWatch::start(
                &publishing,
                m::AMQP_BLOCKED,
                "dead letters wait until it lifts",
            ),
            publishing,
            dead_letter_channel,
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
        left_blocked: &mut LeftBlocked,
    ) -> ConsumeEnd {
        context.set_dead_letter_route(Some(dead_letter::Route {
            channel: self.dead_letter_channel.clone(),
            connection: self.publishing.status().clone(),
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
                    let old_ones_held = left_blocked.tidy();
                    if !old_ones_held && !shared::amqp::held_now(self.publishing.status()) {
                        context.held_dead_letters.written();
                    }
                    if !self.connection.status().connected()
                        || !self.publishing.status().connected()
                        || !self.dead_letter_channel.status().connected()
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
    /// close, which hands every unacknowledged message back to the queue.
    async fn shut_down(
        self,
        context: &Context,
        tasks: &mut JoinSet<()>,
        left_blocked: &mut LeftBlocked,
    ) {
        let stop_by = tokio::time::Instant::now() + context.config.shutdown_grace;
        for consumer in [&self.consumer, &self.broker_copies] {
            let cancel = self
                .channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default());
            if let Err(e) = with_timeout(cancel).await {
                warn!(error = %e, "could not cancel a consumer");
            }
        }
        drain(tasks, context.config.shutdown_grace).await;
        // What follows the grace period has one deadline in all, so that a broker that stopped
        // reading cannot hold the stop past an orchestrator's patience (Compose waits 30 s; the
        // grace is 15 s by default).
        let hard_stop = stop_by.max(tokio::time::Instant::now()) + 2 * CLOSE_TIMEOUT;
        let rest = async {
            // What finished during the drain is acknowledged before the channel closes.
            let acknowledged = tokio::time::timeout(CLOSE_TIMEOUT, self.acks.flush())
                .await
                .is_ok();
            context.set_dead_letter_route(None);
            if acknowledged {
                let _ = with_timeout(self.channel.close(200, "shutting down".into())).await;
            } else {
                // The broker is not reading: closing each channel politely would only wait out
                // more deadlines; closing the connection ends all.
                warn!(
                    "the last acknowledgements were not sent in time; the broker will redeliver and the copies are skipped"
                );
            }
            tokio::join!(
                self.let_held_dead_letters_out(stop_by),
                left_blocked.wait_out(stop_by)
            );
            self.close_both("shutting down").await;
        };
        if tokio::time::timeout_at(hard_stop, rest).await.is_err() {
            warn!("RabbitMQ did not let the worker finish closing in time; stopping anyway");
        }
    }

    /// A dead-letter connection the broker blocks (a memory or disk alarm) holds the copies of
    /// dead letters already acknowledged, unwritten: they go out when the alarm ends, and are
    /// lost if this process ends first. So a stop waits, within the grace period, for the alarm
    /// to end.
    async fn let_held_dead_letters_out(&self, stop_by: tokio::time::Instant) {
        let connection = self.publishing.status();
        if !shared::amqp::held_now(connection) {
            return;
        }
        warn!(
            "RabbitMQ is blocking dead letters (a memory or disk alarm): waiting, within the grace period, for it to end so that those held here are stored"
        );
        if shared::amqp::wait_while_held(connection, stop_by).await {
            info!("RabbitMQ lifted its alarm; the held dead letters went out");
        } else {
            warn!(
                "stopping while RabbitMQ still blocks dead letters: those held here are lost (each was logged with its event id)"
            );
        }
    }

    /// Closes both connections, except a dead-letter connection that an alarm blocks: it holds
    /// copies of dead letters already acknowledged, which closing it would lose, so it is kept,
    /// with its alarm watch, until the alarm ends ([`LeftBlocked`]).
    async fn abandon(self, left_blocked: &mut LeftBlocked) {
        if !shared::amqp::held_now(self.publishing.status()) {
            self.close_both("reconnecting").await;
            return;
        }
        warn!(
            "RabbitMQ blocks this dead-letter connection (an alarm): it is kept until the alarm ends, so that the dead letters held there are stored, and closed then"
        );
        let _ = with_timeout(self.connection.close(200, "reconnecting".into())).await;
        left_blocked.kept.push(KeptConnection {
            connection: self.publishing,
            channel: self.dead_letter_channel,
            _alarms: self._alarms,
        });
    }

    /// Closes both connections at once, each within [`CLOSE_TIMEOUT`]. A blocked one is not
    /// asked: the broker reads nothing from it, so the close would only wait out its deadline.
    async fn close_both(&self, reason: &str) {
        let publishing = async {
            if !self.publishing.status().blocked() {
                // What it still has unconfirmed goes first: lapin's close could overtake it.
                if let Err(e) = with_timeout(self.dead_letter_channel.wait_for_confirms()).await {
                    warn!(error = %e, "dead letters were not confirmed before the close; they may be lost");
                }
                let _ = with_timeout(self.publishing.close(200, reason.into())).await;
            }
        };
        let consuming = with_timeout(self.connection.close(200, reason.into()));
        let _ = tokio::join!(consuming, publishing);
    }
}

/// Dead-letter connections left behind by a reconnect while RabbitMQ blocked them. Each holds
/// copies of dead letters already acknowledged, written when the alarm ends; it is closed then.
/// Until then the held count is not reset, and a stop waits for them as for the current one.
#[derive(Default)]
struct LeftBlocked {
    kept: Vec<KeptConnection>,
    /// Closes under way; a connection blocked again before its copies were confirmed comes back.
    closing: JoinSet<Option<KeptConnection>>,
}

/// A blocked dead-letter connection, its channel, and the watch that reports its alarm.
struct KeptConnection {
    connection: Connection,
    channel: Channel,
    _alarms: AlarmWatch,
}

impl LeftBlocked {
    /// Takes out those the alarm has let go (nothing more is published on them) and forgets,
    /// with a warning, those the broker dropped.
    fn take_let_go(&mut self) -> Vec<KeptConnection> {
        let (held, let_go): (Vec<_>, Vec<_>) = std::mem::take(&mut self.kept)
            .into_iter()
            .partition(|kept| shared::amqp::held_now(kept.connection.status()));
        self.kept = held;
        let (open, dropped): (Vec<_>, Vec<_>) = let_go
            .into_iter()
            .partition(|kept| kept.connection.status().connected());
        if !dropped.is_empty() {
            warn!(
                connections = dropped.len(),
                "a dead-letter connection kept through a reconnect was lost before its alarm ended: the dead letters held there are lost (each was logged with its event id)"
            );
        }
        open
    }

    /// Takes back what finished closing: a connection blocked again is kept once more.
    fn collect(&mut self, joined: Result<Option<KeptConnection>, tokio::task::JoinError>) {
        match joined {
            Ok(Some(kept)) => self.kept.push(kept),
            Ok(None) => {}
            Err(e) if e.is_panic() => error!("closing a kept dead-letter connection panicked"),
            Err(_) => {}
        }
    }

    /// Starts closing those the alarm has let go. Whether any may still hold copies: kept and
    /// blocked, or closing with copies not yet confirmed.
    fn tidy(&mut self) -> bool {
        while let Some(joined) = self.closing.try_join_next() {
            self.collect(joined);
        }
        for kept in self.take_let_go() {
            self.closing.spawn(close_after_its_copies(kept));
        }
        !self.kept.is_empty() || !self.closing.is_empty()
    }

    /// Waits, until `stop_by` at the latest, for the alarm to let each go, and closes them.
    async fn wait_out(&mut self, stop_by: tokio::time::Instant) {
        if !self.kept.is_empty() {
            warn!(
                connections = self.kept.len(),
                "RabbitMQ still blocks dead-letter connections of earlier reconnects: waiting, within the grace period, for the alarm to end so that those held there are stored"
            );
        }
        for kept in &self.kept {
            shared::amqp::wait_while_held(kept.connection.status(), stop_by).await;
        }
        self.tidy();
        while let Some(joined) = self.closing.join_next().await {
            self.collect(joined);
        }
        if !self.kept.is_empty() {
            warn!(
                "stopping while RabbitMQ still blocks dead-letter connections of earlier reconnects: those held there are lost (each was logged with its event id)"
            );
        }
    }
}

/// Closes a dead-letter connection an alarm has let go, once the broker has confirmed the
/// copies it held (a close sent at once could overtake them). Gives it back if the alarm
/// blocks it again first (alarms come and go), so that it is kept, not closed with its copies.
async fn close_after_its_copies(kept: KeptConnection) -> Option<KeptConnection> {
    match tokio::time::timeout(CLOSE_TIMEOUT, kept.channel.wait_for_confirms()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            warn!(error = %e, "the dead letters held on an old connection were not confirmed; they may be lost");
        }
        Err(_) if shared::amqp::held_now(kept.connection.status()) => return Some(kept),
        Err(_) => {
            warn!(
                "the dead letters held on an old connection were not confirmed in time; they may be lost"
            );
        }
    }
    let _ = with_timeout(kept.connection.close(200, "the alarm is over".into())).await;
    None
}

async fn with_timeout<T>(future: impl Future<Output = lapin::Result<T>>) -> Result<T, String> {
    match tokio::time::timeout(CLOSE_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Waits for the tasks, at most `grace`; then aborts the rest (their messages return to the
/// queue when the channel closes, and their claims lapse).
async fn drain(tasks: &mut JoinSet<()>, grace: Duration) {
    if tasks.is_empty() {
        return;
    }
    info!(
        in_flight = tasks.len(),
        grace_secs = grace.as_secs_f64(),
        "waiting for in-flight sends"
    );
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => log_join(joined),
                None => return,
            },
            () = &mut deadline => {
                warn!(left = tasks.len(), "grace period over; handing the rest back to the queue");
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return;
            }
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
