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
use std::time::Duration;

use aws_lc_rs::{digest, hmac};
use redis::RedisResult;
use serde::{Deserialize, Serialize};
use shared::redis_connection::RedisConnection;
use shared::{OtpRequested, PhoneNumber};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use crate::provider::{Accepted, Failure, SendError};
use crate::seal::SealKey;

pub use print::print;

/// A timeline is kept this long after its last line.
pub const KEEP: Duration = Duration::from_secs(24 * 3600);
/// A timeline keeps this many lines at most (about a day of a busy test number).
const LENGTH: isize = 500;
/// Timeline writes left to finish on their own ([`Timelines::append_detached`]), at most this
/// many at once. Each ends within [`WRITE_DEADLINE`], so a sick Redis node would otherwise
/// collect one task (and its lines) per SMS sent while it is sick: at 4,000 a second and three
/// seconds each, twelve thousand. Past the bound a timeline misses its lines, which only a
/// diagnostic loses; the SMS, its ack and its ledger record never wait for them.
const DETACHED_WRITES: u32 = 1_024;
/// How long a timeline write may take, whatever the Redis connection's reconnects and retries
/// add up to (each command is bounded, a reconnect before it is bounded again): a diagnostic
/// must not hold a receipt's answer for longer, and the worker's stop waits for the detached
/// writes with a bound of its own that must exceed this one.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(3);

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

    /// One provider call cut short by the end of a stop's grace period, still without an answer:
    /// the SMS may have gone out through `provider`.
    pub fn cut_short(&mut self, provider: &str) {
        let line = Line::new(self.event_id.clone(), What::Tried).provider(provider);
        self.lines.push(line.status(Failure::Ambiguous.as_str()));
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
    /// A permit per detached write under way; shared by every clone.
    detached: Arc<Semaphore>,
    /// How many permits `detached` was made with.
    detached_capacity: u32,
}

impl Timelines {
    pub fn new(redis: RedisConnection, namespace: &str, seal: Option<Arc<SealKey>>) -> Self {
        Self::with_detached_writes(redis, namespace, seal, DETACHED_WRITES)
    }

    fn with_detached_writes(
        redis: RedisConnection,
        namespace: &str,
        seal: Option<Arc<SealKey>>,
        detached_writes: u32,
    ) -> Self {
        Self {
            redis,
            namespace: namespace.to_owned(),
            id_key: seal.map(|seal| hmac::Key::new(hmac::HMAC_SHA256, seal.bytes())),
            detached: Arc::new(Semaphore::new(detached_writes as usize)),
            detached_capacity: detached_writes,
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
    /// several microseconds per call (BENCHMARKS.md, issue 12). Gives up after
    /// [`WRITE_DEADLINE`].
    pub async fn append(&self, trace_id: &str, lines: &[Line]) -> RedisResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let key = self.key(trace_id);
        let lines: Vec<String> = lines
            .iter()
            .map(|line| serde_json::to_string(line).unwrap_or_default())
            .collect();
        let mut redis = self.redis.clone();
        let mut write = redis::pipe();
        write
            .atomic()
            .rpush(&key, lines)
            .ignore()
            .ltrim(&key, -LENGTH, -1)
            .ignore()
            .pexpire(&key, i64::try_from(millis(KEEP)).unwrap_or(i64::MAX))
            .ignore();
        match tokio::time::timeout(WRITE_DEADLINE, write.query_async::<()>(&mut redis)).await {
            Ok(written) => written,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "the timeline was not written in time",
            ))),
        }
    }

    /// Appends lines on a task of its own, for callers that must not wait on a diagnostic.
    /// Returns `false`, writing nothing, when [`DETACHED_WRITES`] writes are under way already.
    pub fn append_detached(&self, trace_id: String, lines: Vec<Line>) -> bool {
        let Ok(permit) = Arc::clone(&self.detached).try_acquire_owned() else {
            metrics::counter!(crate::metrics::TIMELINE_WRITES_DROPPED).increment(1);
            return false;
        };
        let timelines = self.clone();
        tokio::spawn(
            async move {
                if let Err(e) = timelines.append(&trace_id, &lines).await {
                    tracing::debug!(error = %e, "could not write the number's timeline");
                }
                drop(permit);
            }
            .in_current_span(),
        );
        true
    }

    /// Waits, up to `deadline`, for the detached writes under way to finish, so that a worker
    /// stopping does not cut the last timelines short. Returns whether they all finished.
    pub async fn flush(&self, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, self.detached.acquire_many(self.detached_capacity))
            .await
            .is_ok_and(|permits| permits.is_ok())
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

pub use shared::clock::unix_ms;

pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;
    use shared::redis_connection::RedisTarget;

    use super::*;

    /// A "Redis" that accepts connections and never answers: every write to it hangs until the
    /// client's own timeouts end it.
    async fn silent_redis() -> RedisConnection {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        RedisConnection::new(&RedisTarget::parse(&SecretString::from(url)).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn detached_writes_are_bounded_while_redis_hangs_and_flushed_when_it_answers() {
        let timelines = Timelines::with_detached_writes(silent_redis().await, "ns", None, 2);
        let lines = || vec![Line::new("event", What::Ended)];
        assert!(timelines.append_detached("a".into(), lines()));
        assert!(timelines.append_detached("b".into(), lines()));
        assert!(
            !timelines.append_detached("c".into(), lines()),
            "a third write was started while two hang"
        );
        assert!(
            !timelines.flush(Duration::from_millis(100)).await,
            "flush said done while two writes hang"
        );
        // Each hung write ends with the Redis client's timeout; then there is room again.
        assert!(timelines.flush(Duration::from_secs(15)).await);
        assert!(timelines.append_detached("d".into(), lines()));
    }
}
