//! One-time passwords: generated from the OS CSPRNG, kept in Redis only as an HMAC, checked and
//! rate limited by Lua scripts so each request is one atomic round trip, across replicas too.

use std::net::IpAddr;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use rand::rand_core::UnwrapErr;
use rand::rngs::SysRng;
use redis::Script;
use redis::aio::ConnectionManager;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use shared::PhoneNumber;
use uuid::Uuid;

use crate::config::OtpPolicy;

/// A fresh code of `length` digits, uniform over all of them (`random_range` has no modulo bias).
pub fn generate_code(length: u32) -> String {
    let upper = 10u64.pow(length);
    let n = UnwrapErr(SysRng).random_range(0..upper);
    format!("{n:0width$}", width = length as usize)
}

/// Whether `otp` is exactly `length` ASCII digits.
pub fn is_well_formed(otp: &str, length: u32) -> bool {
    otp.len() == length as usize && otp.bytes().all(|b| b.is_ascii_digit())
}

/// HMAC-SHA256 keyed by `OTP_SECRET`. The phone number is part of the message, so one code's
/// digest says nothing about another phone's.
#[derive(Clone)]
pub struct OtpHasher {
    key: SecretString,
}

impl OtpHasher {
    pub fn new(key: SecretString) -> Self {
        Self { key }
    }

    pub fn digest(&self, phone: &PhoneNumber, code: &str) -> CodeDigest {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(self.key.expose_secret().as_bytes())
                .expect("HMAC accepts keys of any length");
        mac.update(phone.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(code.as_bytes());
        let bytes = mac.finalize().into_bytes();
        CodeDigest(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// What Redis keeps of a code: its HMAC, in hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeDigest(String);

/// The Redis keys of one phone. `{…}` is a Redis Cluster hash tag: all of a phone's keys live in
/// one slot, so the scripts stay atomic on a cluster. The per-IP window is the one key outside it.
#[derive(Debug, Clone)]
struct PhoneKeys {
    code: String,
    resend: String,
    window: String,
    ip_window: String,
}

impl PhoneKeys {
    fn new(namespace: &str, phone: &PhoneNumber, ip: &str) -> Self {
        let phone = phone.as_str();
        Self {
            code: format!("{namespace}:otp:{{{phone}}}:code"),
            resend: format!("{namespace}:otp:{{{phone}}}:resend"),
            window: format!("{namespace}:otp:{{{phone}}}:sent"),
            ip_window: format!("{namespace}:otp:ip:{{{ip}}}:sent"),
        }
    }
}

const HOUR_MS: u64 = 3_600_000;

/// Checks the resend gap and both rolling-hour windows, then stores the new code. Refused
/// requests change nothing, so they do not count toward any limit.
/// Returns {1, 0} when stored, {0, retry_after_ms} when refused.
const ISSUE_SCRIPT: &str = r"
-- Redis's clock, not the caller's: every api replica then agrees on the windows.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local digest, ttl, gap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local phone_limit, ip_limit, id, window = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local wait = redis.call('PTTL', KEYS[2])
if wait > 0 then return {0, wait} end
local function full(key, limit)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return math.max(tonumber(oldest[2]) + window - now, 1)
  end
  return 0
end
wait = full(KEYS[3], phone_limit)
if wait > 0 then return {0, wait} end
wait = full(KEYS[4], ip_limit)
if wait > 0 then return {0, wait} end
redis.call('ZADD', KEYS[3], now, id)
redis.call('PEXPIRE', KEYS[3], window)
redis.call('ZADD', KEYS[4], now, id)
redis.call('PEXPIRE', KEYS[4], window)
if gap > 0 then redis.call('SET', KEYS[2], id, 'PX', gap) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'h', digest, 'a', 0, 'e', id)
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, 0}
";

/// Undoes ISSUE_SCRIPT for a request whose event the broker did not confirm: the code must not
/// stay valid, and a request that failed should not count toward the limits.
const WITHDRAW_SCRIPT: &str = r"
local id = ARGV[1]
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[4], id)
if redis.call('GET', KEYS[2]) == id then redis.call('DEL', KEYS[2]) end
if redis.call('HGET', KEYS[1], 'e') == id then redis.call('DEL', KEYS[1]) end
return 1
";

/// Checks a guess. The digest comparison runs over every byte without an early exit, so its
/// time does not depend on how much of the guess matched.
/// Returns {0} wrong/absent, {1, pttl, attempts, id} right (the code is consumed), {2} burned.
const CHECK_SCRIPT: &str = r"
local state = redis.call('HMGET', KEYS[1], 'h', 'a', 'e')
if not state[1] then return {0} end
local attempts, max = tonumber(state[2]), tonumber(ARGV[2])
if attempts >= max then return {2} end
local stored, given = state[1], ARGV[1]
local diff = 0
if #stored ~= #given then diff = 1 end
for i = 1, #stored do
  diff = bit.bor(diff, bit.bxor(string.byte(stored, i), string.byte(given, i) or 0))
end
if diff == 0 then
  local pttl = redis.call('PTTL', KEYS[1])
  redis.call('DEL', KEYS[1])
  return {1, pttl, attempts, state[3]}
end
redis.call('HINCRBY', KEYS[1], 'a', 1)
return {0}
";

/// Puts a consumed code back when the session could not be stored, unless a newer one exists.
const RESTORE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'h', ARGV[1], 'a', ARGV[2], 'e', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueOutcome {
    Stored,
    Refused { retry_after: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The code was right and is now consumed. `Consumed` lets it be put back.
    Accepted(Consumed),
    Rejected,
    Burned,
}

/// What a right guess removed, to restore it if the session cannot be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    digest: CodeDigest,
    attempts: u32,
    event_id: String,
    ttl_left_ms: i64,
}

/// One code being issued: for whom, on whose behalf, its digest and the event that carries it.
pub struct Issue<'a> {
    pub phone: &'a PhoneNumber,
    pub client_ip: IpAddr,
    pub digest: CodeDigest,
    pub event_id: Uuid,
}

pub struct OtpStore {
    namespace: String,
    issue: Script,
    withdraw: Script,
    check: Script,
    restore: Script,
}

impl OtpStore {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            issue: Script::new(ISSUE_SCRIPT),
            withdraw: Script::new(WITHDRAW_SCRIPT),
            check: Script::new(CHECK_SCRIPT),
            restore: Script::new(RESTORE_SCRIPT),
        }
    }

    fn keys(&self, phone: &PhoneNumber, ip: Option<IpAddr>) -> PhoneKeys {
        let ip = ip.map(|ip| ip.to_string()).unwrap_or_default();
        PhoneKeys::new(&self.namespace, phone, &ip)
    }

    /// Stores a new code for `issue.phone`, unless a limit refuses it.
    pub async fn issue(
        &self,
        conn: &mut ConnectionManager,
        policy: &OtpPolicy,
        issue: &Issue<'_>,
    ) -> redis::RedisResult<IssueOutcome> {
        let keys = self.keys(issue.phone, Some(issue.client_ip));
        let (stored, wait_ms): (i64, i64) = self
            .issue
            .key(&keys.code)
            .key(&keys.resend)
            .key(&keys.window)
            .key(&keys.ip_window)
            .arg(&issue.digest.0)
            .arg(millis(policy.ttl))
            .arg(millis(policy.resend_gap))
            .arg(policy.per_phone_per_hour)
            .arg(policy.per_ip_per_hour)
            .arg(issue.event_id.to_string())
            .arg(HOUR_MS)
            .invoke_async(conn)
            .await?;
        Ok(if stored == 1 {
            IssueOutcome::Stored
        } else {
            IssueOutcome::Refused {
                retry_after: Duration::from_millis(u64::try_from(wait_ms).unwrap_or(1)),
            }
        })
    }

    /// Undoes [`OtpStore::issue`] for a code whose event was never confirmed.
    pub async fn withdraw(
        &self,
        conn: &mut ConnectionManager,
        issue: &Issue<'_>,
    ) -> redis::RedisResult<()> {
        let keys = self.keys(issue.phone, Some(issue.client_ip));
        let _: i64 = self
            .withdraw
            .key(&keys.code)
            .key(&keys.resend)
            .key(&keys.window)
            .key(&keys.ip_window)
            .arg(issue.event_id.to_string())
            .invoke_async(conn)
            .await?;
        Ok(())
    }

    /// Checks a guess against the stored code, counting a wrong one.
    pub async fn check_guess(
        &self,
        conn: &mut ConnectionManager,
        phone: &PhoneNumber,
        digest: &CodeDigest,
        max_attempts: u32,
    ) -> redis::RedisResult<CheckOutcome> {
        let keys = self.keys(phone, None);
        let reply: Vec<redis::Value> = self
            .check
            .key(&keys.code)
            .arg(&digest.0)
            .arg(max_attempts)
            .invoke_async(conn)
            .await?;
        let int = |i: usize| match reply.get(i) {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        };
        Ok(match int(0) {
            1 => CheckOutcome::Accepted(Consumed {
                digest: digest.to_owned(),
                ttl_left_ms: int(1),
                attempts: u32::try_from(int(2)).unwrap_or(0),
                event_id: match reply.get(3) {
                    Some(redis::Value::BulkString(bytes)) => {
                        String::from_utf8_lossy(bytes).into_owned()
                    }
                    _ => String::new(),
                },
            }),
            2 => CheckOutcome::Burned,
            _ => CheckOutcome::Rejected,
        })
    }

    pub async fn restore(
        &self,
        conn: &mut ConnectionManager,
        phone: &PhoneNumber,
        consumed: &Consumed,
    ) -> redis::RedisResult<()> {
        if consumed.ttl_left_ms <= 0 {
            return Ok(());
        }
        let keys = self.keys(phone, None);
        let _: i64 = self
            .restore
            .key(&keys.code)
            .arg(&consumed.digest.0)
            .arg(consumed.attempts)
            .arg(&consumed.event_id)
            .arg(consumed.ttl_left_ms)
            .invoke_async(conn)
            .await?;
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_the_asked_length_and_only_digits() {
        for length in 4..=10 {
            let code = generate_code(length);
            assert!(is_well_formed(&code, length), "{code}");
        }
        assert!(!is_well_formed("12345", 6));
        assert!(!is_well_formed("12345a", 6));
        assert!(!is_well_formed("１２３４５６", 6));
    }

    #[test]
    fn codes_are_spread_over_all_digits() {
        let mut seen = [0u32; 10];
        for _ in 0..2_000 {
            let code = generate_code(4);
            seen[usize::from(code.as_bytes()[0] - b'0')] += 1;
        }
        assert!(seen.iter().all(|&n| n > 100), "first digits: {seen:?}");
    }

    #[test]
    fn digests_depend_on_key_phone_and_code() {
        let a = OtpHasher::new("key-one-0123456789".into());
        let b = OtpHasher::new("key-two-0123456789".into());
        let phone = PhoneNumber::parse("+14155550100").unwrap();
        let other = PhoneNumber::parse("+14155550101").unwrap();
        let d = a.digest(&phone, "123456");
        assert_eq!(d.0.len(), 64);
        assert_eq!(d, a.digest(&phone, "123456"));
        assert_ne!(d, b.digest(&phone, "123456"));
        assert_ne!(d, a.digest(&other, "123456"));
        assert_ne!(d, a.digest(&phone, "123457"));
        assert!(!d.0.contains("123456"));
    }

    #[test]
    fn keys_share_one_hash_tag_per_phone() {
        let keys = PhoneKeys::new(
            "ns",
            &PhoneNumber::parse("+14155550100").unwrap(),
            "10.0.0.1",
        );
        for key in [&keys.code, &keys.resend, &keys.window] {
            assert!(key.starts_with("ns:"), "{key}");
            assert!(key.contains("{+14155550100}"), "{key}");
        }
        assert!(keys.ip_window.contains("{10.0.0.1}"));
    }
}
