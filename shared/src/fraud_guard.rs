//! The per-country fraud guard (docs/api.md#request-limits): codes sent and codes verified per
//! country, in a sliding window in one Redis hash. SMS pumping sends codes to numbers nobody
//! verifies, so while a country's unverified codes exceed both a floor and a ratio of its verified
//! ones, it is tripped: counted and logged (`monitor`), or refused (`enforce`).
//!
//! Both programs use it: the api counts each code it sends and each one verified; the worker asks
//! it, counting nothing, before the resend a delivery receipt earns (a second paid SMS a complicit
//! carrier could otherwise earn for every pumped code), so both read the same settings and share
//! this one script. Resends are not counted: a resent code that is then used would weigh as one
//! unused, and a carrier's bad day (many resends) would trip a country's genuine sign-ins.

use std::time::Duration;

use redis::RedisResult;

use crate::config::{ConfigError, Env};
use crate::phone::PhoneNumber;
use crate::redis_connection::RedisConnection;
use crate::redis_script::Script;

/// The fraud guard of one country: sent (`s`, `ps`) and verified (`v`, `pv`) codes in a
/// sliding window. ARGV: operation (`send`, `unsend`, `verified`, or `peek`: what `send` would
/// answer, writing nothing), window in ms, mode (0 off, 1 monitor, 2 enforce), floor of
/// unverified codes, ratio.
/// Returns {1, tripped} or {0, retry_after_ms} (refused while tripped in enforce mode).
const GUARD: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, window, mode = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local floor, ratio = tonumber(ARGV[4]), tonumber(ARGV[5])
local index = math.floor(now / window)
local g = redis.call('HMGET', KEYS[1], 'w', 's', 'ps', 'v', 'pv')
local w = tonumber(g[1]) or index
local s, ps, v, pv = tonumber(g[2]) or 0, tonumber(g[3]) or 0, tonumber(g[4]) or 0, tonumber(g[5]) or 0
if w == index - 1 then ps, s, pv, v = s, 0, v, 0 elseif w < index - 1 then ps, s, pv, v = 0, 0, 0, 0 end
local weight = (window - (now - index * window)) / window
local sent, verified = ps * weight + s, pv * weight + v
local tripped = sent - verified >= math.max(floor, ratio * verified)
if op == 'peek' then
  if tripped and mode == 2 then return {0, window - (now - index * window)} end
  if tripped then return {1, 1} end
  return {1, 0}
end
if op == 'send' then
  if tripped and mode == 2 then return {0, window - (now - index * window)} end
  s = s + 1
elseif op == 'unsend' then
  s = math.max(s - 1, 0)
elseif op == 'verified' then
  v = v + 1
else
  return redis.error_reply('unknown fraud guard operation ' .. tostring(op))
end
redis.call('HSET', KEYS[1], 'w', index, 's', s, 'ps', ps, 'v', v, 'pv', pv)
redis.call('PEXPIRE', KEYS[1], window * 2)
if tripped then return {1, 1} end
return {1, 0}
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FraudGuardMode {
    Off,
    /// Counts and warns, refuses nothing.
    Monitor,
    /// Refuses codes to a country while its guard is tripped.
    Enforce,
}

/// The per-country conversion guard: codes sent against codes verified.
#[derive(Debug, Clone)]
pub struct FraudGuardPolicy {
    pub mode: FraudGuardMode,
    pub window: Duration,
    /// Unverified codes below this never trip the guard (small volumes are noise).
    pub min_unverified: u32,
    /// Trips when unverified codes exceed this many times the verified ones.
    pub ratio: f64,
}

impl FraudGuardPolicy {
    /// `OTP_FRAUD_GUARD`, `OTP_FRAUD_GUARD_WINDOW_SECS`, `OTP_FRAUD_GUARD_MIN_UNVERIFIED` and
    /// `OTP_FRAUD_GUARD_RATIO`, read the same way by both programs.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let mode = match env
            .string("OTP_FRAUD_GUARD", "monitor")
            .to_ascii_lowercase()
            .as_str()
        {
            "off" => FraudGuardMode::Off,
            "monitor" => FraudGuardMode::Monitor,
            "enforce" => FraudGuardMode::Enforce,
            other => {
                return Err(ConfigError::new(
                    "OTP_FRAUD_GUARD",
                    format!("{other:?}: use off, monitor or enforce"),
                ));
            }
        };
        let ratio: f64 = env.parse("OTP_FRAUD_GUARD_RATIO", 1.0)?;
        if !(0.01..=1_000.0).contains(&ratio) {
            return Err(ConfigError::new(
                "OTP_FRAUD_GUARD_RATIO",
                format!("{ratio} is out of range; expected 0.01 to 1000"),
            ));
        }
        Ok(Self {
            mode,
            window: env.seconds("OTP_FRAUD_GUARD_WINDOW_SECS", 3_600, 60..=604_800)?,
            min_unverified: env.integer_in(
                "OTP_FRAUD_GUARD_MIN_UNVERIFIED",
                20,
                1..=100_000_000,
            )?,
            ratio,
        })
    }
}

/// As both programs log it at start, so that an operator can see that they agree.
impl std::fmt::Display for FraudGuardPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.mode {
            FraudGuardMode::Off => return f.write_str("off"),
            FraudGuardMode::Monitor => "monitor",
            FraudGuardMode::Enforce => "enforce",
        };
        write!(
            f,
            "{mode} (window {} s, at least {} unverified, ratio {})",
            self.window.as_secs(),
            self.min_unverified,
            self.ratio
        )
    }
}

/// How often the api notes its guard settings in Redis. A worker with other settings (left in
/// `monitor` beside an api in `enforce`, say) would resend, and pay for, codes to a country the
/// api refuses; each worker compares its own with the note, and says when they differ
/// (`sms_fraud_guard_settings_differ`).
pub const SETTINGS_ANNOUNCED_EVERY: Duration = Duration::from_secs(60);
/// How long a note lasts: a few announcements, so that it outlives a slow Redis but not the apis.
pub const SETTINGS_LAST: Duration = Duration::from_secs(300);

/// Where the guard counts a number's codes: the country libphonenumber places the number in
/// (its ISO 3166 region; for one it cannot place, the main country of its calling code), or,
/// for a number of no country (+881, +882…), the calling code.
///
/// Not the calling code alone: +1 is shared by the United States, Canada and 23 Caribbean and
/// Pacific regions, whose premium routes are a favourite of SMS pumping (as +7 is shared by
/// Russia and Kazakhstan, +44 by the UK and its Crown Dependencies). Counted under one calling
/// code, a country's genuine sign-ins would hide a pumped neighbour from the guard, and a tripped
/// neighbour would hold the country's genuine sign-ins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuardZone {
    Country(phonenumber::country::Id),
    CallingCode(u16),
}

impl GuardZone {
    /// The zone of a number libphonenumber has parsed and placed in `country` (`None`: no
    /// country), for the api, which has done both already. A number of a country's calling code
    /// that the `phonenumber` crate places in none (it drops the leading zero of Italian fixed
    /// lines, +39 06…) counts in that code's main country: a zone of its own would give a
    /// pump one more floor to stay under.
    pub fn new(country: Option<phonenumber::country::Id>, calling_code: u16) -> Self {
        country
            .or_else(|| main_country(calling_code))
            .map_or(Self::CallingCode(calling_code), Self::Country)
    }

    /// The zone of `phone`, parsed here: what [`GuardZone::new`] gives for the same number. For
    /// the worker, which has only the number; `None` for a number that is not one.
    pub fn of(phone: &PhoneNumber) -> Option<Self> {
        let number = phonenumber::parse(None, phone.as_str()).ok()?;
        Some(Self::new(number.country().id(), number.code().value()))
    }
}

/// The main country of `calling_code` (Italy for +39, the United States for +1); `None` for the
/// codes of no country (+881, +882…), which libphonenumber lists under the region `001`.
fn main_country(calling_code: u16) -> Option<phonenumber::country::Id> {
    let regions = phonenumber::metadata::DATABASE.region(&calling_code)?;
    regions.first()?.parse().ok()
}

/// `JM`, or `+882` for a calling code: a bounded set (libphonenumber's), never a client's free
/// text, so fit for a metric's label.
impl std::fmt::Display for GuardZone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Country(id) => f.write_str(id.as_ref()),
            Self::CallingCode(code) => write!(f, "+{code}"),
        }
    }
}

/// What the guard said about one more code to a country.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardVerdict {
    Clear,
    /// Tripped, let through (monitor mode): `send` counts it, `peek` does not.
    Tripped,
    /// Tripped and refused (enforce mode).
    Refused {
        retry_after: Duration,
    },
}

/// The guards of one namespace.
#[derive(Clone)]
pub struct FraudGuard {
    namespace: String,
    script: Script,
}

impl FraudGuard {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            script: Script::new(GUARD),
        }
    }

    /// The key of `zone`'s guard: a hash slot of its own on a Redis Cluster.
    fn key(&self, zone: GuardZone) -> String {
        format!("{}:limit:guard:{{{zone}}}", self.namespace)
    }

    /// Counts a code to `zone`, unless the guard refuses it.
    pub async fn send(
        &self,
        conn: RedisConnection,
        policy: &FraudGuardPolicy,
        zone: GuardZone,
    ) -> RedisResult<GuardVerdict> {
        let reply = self.run(conn, policy, zone, "send").await?;
        Ok(verdict(&reply))
    }

    /// What [`Self::send`] would answer for `zone` now, counting nothing.
    pub async fn peek(
        &self,
        conn: RedisConnection,
        policy: &FraudGuardPolicy,
        zone: GuardZone,
    ) -> RedisResult<GuardVerdict> {
        let reply = self.run(conn, policy, zone, "peek").await?;
        Ok(verdict(&reply))
    }

    /// Notes `policy` as an api's, for the workers to compare theirs with
    /// ([`SETTINGS_ANNOUNCED_EVERY`]). A sorted set of every api's settings, scored by when each
    /// was last noted, so that one replica configured apart from the rest shows however the
    /// notes interleave; a note lapses [`SETTINGS_LAST`] after it was last made.
    pub async fn announce_settings(
        &self,
        mut conn: RedisConnection,
        policy: &FraudGuardPolicy,
    ) -> RedisResult<()> {
        let now = crate::clock::unix_ms();
        let last = u64::try_from(SETTINGS_LAST.as_millis()).unwrap_or(u64::MAX);
        let key = self.settings_key();
        redis::pipe()
            .atomic()
            .cmd("ZADD")
            .arg(&key)
            .arg(now)
            .arg(policy.to_string())
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now.saturating_sub(last))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(last)
            .ignore()
            .query_async(&mut conn)
            .await
    }

    /// The settings apis noted within [`SETTINGS_LAST`], each once.
    pub async fn announced_settings(&self, mut conn: RedisConnection) -> RedisResult<Vec<String>> {
        let last = u64::try_from(SETTINGS_LAST.as_millis()).unwrap_or(u64::MAX);
        redis::cmd("ZRANGEBYSCORE")
            .arg(self.settings_key())
            .arg(crate::clock::unix_ms().saturating_sub(last))
            .arg("+inf")
            .query_async(&mut conn)
            .await
    }

    fn settings_key(&self) -> String {
        format!("{}:fraud_guard:{{settings}}", self.namespace)
    }

    /// Uncounts a send counted for a request that did not go through.
    pub async fn unsend(
        &self,
        conn: RedisConnection,
        policy: &FraudGuardPolicy,
        zone: GuardZone,
    ) -> RedisResult<()> {
        self.run(conn, policy, zone, "unsend").await.map(drop)
    }

    /// Counts a verified code for `zone`.
    pub async fn verified(
        &self,
        conn: RedisConnection,
        policy: &FraudGuardPolicy,
        zone: GuardZone,
    ) -> RedisResult<()> {
        self.run(conn, policy, zone, "verified").await.map(drop)
    }

    async fn run(
        &self,
        mut conn: RedisConnection,
        policy: &FraudGuardPolicy,
        zone: GuardZone,
        op: &str,
    ) -> RedisResult<Vec<i64>> {
        let mode = match policy.mode {
            FraudGuardMode::Off => 0,
            FraudGuardMode::Monitor => 1,
            FraudGuardMode::Enforce => 2,
        };
        self.script
            .key(self.key(zone))
            .arg(op)
            .arg(u64::try_from(policy.window.as_millis()).unwrap_or(u64::MAX))
            .arg(mode)
            .arg(policy.min_unverified)
            .arg(policy.ratio)
            .invoke_async(&mut conn)
            .await
    }
}

fn verdict(reply: &[i64]) -> GuardVerdict {
    match reply {
        [0, wait, ..] => GuardVerdict::Refused {
            retry_after: Duration::from_millis(u64::try_from(*wait).unwrap_or(1).max(1)),
        },
        [_, 1, ..] => GuardVerdict::Tripped,
        _ => GuardVerdict::Clear,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_zone_is_a_hash_slot_of_its_own() {
        let guard = FraudGuard::new("ns");
        let zone = |phone: &str| GuardZone::of(&PhoneNumber::parse(phone).unwrap()).unwrap();
        assert_eq!(guard.key(zone("+447400123456")), "ns:limit:guard:{GB}");
        assert_eq!(guard.key(zone("+881612345678")), "ns:limit:guard:{+881}");
    }

    #[test]
    fn countries_sharing_a_calling_code_are_zones_of_their_own() {
        let zone = |phone: &str| {
            GuardZone::of(&PhoneNumber::parse(phone).unwrap())
                .unwrap()
                .to_string()
        };
        // +1: the United States, Canada, Jamaica, the Dominican Republic, Guam.
        assert_eq!(zone("+14155550123"), "US");
        assert_eq!(zone("+16137827274"), "CA");
        assert_eq!(zone("+18762101234"), "JM");
        assert_eq!(zone("+18092345678"), "DO");
        assert_eq!(zone("+16713001234"), "GU");
        // +7 and +44.
        assert_eq!(zone("+79123456789"), "RU");
        assert_eq!(zone("+77012345678"), "KZ");
        assert_eq!(zone("+447400123456"), "GB");
        assert_eq!(zone("+447781123456"), "GG");
        assert_eq!(zone("+447624123456"), "IM");
        // No country: satellite and international networks keep their calling code.
        assert_eq!(zone("+881612345678"), "+881");
        assert_eq!(zone("+882345678901"), "+882");
    }

    #[test]
    fn bad_settings_are_named() {
        for (name, value) in [
            ("OTP_FRAUD_GUARD", "paranoid"),
            ("OTP_FRAUD_GUARD_RATIO", "0"),
            ("OTP_FRAUD_GUARD_WINDOW_SECS", "10"),
        ] {
            let err = FraudGuardPolicy::from_env(&Env::from_pairs([(name, value)])).unwrap_err();
            assert_eq!(err.name, name, "{value}: {err}");
        }
        let policy =
            FraudGuardPolicy::from_env(&Env::from_pairs([("OTP_FRAUD_GUARD", "ENFORCE")])).unwrap();
        assert_eq!(policy.mode, FraudGuardMode::Enforce);
        assert_eq!(
            policy.to_string(),
            "enforce (window 3600 s, at least 20 unverified, ratio 1)"
        );
    }
}
