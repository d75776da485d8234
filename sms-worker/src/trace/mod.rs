//! Each number's story for `sms-worker trace +14155550100`: per event, when it was requested,
//! every provider call and its answer, the receipts that came back, and any resend. Kept in
//! Redis for a day, under a keyed hash of the number (Redis holds no number in the clear, and
//! never a code: entries hold ids, provider names, statuses and error codes only).
//!
//! The worker collects one delivery's lines in a [`Journal`] and writes them in one call when
//! the delivery ends; receipts and resends add theirs as they happen. [`print`] renders it.

mod print;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{digest, hmac};
use redis::RedisResult;
use serde::{Deserialize, Serialize};
use shared::redis_connection::RedisConnection;
use shared::{OtpRequested, PhoneNumber};

use crate::provider::{Accepted, SendError};
use crate::seal::SealKey;

pub use print::print;

/// A timeline is kept this long after its last line.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);
/// A timeline keeps this many lines at most (about a day of a busy test number).
const LENGTH: isize = 500;

/// What a line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum What {
    /// The api accepted the request (at the event's `requested_at`).
    Requested,
    /// One provider call and its answer.
    Tried,
    /// The delivery ended: sent, sent unconfirmed, dead-lettered, or a copy skipped.
    Ended,
    /// A delivery receipt moved the message's status.
    Receipt,
    /// The code went out again through another provider after a carrier-side failure.
    Resent,
    /// A carrier-side failure that was not resent, and why.
    NotResent,
}

/// One line of a number's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub at_ms: u64,
    pub event_id: String,
    pub what: What,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// `accepted`, a failure kind, a receipt status, or how the delivery ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The provider's HTTP status or error code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Anything else worth reading (why nothing was resent); never a code or a number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Line {
    pub fn new(event_id: impl Into<String>, what: What) -> Self {
        Self {
            at_ms: unix_ms(),
            event_id: event_id.into(),
            what,
            provider: None,
            status: None,
            code: None,
            message_id: None,
            detail: None,
        }
    }

    pub fn provider(mut self, provider: &str) -> Self {
        self.provider = Some(provider.to_owned());
        self
    }

    pub fn status(mut self, status: &str) -> Self {
        self.status = Some(status.to_owned());
        self
    }

    pub fn code(mut self, code: Option<i64>) -> Self {
        self.code = code;
        self
    }

    pub fn message_id(mut self, id: Option<&str>) -> Self {
        self.message_id = id.map(str::to_owned);
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// The lines of one delivery, written together when it ends.
pub struct Journal {
    event_id: String,
    lines: Vec<Line>,
    /// Set by [`Journal::end`]: a delivery ends once.
    ended: bool,
}

impl Journal {
    pub fn new(event: &OtpRequested) -> Self {
        let event_id = event.event_id.to_string();
        let requested_at = u64::try_from(event.requested_at.unix_timestamp_nanos() / 1_000_000)
            .unwrap_or_default();
        let mut requested = Line::new(event_id.clone(), What::Requested);
        requested.at_ms = requested_at;
        Self {
            event_id,
            lines: vec![requested],
            ended: false,
        }
    }

    /// One provider call.
    pub fn tried(&mut self, provider: &str, result: &Result<Accepted, SendError>) {
        let line = Line::new(self.event_id.clone(), What::Tried).provider(provider);
        self.lines.push(match result {
            Ok(accepted) => line
                .status("accepted")
                .message_id(accepted.message_id.as_deref()),
            Err(error) => line
                .status(error.kind.as_str())
                .code(error.code.or(error.status.map(i64::from))),
        });
    }

    /// Records how the delivery ended and hands over the lines to write. Only the first call
    /// gives lines: an SMS that went out ends its journal when the send is recorded, before the
    /// message is acknowledged, and the acknowledgement must not end it a second time.
    pub fn end(&mut self, how: &str, detail: Option<String>) -> Vec<Line> {
        if std::mem::replace(&mut self.ended, true) {
            return Vec::new();
        }
        let mut line = Line::new(self.event_id.clone(), What::Ended).status(how);
        line.detail = detail;
        self.lines.push(line);
        std::mem::take(&mut self.lines)
    }
}

/// The timelines in Redis.
#[derive(Clone)]
pub struct Timelines {
    redis: RedisConnection,
    namespace: String,
    /// `WORKER_SEAL_KEY` as an HMAC key, set up once rather than per timeline id.
    id_key: Option<hmac::Key>,
}

impl Timelines {
    pub fn new(redis: RedisConnection, namespace: &str, seal: Option<Arc<SealKey>>) -> Self {
        Self {
            redis,
            namespace: namespace.to_owned(),
            id_key: seal.map(|seal| hmac::Key::new(hmac::HMAC_SHA256, seal.bytes())),
        }
    }

    /// The timeline's id for a number: keyed by `WORKER_SEAL_KEY` where there is one, so that
    /// the key names in Redis do not give the numbers away.
    pub fn trace_id(&self, phone: &str) -> String {
        let message = format!("trace:{}:{phone}", self.namespace);
        let tag: Vec<u8> = match &self.id_key {
            Some(key) => hmac::sign(key, message.as_bytes()).as_ref().to_vec(),
            None => digest::digest(&digest::SHA256, message.as_bytes())
                .as_ref()
                .to_vec(),
        };
        tag[..16]
            .iter()
            .fold(String::with_capacity(32), |mut id, b| {
                let _ = write!(id, "{b:02x}");
                id
            })
    }

    fn key(&self, trace_id: &str) -> String {
        format!("{}:trace:{{{trace_id}}}", self.namespace)
    }

    /// Appends lines to the timeline `trace_id`, trims it to its newest [`LENGTH`] lines and
    /// keeps it for [`KEEP`]. Three commands on one key in a MULTI/EXEC: all or none, so a line
    /// is never left without its expiry, and cheaper for Redis than a Lua script, which costs
    /// several microseconds per call (BENCHMARKS.md, issue 12).
    pub async fn append(&self, trace_id: &str, lines: &[Line]) -> RedisResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let key = self.key(trace_id);
        let lines: Vec<String> = lines
            .iter()
            .map(|line| serde_json::to_string(line).unwrap_or_default())
            .collect();
        let () = redis::pipe()
            .atomic()
            .rpush(&key, lines)
            .ignore()
            .ltrim(&key, -LENGTH, -1)
            .ignore()
            .pexpire(&key, i64::try_from(millis(KEEP)).unwrap_or(i64::MAX))
            .ignore()
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// A number's timeline, oldest line first.
    pub async fn read(&self, phone: &PhoneNumber) -> RedisResult<Vec<Line>> {
        let lines: Vec<String> = redis::cmd("LRANGE")
            .arg(self.key(&self.trace_id(phone.as_str())))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(lines
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect())
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
