//! What the worker keeps in Redis about sent messages: each message's latest status for a day
//! (a repeat or a late, lower status changes nothing), its destination and body until its OTP
//! expires (sealed under `WORKER_SEAL_KEY`, for a resend), at most one resend per event, (timelines
//! are [`crate::trace`]'s). Every key of one message shares its hash tag.

use std::sync::Arc;

use redis::{RedisResult, Value};
use serde::{Deserialize, Serialize};
use shared::PhoneNumber;
use shared::fraud_guard::{FraudGuard, FraudGuardPolicy, GuardVerdict, GuardZone};
use shared::redis_connection::RedisConnection;
use shared::redis_script::Script;
use uuid::Uuid;

use super::Receipt;
use crate::seal::SealKey;
use crate::trace::{KEEP, millis, unix_ms};

/// KEYS: status hash, sealed body. ARGV: event id, calling code, trace id, sent at (ms), sealed
/// body, body ttl (ms), keep (ms).
const RECORD: &str = r"
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'c', ARGV[2], 'x', ARGV[3], 't', ARGV[4], 'r', 1, 's', 'queued')
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if tonumber(ARGV[6]) > 0 then redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[6]) end
return 1
";

/// KEYS: status hash, sealed body, seen marker. ARGV: rank, status, dedupe token ('' none),
/// keep (ms), '1' when this receipt earns a resend (a carrier-side failure). Returns {0}
/// unknown message, {2} repeat, {3} not newer, {4, …} the same status again while the resend its
/// first copy earned is not settled (`o`, set here, cleared by [`ReceiptStore::settle`]), or {1,
/// event, calling code, trace id, sent at, sealed body or ''} ({4} carries the same fields). A
/// recipient-side failure sets no `o`, so a later carrier-side report of the same status cannot
/// earn a resend it refused. Only a receipt that moves the status leaves a
/// seen marker: one for a message not recorded yet, asked again once the record is there, must
/// not pass for a repeat, and the token is not covered by Twilio's signature, so a replayed
/// callback with made-up tokens must not write a key each. With the rank checked first, a repeat
/// is already a no-op there ({3}); the marker is redundant, and can go in a later release.
const APPLY: &str = r"
local current = redis.call('HMGET', KEYS[1], 'r', 'e', 'c', 'x', 't', 's', 'o')
if not current[1] then return {0} end
if tonumber(ARGV[1]) <= tonumber(current[1]) then
  if ARGV[5] == '1' and current[6] == ARGV[2] and current[7] == '1' then
    return {4, current[2], current[3], current[4], current[5], redis.call('GET', KEYS[2]) or ''}
  end
  return {3}
end
if ARGV[3] ~= '' then
  if not redis.call('SET', KEYS[3], 1, 'NX', 'PX', ARGV[4]) then return {2} end
end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 's', ARGV[2])
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'o', 1) end
local body = redis.call('GET', KEYS[2]) or ''
return {1, current[2], current[3], current[4], current[5], body}
";

/// A sent message as it is sealed: enough to send it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SentMessage {
    pub event_id: Uuid,
    pub to: String,
    pub body: String,
    /// When its OTP expires, Unix ms.
    pub expires_ms: u64,
}

/// What a receipt changed.
#[derive(Debug)]
pub enum Applied {
    /// No message with that id is remembered (not ours, or older than a day).
    Unknown,
    /// The same report again, or a status no newer than the one known.
    Nothing,
    /// The same failure again, as stored by an earlier copy of this receipt: only its resend may
    /// still be owed (that copy's answer was lost to a Redis timeout, or Redis failed it before
    /// the resend), so the provider's retry must not be a plain no-op.
    Again(Recorded),
    /// The status moved forward.
    Changed(Recorded),
}

/// What the worker recorded about a sent message, as a receipt finds it.
#[derive(Debug)]
pub struct Recorded {
    pub event_id: String,
    pub calling_code: Option<u16>,
    pub trace_id: String,
    pub sent_at_ms: u64,
    /// The message, while its OTP is valid.
    pub message: Option<SentMessage>,
}

#[derive(Clone)]
pub struct ReceiptStore {
    redis: RedisConnection,
    namespace: String,
    seal: Option<Arc<SealKey>>,
    record: Script,
    apply: Script,
    fraud_guard: FraudGuard,
}

impl ReceiptStore {
    pub fn new(redis: RedisConnection, namespace: &str, seal: Option<Arc<SealKey>>) -> Self {
        Self {
            redis,
            namespace: namespace.to_owned(),
            seal,
            record: Script::new(RECORD),
            apply: Script::new(APPLY),
            fraud_guard: FraudGuard::new(namespace),
        }
    }

    fn keys(&self, provider: &str, message_id: &str) -> (String, String, String) {
        let base = format!("{}:sent:{{{provider}:{message_id}}}", self.namespace);
        (
            format!("{base}:status"),
            format!("{base}:body"),
            format!("{base}:seen"),
        )
    }

    /// Remembers a message a provider accepted, to match its receipts (and resend it, sealed,
    /// while its OTP is valid).
    pub async fn record_sent(
        &self,
        provider: &str,
        message_id: &str,
        message: &SentMessage,
        calling_code: Option<u16>,
        trace_id: &str,
    ) -> RedisResult<()> {
        let (status, body, _) = self.keys(provider, message_id);
        let now = unix_ms();
        let body_ttl = message.expires_ms.saturating_sub(now);
        let sealed = match &self.seal {
            Some(seal) => seal
                .seal(&body, &serde_json::to_vec(message).unwrap_or_default())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let body_ttl = if sealed.is_empty() { 0 } else { body_ttl };
        let _: i64 = self
            .record
            .key(&status)
            .key(&body)
            .arg(message.event_id.to_string())
            .arg(calling_code.map_or_else(String::new, |c| c.to_string()))
            .arg(trace_id)
            .arg(now)
            .arg(sealed.as_slice())
            .arg(body_ttl)
            .arg(millis(KEEP))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// Applies a receipt: only a newer status changes anything.
    pub async fn apply(&self, receipt: &Receipt) -> RedisResult<Applied> {
        let (status, body, seen) = self.keys(receipt.provider, &receipt.message_id);
        let seen = format!("{seen}:{}", receipt.dedupe.as_deref().unwrap_or(""));
        let reply: Vec<Value> = self
            .apply
            .key(&status)
            .key(&body)
            .key(&seen)
            .arg(receipt.status.rank())
            .arg(receipt.status.as_str())
            .arg(receipt.dedupe.as_deref().unwrap_or(""))
            .arg(millis(KEEP))
            .arg(if receipt.may_owe_a_resend() { "1" } else { "0" })
            .invoke_async(&mut self.redis.clone())
            .await?;
        let text = |i: usize| match reply.get(i) {
            Some(Value::BulkString(bytes)) => bytes.clone(),
            Some(Value::SimpleString(s)) => s.clone().into_bytes(),
            Some(Value::Int(n)) => n.to_string().into_bytes(),
            _ => Vec::new(),
        };
        let recorded = || Recorded {
            event_id: String::from_utf8_lossy(&text(1)).into_owned(),
            calling_code: String::from_utf8_lossy(&text(2)).parse().ok(),
            trace_id: String::from_utf8_lossy(&text(3)).into_owned(),
            sent_at_ms: String::from_utf8_lossy(&text(4)).parse().unwrap_or(0),
            message: self.seal.as_ref().and_then(|seal| {
                let plain = seal.open(&body, &text(5)).ok()?;
                serde_json::from_slice::<SentMessage>(&plain).ok()
            }),
        };
        Ok(match reply.first() {
            Some(Value::Int(1)) => Applied::Changed(recorded()),
            Some(Value::Int(4)) => Applied::Again(recorded()),
            Some(Value::Int(0)) => Applied::Unknown,
            _ => Applied::Nothing,
        })
    }

    /// Marks the resend `receipt` earned as settled (made, or skipped for good): a repeat of the
    /// receipt is then a plain no-op.
    pub async fn settle(&self, receipt: &Receipt) -> RedisResult<()> {
        let (status, _, _) = self.keys(receipt.provider, &receipt.message_id);
        redis::cmd("HDEL")
            .arg(status)
            .arg("o")
            .query_async(&mut self.redis.clone())
            .await
    }

    /// Whether the api still holds the code this event carried, unused and not replaced by a
    /// newer one: only then is a resend worth an SMS.
    pub async fn code_is_current(&self, phone: &PhoneNumber, event_id: &str) -> RedisResult<bool> {
        let field = shared::otp_keys::EVENT_FIELD;
        let (current, pending): (Option<String>, Option<String>) = redis::pipe()
            .hget(
                shared::otp_keys::current_code(&self.namespace, phone),
                field,
            )
            .hget(
                shared::otp_keys::pending_code(&self.namespace, phone),
                field,
            )
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(current.as_deref() == Some(event_id) || pending.as_deref() == Some(event_id))
    }

    /// The fraud-guard settings the apis noted lately (`shared::fraud_guard::SETTINGS_LAST`).
    pub async fn api_fraud_guard_settings(&self) -> RedisResult<Vec<String>> {
        self.fraud_guard
            .announced_settings(self.redis.clone())
            .await
    }

    /// What the fraud guard the api counts its codes in says of one more to `zone`, counting
    /// nothing.
    pub async fn peek_fraud_guard(
        &self,
        policy: &FraudGuardPolicy,
        zone: GuardZone,
    ) -> RedisResult<GuardVerdict> {
        self.fraud_guard
            .peek(self.redis.clone(), policy, zone)
            .await
    }
}
