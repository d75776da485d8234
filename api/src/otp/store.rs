//! The codes in Redis, one phone at a time. Every key of a phone carries the phone as its Redis
//! Cluster hash tag (`{+14155550100}`), so each script below touches one slot and runs
//! atomically across api replicas.
//!
//! A phone has one current code and, while a resend is being published, one pending code:
//! the new code becomes current only once the broker confirmed its event ([`OtpStore::promote`]),
//! so a resend that fails never destroys a code that may already be on the user's phone.
//!
//! Wrong guesses are counted per code twice: with the code's `challenge_id` (bound, the
//! requester's) and without it (unbound, anyone's). Spending the unbound budget blocks only
//! unbound guesses, so a stranger cannot lock the requester out; spending the bound one burns
//! the code. A guess with a wrong `challenge_id` is not checked and counts nowhere. Wrong
//! guesses of either kind also go into the phone's daily tally, which closes the unbound path
//! for the rest of the day once it is full (`OTP_VERIFY_FAILS_PER_PHONE_PER_DAY`).

use std::time::{Duration, Instant};

use redis::{RedisResult, Value};
use shared::PhoneNumber;
use shared::redis_connection::RedisConnection;
use shared::redis_script::Script;
use uuid::Uuid;

use super::CodeDigest;
use crate::config::{OtpPolicy, SendLimits};
use crate::error::Limit;

/// Resend gap, hourly and daily caps, then the new code as pending. Refused requests change
/// nothing. Returns {1} or {0, retry_after_ms, limit}. A pending code has exactly the fields
/// `h`, `c` and `e`, so the HSET replaces an older pending code whole, without a DEL first.
const ISSUE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hour, day = 3600000, 86400000
local wait = redis.call('PTTL', KEYS[3])
if wait > 0 then return {0, wait, 'resend_gap'} end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - day)
if redis.call('ZCOUNT', KEYS[4], now - hour, '+inf') >= tonumber(ARGV[5]) then
  local first = redis.call('ZRANGEBYSCORE', KEYS[4], now - hour, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  return {0, math.max(tonumber(first[2]) + hour - now, 1), 'phone_hour'}
end
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[6]) then
  local oldest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  return {0, math.max(tonumber(oldest[2]) + day - now, 1), 'phone_day'}
end
redis.call('ZADD', KEYS[4], now, ARGV[7])
redis.call('PEXPIRE', KEYS[4], day)
local gap = tonumber(ARGV[4])
if gap > 0 then redis.call('SET', KEYS[3], ARGV[7], 'PX', gap) end
redis.call('HSET', KEYS[2], 'h', ARGV[1], 'c', ARGV[2], 'e', ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {1}
";

/// The pending code becomes current, with fresh budgets, keeping its own expiry. Returns 1 when
/// promoted; 3 when this code already is current or was used (KEYS[4]): a try whose answer was
/// lost, tried again, or a sign-in that made it current itself (`signin::late_promotion`);
/// 2 when a newer request's code replaced it (pending now, or since made current or used: the
/// phone's sends, KEYS[3], list another one issued in the same millisecond or later), which is
/// left alone; 0 when it is gone (it expired, or Redis lost it). RENAME moves the hash and its
/// expiry, replacing the old current code, in one step: cheaper for Redis than reading the
/// pending code, deleting both and writing the current one (BENCHMARKS.md, issue 12). The other
/// branches are off the usual path.
const PROMOTE: &str = r"
local pending = redis.call('HGET', KEYS[2], 'e')
if pending ~= ARGV[1] then
  if redis.call('HGET', KEYS[1], 'e') == ARGV[1] then return 3 end
  if redis.call('GET', KEYS[4]) == ARGV[1] then return 3 end
  if pending then return 2 end
  local mine = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if mine and redis.call('ZCOUNT', KEYS[3], mine, '+inf') > 1 then return 2 end
  return 0
end
if redis.call('PTTL', KEYS[2]) <= 0 then return 0 end
redis.call('RENAME', KEYS[2], KEYS[1])
redis.call('HSET', KEYS[1], 'a', 0, 'u', 0)
return 1
";

/// Undoes ISSUE for a request whose event the broker did not confirm: the pending code goes,
/// and the request counts toward no limit. The current code is untouched.
const WITHDRAW: &str = r"
local id = ARGV[1]
redis.call('ZREM', KEYS[4], id)
if redis.call('GET', KEYS[3]) == id then redis.call('DEL', KEYS[3]) end
if redis.call('HGET', KEYS[2], 'e') == id then redis.call('DEL', KEYS[2]) end
return 1
";

/// Checks a guess against the current code. KEYS: current code, the phone's fails, pending code,
/// used. ARGV: digest, challenge fingerprint ('' when the guess carries none), max attempts,
/// daily fail cap, '1' to report a pending code first. The digest comparison runs over every
/// byte without an early exit, so its time does not depend on how much of the guess matched.
/// Returns {0} wrong/absent, {1, pttl, a, u, challenge, event} right (the code is consumed, and
/// its event noted as used for PROMOTE), {2} burned, {3} the unbound budget is spent,
/// {4, retry_ms} the phone's daily fails are (for an unbound guess, code or no code), {5} the guess carries another code's
/// `challenge_id` (not checked, not counted), {6, event} a pending code exists and the guess
/// carries no `challenge_id` or the pending code's (nothing checked or counted, whatever the code
/// guessed, so its answer says nothing about the guess). A guess bound to another code skips the
/// pending one: only the late code's own `challenge_id` could be made to work by promoting it,
/// and a made-up one must not buy a look into the send ledger and a second CHECK.
const CHECK: &str = r"
if ARGV[5] == '1' then
  local pending = redis.call('HMGET', KEYS[3], 'e', 'c')
  if pending[1] and (ARGV[2] == '' or ARGV[2] == pending[2]) then return {6, pending[1]} end
end
local s = redis.call('HMGET', KEYS[1], 'h', 'c', 'e', 'a', 'u')
local bound = ARGV[2] ~= ''
if bound and ARGV[2] ~= s[2] then return {5} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = 86400000
if not bound then
  -- Before whether a code exists: a full tally answers alike with a code live or none, so its
  -- answer does not tell a stranger that the number is signing in right now.
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - day)
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {4, math.max(tonumber(oldest[2]) + day - now, 1)}
  end
end
if not s[1] then return {0} end
local max = tonumber(ARGV[3])
local a, u = tonumber(s[4]), tonumber(s[5])
if a >= max then return {2} end
if not bound and u >= max then return {3} end
local stored, given = s[1], ARGV[1]
local diff = 0
if #stored ~= #given then diff = 1 end
for i = 1, #stored do
  diff = bit.bor(diff, bit.bxor(string.byte(stored, i), string.byte(given, i) or 0))
end
if diff == 0 then
  local pttl = redis.call('PTTL', KEYS[1])
  redis.call('DEL', KEYS[1])
  if pttl > 0 and s[3] then redis.call('SET', KEYS[4], s[3], 'PX', pttl) end
  return {1, pttl, a, u, s[2], s[3]}
end
if bound then
  redis.call('HINCRBY', KEYS[1], 'a', 1)
else
  redis.call('HINCRBY', KEYS[1], 'u', 1)
end
-- Unique per guess: this code's event and its count of wrong guesses so far.
redis.call('ZADD', KEYS[2], now, s[3] .. ':' .. (a + u + 1))
redis.call('PEXPIRE', KEYS[2], day)
return {0}
";

/// Puts a consumed code back when the session could not be stored, unless a newer one exists or
/// was used meanwhile (KEYS[2], the event of the code last used, is then another's): an older
/// code must not come back over a newer one, which could then not be put back itself.
/// KEYS: current code, used. ARGV: digest, challenge, event, bound and unbound attempts, life (ms).
const RESTORE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'h', ARGV[1], 'c', ARGV[2], 'e', ARGV[3], 'a', ARGV[4], 'u', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssueOutcome {
    Pending,
    Refused { limit: Limit, retry_after: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The code was right and is now consumed. `Consumed` lets it be put back.
    Accepted(Consumed),
    /// Wrong, expired or never requested.
    Rejected,
    /// Carries a `challenge_id` that is not this code's: not checked, counted nowhere.
    Unchecked,
    /// The code's budget is spent (for unbound guesses: the unbound budget only).
    Burned,
    /// The phone's daily tally of wrong guesses is full: unbound guesses wait.
    PhoneFailsExhausted { retry_after: Duration },
    /// Nothing checked: the phone has a pending code, of this event, to look into first
    /// (`None`: its event field is not an event id, so there is nothing to look up).
    Pending { event_id: Option<Uuid> },
}

/// What a right guess removed, to restore it if the session cannot be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    digest: CodeDigest,
    challenge: String,
    event_id: String,
    bound_attempts: i64,
    unbound_attempts: i64,
    ttl_left_ms: i64,
    /// When Redis answered: the time since comes off `ttl_left_ms` when the code is put back,
    /// so that a slow session step never lengthens the code's life.
    consumed_at: Instant,
}

/// A guess to check: its digest, the fingerprint of its `challenge_id` if it has one, and the
/// budgets it counts against.
pub struct CheckedGuess<'a> {
    pub digest: &'a CodeDigest,
    pub challenge: Option<&'a str>,
    pub max_attempts: u32,
    pub fails_per_phone_per_day: u32,
}

/// A new code: for whom, its digest, the fingerprint of its `challenge_id` and its event.
pub struct NewCode<'a> {
    pub phone: &'a PhoneNumber,
    pub digest: CodeDigest,
    pub challenge: String,
    pub event_id: Uuid,
}

/// The Redis keys of one phone, all in the phone's hash slot.
struct PhoneKeys {
    code: String,
    pending: String,
    resend: String,
    sent: String,
    fails: String,
    /// The event of the code last used: lets PROMOTE tell a used code from a lost one.
    used: String,
}

impl PhoneKeys {
    fn new(namespace: &str, phone: &PhoneNumber) -> Self {
        let key = |name: &str| shared::otp_keys::key(namespace, phone, name);
        Self {
            code: shared::otp_keys::current_code(namespace, phone),
            pending: shared::otp_keys::pending_code(namespace, phone),
            resend: key("resend"),
            sent: key("sent"),
            fails: key("fails"),
            used: key("used"),
        }
    }
}

/// What [`OtpStore::promote`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// The code is now the phone's current code.
    Promoted,
    /// The code already was current, or was used: made current by an earlier try or by a
    /// sign-in.
    Current,
    /// A newer request's code replaced it: that one counts.
    Replaced,
    /// No pending code at all: it expired, or Redis lost it (a failover that dropped the last
    /// writes of a master, a restart without persistence).
    Missing,
}

pub struct OtpStore {
    namespace: String,
    issue: Script,
    promote: Script,
    withdraw: Script,
    check: Script,
    restore: Script,
}

impl OtpStore {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            issue: Script::new(ISSUE),
            promote: Script::new(PROMOTE),
            withdraw: Script::new(WITHDRAW),
            check: Script::new(CHECK),
            restore: Script::new(RESTORE),
        }
    }

    fn keys(&self, phone: &PhoneNumber) -> PhoneKeys {
        PhoneKeys::new(&self.namespace, phone)
    }

    /// Stores `code` as the phone's pending code, unless a per-phone limit refuses it.
    pub async fn issue(
        &self,
        mut conn: RedisConnection,
        policy: &OtpPolicy,
        limits: &SendLimits,
        code: &NewCode<'_>,
    ) -> RedisResult<IssueOutcome> {
        let keys = self.keys(code.phone);
        let reply: Vec<Value> = self
            .issue
            .key(&keys.code)
            .key(&keys.pending)
            .key(&keys.resend)
            .key(&keys.sent)
            .arg(code.digest.as_str())
            .arg(&code.challenge)
            .arg(millis(policy.ttl))
            .arg(millis(policy.resend_gap))
            .arg(limits.per_phone_per_hour)
            .arg(limits.per_phone_per_day)
            .arg(code.event_id.to_string())
            .invoke_async(&mut conn)
            .await?;
        if int(&reply, 0) == 1 {
            return Ok(IssueOutcome::Pending);
        }
        let limit = match text(&reply, 2).as_deref() {
            Some("phone_hour") => Limit::PhonePerHour,
            Some("phone_day") => Limit::PhonePerDay,
            _ => Limit::ResendGap,
        };
        Ok(IssueOutcome::Refused {
            limit,
            retry_after: retry(int(&reply, 1)),
        })
    }

    /// Makes the pending code of `event_id` the phone's current code.
    pub async fn promote(
        &self,
        mut conn: RedisConnection,
        phone: &PhoneNumber,
        event_id: Uuid,
    ) -> RedisResult<Promotion> {
        let keys = self.keys(phone);
        let promoted: i64 = self
            .promote
            .key(&keys.code)
            .key(&keys.pending)
            .key(&keys.sent)
            .key(&keys.used)
            .arg(event_id.to_string())
            .invoke_async(&mut conn)
            .await?;
        Ok(match promoted {
            1 => Promotion::Promoted,
            3 => Promotion::Current,
            2 => Promotion::Replaced,
            _ => Promotion::Missing,
        })
    }

    /// Undoes [`OtpStore::issue`] for a code whose event was never confirmed.
    pub async fn withdraw(
        &self,
        mut conn: RedisConnection,
        phone: &PhoneNumber,
        event_id: Uuid,
    ) -> RedisResult<()> {
        let keys = self.keys(phone);
        let _: i64 = self
            .withdraw
            .key(&keys.code)
            .key(&keys.pending)
            .key(&keys.resend)
            .key(&keys.sent)
            .arg(event_id.to_string())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Checks a guess against the current code, counting a wrong one. `challenge` is the
    /// fingerprint of the guess's `challenge_id`, if it carried one. With `pending_first`, a
    /// pending code is reported instead ([`CheckOutcome::Pending`]), before anything is checked,
    /// unless the guess is bound to another code.
    pub async fn check_guess(
        &self,
        mut conn: RedisConnection,
        phone: &PhoneNumber,
        guess: &CheckedGuess<'_>,
        pending_first: bool,
    ) -> RedisResult<CheckOutcome> {
        let keys = self.keys(phone);
        let reply: Vec<Value> = self
            .check
            .key(&keys.code)
            .key(&keys.fails)
            .key(&keys.pending)
            .key(&keys.used)
            .arg(guess.digest.as_str())
            .arg(guess.challenge.unwrap_or(""))
            .arg(guess.max_attempts)
            .arg(guess.fails_per_phone_per_day)
            .arg(if pending_first { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        Ok(match int(&reply, 0) {
            1 => CheckOutcome::Accepted(Consumed {
                digest: guess.digest.clone(),
                ttl_left_ms: int(&reply, 1),
                consumed_at: Instant::now(),
                bound_attempts: int(&reply, 2),
                unbound_attempts: int(&reply, 3),
                challenge: text(&reply, 4).unwrap_or_default(),
                event_id: text(&reply, 5).unwrap_or_default(),
            }),
            2 | 3 => CheckOutcome::Burned,
            4 => CheckOutcome::PhoneFailsExhausted {
                retry_after: retry(int(&reply, 1)),
            },
            5 => CheckOutcome::Unchecked,
            6 => CheckOutcome::Pending {
                event_id: text(&reply, 1).and_then(|id| Uuid::parse_str(&id).ok()),
            },
            _ => CheckOutcome::Rejected,
        })
    }

    pub async fn restore(
        &self,
        mut conn: RedisConnection,
        phone: &PhoneNumber,
        consumed: &Consumed,
    ) -> RedisResult<()> {
        let since = i64::try_from(consumed.consumed_at.elapsed().as_millis()).unwrap_or(i64::MAX);
        let ttl_left_ms = consumed.ttl_left_ms.saturating_sub(since);
        if ttl_left_ms <= 0 {
            return Ok(());
        }
        let keys = self.keys(phone);
        let _: i64 = self
            .restore
            .key(&keys.code)
            .key(&keys.used)
            .arg(consumed.digest.as_str())
            .arg(&consumed.challenge)
            .arg(&consumed.event_id)
            .arg(consumed.bound_attempts)
            .arg(consumed.unbound_attempts)
            .arg(ttl_left_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }
}

fn int(reply: &[Value], index: usize) -> i64 {
    match reply.get(index) {
        Some(Value::Int(n)) => *n,
        _ => 0,
    }
}

fn text(reply: &[Value], index: usize) -> Option<String> {
    match reply.get(index) {
        Some(Value::BulkString(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Some(Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    }
}

fn retry(millis: i64) -> Duration {
    Duration::from_millis(u64::try_from(millis).unwrap_or(1).max(1))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_phone_shares_its_hash_tag() {
        let phone = PhoneNumber::parse("+14155550100").unwrap();
        let keys = PhoneKeys::new("ns", &phone);
        for key in [
            &keys.code,
            &keys.pending,
            &keys.resend,
            &keys.sent,
            &keys.fails,
            &keys.used,
        ] {
            assert!(key.starts_with("ns:otp:{+14155550100}:"), "{key}");
        }
    }
}
