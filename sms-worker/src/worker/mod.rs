//! The worker, in named stages:
//!
//! - this file wires the program: Redis, the providers, the HTTP port, the shutdown signal;
//! - [`connection`]: the AMQP connection and the consume loop, reconnecting when the broker goes;
//! - [`delivery`]: one message's life, from parsing to ack, nack or dead letter;
//! - [`broker_copies`]: RabbitMQ's own dead letters, moved to the DLQ without their code;
//! - [`send`]: the send path: claiming the event in the ledger, within a [`budget`], its
//!   [`lease`] kept while the event is worked on;
//! - [`failover`]: sending it through the providers in order, past their breakers;
//! - [`callbacks`]: the public listener for delivery receipts, which [`resend`] applies on
//!   [`receipt_tasks`] the worker waits for when it stops.

mod acks;
mod broker_copies;
mod budget;
mod callbacks;
mod connection;
mod context;
mod delivery;
mod failover;
mod guard_settings;
mod lease;
mod outcome;
mod queue_depth;
mod receipt_tasks;
mod resend;
mod send;
mod sent;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use shared::redis_connection::RedisConnection;
use shared::serve::ServerLimits;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::config::Config;
use crate::http::{self, Readiness};
use crate::ledger::SendLedger;
use crate::provider::Providers;
use crate::receipts::store::ReceiptStore;
use crate::shutdown::{self, ShutdownTrigger};
use crate::trace::Timelines;
use context::{Context, Stores};
use receipt_tasks::ReceiptTasks;

/// How long a stopping worker waits for the timeline writes still under way: a little longer
/// than any of them may take ([`crate::trace::WRITE_DEADLINE`]).
const TIMELINE_FLUSH: Duration = Duration::from_millis(3_500);
/// How long a stopping worker waits for `sent` records still waiting for Redis: as long as for
/// the timeline writes, alongside them, so a stop takes no longer than it did before records
/// waited (its worst case is sized to Compose's 30 s, see `connection.rs`); records try every
/// 250 ms meanwhile, so a Redis failover of a few seconds costs none.
const RECORDS_FLUSH: Duration = TIMELINE_FLUSH;
/// Connections at most on the HTTP port (`WORKER_ADDR`: probes and scrapes), whatever
/// `HTTP_MAX_CONNECTIONS` says for the receipts port.
const HTTP_PORT_MAX_CONNECTIONS: usize = 64;
/// Past a server's own limit for its requests, how long closing what is left may take.
const SERVER_CLOSE: Duration = Duration::from_secs(1);

/// A worker bound to its HTTP port, not yet consuming. Tests read [`Worker::local_addr`] when
/// `WORKER_ADDR` has port 0.
pub struct Worker {
    context: Arc<Context>,
    trigger: ShutdownTrigger,
    listener: TcpListener,
    addr: SocketAddr,
    /// `CALLBACK_ADDR`'s listener, when receipts are on.
    callback_listener: Option<TcpListener>,
}

/// Binds, then runs until `shutdown` resolves; in-flight sends finish (within
/// `SHUTDOWN_GRACE_SECS`) and the rest goes back to the queue.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Worker::bind(config).await?.run(shutdown).await
}

impl Worker {
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        // Installs the recorder before the first metric is written.
        let _ = shared::telemetry::metrics_handle();
        crate::metrics::describe();
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on WORKER_ADDR {}", config.addr))?;
        let addr = listener.local_addr()?;

        // Lazy: the worker starts (and reports not ready) while Redis is still down; every
        // command then fails fast instead of hanging, and the connection recovers by itself.
        let redis =
            RedisConnection::new(&config.common.redis).context("cannot set up the Redis client")?;

        let callback_listener = match &config.callbacks {
            Some(callbacks) => {
                Some(TcpListener::bind(callbacks.addr).await.with_context(|| {
                    format!("cannot listen on CALLBACK_ADDR {}", callbacks.addr)
                })?)
            }
            None => None,
        };

        let providers = Providers::new(&config, &redis)?;
        let (trigger, shutdown) = shutdown::channel();
        let readiness = Arc::new(Readiness::new(shutdown.clone(), redis.clone()));
        let namespace = &config.common.namespace;
        let seal = config.seal_key.clone().map(Arc::new);
        let stores = Stores {
            ledger: SendLedger::new(redis.clone(), namespace),
            receipts: config
                .callbacks
                .is_some()
                .then(|| ReceiptStore::new(redis.clone(), namespace, seal.clone())),
            timelines: Timelines::new(redis, namespace, seal),
        };
        let context = Arc::new(Context::new(config, stores, providers, readiness, shutdown));
        Ok(Self {
            context,
            trigger,
            listener,
            addr,
            callback_listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where delivery receipts are received, when they are on.
    pub fn callback_addr(&self) -> Option<SocketAddr> {
        self.callback_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            context,
            trigger,
            listener,
            addr,
            callback_listener,
        } = self;
        let config = &context.config;
        info!(
            %addr,
            amqp = %config.common.amqp.redacted(),
            redis = %shared::config::redact_url(&config.common.redis_url),
            namespace = %config.common.namespace,
            queue = %context.topology.sms_queue(),
            concurrency = config.concurrency,
            providers = ?context.providers.names(),
            // Which providers take an unanswered call's repeat (INFOBIP_IDEMPOTENT).
            repeats_ignored_by = ?context
                .providers
                .all()
                .iter()
                .filter(|p| p.ignores_repeats())
                .map(|p| p.name())
                .collect::<Vec<_>>(),
            callbacks = ?callback_listener.as_ref().and_then(|l| l.local_addr().ok()),
            // Resends ask the api's guard: the two programs' settings should agree.
            fraud_guard = %config.fraud_guard,
            "sms-worker starting"
        );
        if context.providers.logs_only() {
            warn!(
                "SMS_PROVIDERS=log: no SMS is sent; each one is written to the log, masked. Set SMS_PROVIDERS (twilio, infobip) in production"
            );
        } else if config.seal_key.is_none() {
            warn!(
                "WORKER_SEAL_KEY is not set: the timelines' key names in Redis are a plain hash of each number, so anyone who can read Redis can tell which numbers of a range were sent codes; set it (openssl rand -base64 32, the same on every worker)"
            );
        }

        // Probes and scrapes need a few connections, kept whatever the open files allow (a
        // probe left waiting for a place would have the worker restarted).
        let http_limits = ServerLimits {
            max_connections: config.server.max_connections.min(HTTP_PORT_MAX_CONNECTIONS),
            ..config.server
        };
        let (http, http_stop) = spawn_server(
            "http",
            listener,
            http::router(context.readiness.clone()),
            http_limits,
        );

        // Receipts are taken until the deliveries are done: a load balancer may still send them
        // here for a while, and one turned away may be lost (Twilio retries a status callback
        // only as its URL's connection overrides say).
        let callbacks = callback_listener.and_then(|listener| {
            // It gets what the open files leave once the HTTP port's and the worker's own are
            // kept: a connection to a provider per send in flight, for each of two providers,
            // and Redis, RabbitMQ, the listeners and the log file. A receipt may resend through
            // a provider, on a task that may outlive its connection; there are never more such
            // tasks than places, so each place takes two.
            let reserved = shared::serve::OWN_OPEN_FILES
                + HTTP_PORT_MAX_CONNECTIONS as u64
                + 2 * u64::from(config.concurrency);
            let limits = config.server.within_open_files(reserved, 2);
            let tasks = ReceiptTasks::new(limits.max_connections);
            let router = callbacks::router(context.clone(), tasks.clone())?;
            Some((spawn_server("receipts", listener, router, limits), tasks))
        });

        let _guard_settings = guard_settings::SettingsWatch::start(&context);
        let signal = tokio::spawn(async move {
            shutdown.await;
            info!("stopping: no new messages; in-flight sends may finish");
            trigger.fire();
        });

        let stop_deadline = connection::consume_until_shutdown(&context).await;
        // The last sends' timelines and the `sent` records still waiting for Redis are written
        // on tasks of their own; the runtime would drop them at exit. Each timeline write has a
        // deadline, and that wait is no longer; a record waits for Redis, which may come back
        // within seconds (a failover during a rolling restart). The servers finish alongside:
        // the HTTP port, whose `/readyz` has said `shutting_down` since the stop began, and the
        // receipts being handled. One of those may be resending through a provider, and a resend
        // cut short is one its user never gets (each event has one): they get until the stop's
        // deadline, which a quick stop is far from, and at least as long as the flush.
        let receipts_deadline = stop_deadline.max(tokio::time::Instant::now() + TIMELINE_FLUSH);
        let (timelines_flushed, (), (), ()) = tokio::join!(
            context.timelines.flush(TIMELINE_FLUSH),
            sent::wait_for_records(&context, RECORDS_FLUSH),
            stop_receipts(callbacks, receipts_deadline),
            stop_server("HTTP", Some((http, http_stop)), TIMELINE_FLUSH),
        );
        if !timelines_flushed {
            warn!("some timeline writes did not finish before the worker stopped");
        }
        sent::report_records_left(&context);
        signal.abort();
        info!("sms-worker stopped");
        Ok(())
    }
}

type ServerTask = tokio::task::JoinHandle<std::io::Result<()>>;
/// Tells a server to stop, with how long its requests in flight may take.
type StopServer = tokio::sync::oneshot::Sender<Duration>;

/// Serves `router` with the same slow-client limits as the api (`shared::serve`): the receipts
/// port is open to anyone on the internet.
fn spawn_server(
    port: &'static str,
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
) -> (ServerTask, StopServer) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<Duration>();
    // A dropped sender (the worker's run ending early) stops the server at once.
    let stopped = async { stopped.await.unwrap_or(Duration::ZERO) };
    let task = tokio::spawn(shared::serve::serve(
        port, listener, router, limits, stopped,
    ));
    (task, stop)
}

/// Stops the receipts port, then waits for the receipts still being applied (a request cut off
/// leaves its task running), both by `deadline`.
async fn stop_receipts(
    callbacks: Option<((ServerTask, StopServer), ReceiptTasks)>,
    deadline: tokio::time::Instant,
) {
    let Some((server, tasks)) = callbacks else {
        return;
    };
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    stop_server("callback", Some(server), left()).await;
    tasks.finished(left()).await;
}

/// Stops a server, giving the requests it holds `limit` to finish; the server closes what is left.
async fn stop_server(
    name: &'static str,
    server: Option<(ServerTask, StopServer)>,
    limit: Duration,
) {
    let Some((mut server, stop)) = server else {
        return;
    };
    let _ = stop.send(limit);
    // The server keeps the limit itself; this only guards against it not returning.
    match tokio::time::timeout(limit + SERVER_CLOSE, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, server = name, "a server failed"),
        Ok(Err(e)) => warn!(error = %e, server = name, "a server task failed"),
        Err(_) => {
            warn!(
                server = name,
                "a server did not stop in time; stopping it anyway"
            );
            server.abort();
        }
    }
}
