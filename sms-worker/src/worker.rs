//! The consumer: connection management, one task per delivery, and what happens to each message.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use shared::{OtpRequested, Topology, mask_phone};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::claims::{self, ClaimState, Claims, Finished};
use crate::config::{Config, ProviderConfig};
use crate::dead_letter::{self, DeadLetter, ErrorKind};
use crate::message;
use crate::metrics::{self as m, InFlight, send_outcome};
use crate::provider::{Provider, SendError, Sms};

/// Connecting (TCP, AMQP handshake, channels, declarations) must not hang forever on a broker that
/// accepts TCP but does not answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Closing politely is best effort; a dead broker must not hold up the exit.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a copy that found its event claimed by another worker looks again.
const CLAIM_POLL: Duration = Duration::from_millis(100);
/// Below this, an OTP is as good as expired: Twilio's smallest ValidityPeriod is one second.
const MIN_MILLIS_LEFT: u64 = 1_000;

/// What every delivery task needs.
pub struct Shared {
    pub(crate) config: Config,
    pub(crate) topology: Topology,
    pub(crate) redis: ConnectionManager,
    pub(crate) claims: Claims,
    pub(crate) provider: Provider,
    /// Connected to RabbitMQ and consuming.
    pub(crate) consuming: AtomicBool,
    pub(crate) stopping: AtomicBool,
    /// The confirm-mode channel of the current connection. Tasks read it when they need it, so a
    /// task that outlived its connection still dead-letters through the new one.
    publisher: Mutex<Option<Channel>>,
}

impl Shared {
    fn publisher(&self) -> Option<Channel> {
        self.publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_publisher(&self, channel: Option<Channel>) {
        *self.publisher.lock().unwrap_or_else(|e| e.into_inner()) = channel;
    }
}

/// A worker bound to its HTTP port, not yet consuming. Tests read [`Worker::local_addr`] when
/// `WORKER_ADDR` has port 0.
pub struct Worker {
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
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
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("cannot listen on WORKER_ADDR {}", config.addr))?;
        let addr = listener.local_addr()?;

        let client = redis::Client::open(config.common.redis_url.expose_secret())
            .map_err(|_| anyhow::anyhow!("REDIS_URL is not a valid Redis URL"))?;
        // Lazy: the worker starts (and reports not ready) while Redis is still down; every
        // command then fails fast instead of hanging, and the manager reconnects by itself.
        let redis_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let redis = ConnectionManager::new_lazy_with_config(client, redis_config)
            .context("cannot set up the Redis client")?;

        let provider = Provider::new(&config.provider)?;
        let shared = Arc::new(Shared {
            topology: config.common.topology(),
            claims: Claims::new(redis.clone(), &config.common.namespace),
            redis,
            provider,
            consuming: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            publisher: Mutex::new(None),
            config,
        });
        Ok(Self {
            shared,
            listener,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            shared,
            listener,
            addr,
        } = self;
        let config = &shared.config;
        info!(
            %addr,
            amqp = %shared::config::redact_url(&config.common.amqp_url),
            redis = %shared::config::redact_url(&config.common.redis_url),
            namespace = %config.common.namespace,
            queue = %shared.topology.sms_queue(),
            concurrency = config.concurrency,
            provider = shared.provider.name(),
            "sms-worker starting"
        );
        if matches!(config.provider, ProviderConfig::Log) {
            warn!(
                "SMS_PROVIDER=log: no SMS is sent; each one is written to the log, masked. Set SMS_PROVIDER=twilio in production"
            );
        }

        let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, crate::http::router(shared.clone()))
            .with_graceful_shutdown(async {
                let _ = http_stop_rx.await;
            });
        let http = tokio::spawn(server.into_future());

        let (stop_tx, stop_rx) = watch::channel(false);
        let signal = {
            let shared = shared.clone();
            tokio::spawn(async move {
                shutdown.await;
                shared.stopping.store(true, Ordering::Relaxed);
                info!("stopping: no new messages; in-flight sends may finish");
                let _ = stop_tx.send(true);
            })
        };

        consume(&shared, stop_rx).await;

        signal.abort();
        let _ = http_stop_tx.send(());
        match http.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "the HTTP server failed"),
            Err(e) => warn!(error = %e, "the HTTP server task failed"),
        }
        info!("sms-worker stopped");
        Ok(())
    }
}

/// Connects, consumes, and reconnects with backoff whenever RabbitMQ goes away, until stopped.
async fn consume(shared: &Arc<Shared>, mut stop: watch::Receiver<bool>) {
    // One set for every connection: tasks of a lost connection keep running (their SMS may be
    // half-sent) and are drained on shutdown like the others.
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut backoff = reconnect_backoff();
    loop {
        if *stop.borrow() {
            break;
        }
        let opened = tokio::select! {
            opened = tokio::time::timeout(CONNECT_TIMEOUT, Session::open(shared)) => opened,
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        match opened {
            Ok(Ok(mut session)) => {
                backoff = reconnect_backoff();
                metrics::counter!(m::AMQP_CONNECTS).increment(1);
                info!(queue = %shared.topology.sms_queue(), "connected to RabbitMQ; consuming");
                match session.consume(shared, &mut tasks, &mut stop).await {
                    SessionEnd::Stopped => {
                        session.shut_down(shared, &mut tasks).await;
                        return;
                    }
                    SessionEnd::Lost(reason) => {
                        warn!(%reason, "lost RabbitMQ; reconnecting");
                        shared.set_publisher(None);
                        session.abandon().await;
                    }
                }
            }
            Ok(Err(e)) => warn!(error = %e, "cannot connect to RabbitMQ; retrying"),
            Err(_) => warn!("connecting to RabbitMQ timed out; retrying"),
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
    }
    // Stopped while disconnected: what is left can finish, but cannot be acknowledged anyway.
    drain(&mut tasks, shared.config.shutdown_grace).await;
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

enum SessionEnd {
    Stopped,
    Lost(String),
}

/// One AMQP connection: a consuming channel and a confirm-mode channel for dead letters.
struct Session {
    connection: Connection,
    channel: Channel,
    publisher: Channel,
    consumer: Consumer,
}

impl Session {
    async fn open(shared: &Shared) -> lapin::Result<Self> {
        let config = &shared.config;
        // Named after the namespace, so an operator (or a test) can tell the connections apart.
        let name = format!("sms-worker {}", config.common.namespace);
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection =
            Connection::connect(config.common.amqp_url.expose_secret(), properties).await?;
        let channel = connection.create_channel().await?;
        // Prefetch = concurrency: the broker never hands this process more than it works on, so
        // the rest stays available to other replicas.
        channel
            .basic_qos(config.concurrency, BasicQosOptions::default())
            .await?;
        // Declared here too, so the worker can start before the api.
        shared.topology.declare(&channel).await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let tag = format!("sms-worker-{}", uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                shared.topology.sms_queue().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            connection,
            channel,
            publisher,
            consumer,
        })
    }

    async fn consume(
        &mut self,
        shared: &Arc<Shared>,
        tasks: &mut JoinSet<()>,
        stop: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        shared.set_publisher(Some(self.publisher.clone()));
        shared.consuming.store(true, Ordering::Relaxed);
        let mut health = tokio::time::interval(Duration::from_secs(1));
        let task_stop = stop.clone();
        let end = loop {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => break SessionEnd::Stopped,
                delivery = self.consumer.next() => match delivery {
                    Some(Ok(delivery)) => spawn_delivery(tasks, shared.clone(), delivery, task_stop.clone()),
                    Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                    None => break SessionEnd::Lost("the broker cancelled the consumer".to_owned()),
                },
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => log_join(joined),
                _ = health.tick() => {
                    if !self.connection.status().connected() || !self.publisher.status().connected() {
                        break SessionEnd::Lost("the connection or the dead-letter channel closed".to_owned());
                    }
                }
            }
        };
        shared.consuming.store(false, Ordering::Relaxed);
        end
    }

    /// SIGTERM: stop taking messages, let in-flight sends finish within the grace period, then
    /// close, which hands every unacknowledged message back to the queue.
    async fn shut_down(self, shared: &Shared, tasks: &mut JoinSet<()>) {
        let cancel = self
            .channel
            .basic_cancel(self.consumer.tag(), BasicCancelOptions::default());
        if let Err(e) = with_timeout(cancel).await {
            warn!(error = %e, "could not cancel the consumer");
        }
        drain(tasks, shared.config.shutdown_grace).await;
        shared.set_publisher(None);
        let _ = with_timeout(self.channel.close(200, "shutting down".into())).await;
        let _ = with_timeout(self.publisher.close(200, "shutting down".into())).await;
        let _ = with_timeout(self.connection.close(200, "shutting down".into())).await;
    }

    async fn abandon(self) {
        let _ = with_timeout(self.connection.close(200, "reconnecting".into())).await;
    }
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

fn spawn_delivery(
    tasks: &mut JoinSet<()>,
    shared: Arc<Shared>,
    delivery: Delivery,
    stop: watch::Receiver<bool>,
) {
    let acker = delivery.acker.clone();
    tasks.spawn(async move {
        let handled = AssertUnwindSafe(handle_delivery(shared, delivery, stop))
            .catch_unwind()
            .await;
        if handled.is_err() {
            // Back to the queue. basic.reject (not nack) is what every RabbitMQ version counts
            // toward a quorum queue's delivery limit, so a message that keeps crashing the
            // handler is dead-lettered by the broker instead of looping.
            error!("handling a message panicked; returning it to the queue");
            let _ = acker.reject(BasicRejectOptions { requeue: true }).await;
        }
    });
}

/// How one delivery ends.
enum Outcome {
    /// The provider accepted the SMS.
    Sent,
    /// Already sent or dead-lettered by another copy.
    Duplicate(Finished),
    DeadLetter {
        dead_letter: DeadLetter,
        /// The claim token, if this task holds the claim.
        token: Option<String>,
    },
    /// Not handled here: on shutdown the message goes back when the channel closes (`requeue:
    /// false`); otherwise it is returned now.
    Release { requeue: bool },
}

async fn handle_delivery(shared: Arc<Shared>, delivery: Delivery, stop: watch::Receiver<bool>) {
    let _in_flight = InFlight::start();
    let request_id = header_string(
        delivery.properties.headers().as_ref(),
        shared::event::REQUEST_ID_HEADER,
    )
    .unwrap_or_default();
    match parse(&delivery.data) {
        Err(reason) => {
            let span = info_span!("sms", %request_id, event_id = tracing::field::Empty);
            async {
                warn!(error = %reason, "unreadable message; dead-lettering it as it came");
                let dead_letter = DeadLetter::new(ErrorKind::InvalidMessage, reason, 0);
                let body = delivery.data.clone();
                settle(
                    &shared,
                    &delivery,
                    None,
                    body,
                    Outcome::DeadLetter {
                        dead_letter,
                        token: None,
                    },
                    &stop,
                )
                .await;
            }
            .instrument(span)
            .await;
        }
        Ok(event) => {
            let span = info_span!(
                "sms",
                event_id = %event.event_id,
                %request_id,
                to = %mask_phone(&event.phone_number),
            );
            async {
                let outcome = process(&shared, &event, &stop).await;
                let body = serde_json::to_vec(&event.without_code()).unwrap_or_default();
                settle(&shared, &delivery, Some(&event), body, outcome, &stop).await;
            }
            .instrument(span)
            .await;
        }
    }
}

/// The event, or why it cannot be handled. The reason never quotes the body: it could hold the
/// code or the number.
fn parse(data: &[u8]) -> Result<OtpRequested, String> {
    let event: OtpRequested = serde_json::from_slice(data).map_err(|e| {
        format!(
            "the body is not an OtpRequested event ({} at line {} column {})",
            scrub(&e.to_string()),
            e.line(),
            e.column()
        )
    })?;
    if event.version != shared::event::EVENT_VERSION {
        return Err(format!("unsupported event version {}", event.version));
    }
    if event.otp.as_deref().is_none_or(str::is_empty) {
        return Err("the event carries no code".to_owned());
    }
    if event.phone_number.is_empty() {
        return Err("the event carries no phone number".to_owned());
    }
    Ok(event)
}

/// serde's messages quote the offending value; a value here could be a code or a number.
fn scrub(text: &str) -> String {
    let text = text.split(" at line ").next().unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    let mut in_quotes = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                if in_quotes {
                    out.push_str("\"…\"");
                }
            }
            _ if in_quotes => {}
            c if c.is_ascii_digit() => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn header_string(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let value = headers?.inner().get(name)?;
    let text = match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        _ => return None,
    };
    // Only an id belongs here; anything else is cut short rather than logged whole.
    Some(
        text.chars()
            .filter(|c| c.is_ascii_graphic())
            .take(128)
            .collect(),
    )
}

/// Sends the SMS, retrying what can be retried, and says how the delivery ends. Acknowledging is
/// [`settle`]'s job.
async fn process(shared: &Shared, event: &OtpRequested, stop: &watch::Receiver<bool>) -> Outcome {
    let config = &shared.config;
    let started = Instant::now();
    let event_id = event.event_id;

    // A copy of an event that was already handled is acknowledged whatever its age.
    match shared.claims.finished(event_id).await {
        Ok(Some(finished)) => return Outcome::Duplicate(finished),
        Ok(None) => {}
        // Claiming below retries within the budget.
        Err(e) => debug!(error = %e, "Redis did not answer"),
    }

    let millis_left = event.millis_left(OffsetDateTime::now_utc());
    if millis_left < MIN_MILLIS_LEFT {
        info!("the OTP expired before it could be sent; dead-lettering it");
        return Outcome::DeadLetter {
            dead_letter: DeadLetter::new(
                ErrorKind::Expired,
                "the OTP expired before it could be sent",
                0,
            ),
            token: None,
        };
    }
    let budget = Budget {
        retry_deadline: started + config.retry_max_elapsed,
        expires: started + Duration::from_millis(millis_left),
    };
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(config.retry_min_delay)
        .with_max_delay(config.retry_max_delay)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();

    // 1. Claim the event, so that no other copy sends it at the same time.
    let token = claims::new_token();
    // A copy that waits for another is bounded by the other's budget, plus its lease lapsing.
    let wait_limit = config.retry_max_elapsed + config.send_timeout + config.claim_lease * 2;
    let mut waiting = false;
    loop {
        match shared
            .claims
            .claim(event_id, &token, config.claim_lease)
            .await
        {
            Ok(ClaimState::Acquired) => break,
            Ok(ClaimState::Done(finished)) => return Outcome::Duplicate(finished),
            Ok(ClaimState::HeldElsewhere) => {
                if !waiting {
                    info!("another copy of this event is being sent; waiting for it to finish");
                    waiting = true;
                }
                if started.elapsed() > wait_limit {
                    warn!("the other copy never finished; returning this one to the queue");
                    return Outcome::Release { requeue: true };
                }
                if sleep_unless_stopped(CLAIM_POLL, stop).await.is_err() {
                    return Outcome::Release { requeue: false };
                }
            }
            Err(e) => {
                warn!(error = %e, "Redis unavailable: cannot tell whether this event was already sent; not sending blindly");
                let error = format!("Redis unavailable, so the duplicate check could not run: {e}");
                match budget.next_delay(&mut backoff, None) {
                    Ok(delay) => {
                        if sleep_unless_stopped(delay, stop).await.is_err() {
                            return Outcome::Release { requeue: false };
                        }
                    }
                    Err(kind) => {
                        return Outcome::DeadLetter {
                            dead_letter: DeadLetter::new(kind, error, 0),
                            token: None,
                        };
                    }
                }
            }
        }
    }
    let _lease = Lease::keep(
        shared.claims.clone(),
        event_id,
        token.clone(),
        config.claim_lease,
    );

    // 2. Send, retrying connect errors, timeouts, 429 and 5xx with backoff.
    let code = event.otp.as_deref().unwrap_or_default();
    let mut attempts: u32 = 0;
    loop {
        let millis_left = event.millis_left(OffsetDateTime::now_utc());
        if millis_left < MIN_MILLIS_LEFT {
            let dead_letter = DeadLetter::new(
                ErrorKind::Expired,
                "the OTP expired while retrying",
                attempts,
            );
            return Outcome::DeadLetter {
                dead_letter,
                token: Some(token),
            };
        }
        attempts += 1;
        let sms = Sms {
            to: &event.phone_number,
            body: message::render(&config.message, code, millis_left),
            masked_body: message::render_masked(&config.message, code, millis_left),
            validity_secs: millis_left / 1_000,
        };
        let timeout = config.send_timeout.min(Duration::from_millis(millis_left));
        match shared.provider.send(&sms, timeout).await {
            Ok(accepted) => {
                info!(
                    attempts,
                    sid = accepted.sid.as_deref().unwrap_or("-"),
                    status = accepted.status.as_deref().unwrap_or("-"),
                    "SMS sent"
                );
                send_outcome("sent");
                record_sent(shared, event).await;
                return Outcome::Sent;
            }
            Err(error) if !error.retryable => {
                warn!(
                    attempts,
                    status = error.status,
                    code = error.code,
                    error = %error,
                    "the provider refused the SMS; dead-lettering it"
                );
                return Outcome::DeadLetter {
                    dead_letter: provider_dead_letter(
                        ErrorKind::Permanent,
                        &error,
                        attempts,
                        String::new(),
                    ),
                    token: Some(token),
                };
            }
            Err(error) => match budget.next_delay(&mut backoff, error.retry_after) {
                Ok(delay) => {
                    send_outcome("retried");
                    warn!(
                        attempts,
                        status = error.status,
                        code = error.code,
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        error = %error,
                        "send failed; retrying"
                    );
                    if sleep_unless_stopped(delay, stop).await.is_err() {
                        // Shutting down: hand it to another worker rather than wait here.
                        if let Err(e) = shared.claims.release(event_id, &token).await {
                            debug!(error = %e, "could not release the claim; it will lapse");
                        }
                        return Outcome::Release { requeue: false };
                    }
                }
                Err(kind) => {
                    warn!(attempts, error = %error, kind = kind.as_str(), "giving up; dead-lettering");
                    let prefix = format!("gave up after {attempts} attempts: ");
                    return Outcome::DeadLetter {
                        dead_letter: provider_dead_letter(kind, &error, attempts, prefix),
                        token: Some(token),
                    };
                }
            },
        }
    }
}

fn provider_dead_letter(
    kind: ErrorKind,
    error: &SendError,
    attempts: u32,
    prefix: String,
) -> DeadLetter {
    DeadLetter {
        kind,
        error: prefix + &error.message,
        attempts,
        provider_status: error.status,
        provider_code: error.code,
    }
}

/// Records the send; a few quick tries, since a missing record could let a redelivered copy
/// send the SMS again.
async fn record_sent(shared: &Shared, event: &OtpRequested) {
    let ttl = Duration::from_millis(event.millis_left(OffsetDateTime::now_utc()));
    for attempt in 1..=3 {
        match shared
            .claims
            .finish(event.event_id, Finished::Sent, ttl)
            .await
        {
            Ok(()) => return,
            Err(e) if attempt == 3 => {
                warn!(error = %e, "sent, but could not record it in Redis; a redelivered copy could be sent again")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Retrying ends at `RETRY_MAX_ELAPSED_SECS` or at the OTP's expiry, whichever is first.
struct Budget {
    retry_deadline: Instant,
    expires: Instant,
}

impl Budget {
    /// The next backoff delay, at least `retry_after`; or, when the next attempt would come too
    /// late, why retrying stops.
    fn next_delay(
        &self,
        backoff: &mut ExponentialBackoff,
        retry_after: Option<Duration>,
    ) -> Result<Duration, ErrorKind> {
        let delay = backoff.next().unwrap_or(Duration::from_secs(20));
        let delay = retry_after.map_or(delay, |after| after.max(delay));
        let next_attempt = Instant::now() + delay;
        // The next attempt also needs a moment before the OTP expires to be worth it.
        if next_attempt + Duration::from_millis(MIN_MILLIS_LEFT) > self.expires {
            Err(ErrorKind::Expired)
        } else if next_attempt > self.retry_deadline {
            Err(ErrorKind::RetriesExhausted)
        } else {
            Ok(delay)
        }
    }
}

/// Keeps renewing a claim's lease until dropped.
struct Lease(tokio::task::JoinHandle<()>);

impl Lease {
    fn keep(claims: Claims, event_id: uuid::Uuid, token: String, lease: Duration) -> Self {
        Self(tokio::spawn(async move {
            let every = lease / 3;
            loop {
                tokio::time::sleep(every).await;
                match claims.renew(event_id, &token, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(%event_id, "lost the claim on this event (its lease lapsed)");
                        return;
                    }
                    Err(e) => debug!(%event_id, error = %e, "could not renew the claim"),
                }
            }
        }))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sleeps, or returns `Err` as soon as the worker is stopping.
async fn sleep_unless_stopped(delay: Duration, stop: &watch::Receiver<bool>) -> Result<(), ()> {
    let mut stop = stop.clone();
    if *stop.borrow() {
        return Err(());
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => Ok(()),
        _ = stop.wait_for(|stopped| *stopped) => Err(()),
    }
}

/// Acknowledges, dead-letters or returns the delivery.
async fn settle(
    shared: &Shared,
    delivery: &Delivery,
    event: Option<&OtpRequested>,
    dead_letter_body: Vec<u8>,
    outcome: Outcome,
    stop: &watch::Receiver<bool>,
) {
    match outcome {
        Outcome::Sent => ack(delivery).await,
        Outcome::Duplicate(finished) => {
            info!(already = ?finished, "this event was already handled; acknowledging the copy without sending");
            send_outcome("duplicate_skipped");
            ack(delivery).await;
        }
        Outcome::Release { requeue: false } => {
            debug!("left for the broker to hand to another worker");
            send_outcome("requeued");
        }
        Outcome::Release { requeue: true } => {
            send_outcome("requeued");
            nack_requeue(delivery).await;
        }
        Outcome::DeadLetter { dead_letter, token } => {
            let published = match shared.publisher() {
                Some(channel) => {
                    dead_letter::publish(
                        &channel,
                        &shared.topology.dead_letter_exchange(),
                        &delivery.properties,
                        &dead_letter_body,
                        &dead_letter,
                    )
                    .await
                }
                None => Err(dead_letter::PublishError::NoChannel),
            };
            match published {
                Ok(()) => {
                    if let Some(event) = event
                        && let Err(e) = shared
                            .claims
                            .finish(
                                event.event_id,
                                Finished::DeadLettered,
                                Duration::from_millis(event.millis_left(OffsetDateTime::now_utc())),
                            )
                            .await
                    {
                        debug!(error = %e, "could not record the dead letter in Redis");
                    }
                    send_outcome("dead_lettered");
                    metrics::counter!(m::DEAD_LETTERS, "kind" => dead_letter.kind.as_str())
                        .increment(1);
                    info!(
                        kind = dead_letter.kind.as_str(),
                        attempts = dead_letter.attempts,
                        "dead-lettered"
                    );
                    ack(delivery).await;
                }
                Err(e) => {
                    // Never drop: the original goes back to the queue and is tried again.
                    warn!(error = %e, "could not dead-letter the message; returning it to the queue");
                    if let (Some(event), Some(token)) = (event, token)
                        && let Err(e) = shared.claims.release(event.event_id, &token).await
                    {
                        debug!(error = %e, "could not release the claim; it will lapse");
                    }
                    send_outcome("requeued");
                    // A short pause, so that a broken dead-letter route does not turn into a
                    // busy loop of redeliveries.
                    if sleep_unless_stopped(Duration::from_secs(1), stop)
                        .await
                        .is_ok()
                    {
                        nack_requeue(delivery).await;
                    }
                }
            }
        }
    }
}

async fn ack(delivery: &Delivery) {
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        // The channel is gone: the broker redelivers the message, and the copy is skipped
        // because the outcome is recorded in Redis.
        Ok(false) => warn!("could not acknowledge: the channel closed"),
        Err(e) => warn!(error = %e, "could not acknowledge"),
    }
}

async fn nack_requeue(delivery: &Delivery) {
    let options = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.nack(options).await {
        warn!(error = %e, "could not return the message; the broker returns it when the channel closes");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parse_errors_never_quote_the_body() {
        let body = br#"{"version":1,"event_id":"not-a-uuid-123456","phone_number":"+14155550100","otp":"123456"}"#;
        let err = parse(body).unwrap_err();
        assert!(!err.contains("123456"), "{err}");
        assert!(!err.contains("4155550100"), "{err}");

        let body = br#"{"version":1,"phone_number":14155550100}"#;
        let err = parse(body).unwrap_err();
        assert!(!err.contains("4155550100"), "{err}");

        assert!(
            parse(b"not json")
                .unwrap_err()
                .contains("not an OtpRequested")
        );
    }

    #[test]
    fn refuses_other_versions_and_missing_codes() {
        let event = OtpRequested::new(
            "+14155550100".into(),
            "123456".into(),
            OffsetDateTime::now_utc() + time::Duration::minutes(5),
            "req".into(),
        );
        assert!(parse(&serde_json::to_vec(&event).unwrap()).is_ok());
        let mut v2 = event.clone();
        v2.version = 2;
        assert!(
            parse(&serde_json::to_vec(&v2).unwrap())
                .unwrap_err()
                .contains("version 2")
        );
        assert!(
            parse(&serde_json::to_vec(&event.without_code()).unwrap())
                .unwrap_err()
                .contains("no code")
        );
    }

    #[test]
    fn the_budget_ends_at_expiry_or_the_retry_limit() {
        let now = Instant::now();
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .without_max_times()
            .build();
        let budget = Budget {
            retry_deadline: now + Duration::from_secs(60),
            expires: now + Duration::from_secs(600),
        };
        assert_eq!(
            budget.next_delay(&mut backoff, None),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(
            budget.next_delay(&mut backoff, Some(Duration::from_secs(3))),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(
            budget.next_delay(&mut backoff, Some(Duration::from_secs(61))),
            Err(ErrorKind::RetriesExhausted)
        );

        let budget = Budget {
            retry_deadline: now + Duration::from_secs(60),
            expires: now + Duration::from_secs(5),
        };
        assert_eq!(
            budget.next_delay(&mut backoff, Some(Duration::from_secs(10))),
            Err(ErrorKind::Expired)
        );
    }

    #[test]
    fn reads_the_request_id_header() {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-request-id".into(),
            AMQPValue::LongString("req-42".into()),
        );
        assert_eq!(
            header_string(Some(&headers), "x-request-id").as_deref(),
            Some("req-42")
        );
        assert_eq!(header_string(None, "x-request-id"), None);
    }
}
