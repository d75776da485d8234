//! Fault injection: latency, a queue of next answers (e.g. 503, or 429 with `Retry-After`), an
//! answer for every request, and per-number answers; and `/control/faults`, which reads, sets
//! and clears them over HTTP.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::FakeState;
use super::store::SmsProvider;

/// An answer to inject instead of accepting the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedResponse {
    pub status: u16,
    /// The provider's error code: Twilio's body `code` (defaults by status: 20429, 20500, 20503,
    /// …), or an Infobip status id answered in a 200 `REJECTED` (e.g. 52, invalid destination)
    /// when `status` is 200.
    #[serde(default)]
    pub code: Option<i64>,
    /// The error's text: Twilio's `message`, or Infobip's `description`.
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
    /// Bytes of JSON whitespace sent after every answer's body, a chunk at a time and slowly
    /// (see [`pad_answer`]): a provider whose answer never seems to end.
    #[serde(default)]
    pub answer_padding_bytes: u64,
    /// The padding comes a byte every 100 ms instead: an answer that never seems to end, and
    /// stays short.
    #[serde(default)]
    pub answer_padding_trickles: bool,
}

impl Faults {
    /// Every answer delayed by `latency_ms`, and nothing else.
    pub fn latency(latency_ms: u64) -> Self {
        Self {
            latency_ms,
            ..Self::default()
        }
    }

    /// The answer for a request to `to`, by precedence; a queued one is used up.
    pub(super) fn take_for(&mut self, to: &str) -> Option<InjectedResponse> {
        self.responses
            .pop_front()
            .or_else(|| {
                self.rules
                    .iter()
                    .find(|rule| rule.to == to)
                    .map(|rule| rule.response.clone())
            })
            .or_else(|| self.always.clone())
    }
}

/// How much padding one chunk carries, and how long fake-sms waits before the next: 6.4 MB/s,
/// so an unbounded reader takes many seconds over a padding a bounded one stops early in.
const PADDING_CHUNK: usize = 64 * 1024;
const PADDING_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);
/// A trickle: a byte every 100 ms.
const TRICKLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// `response` with `bytes` of whitespace sent slowly after its body. The body stays valid JSON
/// (whitespace may follow a document), so only a reader that stops early tells the difference.
pub(super) async fn pad_answer(response: Response, bytes: u64, trickles: bool) -> Response {
    if bytes == 0 {
        return response;
    }
    let (chunk_size, pause) = if trickles {
        (1, TRICKLE_PAUSE)
    } else {
        (PADDING_CHUNK, PADDING_PAUSE)
    };
    let (parts, body) = response.into_parts();
    let Ok(head) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let chunk = axum::body::Bytes::from(vec![b' '; chunk_size]);
    let chunks = futures_util::stream::unfold((Some(head), bytes), move |(head, left)| {
        let chunk = chunk.clone();
        async move {
            if let Some(head) = head {
                return Some((Ok::<_, std::io::Error>(head), (None, left)));
            }
            if left == 0 {
                return None;
            }
            tokio::time::sleep(pause).await;
            let size = left.min(chunk_size as u64);
            let next = chunk.slice(..usize::try_from(size).unwrap_or(chunk_size));
            Some((Ok(next), (None, left - size)))
        }
    });
    let mut parts = parts;
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from_stream(chunks))
}

/// `/control/faults` is Twilio's (what fake-sms began with); `/control/faults/{provider}` names
/// the provider.
fn provider_of(path: Option<Path<String>>) -> Result<SmsProvider, StatusCode> {
    match path.as_ref().map(|Path(p)| p.as_str()) {
        None | Some("twilio") => Ok(SmsProvider::Twilio),
        Some("infobip") => Ok(SmsProvider::Infobip),
        Some(_) => Err(StatusCode::NOT_FOUND),
    }
}

pub(super) async fn get_faults(
    State(state): State<Arc<FakeState>>,
    path: Option<Path<String>>,
) -> Response {
    match provider_of(path) {
        Ok(provider) => axum::Json(state.faults_for(provider)).into_response(),
        Err(status) => status.into_response(),
    }
}

pub(super) async fn set_faults(
    State(state): State<Arc<FakeState>>,
    path: Option<Path<String>>,
    axum::Json(faults): axum::Json<Faults>,
) -> Response {
    match provider_of(path) {
        Ok(provider) => {
            state.set_faults_for(provider, faults.clone());
            axum::Json(faults).into_response()
        }
        Err(status) => status.into_response(),
    }
}

pub(super) async fn reset_faults(
    State(state): State<Arc<FakeState>>,
    path: Option<Path<String>>,
) -> StatusCode {
    match provider_of(path) {
        Ok(provider) => {
            state.set_faults_for(provider, Faults::default());
            StatusCode::NO_CONTENT
        }
        Err(status) => status,
    }
}
