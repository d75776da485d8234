//! fake-sms plays the carrier: after a provider endpoint accepted a message that asked for
//! receipts (Twilio's `StatusCallback`, Infobip's `webhooks.delivery.url`), it reports what
//! became of it, as each provider does.
//!
//! - Twilio: form POSTs signed with the account's auth token (`X-Twilio-Signature`, computed
//!   here independently of the worker's check), each with its own `I-Twilio-Idempotency-Token`:
//!   `queued`, `sent`, then `delivered`, or `undelivered`/`failed` with an `ErrorCode`.
//! - Infobip: one JSON delivery report (`{"results": [...]}`) with the final status and error.
//!
//! `/control/carrier` sets how (a [`Carrier`]): the delay between steps, duplicates of every
//! callback, the final status sent before `sent` (reordering), and outcomes by destination
//! prefix and provider. Every callback and the answer it got is listed at
//! `/control/carrier/callbacks`.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::hmac;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;

use super::FakeState;
use super::store::SmsProvider;

/// How the carrier treats accepted messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carrier {
    /// Between the acceptance and the first callback, and between callbacks.
    #[serde(default = "default_delay")]
    pub delay_ms: u64,
    /// Every callback is sent this many more times (with the same idempotency token).
    #[serde(default)]
    pub duplicates: u32,
    /// The final status is sent before the intermediate `sent`.
    #[serde(default)]
    pub reorder: bool,
    /// The first rule whose prefix and provider match decides; else the message is delivered.
    #[serde(default)]
    pub outcomes: Vec<Outcome>,
    /// Send no receipts at all (benchmarks post their own).
    #[serde(default)]
    pub mute: bool,
}

fn default_delay() -> u64 {
    50
}

impl Default for Carrier {
    fn default() -> Self {
        Self {
            delay_ms: default_delay(),
            duplicates: 0,
            reorder: false,
            outcomes: Vec::new(),
            mute: false,
        }
    }
}

/// What happens to messages to numbers starting with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub prefix: String,
    /// Only messages through this provider (`None`: any).
    #[serde(default)]
    pub provider: Option<SmsProvider>,
    /// `delivered`, `undelivered` or `failed`.
    pub status: String,
    /// Twilio's `ErrorCode` (30007…) or Infobip's error id.
    #[serde(default)]
    pub error_code: Option<i64>,
}

impl Outcome {
    pub fn new(prefix: &str, status: &str, error_code: Option<i64>) -> Self {
        Self {
            prefix: prefix.to_owned(),
            provider: None,
            status: status.to_owned(),
            error_code,
        }
    }

    pub fn via(mut self, provider: SmsProvider) -> Self {
        self.provider = Some(provider);
        self
    }
}

/// One callback sent, and how the receiver answered it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SentCallback {
    pub provider: SmsProvider,
    pub message_id: String,
    pub to: String,
    pub status: String,
    /// The receiver's HTTP status; `None` when it could not be reached.
    pub answer: Option<u16>,
    /// When it was sent.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// How long the receiver took to answer.
    pub took_ms: u64,
}

/// An accepted message that asked for receipts.
pub(super) struct Accepted {
    pub provider: SmsProvider,
    pub message_id: String,
    pub to: String,
    pub from: Option<String>,
    pub callback_url: String,
}

/// The `X-Twilio-Signature` Twilio puts on a request to `url` with these form parameters:
/// base64 HMAC-SHA1, keyed with the auth token, of the URL followed by each parameter's name
/// and value, sorted by name.
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted = params.to_vec();
    sorted.sort();
    let mut data = url.to_owned();
    for (name, value) in &sorted {
        data.push_str(name);
        data.push_str(value);
    }
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth_token.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, data.as_bytes()).as_ref())
}

impl FakeState {
    pub fn set_carrier(&self, carrier: Carrier) {
        *self.carrier() = carrier;
    }

    pub fn callbacks_sent(&self) -> Vec<SentCallback> {
        self.callbacks().clone()
    }

    /// Reports what became of `message`, in the background.
    pub(super) fn play_carrier(self: &Arc<Self>, message: Accepted) {
        let state = self.clone();
        tokio::spawn(async move { state.report(message).await });
    }

    async fn report(self: Arc<Self>, message: Accepted) {
        let carrier = self.carrier().clone();
        if carrier.mute {
            return;
        }
        let outcome = carrier
            .outcomes
            .iter()
            .find(|o| {
                message.to.starts_with(&o.prefix)
                    && o.provider.is_none_or(|p| p == message.provider)
            })
            .cloned();
        let (last, code) =
            outcome.map_or(("delivered".to_owned(), None), |o| (o.status, o.error_code));
        let steps: Vec<(&str, Option<i64>)> = match message.provider {
            SmsProvider::Twilio if carrier.reorder => {
                vec![("queued", None), (&last, code), ("sent", None)]
            }
            SmsProvider::Twilio => vec![("queued", None), ("sent", None), (&last, code)],
            SmsProvider::Infobip => vec![(&last, code)],
        };
        let client = reqwest::Client::new();
        for (status, code) in steps {
            tokio::time::sleep(Duration::from_millis(carrier.delay_ms)).await;
            let request = match message.provider {
                SmsProvider::Twilio => self.twilio_callback(&client, &message, status, code),
                SmsProvider::Infobip => infobip_report(&client, &message, status, code),
            };
            for _ in 0..=carrier.duplicates {
                let Some(request) = request.try_clone() else {
                    break;
                };
                let at = OffsetDateTime::now_utc();
                let started = std::time::Instant::now();
                let answer = request.send().await.ok().map(|r| r.status().as_u16());
                self.callbacks().push(SentCallback {
                    provider: message.provider,
                    message_id: message.message_id.clone(),
                    to: message.to.clone(),
                    status: status.to_owned(),
                    answer,
                    at,
                    took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
            }
        }
    }

    fn twilio_callback(
        &self,
        client: &reqwest::Client,
        message: &Accepted,
        status: &str,
        code: Option<i64>,
    ) -> reqwest::RequestBuilder {
        let mut params: Vec<(String, String)> = vec![
            ("AccountSid".into(), self.config.account_sid.clone()),
            ("ApiVersion".into(), "2010-04-01".into()),
            ("From".into(), message.from.clone().unwrap_or_default()),
            ("MessageSid".into(), message.message_id.clone()),
            ("MessageStatus".into(), status.to_owned()),
            ("SmsSid".into(), message.message_id.clone()),
            ("SmsStatus".into(), status.to_owned()),
            ("To".into(), message.to.clone()),
        ];
        if let Some(code) = code {
            params.push(("ErrorCode".into(), code.to_string()));
        }
        let signature = twilio_signature(&self.config.auth_token, &message.callback_url, &params);
        client
            .post(&message.callback_url)
            .header("X-Twilio-Signature", signature)
            .header(
                "I-Twilio-Idempotency-Token",
                uuid::Uuid::new_v4().to_string(),
            )
            .form(&params)
    }
}

/// Infobip's delivery report for one message.
fn infobip_report(
    client: &reqwest::Client,
    message: &Accepted,
    status: &str,
    code: Option<i64>,
) -> reqwest::RequestBuilder {
    let (group_id, group, id, name) = match status {
        "delivered" => (3, "DELIVERED", 5, "DELIVERED_TO_HANDSET"),
        "sent" => (3, "DELIVERED", 2, "DELIVERED_TO_OPERATOR"),
        "failed" => (5, "REJECTED", 6, "REJECTED_NETWORK"),
        _ => (2, "UNDELIVERABLE", 4, "UNDELIVERABLE_NOT_DELIVERED"),
    };
    let error_id = code.unwrap_or(0);
    let now = OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let body = json!({"results": [{
        "bulkId": format!("bulk-{}", message.message_id),
        "messageId": message.message_id,
        "to": message.to.trim_start_matches('+'),
        "sentAt": now,
        "doneAt": now,
        "messageCount": 1,
        "price": {"pricePerMessage": 0.01, "currency": "EUR"},
        "status": {"groupId": group_id, "groupName": group, "id": id, "name": name, "description": name},
        "error": {
            "groupId": i64::from(error_id != 0), "groupName": if error_id == 0 { "OK" } else { "HANDSET_ERRORS" },
            "id": error_id, "name": if error_id == 0 { "NO_ERROR" } else { "ERROR" },
            "description": "", "permanent": error_id != 0
        }
    }]});
    client.post(&message.callback_url).json(&body)
}

/// `GET|POST|DELETE /control/carrier`, `GET /control/carrier/callbacks`.
pub(super) async fn get_carrier(State(state): State<Arc<FakeState>>) -> Response {
    axum::Json(state.carrier().clone()).into_response()
}

pub(super) async fn set_carrier(
    State(state): State<Arc<FakeState>>,
    axum::Json(carrier): axum::Json<Carrier>,
) -> Response {
    state.set_carrier(carrier.clone());
    axum::Json(carrier).into_response()
}

pub(super) async fn reset_carrier(State(state): State<Arc<FakeState>>) -> Response {
    state.set_carrier(Carrier::default());
    axum::Json(Carrier::default()).into_response()
}

pub(super) async fn list_callbacks(State(state): State<Arc<FakeState>>) -> Response {
    axum::Json(state.callbacks_sent()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_twilio() {
        // twilio-python's request validator test vector.
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(
            twilio_signature(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &params
            ),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
    }
}
