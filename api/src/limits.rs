//! Velocity limits that span phones: per client network, per calling code, overall, and the
//! per-country fraud guard (docs/api.md#request-limits).
//!
//! Each limit is a sliding-window counter in one Redis hash: the count of the current fixed
//! window and of the one before, the older one weighted by how much of it still overlaps the
//! sliding window. That is O(1) in memory and time however busy the key (an exact log would
//! hold every request of a busy network), and within a few percent of exact. Each key carries
//! its own hash tag, so on a Redis Cluster each script touches one slot; the api takes a slot on
//! each counter concurrently and gives the taken ones back when another refuses, so refused
//! requests count toward nothing.
//!
//! The fraud guard itself is in `shared::fraud_guard`, since the worker asks it before a resend;
//! its alarm is here.

use std::time::Duration;

use redis::RedisResult;
use shared::fraud_guard::{FraudGuard, GuardZone};
use shared::redis_connection::RedisConnection;
use shared::redis_script::Script;

use crate::client_ip::ClientKey;
use crate::error::Limit;
use crate::metrics as m;

/// A sliding-window counter. ARGV: operation (`take`: count one if under the limit; `add`:
/// count one whatever the limit; `give_back`: uncount one), limit, window in ms.
/// Returns {1} or {0, retry_after_ms}.
const COUNTER: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, limit, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local index = math.floor(now / window)
local s = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local w, c, p = tonumber(s[1]) or index, tonumber(s[2]) or 0, tonumber(s[3]) or 0
if w == index - 1 then p, c = c, 0 elseif w < index - 1 then p, c = 0, 0 end
local elapsed = now - index * window
if op == 'take' and p * (window - elapsed) / window + c + 1 > limit then
  local wait
  if c + 1 > limit then
    wait = (window - elapsed) + math.max(0, window * (1 - (limit - 1) / c))
  else
    wait = window * (1 - (limit - 1 - c) / p) - elapsed
  end
  return {0, math.max(math.ceil(wait), 1)}
end
if op == 'give_back' then c = math.max(c - 1, 0) else c = c + 1 end
redis.call('HSET', KEYS[1], 'w', index, 'c', c, 'p', p)
redis.call('PEXPIRE', KEYS[1], window * 2)
return {1}
";

const HOUR: Duration = Duration::from_secs(3_600);
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// What taking a slot on one counter gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    Yes,
    No { retry_after: Duration },
}

/// One of the counters, by what it limits.
#[derive(Debug, Clone)]
pub struct Counter {
    kind: Limit,
    key: String,
    limit: u32,
    window: Duration,
}

impl Counter {
    /// Which limit this is, for the 429 it causes.
    pub fn limit(&self) -> Limit {
        self.kind
    }
}

pub struct Limits {
    namespace: String,
    counter: Script,
    guard: FraudGuard,
}

impl Limits {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            counter: Script::new(COUNTER),
            guard: FraudGuard::new(namespace),
        }
    }

    /// Codes requested on behalf of one client network per rolling hour.
    pub fn sends_per_client(&self, client: &ClientKey, limit: u32) -> Counter {
        self.counter_for(
            Limit::IpPerHour,
            format!("ip:{{{}}}:sent", client.as_str()),
            limit,
            HOUR,
        )
    }

    /// Codes requested on behalf of one IPv6 /48 per rolling hour (`OTP_PER_IPV6_48_PER_HOUR`).
    pub fn sends_per_site(&self, site: &ClientKey, limit: u32) -> Counter {
        let key = format!("ip:{{{}}}:sent", site.as_str());
        self.counter_for(Limit::Ipv6SitePerHour, key, limit, HOUR)
    }

    /// Wrong guesses from one client network per rolling hour.
    pub fn fails_per_client(&self, client: &ClientKey, limit: u32) -> Counter {
        let key = format!("ip:{{{}}}:fails", client.as_str());
        self.counter_for(Limit::VerifyFailsPerIp, key, limit, HOUR)
    }

    /// Codes sent to one calling code per rolling hour.
    pub fn sends_per_country(&self, calling_code: u16, limit: u32) -> Counter {
        let key = format!("cc:{{{calling_code}}}:sent");
        self.counter_for(Limit::CountryPerHour, key, limit, HOUR)
    }

    /// Codes sent overall per rolling minute.
    pub fn sends_overall(&self, limit: u32) -> Counter {
        self.counter_for(Limit::Global, "{global}:sent".to_owned(), limit, MINUTE)
    }

    /// Refreshes of one session per sliding day (`REFRESH_PER_SESSION_PER_DAY`).
    pub fn refreshes_per_session(&self, session_id: uuid::Uuid, limit: u32) -> Counter {
        let key = format!("session:{{{session_id}}}:refreshes");
        self.counter_for(Limit::RefreshesPerSessionPerDay, key, limit, DAY)
    }

    fn counter_for(&self, kind: Limit, key: String, limit: u32, window: Duration) -> Counter {
        Counter {
            kind,
            key: format!("{}:limit:{key}", self.namespace),
            limit,
            window,
        }
    }

    /// Counts one against `counter` if it is under its limit.
    pub async fn take(&self, mut conn: RedisConnection, counter: &Counter) -> RedisResult<Taken> {
        let reply: Vec<i64> = self
            .run_counter(counter, "take")
            .invoke_async(&mut conn)
            .await?;
        Ok(match reply.as_slice() {
            [1, ..] => Taken::Yes,
            [_, wait, ..] => Taken::No {
                retry_after: Duration::from_millis(u64::try_from(*wait).unwrap_or(1)),
            },
            _ => Taken::No {
                retry_after: Duration::from_secs(1),
            },
        })
    }

    /// Uncounts one taken by [`Limits::take`] for a request that was refused or did not count.
    pub async fn give_back(&self, mut conn: RedisConnection, counter: &Counter) -> RedisResult<()> {
        let _: Vec<i64> = self
            .run_counter(counter, "give_back")
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The fraud guard, with the limits a code request takes a slot on (and gives back).
    pub fn guard(&self) -> &FraudGuard {
        &self.guard
    }

    fn run_counter<'a>(
        &'a self,
        counter: &Counter,
        op: &str,
    ) -> shared::redis_script::ScriptInvocation<'a> {
        let mut invocation = self.counter.key(&counter.key);
        invocation
            .arg(op)
            .arg(counter.limit)
            .arg(u64::try_from(counter.window.as_millis()).unwrap_or(u64::MAX));
        invocation
    }
}

/// Reports guard trips: `otp_fraud_guard_trips_total{country}` for every code sent to (or
/// refused for) a tripped country, and a warning at most once a minute per country, so an attack
/// does not flood the log.
#[derive(Default)]
pub struct FraudAlarm {
    last_warned: std::sync::Mutex<std::collections::HashMap<GuardZone, std::time::Instant>>,
}

impl FraudAlarm {
    pub fn tripped(&self, zone: GuardZone, refused: bool) {
        metrics::counter!(m::FRAUD_GUARD_TRIPS, "country" => zone.to_string()).increment(1);
        let now = std::time::Instant::now();
        let mut last = self.last_warned.lock().unwrap_or_else(|e| e.into_inner());
        if last
            .get(&zone)
            .is_some_and(|at| now.duration_since(*at) < MINUTE)
        {
            return;
        }
        last.insert(zone, now);
        drop(last);
        tracing::warn!(
            country = %zone,
            refused,
            "SMS fraud guard tripped: codes to this country are mostly not being verified"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_is_a_hash_slot_of_its_own() {
        let limits = Limits::new("ns");
        let client = ClientKey::of("2001:db8::1".parse().unwrap());
        assert_eq!(
            limits.sends_per_client(&client, 1).key,
            "ns:limit:ip:{2001:db8:0:0::/64}:sent"
        );
        let site = ClientKey::site_of("2001:db8:7:3::1".parse().unwrap()).unwrap();
        assert_eq!(
            limits.sends_per_site(&site, 1).key,
            "ns:limit:ip:{2001:db8:7::/48}:sent"
        );
        assert_eq!(ClientKey::site_of("203.0.113.7".parse().unwrap()), None);
        assert_eq!(
            ClientKey::site_of("::ffff:203.0.113.7".parse().unwrap()),
            None
        );
        assert_eq!(limits.sends_per_country(44, 1).key, "ns:limit:cc:{44}:sent");
        assert_eq!(limits.sends_overall(1).key, "ns:limit:{global}:sent");
        let session = uuid::Uuid::nil();
        assert_eq!(
            limits.refreshes_per_session(session, 1).key,
            format!("ns:limit:session:{{{session}}}:refreshes")
        );
    }
}
