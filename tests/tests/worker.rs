//! sms-worker against the real RabbitMQ and Redis, with fake-sms (real HTTP) as Twilio.
//!
//! Each test has its own NAMESPACE (queues, exchanges, Redis keys) and its own fake-sms on port
//! 0, so tests run in parallel and repeatedly; everything is deleted at the end. Waiting is always
//! on a condition with a deadline.
//!
//! Most tests run the worker in-process (`sms_worker::Worker`, stopped through its shutdown
//! future). The SIGTERM and the kill tests run the real `sms-worker` binary as a child process,
//! since only a process receives a signal or dies with its sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use shared::event::{CONTENT_TYPE, MESSAGE_TYPE, REQUEST_ID_HEADER, ROUTING_KEY};
use shared::{OtpRequested, QueueType, Topology};
use sms_worker::{Config, ProviderConfig, TwilioAuth, TwilioConfig};
use tests::fake_sms::{FakeSms, FakeSmsConfig, Faults, InjectedResponse, Rule};
use tests::proxy::TcpProxy;
use time::OffsetDateTime;
use tokio::sync::oneshot;

const AMQP_URL: &str = shared::config::DEFAULT_AMQP_URL;
const REDIS_URL: &str = shared::config::DEFAULT_REDIS_URL;
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Harness

struct Harness {
    ns: String,
    queue_type: QueueType,
    topology: Topology,
    fake: FakeSms,
    connection: Connection,
    channel: Channel,
    http: reqwest::Client,
}

/// Runs `body` with a fresh harness and always cleans up, even when `body` panics.
async fn with_harness<F, Fut>(queue_type: QueueType, body: F)
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
        let ns = format!("t_{}", uuid::Uuid::new_v4().simple());
        let topology = Topology::new(&ns, queue_type);
        let fake = FakeSms::start(FakeSmsConfig::ephemeral())
            .await
            .expect("fake-sms starts");
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ is running on localhost");
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // As the api does at start-up, so events published before the worker starts are kept.
        topology.declare(&channel).await.unwrap();
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

    fn twilio(&self) -> TwilioConfig {
        let fake = self.fake.config();
        TwilioConfig {
            account_sid: fake.account_sid.clone(),
            auth: TwilioAuth::AuthToken(fake.auth_token.clone().into()),
            from: Some("+15005550006".to_owned()),
            messaging_service_sid: None,
            base_url: self.fake.base_url(),
        }
    }

    fn config(&self) -> Config {
        let mut config = Config::local(&self.ns);
        config.common.queue_type = self.queue_type;
        config.provider = ProviderConfig::Twilio(self.twilio());
        config
    }

    /// The environment of a worker process equivalent to [`Harness::config`].
    fn env(&self) -> Vec<(String, String)> {
        let fake = self.fake.config();
        let queue_type = match self.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        [
            ("NAMESPACE", self.ns.as_str()),
            ("AMQP_QUEUE_TYPE", queue_type),
            ("AMQP_URL", AMQP_URL),
            ("REDIS_URL", REDIS_URL),
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
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    async fn start_worker(&self, config: Config) -> RunningWorker {
        let worker = sms_worker::Worker::bind(config)
            .await
            .expect("the worker binds");
        let addr = worker.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async move {
            let _ = stopped.await;
        }));
        let running = RunningWorker {
            addr,
            stop: Some(stop),
            task: Some(task),
        };
        running.wait_ready(&self.http).await;
        running
    }

    fn event(&self, phone: &str, ttl: Duration) -> OtpRequested {
        let code = format!("{:06}", rand::random_range(0..1_000_000u32));
        let expires_at = OffsetDateTime::now_utc() + ttl;
        OtpRequested::new(
            phone.to_owned(),
            code,
            expires_at,
            format!("req-{}", uuid::Uuid::new_v4().simple()),
        )
    }

    /// Publishes as the api does: persistent, message id, type, `x-request-id`, expiration.
    async fn publish(&self, event: &OtpRequested) {
        let ttl_ms = event.millis_left(OffsetDateTime::now_utc()).max(1);
        self.publish_with(
            &serde_json::to_vec(event).unwrap(),
            properties(event).with_expiration(ttl_ms.to_string().into()),
        )
        .await;
    }

    async fn publish_with(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                self.topology.events_exchange().into(),
                ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker confirms the publish");
    }

    /// Ready messages in a queue (unacknowledged ones are not counted).
    async fn ready_count(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
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
            .unwrap();
        let _ = channel.close(200, "ok".into()).await;
        declared.message_count()
    }

    /// Every dead letter, left in place: fetched without ack, returned when the channel closes.
    async fn dead_letters(&self) -> Vec<(BasicProperties, Vec<u8>)> {
        let channel = self.connection.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.topology.dead_letter_queue().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap()
        {
            out.push((
                message.delivery.properties.clone(),
                message.delivery.data.clone(),
            ));
        }
        let _ = channel.close(200, "ok".into()).await;
        out
    }

    async fn wait_for_dead_letters(&self, count: u32) -> Vec<(BasicProperties, Vec<u8>)> {
        let dlq = self.topology.dead_letter_queue();
        wait_until(WAIT, &format!("{count} dead letter(s)"), || async {
            self.ready_count(&dlq).await >= count
        })
        .await;
        self.dead_letters().await
    }

    async fn wait_for_messages(&self, to: &str, count: usize) {
        wait_until(WAIT, &format!("{count} SMS to {to}"), || async {
            self.fake.messages(Some(to)).len() >= count
        })
        .await;
    }

    async fn cleanup(&self) {
        let channel = self.connection.create_channel().await.unwrap();
        for queue in [self.topology.sms_queue(), self.topology.dead_letter_queue()] {
            let _ = channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [
            self.topology.events_exchange(),
            self.topology.dead_letter_exchange(),
        ] {
            let _ = channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "done".into()).await;
        if let Ok(client) = redis::Client::open(REDIS_URL)
            && let Ok(mut redis) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", self.ns))
                .query_async(&mut redis)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
            }
        }
    }
}

fn properties(event: &OtpRequested) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(REQUEST_ID_HEADER),
        AMQPValue::LongString(event.request_id.clone().into()),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(event.event_id.to_string().into())
        .with_type(MESSAGE_TYPE.into())
        .with_headers(headers)
}

struct RunningWorker {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningWorker {
    async fn wait_ready(&self, http: &reqwest::Client) {
        let url = format!("http://{}/readyz", self.addr);
        wait_until(WAIT, "the worker to be ready", || async {
            http.get(&url).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    async fn stop(mut self) {
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

async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return;
        }
        assert!(started.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    match header(properties, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn header_int(properties: &BasicProperties, name: &str) -> Option<i64> {
    match header(properties, name)? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        _ => None,
    }
}

/// A random, valid-looking US number, distinct per call.
fn phone() -> String {
    format!("+1415{:07}", rand::random_range(0..10_000_000u32))
}

fn gaps(fake: &FakeSms, to: &str) -> Vec<Duration> {
    let requests = fake.requests(Some(to));
    requests
        .windows(2)
        .map(|pair| Duration::try_from(pair[1].received_at - pair[0].received_at).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Sending

#[tokio::test]
async fn sends_the_sms_and_acknowledges_the_event() {
    with_harness(QueueType::Classic, |h| async move {
        let mut config = h.config();
        config.message.webotp_domain = Some("example.com".to_owned());
        let worker = h.start_worker(config).await;
        let to = phone();
        let event = h.event(&to, Duration::from_secs(300));
        h.publish(&event).await;
        h.wait_for_messages(&to, 1).await;

        let sms = &h.fake.messages(Some(&to))[0];
        let code = event.otp.as_deref().unwrap();
        assert_eq!(
            sms.body,
            format!(
                "Your Cheershare code is {code}. It expires in 5 minutes.\n\n@example.com #{code}"
            )
        );
        assert_eq!(sms.from.as_deref(), Some("+15005550006"));
        let validity = sms.validity_period.unwrap();
        assert!((290..=300).contains(&validity), "ValidityPeriod {validity}");
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);

        // The send is remembered until the OTP expires plus the margin, not longer.
        let mut redis = redis::Client::open(REDIS_URL)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let key = format!("{}:sms:{{{}}}", h.topology.namespace, event.event_id);
        let (value, ttl_ms): (String, i64) = redis::pipe()
            .get(&key)
            .pttl(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(value, "sent");
        assert!(
            (3_500_000..=3_900_000).contains(&ttl_ms),
            "record TTL {ttl_ms} ms"
        );

        worker.stop().await;
        // Stopped, so nothing is unacknowledged any more: the queue would show a returned event.
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
        assert_eq!(h.ready_count(&h.topology.dead_letter_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn sends_with_an_api_key_and_a_messaging_service_on_quorum_queues() {
    with_harness(QueueType::Quorum, |h| async move {
        let mut config = h.config();
        let fake = h.fake.config();
        config.provider = ProviderConfig::Twilio(TwilioConfig {
            auth: TwilioAuth::ApiKey {
                sid: fake.api_key_sid.clone(),
                secret: fake.api_key_secret.clone().into(),
            },
            from: None,
            messaging_service_sid: Some("MG0123456789abcdef0123456789abcdef".to_owned()),
            ..h.twilio()
        });
        let worker = h.start_worker(config).await;
        let to = phone();
        h.publish(&h.event(&to, Duration::from_secs(120))).await;
        h.wait_for_messages(&to, 1).await;
        let sms = &h.fake.messages(Some(&to))[0];
        assert_eq!(sms.from, None);
        assert_eq!(
            sms.messaging_service_sid.as_deref(),
            Some("MG0123456789abcdef0123456789abcdef")
        );
        assert!(sms.body.contains("It expires in 2 minutes"), "{}", sms.body);
        worker.stop().await;
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn retries_5xx_then_succeeds() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            responses: [InjectedResponse::status(503), InjectedResponse::status(500)].into(),
            ..Faults::default()
        });
        let worker = h.start_worker(h.config()).await;
        let to = phone();
        h.publish(&h.event(&to, Duration::from_secs(300))).await;
        h.wait_for_messages(&to, 1).await;

        let statuses: Vec<u16> = h
            .fake
            .requests(Some(&to))
            .iter()
            .map(|r| r.status)
            .collect();
        assert_eq!(statuses, [503, 500, 201]);
        assert_eq!(h.fake.messages(Some(&to)).len(), 1);
        worker.stop().await;
        assert_eq!(h.ready_count(&h.topology.dead_letter_queue()).await, 0);
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn honours_retry_after_on_429() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            responses: [InjectedResponse::status(429).retry_after(2)].into(),
            ..Faults::default()
        });
        // The backoff alone would retry after 50 to 100 ms.
        let worker = h.start_worker(h.config()).await;
        let to = phone();
        h.publish(&h.event(&to, Duration::from_secs(300))).await;
        h.wait_for_messages(&to, 1).await;

        let requests = h.fake.requests(Some(&to));
        assert_eq!(
            requests.iter().map(|r| r.status).collect::<Vec<_>>(),
            [429, 201]
        );
        let gap = gaps(&h.fake, &to)[0];
        assert!(
            gap >= Duration::from_millis(1_950),
            "retried after {gap:?}, before Retry-After"
        );
        assert!(gap < Duration::from_secs(5), "retried after {gap:?}");
        worker.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Dead letters

#[tokio::test]
async fn dead_letters_permanent_errors_after_one_call() {
    with_harness(QueueType::Classic, |h| async move {
        let unsubscribed = phone();
        h.fake.set_faults(Faults {
            rules: vec![Rule {
                to: unsubscribed.clone(),
                response: InjectedResponse::twilio_error(400, 21610),
            }],
            ..Faults::default()
        });
        let worker = h.start_worker(h.config()).await;
        // fake-sms, like Twilio, answers 21211 for a number that is not a valid E.164 number.
        let invalid = "+1234".to_owned();
        let invalid_event = h.event(&invalid, Duration::from_secs(300));
        h.publish(&invalid_event).await;
        let dead = h.wait_for_dead_letters(1).await;
        h.publish(&h.event(&unsubscribed, Duration::from_secs(300)))
            .await;
        let dead_after = h.wait_for_dead_letters(2).await;

        assert_eq!(h.fake.requests(Some(&invalid)).len(), 1, "exactly one call");
        assert_eq!(
            h.fake.requests(Some(&unsubscribed)).len(),
            1,
            "exactly one call"
        );
        assert!(h.fake.messages(None).is_empty());

        let (properties, body) = &dead[0];
        assert_eq!(
            header_str(properties, "x-error-kind").as_deref(),
            Some("permanent")
        );
        assert_eq!(header_int(properties, "x-provider-status"), Some(400));
        assert_eq!(header_int(properties, "x-provider-code"), Some(21211));
        assert_eq!(header_int(properties, "x-attempts"), Some(1));
        assert_eq!(
            header_str(properties, "x-request-id"),
            Some(invalid_event.request_id.clone())
        );
        let failed_at = header_str(properties, "x-failed-at").unwrap();
        OffsetDateTime::parse(&failed_at, &time::format_description::well_known::Rfc3339).unwrap();
        let error = header_str(properties, "x-error").unwrap();
        assert!(
            error.contains("21211") || error.contains("Invalid"),
            "{error}"
        );
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.expiration(),
            &None,
            "a dead letter must not expire with the OTP"
        );
        assert_eq!(
            properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
            Some(invalid_event.event_id.to_string())
        );

        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["otp"], serde_json::Value::Null);
        assert_eq!(json["event_id"], invalid_event.event_id.to_string());
        let code = invalid_event.otp.as_deref().unwrap();
        assert!(
            !String::from_utf8_lossy(body).contains(code),
            "the code never stays readable"
        );

        let unsubscribed_dead = dead_after
            .iter()
            .find(|(p, _)| header_int(p, "x-provider-code") == Some(21610))
            .expect("the 21610 dead letter");
        let error = header_str(&unsubscribed_dead.0, "x-error").unwrap();
        assert!(
            !error.contains(&unsubscribed[1..]),
            "the number is masked: {error}"
        );

        worker.stop().await;
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn dead_letters_after_backoff_when_the_provider_keeps_failing() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            always: Some(InjectedResponse::status(503)),
            ..Faults::default()
        });
        let mut config = h.config();
        config.retry_min_delay = Duration::from_millis(100);
        config.retry_max_delay = Duration::from_secs(10);
        config.retry_max_elapsed = Duration::from_secs(3);
        let worker = h.start_worker(config).await;
        let to = phone();
        let started = Instant::now();
        h.publish(&h.event(&to, Duration::from_secs(300))).await;
        let dead = h.wait_for_dead_letters(1).await;
        let elapsed = started.elapsed();

        let (properties, _) = &dead[0];
        assert_eq!(
            header_str(properties, "x-error-kind").as_deref(),
            Some("retries_exhausted")
        );
        assert_eq!(header_int(properties, "x-provider-status"), Some(503));
        let calls = h.fake.requests(Some(&to)).len();
        assert!(calls >= 3, "{calls} calls");
        assert_eq!(
            header_int(properties, "x-attempts"),
            Some(i64::try_from(calls).unwrap())
        );
        assert!(
            elapsed < Duration::from_secs(6),
            "gave up after {elapsed:?}"
        );

        // Exponential with jitter: each delay is in [d, 2d) and d doubles, so the gaps grow.
        let gaps = gaps(&h.fake, &to);
        assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
        for pair in gaps.windows(2) {
            assert!(pair[1] > pair[0], "gaps grow: {gaps:?}");
        }
        worker.stop().await;
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn dead_letters_expired_and_invalid_events_without_sending() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = h.start_worker(h.config()).await;
        let to = phone();
        // Expired already; published without an expiration, so the worker (not the broker)
        // sees it, as with a message that waited in the queue across a worker outage.
        let mut expired = h.event(&to, Duration::from_secs(300));
        expired.expires_at = OffsetDateTime::now_utc() - time::Duration::seconds(5);
        h.publish_with(&serde_json::to_vec(&expired).unwrap(), properties(&expired))
            .await;
        let dead = h.wait_for_dead_letters(1).await;
        let (props, body) = &dead[0];
        assert_eq!(
            header_str(props, "x-error-kind").as_deref(),
            Some("expired")
        );
        assert_eq!(header_int(props, "x-attempts"), Some(0));
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["otp"], serde_json::Value::Null);

        let garbage = b"{\"version\":1,\"phone_number\":\"+14155550100\",\"otp\":\"654321\"";
        h.publish_with(garbage, BasicProperties::default().with_delivery_mode(2))
            .await;
        let dead = h.wait_for_dead_letters(2).await;
        let (props, body) = dead
            .iter()
            .find(|(p, _)| header_str(p, "x-error-kind").as_deref() == Some("invalid_message"))
            .expect("an invalid_message dead letter");
        assert_eq!(body.as_slice(), garbage.as_slice(), "kept as it came");
        let error = header_str(props, "x-error").unwrap();
        assert!(
            !error.contains("654321") && !error.contains("4155550100"),
            "{error}"
        );

        assert!(h.fake.requests(None).is_empty(), "nothing was sent");
        worker.stop().await;
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// At most one SMS per event

#[tokio::test]
async fn the_same_event_published_twice_gives_one_sms() {
    with_harness(QueueType::Classic, |h| async move {
        // Slow sends, so both copies are in flight at once.
        h.fake.set_faults(Faults {
            latency_ms: 300,
            ..Faults::default()
        });
        let worker = h.start_worker(h.config()).await;
        let to = phone();
        let event = h.event(&to, Duration::from_secs(300));
        h.publish(&event).await;
        h.publish(&event).await;
        h.wait_for_messages(&to, 1).await;
        // A third copy, well after the first was sent.
        wait_until(WAIT, "the first send to be answered", || async {
            h.fake
                .requests(Some(&to))
                .iter()
                .all(|r| r.responded_at.is_some())
        })
        .await;
        h.publish(&event).await;
        // Stop only once the worker has taken the third copy; stopping returns anything it
        // has not acknowledged, which the assertions below would see.
        wait_until(WAIT, "the third copy to be taken", || async {
            h.ready_count(&h.topology.sms_queue()).await == 0
        })
        .await;
        worker.stop().await;

        assert_eq!(
            h.fake.requests(Some(&to)).len(),
            1,
            "one call for three copies"
        );
        assert_eq!(
            h.ready_count(&h.topology.sms_queue()).await,
            0,
            "every copy was acknowledged"
        );
        assert_eq!(h.ready_count(&h.topology.dead_letter_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn twenty_slow_sends_run_concurrently() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            latency_ms: 500,
            ..Faults::default()
        });
        let mut config = h.config();
        config.concurrency = 20;
        let worker = h.start_worker(config).await;
        let numbers: Vec<String> = (0..20).map(|_| phone()).collect();
        let events: Vec<_> = numbers
            .iter()
            .map(|to| h.event(to, Duration::from_secs(300)))
            .collect();

        let started = Instant::now();
        for event in &events {
            h.publish(event).await;
        }
        wait_until(WAIT, "20 answered sends", || async {
            let requests = h.fake.requests(None);
            requests.len() == 20
                && requests
                    .iter()
                    .all(|r| r.status == 201 && r.responded_at.is_some())
        })
        .await;
        let elapsed = started.elapsed();
        // One at a time would take 10 s.
        assert!(elapsed < Duration::from_millis(2_500), "took {elapsed:?}");
        worker.stop().await;
        assert_eq!(h.fake.messages(None).len(), 20);
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Processes: SIGTERM and SIGKILL

fn worker_binary() -> PathBuf {
    tests::binaries::workspace_binary("sms-worker")
}

async fn spawn_worker_process(h: &Harness, extra: &[(&str, &str)]) -> tokio::process::Child {
    let binary = tokio::task::spawn_blocking(worker_binary).await.unwrap();
    let mut command = tokio::process::Command::new(binary);
    command
        .env_clear()
        .envs(h.env())
        .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdin(Stdio::null())
        // The worker logs to stdout; WORKER_TEST_LOGS=1 shows it.
        .stdout(if std::env::var_os("WORKER_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command.spawn().expect("sms-worker starts")
}

#[tokio::test]
async fn sigterm_with_sends_in_flight_loses_nothing() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            latency_ms: 1_500,
            ..Faults::default()
        });
        let numbers: Vec<String> = (0..12).map(|_| phone()).collect();
        for to in &numbers {
            h.publish(&h.event(to, Duration::from_secs(300))).await;
        }
        let mut child = spawn_worker_process(&h, &[("WORKER_CONCURRENCY", "4")]).await;
        wait_until(WAIT, "sends in flight", || async {
            h.fake.requests(None).len() >= 4
        })
        .await;

        let pid = child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("exits in time")
            .unwrap();
        assert_eq!(exit.code(), Some(0), "exit 0 on SIGTERM");

        // The in-flight sends finished and were acknowledged; the rest went back to the queue.
        let sent_before = h.fake.requests(None);
        assert!(
            sent_before.iter().all(|r| r.responded_at.is_some()),
            "in-flight sends finished"
        );
        assert_eq!(
            h.ready_count(&h.topology.sms_queue()).await as usize,
            numbers.len() - sent_before.len(),
            "everything not sent is back in the queue"
        );

        h.fake.set_faults(Faults::default());
        let worker = h.start_worker(h.config()).await;
        for to in &numbers {
            h.wait_for_messages(to, 1).await;
        }
        worker.stop().await;
        for to in &numbers {
            assert_eq!(
                h.fake.messages(Some(to)).len(),
                1,
                "exactly one SMS to {to}"
            );
        }
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
        assert_eq!(h.ready_count(&h.topology.dead_letter_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn a_worker_killed_mid_send_has_its_messages_redelivered() {
    with_harness(QueueType::Classic, |h| async move {
        h.fake.set_faults(Faults {
            latency_ms: 3_000,
            ..Faults::default()
        });
        let numbers: Vec<String> = (0..3).map(|_| phone()).collect();
        for to in &numbers {
            h.publish(&h.event(to, Duration::from_secs(300))).await;
        }
        let mut child = spawn_worker_process(&h, &[]).await;
        wait_until(WAIT, "all three sends in flight", || async {
            h.fake.requests(None).len() == 3
        })
        .await;
        child.kill().await.unwrap();

        h.fake.set_faults(Faults::default());
        let worker = h.start_worker(h.config()).await;
        for to in &numbers {
            // The killed worker's request reached the provider before it died, so, as with
            // Twilio, that SMS may already be on its way; the new worker cannot know and sends
            // again once the dead worker's claim has lapsed (SMS_CLAIM_LEASE_MS): at least once.
            h.wait_for_messages(to, 2).await;
        }
        worker.stop().await;
        assert_eq!(
            h.ready_count(&h.topology.sms_queue()).await,
            0,
            "all acknowledged"
        );
        assert_eq!(h.ready_count(&h.topology.dead_letter_queue()).await, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Operations

#[tokio::test]
async fn dlq_list_shows_entries_and_leaves_them_in_place() {
    with_harness(QueueType::Quorum, |h| async move {
        // A native dead letter: expired in the queue before any worker ran.
        let stale_to = phone();
        let stale = h.event(&stale_to, Duration::from_secs(300));
        h.publish_with(
            &serde_json::to_vec(&stale).unwrap(),
            properties(&stale).with_expiration("1".into()),
        )
        .await;
        h.wait_for_dead_letters(1).await;

        let worker = h.start_worker(h.config()).await;
        let invalid = h.event("+1234", Duration::from_secs(300));
        h.publish(&invalid).await;
        h.wait_for_dead_letters(2).await;
        worker.stop().await;

        let mut common = shared::CommonConfig::local(&h.ns);
        common.queue_type = QueueType::Quorum;
        // More looks than RabbitMQ 4's default quorum delivery limit (20): none may drop an entry.
        for _ in 0..25 {
            let listing = sms_worker::dlq::list(&common, 10).await.unwrap();
            assert_eq!(listing.total, 2);
            assert_eq!(listing.entries.len(), 2);
        }
        let listing = sms_worker::dlq::list(&common, 10).await.unwrap();
        let broker = listing
            .entries
            .iter()
            .find(|e| e.source == "broker")
            .expect("the broker's entry");
        assert_eq!(broker.error_kind, "expired");
        assert_eq!(
            broker.event_id.as_deref(),
            Some(stale.event_id.to_string().as_str())
        );
        assert_eq!(
            broker.phone_number.as_deref(),
            Some(shared::mask_phone(&stale_to).as_str())
        );
        let ours = listing
            .entries
            .iter()
            .find(|e| e.source == "worker")
            .expect("the worker's entry");
        assert_eq!(ours.error_kind, "permanent");
        assert_eq!(ours.provider_code, Some(21211));
        assert_eq!(ours.attempts, Some(1));
        assert_eq!(
            sms_worker::dlq::list(&common, 1)
                .await
                .unwrap()
                .entries
                .len(),
            1,
            "--limit"
        );

        // The binary, as an operator runs it.
        let binary = tokio::task::spawn_blocking(worker_binary).await.unwrap();
        let output = tokio::process::Command::new(&binary)
            .args(["dlq", "list", "--json"])
            .env_clear()
            .envs(h.env())
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{stdout}");
        assert!(
            !stdout.contains(stale.otp.as_deref().unwrap()),
            "no code is shown"
        );
        assert!(!stdout.contains(&stale_to), "numbers are masked");
        let output = tokio::process::Command::new(&binary)
            .args(["dlq", "list"])
            .env_clear()
            .envs(h.env())
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        assert_eq!(String::from_utf8(output.stdout).unwrap().lines().count(), 2);

        assert_eq!(
            h.ready_count(&h.topology.dead_letter_queue()).await,
            2,
            "listing removed nothing"
        );

        let output = tokio::process::Command::new(&binary)
            .args(["dlq", "purge"])
            .env_clear()
            .envs(h.env())
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        assert_eq!(h.ready_count(&h.topology.dead_letter_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn reports_readiness_and_metrics() {
    with_harness(QueueType::Classic, |h| async move {
        let worker = h.start_worker(h.config()).await;
        let base = format!("http://{}", worker.addr);
        let health = h.http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        let to = phone();
        h.publish(&h.event(&to, Duration::from_secs(300))).await;
        h.wait_for_messages(&to, 1).await;
        let metrics = h
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for name in [
            "sms_sends_total{outcome=\"sent\"}",
            "sms_provider_request_duration_seconds_bucket",
            "sms_in_flight",
        ] {
            assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
        }
        worker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn without_redis_nothing_is_sent_blindly() {
    with_harness(QueueType::Classic, |h| async move {
        let mut config = h.config();
        // Nothing listens there.
        config.common.redis_url = "redis://127.0.0.1:1".to_owned().into();
        config.retry_max_elapsed = Duration::from_secs(2);
        let worker = sms_worker::Worker::bind(config).await.unwrap();
        let addr = worker.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async move {
            let _ = stopped.await;
        }));

        let url = format!("http://{addr}/readyz");
        wait_until(WAIT, "readyz to name redis", || async {
            match h.http.get(&url).send().await {
                Ok(response) if response.status() == 503 => {
                    response.text().await.unwrap_or_default().contains("redis")
                }
                _ => false,
            }
        })
        .await;

        let to = phone();
        h.publish(&h.event(&to, Duration::from_secs(300))).await;
        let dead = h.wait_for_dead_letters(1).await;
        assert_eq!(
            header_str(&dead[0].0, "x-error-kind").as_deref(),
            Some("retries_exhausted")
        );
        assert!(header_str(&dead[0].0, "x-error").unwrap().contains("Redis"));
        assert!(
            h.fake.requests(None).is_empty(),
            "no SMS without the duplicate check"
        );

        let _ = stop.send(());
        task.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn keeps_running_through_a_rabbitmq_outage() {
    with_harness(QueueType::Classic, |h| async move {
        // The worker reaches RabbitMQ through a proxy the test can cut, as if the broker died.
        let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap())
            .await
            .unwrap();
        let mut config = h.config();
        config.common.amqp_url =
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port()).into();
        let worker = h.start_worker(config).await;
        let readyz = format!("http://{}/readyz", worker.addr);

        proxy.go_down();
        wait_until(WAIT, "readyz to name rabbitmq", || async {
            match h.http.get(&readyz).send().await {
                Ok(response) if response.status() == 503 => response
                    .text()
                    .await
                    .unwrap_or_default()
                    .contains("rabbitmq"),
                _ => false,
            }
        })
        .await;
        let to = phone();
        h.publish(&h.event(&to, Duration::from_secs(300))).await;

        proxy.come_back();
        // It reconnects, re-declares and consumes again.
        worker.wait_ready(&h.http).await;
        h.wait_for_messages(&to, 1).await;
        worker.stop().await;
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn keeps_running_through_a_redis_outage() {
    with_harness(QueueType::Classic, |h| async move {
        let proxy = TcpProxy::start("127.0.0.1:6379".parse().unwrap())
            .await
            .unwrap();
        let mut config = h.config();
        config.common.redis_url = format!("redis://127.0.0.1:{}", proxy.port()).into();
        config.retry_max_delay = Duration::from_millis(500);
        let worker = h.start_worker(config).await;
        let readyz = format!("http://{}/readyz", worker.addr);

        proxy.go_down();
        wait_until(WAIT, "readyz to name redis", || async {
            match h.http.get(&readyz).send().await {
                Ok(response) if response.status() == 503 => {
                    response.text().await.unwrap_or_default().contains("redis")
                }
                _ => false,
            }
        })
        .await;
        let to = phone();
        h.publish(&h.event(&to, Duration::from_secs(300))).await;
        // An observation window, not synchronisation: nothing may be sent while the duplicate
        // check cannot run.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            h.fake.requests(None).is_empty(),
            "sent without the duplicate check"
        );

        proxy.come_back();
        h.wait_for_messages(&to, 1).await;
        worker.wait_ready(&h.http).await;
        worker.stop().await;
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        assert_eq!(h.ready_count(&h.topology.sms_queue()).await, 0);
        assert_eq!(h.ready_count(&h.topology.dead_letter_queue()).await, 0);
    })
    .await;
}

#[tokio::test]
async fn bad_credentials_are_a_permanent_failure() {
    with_harness(QueueType::Classic, |h| async move {
        let mut config = h.config();
        config.provider = ProviderConfig::Twilio(TwilioConfig {
            auth: TwilioAuth::AuthToken("wrong-token".to_owned().into()),
            ..h.twilio()
        });
        let worker = h.start_worker(config).await;
        let to = phone();
        h.publish(&h.event(&to, Duration::from_secs(300))).await;
        let dead = h.wait_for_dead_letters(1).await;
        assert_eq!(
            header_str(&dead[0].0, "x-error-kind").as_deref(),
            Some("permanent")
        );
        assert_eq!(header_int(&dead[0].0, "x-provider-status"), Some(401));
        assert_eq!(header_int(&dead[0].0, "x-provider-code"), Some(20003));
        assert_eq!(h.fake.requests(Some(&to)).len(), 1);
        worker.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// fake-sms itself, over HTTP

#[tokio::test]
async fn fake_sms_answers_like_twilio() {
    let fake = FakeSms::start(FakeSmsConfig::ephemeral()).await.unwrap();
    let config = fake.config().clone();
    let http = reqwest::Client::new();
    let url = format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        fake.base_url(),
        config.account_sid
    );
    let to = phone();
    let form = [
        ("To", to.as_str()),
        ("From", "+15005550006"),
        ("Body", "<b>hi</b> 123"),
        ("ValidityPeriod", "60"),
    ];

    let response = http.post(&url).form(&form).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["code"], 20003);
    assert_eq!(error["status"], 401);
    assert_eq!(
        error["more_info"],
        "https://www.twilio.com/docs/errors/20003"
    );

    let other_account = format!(
        "{}/2010-04-01/Accounts/AC{}/Messages.json",
        fake.base_url(),
        "1".repeat(32)
    );
    let response = http
        .post(&other_account)
        .basic_auth(&config.account_sid, Some(&config.auth_token))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = http
        .post(format!(
            "{}/2010-04-01/Accounts/nope/Messages.json",
            fake.base_url()
        ))
        .basic_auth(&config.account_sid, Some(&config.auth_token))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    // JSON is not what Twilio reads: the fields are missing.
    let response = http
        .post(&url)
        .basic_auth(&config.account_sid, Some(&config.auth_token))
        .json(&serde_json::json!({"To": to, "From": "+15005550006", "Body": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["code"],
        21604
    );

    let response = http
        .post(&url)
        .basic_auth(&config.account_sid, Some(&config.auth_token))
        .form(&[("To", to.as_str()), ("Body", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["code"],
        21603
    );

    let response = http
        .post(&url)
        .basic_auth(&config.api_key_sid, Some(&config.api_key_secret))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let resource: serde_json::Value = response.json().await.unwrap();
    assert!(resource["sid"].as_str().unwrap().starts_with("SM"));
    assert_eq!(resource["status"], "queued");
    assert_eq!(resource["to"], to);
    assert_eq!(resource["account_sid"], config.account_sid);
    assert_eq!(resource["direction"], "outbound-api");

    let listed: serde_json::Value = http
        .get(format!(
            "{}/messages?to={}",
            fake.base_url(),
            to.replace('+', "%2B")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["body"], "<b>hi</b> 123");
    assert_eq!(listed[0]["validity_period"], 60);

    let inbox = http
        .get(fake.base_url())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(inbox.contains("&lt;b&gt;hi&lt;/b&gt; 123"), "escaped");
    assert!(!inbox.contains("<b>hi</b>"));

    let faults = serde_json::json!({"responses": [{"status": 429, "retry_after_secs": 7}]});
    let response = http
        .post(format!("{}/control/faults", fake.base_url()))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = http
        .post(&url)
        .basic_auth(&config.account_sid, Some(&config.auth_token))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["code"],
        20429
    );

    let response = http
        .delete(format!("{}/messages", fake.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert!(fake.messages(None).is_empty() && fake.requests(None).is_empty());
}
