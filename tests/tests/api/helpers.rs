//! `spawn_app`: the api in-process on port 0, with a fresh database and namespace, a reader of
//! the events it publishes, and captured logs.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use api::{ApiConfig, Application};
use axum::Router;
use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, Consumer};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::{Env, OtpRequested};
use tests::cleanup::unique;
use tests::servers::servers;
use tests::wait::eventually;
use tokio::sync::oneshot;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub const PHONE: &str = "+14155550100";

/// Every log line of every app in this test binary, to check what never may be logged.
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = CapturedLogs(buffer.clone());
        // The programs' own filter too, so that what it keeps out of logs stays out here.
        let _ = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new(
                "info,api=trace,shared=trace,tower_http=debug",
            ))
            .with(tracing_subscriber::filter::filter_fn(
                shared::telemetry::log_allowed,
            ))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone()),
            )
            .try_init();
        buffer
    });
}

pub fn captured_logs() -> String {
    let logs = LOGS.get().expect("logs are captured");
    String::from_utf8_lossy(&logs.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub namespace: String,
    pub database: String,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    events: tokio::sync::Mutex<Option<(Connection, Consumer)>>,
}

pub struct Spawn {
    pub vars: Vec<(String, String)>,
    pub extra_routes: Option<Router<api::AppState>>,
    /// Wait for /readyz before returning (off when a dependency is meant to be down).
    pub wait_ready: bool,
}

impl Default for Spawn {
    fn default() -> Self {
        Self {
            vars: Vec::new(),
            extra_routes: None,
            wait_ready: true,
        }
    }
}

impl Spawn {
    pub fn var(mut self, name: &str, value: impl ToString) -> Self {
        self.vars.push((name.to_owned(), value.to_string()));
        self
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_with(Spawn::default()).await
}

pub async fn spawn_with(spawn: Spawn) -> TestApp {
    capture_logs();
    let servers = servers().require_all();
    let namespace = unique("t");
    let database = unique("otp_test");
    let mut vars = servers.env();
    vars.extend([
        ("NAMESPACE".to_owned(), namespace.clone()),
        ("DATABASE_URL".to_owned(), servers.database_url(&database)),
        ("API_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        // Classic queues: one Raft group per test would only slow the suite down.
        ("AMQP_QUEUE_TYPE".to_owned(), "classic".to_owned()),
        (
            "OTP_SECRET".to_owned(),
            "test-secret-0123456789abcdef".to_owned(),
        ),
    ]);
    vars.extend(spawn.vars);
    let config = ApiConfig::from_env(&Env::from_pairs(vars)).expect("test config is valid");
    let mut app = Application::build(config).await.expect("app builds");
    if let Some(extra) = spawn.extra_routes {
        app = app.with_extra_routes(extra);
    }
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let test_app = TestApp {
        addr,
        namespace,
        database,
        client: reqwest::Client::new(),
        stop: Some(stop),
        server: Some(server),
        events: tokio::sync::Mutex::new(None),
    };
    if spawn.wait_ready {
        test_app.wait_until_ready().await;
    }
    test_app
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an RFC 9457 problem with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.body
        );
        assert_eq!(self.body["code"], code, "{}", self.body);
        assert_eq!(self.body["status"], status, "{}", self.body);
        assert!(self.body["type"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(self.body["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(self.body["detail"].as_str().is_some());
        let request_id = self
            .header("x-request-id")
            .expect("every response has a request id");
        assert_eq!(self.body["request_id"], request_id);
    }
}

/// A code and its handle, as the client that requested it has them.
pub struct Sent {
    pub code: String,
    pub challenge_id: String,
}

/// The `challenge_id` of a 202: 26 base32 characters.
pub fn challenge_of(reply: &Reply) -> String {
    let id = reply.body["challenge_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a challenge_id in {}", reply.body));
    assert_eq!(id.len(), 26, "{id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)),
        "{id}"
    );
    id.to_owned()
}

/// The `n`-th wrong guess for `code`: same length, never `code`, a different one for each `n`.
pub fn wrong_code(code: &str, n: u64) -> String {
    let width = code.len();
    let modulus = 10u64.pow(width as u32);
    let right: u64 = code.parse().expect("a code is digits");
    format!("{:0width$}", (right + 1 + n) % modulus)
}

/// The value of one series in Prometheus text, e.g. `name{label="x"}`, or 0 when absent.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Verifies [`PHONE`] with `code` until it signs in, as a new user, waiting for `what`.
pub async fn signs_in_a_new_user_within_15_s(app: &TestApp, code: &str, what: &str) {
    let session = eventually(Duration::from_secs(15), what, || async {
        let reply = app.verify(PHONE, code).await;
        (reply.status == StatusCode::OK).then_some(reply)
    })
    .await;
    assert_eq!(session.body["new_user"], true);
}

/// How many of `replies` have `status`.
pub fn count(replies: &[Reply], status: StatusCode) -> usize {
    replies.iter().filter(|r| r.status == status).count()
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("the api answers");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(self.client.post(self.url(path)).json(&body))
            .await
    }

    /// POSTs `body` as it is, labelled JSON: for bodies that are not (or not quite) JSON.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Reply {
        self.send(
            self.client
                .post(self.url(path))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.client.get(self.url(path))).await
    }

    pub async fn get_authed(&self, path: &str, token: &str) -> Reply {
        self.send(self.client.get(self.url(path)).bearer_auth(token))
            .await
    }

    pub async fn request_otp(&self, phone: &str) -> Reply {
        self.post("/v1/otp", json!({ "phone_number": phone })).await
    }

    pub async fn verify(&self, phone: &str, otp: &str) -> Reply {
        self.post(
            "/v1/otp/verify",
            json!({ "phone_number": phone, "otp": otp }),
        )
        .await
    }

    /// Requests a code: the code (read from its event) and the `challenge_id` of the 202.
    pub async fn code_and_challenge(&self, phone: &str) -> Sent {
        let reply = self.request_otp(phone).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
        let challenge_id = challenge_of(&reply);
        let (event, _) = self.next_delivery(phone).await;
        Sent {
            code: event.otp.expect("the event carries the code"),
            challenge_id,
        }
    }

    /// A guess that carries a `challenge_id` (a bound guess).
    pub async fn verify_bound(&self, phone: &str, otp: &str, challenge_id: &str) -> Reply {
        self.post(
            "/v1/otp/verify",
            json!({ "phone_number": phone, "otp": otp, "challenge_id": challenge_id }),
        )
        .await
    }

    /// POSTs `body` as if through a proxy that put `forwarded_for` in `X-Forwarded-For`.
    pub async fn post_forwarded(&self, path: &str, forwarded_for: &str, body: Value) -> Reply {
        self.send(
            self.client
                .post(self.url(path))
                .header("x-forwarded-for", forwarded_for)
                .json(&body),
        )
        .await
    }

    /// The `/metrics` text. Every app of this test binary shares one recorder.
    pub async fn metrics(&self) -> String {
        let reply = self.get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.body.as_str().expect("metrics are text").to_owned()
    }

    pub async fn wait_until_ready(&self) {
        eventually(Duration::from_secs(30), "/readyz", || async {
            let reply = self.client.get(self.url("/readyz")).send().await;
            reply.is_ok_and(|r| r.status() == StatusCode::OK)
        })
        .await;
    }

    async fn consumer(&self) -> tokio::sync::MutexGuard<'_, Option<(Connection, Consumer)>> {
        let mut events = self.events.lock().await;
        if events.is_none() {
            let connection =
                Connection::connect(servers().rabbitmq.url(), ConnectionProperties::default())
                    .await
                    .expect("amqp");
            let channel = connection.create_channel().await.expect("channel");
            // The api declared the topology when it became ready.
            let consumer = channel
                .basic_consume(
                    format!("{}.sms", self.namespace).into(),
                    "test-reader".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("consume the sms queue");
            *events = Some((connection, consumer));
        }
        events
    }

    /// The next published event, whoever it is for.
    pub async fn next_delivery_any(&self) -> (OtpRequested, lapin::message::Delivery) {
        let mut guard = self.consumer().await;
        let (_, consumer) = guard.as_mut().expect("consumer");
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("an event within 10 s")
            .expect("stream open")
            .expect("delivery");
        let event = serde_json::from_slice(&delivery.data).expect("a valid event");
        (event, delivery)
    }

    /// The next published event for `phone`, with its AMQP delivery.
    pub async fn next_delivery(&self, phone: &str) -> (OtpRequested, lapin::message::Delivery) {
        let mut guard = self.consumer().await;
        let (_, consumer) = guard.as_mut().expect("consumer");
        let deadline = Duration::from_secs(10);
        loop {
            let delivery = tokio::time::timeout(deadline, consumer.next())
                .await
                .expect("an event within 10 s")
                .expect("stream open")
                .expect("delivery");
            let event: OtpRequested =
                serde_json::from_slice(&delivery.data).expect("a valid event");
            if event.phone_number.as_str() == phone {
                return (event, delivery);
            }
        }
    }

    /// Requests an OTP and returns the code, read from the published event.
    pub async fn code_for(&self, phone: &str) -> String {
        let reply = self.request_otp(phone).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
        let (event, _) = self.next_delivery(phone).await;
        event.otp.expect("the event carries the code")
    }

    /// Signs `phone` in and returns the session body.
    pub async fn sign_in(&self, phone: &str) -> Value {
        let code = self.code_for(phone).await;
        let reply = self.verify(phone, &code).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        reply.body
    }

    /// Signs `phone` in once more, skipping the resend gap by deleting its key.
    pub async fn sign_in_again(&self, phone: &str) -> Value {
        let mut redis = self.redis().await;
        let key = format!("{}:otp:{{{phone}}}:resend", self.namespace);
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut redis)
            .await
            .expect("the resend gap is deleted");
        self.sign_in(phone).await
    }

    pub async fn db(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&servers().database_url(&self.database))
            .await
            .expect("test database")
    }

    /// What the sliding-window limit `{ns}:limit:<key>` counts in its current window (`c` of its
    /// hash), or `None` before it counted anything.
    pub async fn limit_count(&self, key: &str) -> Option<u32> {
        redis::cmd("HGET")
            .arg(format!("{}:limit:{key}", self.namespace))
            .arg("c")
            .query_async(&mut self.redis().await)
            .await
            .expect("HGET")
    }

    /// The key, under `{ns}:limit:`, of the only session's daily refresh count.
    pub async fn refresh_day(&self) -> String {
        refresh_day_in(&self.db().await).await
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(servers().redis.url())
            .expect("a Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server exits cleanly");
        }
    }
}

impl Drop for TestApp {
    // Leaves nothing behind: the test's queues, exchanges, Redis keys and database.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tests::cleanup::remove_now(&self.namespace, Some(&self.database));
    }
}

/// The daily refresh count's key (for [`TestApp::limit_count`]) of the one session in `db`.
pub async fn refresh_day_in(db: &sqlx::PgPool) -> String {
    let session_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM sessions")
        .fetch_one(db)
        .await
        .expect("the one session");
    format!("session:{{{session_id}}}:refreshes")
}
