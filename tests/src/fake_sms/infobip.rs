//! Infobip's SMS API v3 as fake-sms plays it: `POST /auth/1/oauth2/token` (client credentials)
//! and `POST /sms/3/messages` (`Authorization: Bearer <token>` or `App <api key>`), answered in
//! Infobip's shapes: a 200 with the message's status, or `{errorCode, description, action,
//! violations, resources}`.
//!
//! The token endpoint can be made strict, as real token endpoints are, for tests of the
//! worker's shared token (`/control/infobip`): a token lifetime, a rate limit (429 above it),
//! and issuing a new token invalidating the previous one. Every call is recorded, with how many
//! were in flight at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::FakeState;
use super::carrier::Accepted;
use super::store::{RecordedMessage, SmsProvider};

/// How the token endpoint behaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPolicy {
    /// `expires_in` of every token.
    #[serde(default = "default_lifetime")]
    pub lifetime_secs: u64,
    /// Calls above this many in the last second get 429 (`None`: unlimited).
    #[serde(default)]
    pub calls_per_second: Option<u32>,
    /// Issuing a token invalidates every earlier one.
    #[serde(default)]
    pub invalidate_previous: bool,
    /// Each call takes this long (to see overlapping calls).
    #[serde(default)]
    pub latency_ms: u64,
    /// Tokens end in a line break, which no HTTP header can carry (a broken or hostile token
    /// endpoint).
    #[serde(default)]
    pub unsendable: bool,
    /// Tokens are empty strings (a broken token endpoint).
    #[serde(default)]
    pub empty: bool,
}

fn default_lifetime() -> u64 {
    3_600
}

impl Default for TokenPolicy {
    fn default() -> Self {
        Self {
            lifetime_secs: default_lifetime(),
            calls_per_second: None,
            invalidate_previous: false,
            latency_ms: 0,
            unsendable: false,
            empty: false,
        }
    }
}

/// One call to the token endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCall {
    pub status: u16,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Calls in flight when this one arrived, itself included.
    pub concurrent: usize,
}

#[derive(Default)]
pub(super) struct Tokens {
    policy: TokenPolicy,
    valid: Vec<(String, Instant)>,
    calls: Vec<TokenCall>,
    recent: Vec<Instant>,
    in_flight: usize,
}

impl FakeState {
    pub fn set_token_policy(&self, policy: TokenPolicy) {
        self.tokens().policy = policy;
    }

    pub fn token_calls(&self) -> Vec<TokenCall> {
        self.tokens().calls.clone()
    }

    /// Calls to the token endpoint not answered yet.
    pub fn token_calls_in_flight(&self) -> usize {
        self.tokens().in_flight
    }

    /// Forgets every token issued, as an expiry would.
    pub fn expire_tokens(&self) {
        self.tokens().valid.clear();
    }

    fn token_is_valid(&self, token: &str) -> bool {
        let now = Instant::now();
        self.tokens()
            .valid
            .iter()
            .any(|(valid, until)| valid == token && *until > now)
    }
}

pub(super) async fn issue_token(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = if is_form(&headers) {
        serde_urlencoded::from_bytes(&body).unwrap_or_default()
    } else {
        Vec::new()
    };
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let config = &state.config;
    let (concurrent, latency, limited) = {
        let mut tokens = state.tokens();
        let now = Instant::now();
        tokens
            .recent
            .retain(|at| now.duration_since(*at) < Duration::from_secs(1));
        let limited = tokens
            .policy
            .calls_per_second
            .is_some_and(|limit| tokens.recent.len() >= limit as usize);
        tokens.recent.push(now);
        tokens.in_flight += 1;
        (tokens.in_flight, tokens.policy.latency_ms, limited)
    };
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let (status, response) = if limited {
        (
            429,
            legacy_error(429, "TOO_MANY_REQUESTS", "Too many requests"),
        )
    } else if field("grant_type") != Some("client_credentials") {
        (400, legacy_error(400, "BAD_REQUEST", "Bad request"))
    } else if field("client_id") != Some(config.infobip_client_id.as_str())
        || field("client_secret") != Some(config.infobip_client_secret.as_str())
    {
        (
            401,
            legacy_error(401, "UNAUTHORIZED", "Invalid login details"),
        )
    } else {
        let mut tokens = state.tokens();
        let mut token = format!("ibtok-{}", uuid::Uuid::new_v4().simple());
        if tokens.policy.unsendable {
            token.push_str("\r\n");
        }
        if tokens.policy.empty {
            token.clear();
        }
        let lifetime = tokens.policy.lifetime_secs;
        if tokens.policy.invalidate_previous {
            tokens.valid.clear();
        }
        let now = Instant::now();
        tokens.valid.retain(|(_, until)| *until > now);
        tokens
            .valid
            .push((token.clone(), now + Duration::from_secs(lifetime)));
        let answer = json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"});
        (200, axum::Json(answer).into_response())
    };
    let mut tokens = state.tokens();
    tokens.in_flight -= 1;
    tokens.calls.push(TokenCall {
        status,
        at: OffsetDateTime::now_utc(),
        concurrent,
    });
    response
}

pub(super) async fn send_messages(
    State(state): State<Arc<FakeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = OffsetDateTime::now_utc();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let message = &request["messages"][0];
    let to = message["destinations"][0]["to"]
        .as_str()
        .map(|digits| format!("+{}", digits.trim_start_matches('+')));
    let latency = Duration::from_millis(state.latency_ms(SmsProvider::Infobip));
    let (response, status, code) = answer(&state, &headers, message, to.as_deref(), received_at);
    let callback_url = message["webhooks"]["delivery"]["url"].as_str();
    let message_id = message["destinations"][0]["messageId"].as_str();
    if let (200, None, Some(url), Some(id), Some(to)) =
        (status, code, callback_url, message_id, to.as_deref())
    {
        state.play_carrier(Accepted {
            provider: SmsProvider::Infobip,
            message_id: id.to_owned(),
            to: to.to_owned(),
            from: message["sender"].as_str().map(str::to_owned),
            callback_url: url.to_owned(),
        });
    }
    let id = state.record_request(SmsProvider::Infobip, to, status, code, received_at);
    if latency > Duration::ZERO {
        tokio::time::sleep(latency).await;
    }
    state.mark_responded(id);
    let (padding, trickles) = state.answer_padding(SmsProvider::Infobip);
    super::faults::pad_answer(response, padding, trickles).await
}

/// Decides the answer, and records the message when it is accepted.
fn answer(
    state: &FakeState,
    headers: &HeaderMap,
    message: &Value,
    to: Option<&str>,
    received_at: OffsetDateTime,
) -> (Response, u16, Option<i64>) {
    if !authorized(state, headers) {
        let response = api_error(
            401,
            "E401",
            "The request lacks valid authentication credentials for the requested resource.",
            &[],
        );
        return (response, 401, Some(401));
    }
    let Some(to) = to.filter(|to| is_e164(to)) else {
        let response = api_error(
            400,
            "E400",
            "Request cannot be processed.",
            &["messages[0].destinations[0].to"],
        );
        return (response, 400, Some(400));
    };
    let text = message["content"]["text"].as_str().unwrap_or_default();
    let sender = message["sender"].as_str().unwrap_or_default();
    if text.is_empty() || sender.is_empty() {
        let property = if text.is_empty() {
            "messages[0].content.text"
        } else {
            "messages[0].sender"
        };
        let response = api_error(400, "E400", "Request cannot be processed.", &[property]);
        return (response, 400, Some(400));
    }
    let message_id = message["destinations"][0]["messageId"]
        .as_str()
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);

    if let Some(injected) = state.take_injected(SmsProvider::Infobip, to) {
        if injected.status == 200 {
            // A REJECTED status inside a 200, with the status id of the injected code.
            let id = injected.code.unwrap_or(52);
            let response =
                status_answer(&message_id, to, 5, "REJECTED", id, "REJECTED_DESTINATION");
            return (response, 200, Some(id));
        }
        let mut response = api_error(
            injected.status,
            &format!("E{}", injected.status),
            injected.message.as_deref().unwrap_or("Injected error"),
            &[],
        );
        if let Some(secs) = injected.retry_after_secs
            && let Ok(value) = secs.to_string().parse()
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return (response, injected.status, Some(i64::from(injected.status)));
    }
    let duplicate = state
        .messages(Some(to))
        .iter()
        .any(|m| m.provider == SmsProvider::Infobip && m.sid == message_id);
    if duplicate {
        let response = status_answer(
            &message_id,
            to,
            5,
            "REJECTED",
            23,
            "REJECTED_DUPLICATE_MESSAGE_ID",
        );
        return (response, 200, Some(23));
    }
    let validity = &message["options"]["validityPeriod"];
    let validity_secs = validity["amount"].as_u64().map(|amount| {
        match validity["timeUnit"].as_str().unwrap_or("MINUTES") {
            "SECONDS" => amount,
            "HOURS" => amount * 3_600,
            _ => amount * 60,
        }
    });
    state.record_message(RecordedMessage {
        provider: SmsProvider::Infobip,
        sid: message_id.clone(),
        to: to.to_owned(),
        from: Some(sender.to_owned()),
        messaging_service_sid: None,
        body: text.to_owned(),
        validity_period: validity_secs.and_then(|s| u32::try_from(s).ok()),
        callback_url: message["webhooks"]["delivery"]["url"]
            .as_str()
            .map(str::to_owned),
        received_at,
    });
    let response = status_answer(&message_id, to, 1, "PENDING", 26, "PENDING_ACCEPTED");
    (response, 200, None)
}

fn authorized(state: &FakeState, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(key) = value.strip_prefix("App ") {
        return key == state.config.infobip_api_key;
    }
    value
        .strip_prefix("Bearer ")
        .is_some_and(|token| state.token_is_valid(token))
}

fn status_answer(
    message_id: &str,
    to: &str,
    group_id: i64,
    group: &str,
    id: i64,
    name: &str,
) -> Response {
    let answer = json!({
        "bulkId": uuid::Uuid::new_v4().simple().to_string(),
        "messages": [{
            "messageId": message_id,
            "status": {"groupId": group_id, "groupName": group, "id": id, "name": name, "description": name},
            "destination": to.trim_start_matches('+'),
            "details": {"messageCount": 1}
        }]
    });
    (StatusCode::OK, axum::Json(answer)).into_response()
}

fn api_error(status: u16, code: &str, description: &str, properties: &[&str]) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let violations: Vec<Value> = properties
        .iter()
        .map(|p| json!({"property": p, "violation": "invalid value"}))
        .collect();
    let body = json!({
        "errorCode": code,
        "description": description,
        "action": "Check the request.",
        "violations": violations,
        "resources": []
    });
    (status, axum::Json(body)).into_response()
}

fn legacy_error(status: u16, id: &str, text: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"requestError": {"serviceException": {"messageId": id, "text": text}}});
    (status, axum::Json(body)).into_response()
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

fn is_e164(number: &str) -> bool {
    number.strip_prefix('+').is_some_and(|digits| {
        (7..=15).contains(&digits.len())
            && digits.chars().all(|c| c.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

/// `GET|POST /control/infobip`: the token endpoint's policy; `GET /control/infobip/token-calls`.
pub(super) async fn get_policy(State(state): State<Arc<FakeState>>) -> Response {
    axum::Json(state.tokens().policy.clone()).into_response()
}

pub(super) async fn set_policy(
    State(state): State<Arc<FakeState>>,
    axum::Json(policy): axum::Json<TokenPolicy>,
) -> Response {
    state.set_token_policy(policy.clone());
    axum::Json(policy).into_response()
}

pub(super) async fn list_token_calls(State(state): State<Arc<FakeState>>) -> Response {
    axum::Json(state.token_calls()).into_response()
}
