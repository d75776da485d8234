//! A circuit breaker per provider, shared by every worker through Redis.
//!
//! Provider-side failures (5xx, 429, timeouts, refused credentials) are counted in a sliding
//! window; `PROVIDER_BREAKER_FAILURES` of them within `PROVIDER_BREAKER_WINDOW_SECS` open the
//! breaker, and while it is open sends go to the next provider at once. After
//! `PROVIDER_BREAKER_COOLDOWN_SECS` one worker wins the right to send one probe (half-open): a
//! success closes the breaker, a failure opens it for another cooldown.
//!
//! The probe is held by the send that took it ([`Probe`]) until the provider's answer is reported;
//! a send that ends without a report gives the probe back, so that the provider is not left out
//! until the probe's lease runs out.
//!
//! The state lives in Redis so that every worker sees the same breaker (and delivery receipts,
//! which may reach another worker, can open it too). Each worker reads it at most every
//! [`REFRESH_EVERY`] and otherwise decides from memory, so a send while the breaker is closed
//! costs no Redis round trip.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::redis_connection::RedisConnection;
use shared::redis_script::Script;

use super::Failure;
use crate::config::BreakerConfig;
use crate::metrics as m;

/// How stale a worker's view of a breaker may be.
const REFRESH_EVERY: Duration = Duration::from_millis(500);
/// A probe that never reports back (its worker died) frees the half-open slot after this.
const PROBE_LEASE_MS: u64 = 30_000;

/// State of a breaker hash. Fields: `w`, `c`, `p` (failures: window index, this window's count,
/// the previous one's), `o` (open until, ms; 0 closed), `q` (a probe is out until, ms), `ds`,
/// `dp`, `fs`, `fp` (receipts: delivered and dropped, this window and the previous).
/// ARGV: operation, failures threshold, window ms, cooldown ms, probe lease ms, dropped ratio,
/// minimum receipts, probe (`q` as granted, for `release`). Operations: `read`; `failure` (count
/// one; open when over the threshold, or again after a failed probe); `success` (a probe
/// succeeded: close); `delivered` and `dropped` (a receipt: open when too many of enough receipts
/// say the carrier dropped the message); `probe` (after the cooldown, claim the one probe);
/// `release` (give that probe back unreported, if it is still the one out).
/// Returns {state, ms left open, granted, q}: state 0 closed, 1 open, 2 half-open.
const BREAKER: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, threshold, window, cooldown = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ratio, min_samples = tonumber(ARGV[6]), tonumber(ARGV[7])
local s = redis.call('HMGET', KEYS[1], 'w', 'c', 'p', 'o', 'q', 'ds', 'dp', 'fs', 'fp')
local index = math.floor(now / window)
local w = tonumber(s[1]) or index
local c, p = tonumber(s[2]) or 0, tonumber(s[3]) or 0
local open_until, probe_until = tonumber(s[4]) or 0, tonumber(s[5]) or 0
local ds, dp, fs, fp = tonumber(s[6]) or 0, tonumber(s[7]) or 0, tonumber(s[8]) or 0, tonumber(s[9]) or 0
if w == index - 1 then
  p, c, dp, ds, fp, fs = c, 0, ds, 0, fs, 0
elseif w < index - 1 then
  p, c, dp, ds, fp, fs = 0, 0, 0, 0, 0, 0
end
local weight = (window - (now - index * window)) / window
local granted = 0
local function open_now()
  if open_until == 0 then open_until = now + cooldown end
end
if op == 'failure' then
  c = c + 1
  if open_until > 0 and now >= open_until then
    open_until, probe_until = now + cooldown, 0
  elseif p * weight + c >= threshold then
    open_now()
  end
elseif op == 'success' then
  if open_until > 0 and now >= open_until then
    open_until, probe_until, c, p, ds, dp, fs, fp = 0, 0, 0, 0, 0, 0, 0, 0
  end
elseif op == 'delivered' or op == 'dropped' then
  if op == 'delivered' then ds = ds + 1 else fs = fs + 1 end
  local delivered, dropped = dp * weight + ds, fp * weight + fs
  if delivered + dropped >= min_samples and dropped / (delivered + dropped) > ratio then
    open_now()
  end
elseif op == 'probe' then
  if open_until > 0 and now >= open_until and probe_until <= now then
    probe_until = now + tonumber(ARGV[5])
    granted = 1
  end
elseif op == 'release' then
  if probe_until == tonumber(ARGV[8]) then probe_until = 0 end
end
redis.call('HSET', KEYS[1], 'w', index, 'c', c, 'p', p, 'o', open_until, 'q', probe_until, 'ds', ds, 'dp', dp, 'fs', fs, 'fp', fp)
redis.call('PEXPIRE', KEYS[1], math.max(window * 2, cooldown * 4))
local state = 0
if open_until > 0 then
  if now < open_until then state = 1 else state = 2 end
end
return {state, math.max(open_until - now, 0), granted, probe_until}
";
/// Whether a send may go to this provider now.
#[derive(Debug)]
pub enum Allowance {
    Yes,
    /// The breaker is half-open and this send is its one probe.
    Probe(Probe),
    No,
}

impl Allowance {
    /// Whether the send may go to this provider.
    pub fn granted(&self) -> bool {
        !matches!(self, Self::No)
    }

    /// The provider's answer was reported another way (a failure, which reopens a half-open
    /// breaker and ends its probe): nothing to give back.
    pub fn reported(self) {
        if let Self::Probe(probe) = self {
            probe.reported();
        }
    }
}

/// The one probe of a half-open breaker, held by the send that took it. Dropped before its
/// answer was reported (a send handed back before its call, one whose answer says nothing of
/// the provider, one cut short at a stop or aborted), it gives the probe back at once. Kept, it
/// would leave the provider out on every worker until its lease ran out, 30 s; with one
/// provider, every send would wait that long.
pub struct Probe {
    /// `None` once reported.
    breaker: Option<Arc<Inner>>,
    /// `q` in Redis as it was granted: giving back frees this probe only, never a later one.
    until_ms: i64,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("until_ms", &self.until_ms)
            .field("reported", &self.breaker.is_none())
            .finish()
    }
}

impl Probe {
    /// Its answer was reported: nothing to give back when it drops.
    fn reported(mut self) {
        self.breaker = None;
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let Some(breaker) = self.breaker.take() else {
            return;
        };
        let until_ms = self.until_ms;
        // A drop cannot wait for Redis. Without a runtime (the process is ending), the lease
        // frees the probe.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = breaker.run("release", until_ms).await;
            });
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

pub struct Breaker(Arc<Inner>);

struct Inner {
    provider: &'static str,
    config: BreakerConfig,
    redis: RedisConnection,
    key: String,
    script: Script,
    /// This worker's view, and when it was read.
    view: Mutex<(State, Option<Instant>)>,
}

impl Breaker {
    pub fn new(
        provider: &'static str,
        config: BreakerConfig,
        redis: RedisConnection,
        namespace: &str,
    ) -> Self {
        metrics::gauge!(m::BREAKER_STATE, "provider" => provider).set(0.0);
        Self(Arc::new(Inner {
            provider,
            config,
            redis,
            key: format!("{namespace}:breaker:{{{namespace}:{provider}}}"),
            script: Script::new(BREAKER),
            view: Mutex::new((State::Closed, None)),
        }))
    }

    /// Whether to send through this provider now. Reads Redis only when this worker's view is
    /// older than [`REFRESH_EVERY`], or to claim the probe of a half-open breaker.
    pub async fn allows(&self) -> Allowance {
        let inner = &self.0;
        let (state, read_at) = *inner.view.lock().unwrap_or_else(|e| e.into_inner());
        let state = if read_at.is_none_or(|at| at.elapsed() >= REFRESH_EVERY) {
            inner
                .run("read", 0)
                .await
                .map_or(state, |reply| reply.state)
        } else {
            state
        };
        match state {
            State::Closed => Allowance::Yes,
            State::Open { until } if Instant::now() < until => Allowance::No,
            State::Open { .. } | State::HalfOpen => match inner.run("probe", 0).await {
                Ok(Reply {
                    granted: true,
                    probe_until_ms,
                    ..
                }) => Allowance::Probe(Probe {
                    breaker: Some(Arc::clone(inner)),
                    until_ms: probe_until_ms,
                }),
                _ => Allowance::No,
            },
        }
    }

    /// How long, as this worker last read it, the breaker stays open before it lets a probe
    /// through; `None` while it is closed or half-open.
    pub fn shut_for(&self) -> Option<Duration> {
        match self.0.view.lock().unwrap_or_else(|e| e.into_inner()).0 {
            State::Open { until } => Some(until.saturating_duration_since(Instant::now())),
            State::Closed | State::HalfOpen => None,
        }
    }

    /// Whether the breaker is open (or half-open) in this worker's current view.
    pub fn is_open(&self) -> bool {
        !matches!(
            self.0.view.lock().unwrap_or_else(|e| e.into_inner()).0,
            State::Closed
        )
    }

    /// A provider-side failure. Redis being away must not stop the send path: the view just
    /// stays as it was.
    pub async fn failure(&self) {
        let _ = self.0.run("failure", 0).await;
    }

    /// A delivery receipt: a carrier that drops the provider's messages opens its breaker too,
    /// even while its API accepts every one.
    pub async fn receipt(&self, delivered: bool) {
        let _ = self
            .0
            .run(if delivered { "delivered" } else { "dropped" }, 0)
            .await;
    }

    /// The provider took the SMS: closes a half-open breaker. Costs a round trip only then.
    pub async fn success(&self, allowance: Allowance) {
        if let Allowance::Probe(probe) = allowance {
            probe.reported();
            let _ = self.0.run("success", 0).await;
        }
    }

    /// A send `allowance` let through failed. A failure the provider is to blame for counts
    /// (and reopens a half-open breaker, ending its probe). Any other gives a probe back, closing
    /// nothing: a refusal for the recipient or the route, or one the worker cannot place, may be
    /// the answer to a number the requester chose, and an SMS-pumping attacker, who sends most
    /// of the traffic, would otherwise close the breaker of a provider still failing everyone
    /// else.
    pub async fn failed(&self, allowance: Allowance, kind: Failure) {
        if kind.counts_toward_breaker() {
            self.failure().await;
            allowance.reported();
        }
    }
}

/// What the script answered.
struct Reply {
    state: State,
    granted: bool,
    /// The probe's lease (`q`), when `granted`.
    probe_until_ms: i64,
}

impl Inner {
    async fn run(&self, op: &str, probe_until_ms: i64) -> redis::RedisResult<Reply> {
        let reply: Vec<i64> = self
            .script
            .key(&self.key)
            .arg(op)
            .arg(self.config.failures)
            .arg(millis(self.config.window))
            .arg(millis(self.config.cooldown))
            .arg(PROBE_LEASE_MS)
            .arg(self.config.delivery_failure_ratio)
            .arg(self.config.delivery_min_samples)
            .arg(probe_until_ms)
            .invoke_async(&mut self.redis.clone())
            .await?;
        let (state, open_ms, granted, probe_until_ms) = match reply.as_slice() {
            [state, open_ms, granted, probe_until_ms, ..] => {
                (*state, *open_ms, *granted == 1, *probe_until_ms)
            }
            _ => (0, 0, false, 0),
        };
        let state = match state {
            1 => State::Open {
                until: Instant::now() + Duration::from_millis(u64::try_from(open_ms).unwrap_or(0)),
            },
            2 => State::HalfOpen,
            _ => State::Closed,
        };
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let was = view.0;
        *view = (state, Some(Instant::now()));
        drop(view);
        self.report(was, state);
        Ok(Reply {
            state,
            granted,
            probe_until_ms,
        })
    }

    fn report(&self, was: State, now: State) {
        let value = match now {
            State::Closed => 0.0,
            State::Open { .. } => 1.0,
            State::HalfOpen => 2.0,
        };
        metrics::gauge!(m::BREAKER_STATE, "provider" => self.provider).set(value);
        match (was, now) {
            (State::Closed, State::Open { .. }) => tracing::warn!(
                provider = self.provider,
                cooldown_secs = self.config.cooldown.as_secs(),
                "provider breaker opened: sends go to the next provider"
            ),
            (State::Open { .. } | State::HalfOpen, State::Closed) => tracing::info!(
                provider = self.provider,
                "provider breaker closed: the provider is back in rotation"
            ),
            _ => {}
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_redis;

    /// A breaker in the Redis the integration tests use (`TEST_REDIS_URL`), under a namespace of
    /// its own, opened by one failure and half-open 50 ms later.
    fn breaker() -> Breaker {
        let config = BreakerConfig {
            failures: 1,
            window: Duration::from_secs(30),
            cooldown: Duration::from_millis(50),
            delivery_failure_ratio: 0.5,
            delivery_min_samples: 10,
        };
        Breaker::new(
            "twilio",
            config,
            test_redis::connection(),
            &test_redis::namespace("breaker"),
        )
    }

    /// Waits, at most 5 s (the probe's lease is 30 s), until the breaker grants its probe.
    async fn take_the_probe(breaker: &Breaker) -> Probe {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Allowance::Probe(probe) = breaker.allows().await {
                return probe;
            }
            assert!(Instant::now() < deadline, "no probe granted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `q`, the probe's lease, as Redis holds it.
    async fn probe_lease(breaker: &Breaker) -> i64 {
        redis::cmd("HGET")
            .arg(&breaker.0.key)
            .arg("q")
            .query_async(&mut breaker.0.redis.clone())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_probe_dropped_unreported_is_given_back_and_only_itself() {
        let breaker = breaker();
        breaker.failure().await;
        let probe = take_the_probe(&breaker).await;
        assert!(!breaker.allows().await.granted(), "two probes at once");
        drop(probe);
        // Given back: the next send may probe now, not once the lease runs out.
        let probe = take_the_probe(&breaker).await;
        // Its lease lapsed and another worker took a new probe (`q` moved on): giving the first
        // back must not free the other's.
        let others = probe.until_ms + 1;
        let () = redis::cmd("HSET")
            .arg(&breaker.0.key)
            .arg("q")
            .arg(others)
            .query_async(&mut breaker.0.redis.clone())
            .await
            .unwrap();
        // What the probe's drop runs, awaited here.
        breaker.0.run("release", probe.until_ms).await.unwrap();
        assert_eq!(probe_lease(&breaker).await, others, "another's probe freed");
        Allowance::Probe(probe).reported();
    }
}
