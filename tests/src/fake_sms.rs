//! `fake-sms`: a stand-in for Twilio's Messages API (`CreateMessage`) for tests, benchmarks and the
//! local stack.
//!
//! - `POST /2010-04-01/Accounts/{AccountSid}/Messages.json` checks what Twilio checks (the account
//!   SID in the path, HTTP basic auth with the auth token or an API key, form fields) and answers
//!   like Twilio: 201 with a message resource, or `{"code", "message", "more_info", "status"}`.
//! - `GET /messages?to=` lists the accepted messages as JSON; `GET /requests?to=` lists every
//!   request with the status it got; `DELETE /messages` forgets both.
//! - `GET /` is an HTML inbox where a developer reads the codes.
//! - `GET|POST|DELETE /control/faults` reads, sets or clears fault injection: latency, a queue
//!   of next responses (e.g. 503, or 429 with `Retry-After`), an answer for every request, and
//!   per-number answers (e.g. Twilio error 21610 for one `To`).
//!
//! Configuration (environment, all optional): `FAKE_SMS_ADDR` (`127.0.0.1:9099`),
//! `FAKE_SMS_ACCOUNT_SID` ([`DEFAULT_ACCOUNT_SID`]), `FAKE_SMS_AUTH_TOKEN`
//! ([`DEFAULT_AUTH_TOKEN`]), `FAKE_SMS_API_KEY_SID` ([`DEFAULT_API_KEY_SID`]),
//! `FAKE_SMS_API_KEY_SECRET` ([`DEFAULT_API_KEY_SECRET`]).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::{ConfigError, Env};
use time::OffsetDateTime;

pub const DEFAULT_ADDR: &str = "127.0.0.1:9099";
/// Test credentials, not secrets: they only open this fake.
pub const DEFAULT_ACCOUNT_SID: &str = "AC00000000000000000000000000fa4e00";
pub const DEFAULT_AUTH_TOKEN: &str = "fake-sms-auth-token";
pub const DEFAULT_API_KEY_SID: &str = "SK00000000000000000000000000fa4e00";
pub const DEFAULT_API_KEY_SECRET: &str = "fake-sms-api-key-secret";

/// Older records are forgotten past this, so a long benchmark does not grow without bound.
const MAX_RECORDS: usize = 100_000;

#[derive(Debug, Clone)]
pub struct FakeSmsConfig {
    pub addr: SocketAddr,
    pub account_sid: String,
    pub auth_token: String,
    pub api_key_sid: String,
    pub api_key_secret: String,
}

impl Default for FakeSmsConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR.parse().expect("a literal address"),
            account_sid: DEFAULT_ACCOUNT_SID.to_owned(),
            auth_token: DEFAULT_AUTH_TOKEN.to_owned(),
            api_key_sid: DEFAULT_API_KEY_SID.to_owned(),
            api_key_secret: DEFAULT_API_KEY_SECRET.to_owned(),
        }
    }
}

impl FakeSmsConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        Ok(Self {
            addr: env.parse("FAKE_SMS_ADDR", defaults.addr)?,
            account_sid: env.string("FAKE_SMS_ACCOUNT_SID", DEFAULT_ACCOUNT_SID),
            auth_token: env.string("FAKE_SMS_AUTH_TOKEN", DEFAULT_AUTH_TOKEN),
            api_key_sid: env.string("FAKE_SMS_API_KEY_SID", DEFAULT_API_KEY_SID),
            api_key_secret: env.string("FAKE_SMS_API_KEY_SECRET", DEFAULT_API_KEY_SECRET),
        })
    }

    /// Port 0 on localhost: what tests use.
    pub fn ephemeral() -> Self {
        Self {
            addr: "127.0.0.1:0".parse().expect("a literal address"),
            ..Self::default()
        }
    }
}

/// An answer to inject instead of accepting the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedResponse {
    pub status: u16,
    /// Twilio error code of the body; defaults by status (20429, 20500, 20503, …).
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub message: Option<String>,
    /// Sent as `Retry-After`.
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
}

impl InjectedResponse {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            code: None,
            message: None,
            retry_after_secs: None,
        }
    }

    pub fn twilio_error(status: u16, code: i64) -> Self {
        Self {
            code: Some(code),
            ..Self::status(status)
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
}

/// An answer for every request to one number (e.g. 21610 for an unsubscribed recipient).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub to: String,
    #[serde(flatten)]
    pub response: InjectedResponse,
}

/// Fault injection. Precedence: the queue of next responses, then a rule for the `To`, then
/// `always`, else the message is accepted. `latency_ms` delays every answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default)]
    pub responses: VecDeque<InjectedResponse>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub always: Option<InjectedResponse>,
}

/// An accepted message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedMessage {
    pub sid: String,
    pub to: String,
    pub from: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub body: String,
    pub validity_period: Option<u32>,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
}

/// Any request to the Messages endpoint, and how it was answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub id: u64,
    pub to: Option<String>,
    pub status: u16,
    pub code: Option<i64>,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    /// When the answer left; `None` while it is delayed, or if the client hung up first.
    #[serde(with = "time::serde::rfc3339::option")]
    pub responded_at: Option<OffsetDateTime>,
}

#[derive(Default)]
struct Inner {
    messages: VecDeque<RecordedMessage>,
    /// Sequence number of `messages[0]`.
    first_message: u64,
    /// Sequence numbers of each number's messages, oldest first: `?to=` look-ups stay cheap
    /// with a full inbox (loadgen polls one per sign-in).
    by_to: HashMap<String, VecDeque<u64>>,
    requests: VecDeque<RecordedRequest>,
    faults: Faults,
    next_id: u64,
}

impl Inner {
    fn record(&mut self, message: RecordedMessage) {
        let seq = self.first_message + self.messages.len() as u64;
        self.by_to
            .entry(message.to.clone())
            .or_default()
            .push_back(seq);
        self.messages.push_back(message);
        if self.messages.len() > MAX_RECORDS
            && let Some(oldest) = self.messages.pop_front()
        {
            self.first_message += 1;
            if let Some(seqs) = self.by_to.get_mut(&oldest.to) {
                seqs.pop_front();
                if seqs.is_empty() {
                    self.by_to.remove(&oldest.to);
                }
            }
        }
    }

    fn messages_to(&self, to: &str) -> Vec<RecordedMessage> {
        let Some(seqs) = self.by_to.get(to) else {
            return Vec::new();
        };
        seqs.iter()
            .filter_map(|seq| self.messages.get((seq - self.first_message) as usize))
            .cloned()
            .collect()
    }
}

/// The fake's state, shared by the HTTP handlers and an in-process [`FakeSms`] handle.
pub struct FakeState {
    config: FakeSmsConfig,
    inner: Mutex<Inner>,
}

impl FakeState {
    pub fn new(config: FakeSmsConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn messages(&self, to: Option<&str>) -> Vec<RecordedMessage> {
        let inner = self.lock();
        match to {
            Some(to) => inner.messages_to(to),
            None => inner.messages.iter().cloned().collect(),
        }
    }

    pub fn requests(&self, to: Option<&str>) -> Vec<RecordedRequest> {
        self.lock()
            .requests
            .iter()
            .filter(|r| to.is_none_or(|to| r.to.as_deref() == Some(to)))
            .cloned()
            .collect()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.first_message += inner.messages.len() as u64;
        inner.messages.clear();
        inner.by_to.clear();
        inner.requests.clear();
    }
}

/// A fake-sms server running in this process (real HTTP on a real port).
pub struct FakeSms {
    addr: SocketAddr,
    state: Arc<FakeState>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeSms {
    pub async fn start(config: FakeSmsConfig) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        let state = FakeState::new(config);
        let app = router(state.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake-sms stopped");
            }
        });
        Ok(Self {
            addr,
            state,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What `TWILIO_BASE_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> &Arc<FakeState> {
        &self.state
    }

    pub fn config(&self) -> &FakeSmsConfig {
        &self.state.config
    }
}

impl std::ops::Deref for FakeSms {
    type Target = FakeState;
    fn deref(&self) -> &FakeState {
        &self.state
    }
}

impl Drop for FakeSms {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub fn router(state: Arc<FakeState>) -> Router {
    Router::new()
        .route("/", get(inbox))
        .route(
            "/2010-04-01/Accounts/{account_sid}/Messages.json",
            axum::routing::post(create_message),
        )
        .route("/messages", get(list_messages).delete(clear))
        .route("/requests", get(list_requests))
        .route(
            "/control/faults",
            get(get_faults).post(set_faults).delete(reset_faults),
        )
        .with_state(state)
}

/// Serves until `shutdown` resolves: what the `fake-sms` binary runs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<FakeState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Deserialize)]
struct ToFilter {
    to: Option<String>,
}

async fn list_messages(
    State(state): State<Arc<FakeState>>,
    Query(filter): Query<ToFilter>,
) -> Response {
    axum::Json(state.messages(filter.to.as_deref())).into_response()
}

async fn list_requests(
    State(state): State<Arc<FakeState>>,
    Query(filter): Query<ToFilter>,
) -> Response {
    axum::Json(state.requests(filter.to.as_deref())).into_response()
}

async fn clear(State(state): State<Arc<FakeState>>) -> StatusCode {
    state.clear();
    StatusCode::NO_CONTENT
}

async fn get_faults(State(state): State<Arc<FakeState>>) -> Response {
    axum::Json(state.faults()).into_response()
}

async fn set_faults(
    State(state): State<Arc<FakeState>>,
    axum::Json(faults): axum::Json<Faults>,
) -> Response {
    state.set_faults(faults.clone());
    axum::Json(faults).into_response()
}

async fn reset_faults(State(state): State<Arc<FakeState>>) -> StatusCode {
    state.set_faults(Faults::default());
    StatusCode::NO_CONTENT
}

/// A Twilio-shaped error answer.
fn twilio_error(status: u16, code: i64, message: &str, retry_after: Option<u64>) -> Response {
    let status_code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status,
    });
    let mut response = (status_code, axum::Json(body)).into_response();
    if let Some(secs) = retry_after
        && let Ok(value) = secs.to_string().parse()
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    if status == 401
        && let Ok(value) = "Basic realm=\"Twilio API\"".parse()
    {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn default_code(status: u16) -> i64 {
    match status {
        401 => 20003,
        404 => 20404,
        429 => 20429,
        503 => 20503,
        s if s >= 500 => 20500,
        _ => 21211,
    }
}

fn default_message(status: u16) -> &'static str {
    match status {
        401 => "Authenticate",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        s if s >= 500 => "Internal Server Error",
        _ => "Injected error",
    }
}

/// The form fields of a CreateMessage request.
#[derive(Default)]
struct Form {
    to: Option<String>,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    body: Option<String>,
    validity_period: Option<String>,
}

fn parse_form(headers: &HeaderMap, body: &[u8]) -> Form {
    // Like Twilio, a body in another encoding is simply a request without fields.
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Form::default();
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let mut form = Form::default();
    for (name, value) in pairs {
        let value = Some(value).filter(|v| !v.is_empty());
        match name.as_str() {
            "To" => form.to = value,
            "From" => form.from = value,
            "MessagingServiceSid" => form.messaging_service_sid = value,
            "Body" => form.body = value,
            "ValidityPeriod" => form.validity_period = value,
            _ => {}
        }
    }
    form
}

fn authorized(config: &FakeSmsConfig, headers: &HeaderMap) -> bool {
    let Some(credentials) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| decode_base64(b64.trim()))
    else {
        return false;
    };
    let Some((user, password)) = credentials.split_once(':') else {
        return false;
    };
    (user == config.account_sid && password == config.auth_token)
        || (user == config.api_key_sid && password == config.api_key_secret)
}

fn decode_base64(input: &str) -> Option<String> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits: u32 = 0;
    let mut count = 0;
    let mut out = Vec::new();
    for byte in input.bytes().filter(|b| *b != b'=') {
        let value = u32::try_from(ALPHABET.iter().position(|c| *c == byte)?).ok()?;
        bits = (bits << 6) | value;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push(u8::try_from((bits >> count) & 0xff).ok()?);
        }
    }
    String::from_utf8(out).ok()
}

fn is_e164(number: &str) -> bool {
    number.strip_prefix('+').is_some_and(|digits| {
        (7..=15).contains(&digits.len())
            && digits.chars().all(|c| c.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

fn is_sid(value: &str, prefix: &str) -> bool {
    value.len() == 34
        && value.starts_with(prefix)
        && value[2..].chars().all(|c| c.is_ascii_hexdigit())
}

async fn create_message(
    State(state): State<Arc<FakeState>>,
    Path(account_sid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&headers, &body);
    let received_at = OffsetDateTime::now_utc();
    let (response, status, code, latency) =
        answer(&state, &account_sid, &headers, &form, received_at);

    let id = {
        let mut inner = state.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.requests.push_back(RecordedRequest {
            id,
            to: form.to.clone(),
            status,
            code,
            received_at,
            responded_at: None,
        });
        if inner.requests.len() > MAX_RECORDS {
            inner.requests.pop_front();
        }
        id
    };
    // The message is accepted (and recorded) before the delay, as with Twilio: a client that
    // gives up waiting does not un-send it.
    if latency > Duration::ZERO {
        tokio::time::sleep(latency).await;
    }
    if let Some(request) = state.lock().requests.iter_mut().rev().find(|r| r.id == id) {
        request.responded_at = Some(OffsetDateTime::now_utc());
    }
    response
}

/// Decides the answer; records an accepted message. Returns the response, its status, the
/// Twilio code of an error, and the delay to apply.
fn answer(
    state: &FakeState,
    account_sid: &str,
    headers: &HeaderMap,
    form: &Form,
    received_at: OffsetDateTime,
) -> (Response, u16, Option<i64>, Duration) {
    let config = &state.config;
    let latency = Duration::from_millis(state.lock().faults.latency_ms);
    let error = |status: u16, code: i64, message: &str| {
        (
            twilio_error(status, code, message, None),
            status,
            Some(code),
            latency,
        )
    };

    if !is_sid(account_sid, "AC") {
        let message = format!(
            "The requested resource /2010-04-01/Accounts/{account_sid}/Messages.json was not found"
        );
        return error(404, 20404, &message);
    }
    if !authorized(config, headers) || account_sid != config.account_sid {
        return error(401, 20003, "Authenticate");
    }

    let Some(to) = form.to.clone() else {
        return error(400, 21604, "A 'To' phone number is required.");
    };
    if !is_e164(&to) {
        return error(400, 21211, &format!("Invalid 'To' Phone Number: {to}"));
    }
    if form.from.is_none() && form.messaging_service_sid.is_none() {
        return error(400, 21603, "A 'From' phone number is required.");
    }
    if let Some(sid) = &form.messaging_service_sid
        && !is_sid(sid, "MG")
    {
        return error(
            400,
            21701,
            &format!("The Messaging Service Sid {sid} is invalid."),
        );
    }
    let Some(body) = form.body.clone() else {
        return error(400, 21602, "Message body is required.");
    };
    if body.chars().count() > 1_600 {
        return error(
            400,
            21617,
            "The concatenated message body exceeds the 1600 character limit.",
        );
    }
    let validity_period = match &form.validity_period {
        None => None,
        Some(value) => match value.parse::<u32>() {
            Ok(v) if (1..=36_000).contains(&v) => Some(v),
            _ => {
                return error(
                    400,
                    21620,
                    "ValidityPeriod must be an integer from 1 to 36000.",
                );
            }
        },
    };

    let injected = {
        let mut inner = state.lock();
        let faults = &mut inner.faults;
        faults
            .responses
            .pop_front()
            .or_else(|| {
                faults
                    .rules
                    .iter()
                    .find(|rule| rule.to == to)
                    .map(|rule| rule.response.clone())
            })
            .or_else(|| faults.always.clone())
    };
    if let Some(injected) = injected {
        let code = injected
            .code
            .unwrap_or_else(|| default_code(injected.status));
        let message = injected
            .message
            .clone()
            .unwrap_or_else(|| default_message(injected.status).to_owned());
        return (
            twilio_error(injected.status, code, &message, injected.retry_after_secs),
            injected.status,
            Some(code),
            latency,
        );
    }

    let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
    let message = RecordedMessage {
        sid: sid.clone(),
        to: to.clone(),
        from: form.from.clone(),
        messaging_service_sid: form.messaging_service_sid.clone(),
        body: body.clone(),
        validity_period,
        received_at,
    };
    {
        state.lock().record(message);
    }
    let date = received_at
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let uri = format!("/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json");
    let resource = json!({
        "account_sid": account_sid,
        "api_version": "2010-04-01",
        "body": body,
        "date_created": date,
        "date_sent": null,
        "date_updated": date,
        "direction": "outbound-api",
        "error_code": null,
        "error_message": null,
        "from": form.from,
        "messaging_service_sid": form.messaging_service_sid,
        "num_media": "0",
        "num_segments": segments(&body).to_string(),
        "price": null,
        "price_unit": "USD",
        "sid": sid,
        // With a Messaging Service, Twilio first answers "accepted" and picks a sender later.
        "status": if form.messaging_service_sid.is_some() { "accepted" } else { "queued" },
        "subresource_uris": {"media": format!("/2010-04-01/Accounts/{account_sid}/Messages/{sid}/Media.json")},
        "to": to,
        "uri": uri,
    });
    (
        (StatusCode::CREATED, axum::Json(resource)).into_response(),
        201,
        None,
        latency,
    )
}

/// GSM-7 fits 160 characters in one SMS (153 per part when split); anything else is UCS-2
/// (70, 67 per part). Close enough for a fake.
fn segments(body: &str) -> usize {
    let chars = body.chars().count();
    let (single, part) = if body.is_ascii() {
        (160, 153)
    } else {
        (70, 67)
    };
    if chars <= single {
        1
    } else {
        chars.div_ceil(part)
    }
}

async fn inbox(
    State(state): State<Arc<FakeState>>,
    Query(filter): Query<ToFilter>,
) -> Html<String> {
    let messages = state.messages(filter.to.as_deref());
    let mut rows = String::new();
    for message in messages.iter().rev().take(200) {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td><td>{}</td></tr>\n",
            escape(
                &message
                    .received_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
            escape(&message.to),
            escape(
                message
                    .from
                    .as_deref()
                    .or(message.messaging_service_sid.as_deref())
                    .unwrap_or("")
            ),
            escape(&message.body),
            message
                .validity_period
                .map(|v| format!("{v} s"))
                .unwrap_or_default(),
        ));
    }
    let filter_note = filter
        .to
        .as_deref()
        .map(|to| format!(" to {}", escape(to)))
        .unwrap_or_default();
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="3">
<title>fake-sms inbox</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ddd;padding:.4em;text-align:left;vertical-align:top}}pre{{margin:0;white-space:pre-wrap}}</style>
</head><body>
<h1>fake-sms inbox</h1>
<p>{count} message(s){filter_note}, newest first; refreshes every 3 seconds. Filter with <code>?to=+14155550100</code>. JSON: <a href="/messages">/messages</a>.</p>
<table><thead><tr><th>received</th><th>to</th><th>from</th><th>body</th><th>validity</th></tr></thead>
<tbody>
{rows}</tbody></table>
</body></html>
"#,
        count = messages.len(),
    ))
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_basic_auth() {
        // "user:pass"
        assert_eq!(decode_base64("dXNlcjpwYXNz").as_deref(), Some("user:pass"));
        assert_eq!(decode_base64("!!"), None);
    }

    #[test]
    fn escapes_html() {
        assert_eq!(escape("<script>&\"'"), "&lt;script&gt;&amp;&quot;&#39;");
    }

    #[test]
    fn checks_numbers_and_sids() {
        assert!(is_e164("+14155550100"));
        assert!(!is_e164("14155550100"));
        assert!(!is_e164("+1415"));
        assert!(is_sid(DEFAULT_ACCOUNT_SID, "AC"));
        assert!(is_sid(DEFAULT_API_KEY_SID, "SK"));
        assert_eq!(segments("hi"), 1);
        assert_eq!(segments(&"a".repeat(161)), 2);
    }

    #[test]
    fn the_inbox_index_follows_eviction() {
        let mut inner = Inner::default();
        let message = |to: &str, n: usize| RecordedMessage {
            sid: format!("SM{n}"),
            to: to.to_owned(),
            from: None,
            messaging_service_sid: None,
            body: format!("message {n}"),
            validity_period: None,
            received_at: OffsetDateTime::UNIX_EPOCH,
        };
        inner.record(message("+1", 0));
        for n in 1..MAX_RECORDS + 2 {
            inner.record(message("+2", n));
        }
        inner.record(message("+1", MAX_RECORDS + 2));
        // Three over the limit: "+1"'s first message and "+2"'s first two were evicted.
        let ones = inner.messages_to("+1");
        assert_eq!(ones.len(), 1);
        assert_eq!(ones[0].sid, format!("SM{}", MAX_RECORDS + 2));
        let twos = inner.messages_to("+2");
        assert_eq!(twos.len(), MAX_RECORDS - 1);
        assert_eq!(twos[0].sid, "SM3");
        assert!(inner.messages_to("+3").is_empty());
    }
}
