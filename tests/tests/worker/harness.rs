//! The worker's surroundings for one test: a NAMESPACE of its own on the real RabbitMQ and
//! Redis, a fake-sms on port 0 as Twilio, events published as the api publishes them, and the
//! worker itself, in-process or as a child process.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use lapin::options::{BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use shared::amqp::headers;
use shared::event::ROUTING_KEY;
use shared::{Env, OtpRequested, PhoneNumber, QueueType, Topology};
use sms_worker::Config;
use tests::cleanup::{remove_namespace, unique};
use tests::fake_sms::{FakeSms, FakeSmsConfig, Faults, InjectedResponse, Rule};
use tests::program::Program;
use tests::servers::servers;
use tests::wait::eventually;
use time::OffsetDateTime;
use tokio::sync::oneshot;

/// Long enough for a busy machine, short enough that a hang fails the test in reasonable time.
pub const WAIT: Duration = Duration::from_secs(20);
/// What most tests give an event: longer than any test runs.
pub const CODE_VALIDITY: Duration = Duration::from_secs(300);
/// A test key for what the worker seals in Redis (32 bytes, base64).
pub const SEAL_KEY: &str = "dGVzdC1zZWFsLWtleS0wMTIzNDU2Nzg5YWJjZGVmMDE=";

pub struct Harness {
    pub ns: String,
    queue_type: QueueType,
    pub topology: Topology,
    pub fake: FakeSms,
    connection: Connection,
    channel: Channel,
    pub http: reqwest::Client,
}

/// Runs `body` with a fresh harness and always cleans up, even when `body` panics.
pub async fn with_harness<F, Fut>(queue_type: QueueType, body: F)
where
    F: FnOnce(Arc<Harness>) -> Fut,
    Fut: Future<Output = ()>,
{
    let harness = Arc::new(Harness::new(queue_type).await);
    let result = AssertUnwindSafe(body(harness.clone())).catch_unwind().await;
    harness.cleanup().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

impl Harness {
    async fn new(queue_type: QueueType) -> Self {
        let servers = servers();
        servers.redis.require();
        servers.rabbitmq.require();
        let ns = unique("t");
        let topology = Topology::new(&ns, queue_type);
        let fake = FakeSms::start(FakeSmsConfig::ephemeral())
            .await
            .expect("fake-sms starts");
        let connection =
            Connection::connect(servers.rabbitmq.url(), ConnectionProperties::default())
                .await
                .expect("RabbitMQ accepts a connection");
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        // As the api does at start-up, so events published before the worker starts are kept.
        topology
            .declare(&connection, &channel)
            .await
            .expect("the topology");
        Self {
            ns,
            queue_type,
            topology,
            fake,
            connection,
            channel,
            http: reqwest::Client::new(),
        }
    }

    /// The worker's environment: this namespace, the test servers, fake-sms as Twilio, and
    /// retry delays and a claim lease short enough for tests.
    pub fn env(&self) -> Vec<(String, String)> {
        let fake = self.fake.config();
        let queue_type = match self.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        let mut env = servers().env();
        env.extend(
            [
                ("NAMESPACE", self.ns.as_str()),
                ("AMQP_QUEUE_TYPE", queue_type),
                ("WORKER_ADDR", "127.0.0.1:0"),
                ("SMS_PROVIDER", "twilio"),
                ("TWILIO_ACCOUNT_SID", fake.account_sid.as_str()),
                ("TWILIO_AUTH_TOKEN", fake.auth_token.as_str()),
                ("TWILIO_FROM", "+15005550006"),
                ("TWILIO_BASE_URL", &self.fake.base_url()),
                ("SMS_RETRY_MIN_DELAY_MS", "50"),
                ("SMS_RETRY_MAX_DELAY_MS", "2000"),
                ("SMS_CLAIM_LEASE_MS", "1000"),
                ("RUST_LOG", "info"),
            ]
            .map(|(name, value)| (name.to_owned(), value.to_owned())),
        );
        env
    }

    /// Overrides that add fake-sms's Infobip after Twilio (`SMS_PROVIDERS=twilio,infobip`), with
    /// OAuth client credentials and a seal key.
    pub fn failover(&self) -> Vec<(String, String)> {
        let fake = self.fake.config();
        [
            ("SMS_PROVIDERS", "twilio,infobip"),
            ("INFOBIP_BASE_URL", &self.fake.base_url()),
            ("INFOBIP_SENDER", "OTPAuth"),
            ("INFOBIP_CLIENT_ID", fake.infobip_client_id.as_str()),
            ("INFOBIP_CLIENT_SECRET", fake.infobip_client_secret.as_str()),
            ("WORKER_SEAL_KEY", SEAL_KEY),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .into()
    }

    /// Overrides for [`Harness::failover`] with delivery receipts on: a callback listener on a
    /// free local port, which fake-sms calls as the carrier.
    pub fn receipts(&self) -> Vec<(String, String)> {
        let port = tests::ports::free_port();
        let mut overrides = self.failover();
        overrides.extend([
            ("CALLBACK_ADDR".to_owned(), format!("127.0.0.1:{port}")),
            (
                "CALLBACK_BASE_URL".to_owned(),
                format!("http://127.0.0.1:{port}"),
            ),
        ]);
        overrides
    }

    /// Stores `event`'s code as the api does once the broker confirmed it (the worker resends
    /// only a code the api still holds).
    pub async fn hold_code(&self, event: &OtpRequested) {
        let mut redis = self.redis().await;
        let key = shared::otp_keys::current_code(&self.ns, &event.phone_number);
        let ttl_ms = event.millis_left(OffsetDateTime::now_utc()).max(1);
        let () = redis::pipe()
            .hset(
                &key,
                shared::otp_keys::EVENT_FIELD,
                event.event_id.to_string(),
            )
            .ignore()
            .pexpire(&key, i64::try_from(ttl_ms).unwrap_or(i64::MAX))
            .ignore()
            .query_async(&mut redis)
            .await
            .expect("the code is stored");
    }

    /// Withdraws `event` as the api does when its publish was neither confirmed nor refused: the
    /// send ledger says `withdrawn`. (The api writes it only where no worker holds a claim; this
    /// writes it whatever is there, as if the claim had lapsed.)
    pub async fn withdraw(&self, event: &OtpRequested) {
        let mut redis = self.redis().await;
        let () = redis::cmd("SET")
            .arg(shared::send_ledger::key(&self.ns, event.event_id))
            .arg(shared::send_ledger::WITHDRAWN)
            .arg("PX")
            .arg(600_000)
            .query_async(&mut redis)
            .await
            .expect("the event is withdrawn");
    }

    /// Waits until the provider has had a call for `to` (fake-sms records it as it arrives, so
    /// the call may still be waiting for its answer).
    pub async fn wait_for_a_call(&self, to: &str) {
        eventually(WAIT, &format!("a call for {to}"), || async {
            !self.fake.requests(Some(to)).is_empty()
        })
        .await;
    }

    /// What the send ledger holds for `event`: `sent`, `dead`, `sending:…`, or nothing.
    pub async fn ledger_record(&self, event: &OtpRequested) -> Option<String> {
        redis::cmd("GET")
            .arg(shared::send_ledger::key(&self.ns, event.event_id))
            .query_async(&mut self.redis().await)
            .await
            .expect("Redis answers")
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(servers().redis.url())
            .expect("a Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("Redis")
    }

    /// What `sms-worker trace <to>` prints, as an operator runs it (no `RUST_LOG`), with
    /// `overrides` in its environment.
    pub async fn trace(&self, to: &str, overrides: &[(&str, &str)]) -> String {
        let mut env = self.env_with(overrides);
        env.retain(|(name, _)| name != "RUST_LOG");
        let mut program = Program::start_workspace("sms-worker", &["trace", to], env).await;
        assert!(program.wait(WAIT).await.success(), "{}", program.logs());
        program.stdout()
    }

    /// [`Harness::env`] with `overrides` (an empty value unsets a variable).
    pub fn env_with(&self, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = self.env();
        env.extend(
            overrides
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
        );
        env
    }

    /// The worker's configuration, read from [`Harness::env`] with `overrides` as the program
    /// reads its environment.
    pub fn config(&self, overrides: &[(&str, &str)]) -> Config {
        Config::from_env(&Env::from_pairs(self.env_with(overrides))).expect("a valid test config")
    }

    /// A worker in this process, consuming once it is ready.
    pub async fn start_worker(&self, overrides: &[(&str, &str)]) -> RunningWorker {
        let running = self.spawn_worker(overrides).await;
        running.wait_ready(&self.http).await;
        running
    }

    /// A worker in this process, not waited for: for one that cannot become ready.
    pub async fn spawn_worker(&self, overrides: &[(&str, &str)]) -> RunningWorker {
        let worker = sms_worker::Worker::bind(self.config(overrides))
            .await
            .expect("the worker binds");
        let addr = worker.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async move {
            let _ = stopped.await;
        }));
        RunningWorker {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The `sms-worker` program, for what only a process can do: take a signal, or die.
    pub async fn start_worker_process(&self, overrides: &[(&str, &str)]) -> Program {
        Program::start_workspace("sms-worker", &[], self.env_with(overrides)).await
    }

    /// As [`Harness::start_worker_process`], under a limit of `open_files`.
    pub async fn start_worker_process_with_open_files(
        &self,
        overrides: &[(&str, &str)],
        open_files: u64,
    ) -> Program {
        let env = self.env_with(overrides);
        Program::start_workspace_with_open_files("sms-worker", env, open_files).await
    }

    /// Publishes a new event for `to`, valid for [`CODE_VALIDITY`], as the api does.
    /// A new number that Twilio (fake-sms) calls invalid (21211), so its event is dead-lettered
    /// at the first call. Replaces fake-sms's faults.
    pub fn invalid_number(&self) -> String {
        self.invalid_numbers(1).remove(0)
    }

    /// `count` such numbers.
    pub fn invalid_numbers(&self, count: usize) -> Vec<String> {
        let numbers: Vec<String> = (0..count).map(|_| phone()).collect();
        self.fake.set_faults(Faults {
            rules: numbers
                .iter()
                .map(|to| Rule {
                    to: to.clone(),
                    response: InjectedResponse::twilio_error(400, 21211),
                })
                .collect(),
            ..Faults::default()
        });
        numbers
    }

    pub async fn request_sms(&self, to: &str) -> OtpRequested {
        let event = event(to, CODE_VALIDITY);
        self.publish(&event).await;
        event
    }

    /// Publishes as the api does: persistent, message id, type, `x-request-id`, and an
    /// expiration at the OTP's.
    pub async fn publish(&self, event: &OtpRequested) {
        let ttl_ms = event.millis_left(OffsetDateTime::now_utc()).max(1);
        self.publish_with(
            &serde_json::to_vec(event).expect("an event serialises"),
            shared::amqp::event_properties(event, ttl_ms),
        )
        .await;
    }

    /// As the api publishes, but without an expiration: the broker keeps it however old it
    /// gets, as a message that waited in the queue does.
    pub async fn publish_without_expiration(&self, event: &OtpRequested) {
        self.publish_with(
            &serde_json::to_vec(event).expect("an event serialises"),
            without_expiration(shared::amqp::event_properties(event, 1)),
        )
        .await;
    }

    /// Puts `event` straight into the queue where RabbitMQ dead-letters what expired in the
    /// work queue, code included, as the broker would (no worker can take it first).
    pub async fn put_among_broker_dead_letters(&self, event: &OtpRequested) {
        shared::amqp::publish_confirmed(
            &self.channel,
            "",
            &self.topology.broker_dead_letter_queue(),
            &serde_json::to_vec(event).expect("an event serialises"),
            without_expiration(shared::amqp::event_properties(event, 1)),
            WAIT,
            None,
        )
        .await
        .expect("the broker confirms the publish");
    }

    pub async fn publish_with(&self, body: &[u8], properties: BasicProperties) {
        shared::amqp::publish_confirmed(
            &self.channel,
            &self.topology.events_exchange(),
            ROUTING_KEY,
            body,
            properties,
            WAIT,
            None,
        )
        .await
        .expect("the broker confirms the publish");
    }

    /// Ready messages in the sms queue (unacknowledged ones are not counted).
    pub async fn queued(&self) -> u32 {
        self.ready_count(&self.topology.sms_queue()).await
    }

    /// Ready messages in the dead-letter queue.
    pub async fn dead_lettered(&self) -> u32 {
        self.ready_count(&self.topology.dead_letter_queue()).await
    }

    /// Ready messages RabbitMQ dead-lettered itself, waiting for a worker to move them on.
    pub async fn held_by_the_broker(&self) -> u32 {
        self.ready_count(&self.topology.broker_dead_letter_queue())
            .await
    }

    async fn ready_count(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.expect("a channel");
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the queue exists");
        let _ = channel.close(200, "ok".into()).await;
        declared.message_count()
    }

    /// Every dead letter, left in place: fetched without ack, returned when the channel closes.
    /// The broker hands them back after the close (a quorum queue through its log), so this
    /// waits until they are ready again: what the test checks next sees them.
    async fn dead_letters(&self) -> Vec<DeadLetter> {
        let channel = self.connection.create_channel().await.expect("a channel");
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.topology.dead_letter_queue().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .expect("a look at the dead-letter queue")
        {
            out.push(DeadLetter {
                properties: message.delivery.properties.clone(),
                body: message.delivery.data.clone(),
            });
        }
        let _ = channel.close(200, "ok".into()).await;
        self.wait_for_dead_lettered(out.len()).await;
        out
    }

    /// Every dead letter, once there are at least `count`.
    pub async fn wait_for_dead_letters(&self, count: usize) -> Vec<DeadLetter> {
        self.wait_for_dead_lettered(count).await;
        self.dead_letters().await
    }

    /// Waits until at least `count` dead letters are ready (none taken by a look at them).
    pub async fn wait_for_dead_lettered(&self, count: usize) {
        eventually(WAIT, &format!("{count} dead letter(s)"), || async {
            self.dead_lettered().await as usize >= count
        })
        .await;
    }

    pub async fn wait_for_messages(&self, to: &str, count: usize) {
        eventually(WAIT, &format!("{count} SMS to {to}"), || async {
            self.fake.messages(Some(to)).len() >= count
        })
        .await;
    }

    /// Waits until the worker's `/metrics` has `line` (e.g. `name 1`).
    pub async fn wait_for_metric(&self, worker: &RunningWorker, line: &str) {
        eventually(
            WAIT,
            &format!("the worker's /metrics to say {line}"),
            || async { self.metrics(worker).await.lines().any(|l| l == line) },
        )
        .await;
    }

    /// What the worker's `/metrics` says now.
    pub async fn metrics(&self, worker: &RunningWorker) -> String {
        self.metrics_at(&worker.addr.to_string()).await
    }

    /// What `/metrics` on `addr` (a worker process's `WORKER_ADDR`) says now.
    pub async fn metrics_at(&self, addr: &str) -> String {
        self.http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("the worker answers /metrics")
            .text()
            .await
            .expect("a metrics body")
    }

    /// The time between one request to fake-sms for `to` and the next.
    pub fn gaps(&self, to: &str) -> Vec<Duration> {
        let requests = self.fake.requests(Some(to));
        requests
            .windows(2)
            .map(|pair| {
                Duration::try_from(pair[1].received_at - pair[0].received_at)
                    .expect("requests in order")
            })
            .collect()
    }

    async fn cleanup(&self) {
        let _ = self.connection.close(200, "done".into()).await;
        remove_namespace(&self.ns).await;
    }
}

/// A dead-lettered message.
pub struct DeadLetter {
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl DeadLetter {
    pub fn header_str(&self, name: &str) -> Option<String> {
        headers::header_str(self.properties.headers().as_ref(), name)
    }

    pub fn header_int(&self, name: &str) -> Option<i64> {
        headers::header_int(self.properties.headers().as_ref(), name)
    }
}

/// `properties` less their expiration. lapin sets a property but cannot clear one, so this
/// goes through their serde form.
fn without_expiration(properties: BasicProperties) -> BasicProperties {
    let mut fields = serde_json::to_value(properties).expect("properties serialise");
    fields["expiration"] = serde_json::Value::Null;
    serde_json::from_value(fields).expect("properties deserialise")
}

/// A new event for `to` whose code is valid for `ttl`.
pub fn event(to: &str, ttl: Duration) -> OtpRequested {
    OtpRequested::valid_for(
        PhoneNumber::parse(to).expect("an E.164 number"),
        format!("{:06}", rand::random_range(0..1_000_000u32)),
        ttl,
        format!("req-{}", uuid::Uuid::new_v4().simple()),
    )
}

/// Owned overrides as the borrowed pairs `start_worker` and `config` take.
pub fn pairs(overrides: &[(String, String)]) -> Vec<(&str, &str)> {
    overrides
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect()
}

/// A random valid US number (libphonenumber places it in the US: its exchange starts with 2 to
/// 9), distinct per call.
pub fn phone() -> String {
    let exchange = rand::random_range(200..1_000u32);
    format!("+1415{exchange}{:04}", rand::random_range(0..10_000u32))
}

pub struct RunningWorker {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningWorker {
    pub async fn wait_ready(&self, http: &reqwest::Client) {
        let url = format!("http://{}/readyz", self.addr);
        eventually(WAIT, "the worker to be ready", || async {
            http.get(&url).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// Waits until `/readyz` answers 503 naming `dependency`.
    pub async fn wait_unready_for(&self, http: &reqwest::Client, dependency: &str) {
        let url = format!("http://{}/readyz", self.addr);
        eventually(WAIT, &format!("readyz to name {dependency}"), || async {
            match http.get(&url).send().await {
                Ok(response) if response.status() == 503 => response
                    .text()
                    .await
                    .unwrap_or_default()
                    .contains(dependency),
                _ => false,
            }
        })
        .await;
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the worker stops in time")
                .expect("the worker task does not panic")
                .expect("the worker exits cleanly");
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        // A failed test must not leave a worker consuming.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
