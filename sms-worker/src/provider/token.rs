//! One OAuth access token for every worker process (the token manager).
//!
//! A provider's token endpoint is rate-limited, and issuing a token may invalidate the previous
//! one, so workers must not each fetch their own. The current token lives in Redis, sealed under
//! `WORKER_SEAL_KEY` (reading Redis alone does not reveal it), and every process keeps a copy in
//! memory, so a send costs no Redis round trip. Ahead of its expiry exactly one process, the one
//! holding a Redis lock, fetches the next token; the others keep using the current one, or, when
//! there is none, wait for the new one (bounded) without calling the endpoint themselves. The
//! lock is released by compare-and-delete, and its lease outlives a slow token call but not a
//! dead process. A token the provider rejected is deleted only if it is still the current one,
//! so fifty concurrent 401s cause one refresh, not fifty. After a failed fetch a process leaves
//! the endpoint alone for a second: its sends use the current token while it lasts, or wait
//! (bounded) for the next fetch, so a failing endpoint is not called once per send. Sends that
//! waited for a fetch that failed all get its error at once (and may move to the next provider),
//! rather than each waiting its turn for a fetch of its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use shared::clock::unix_ms;
use shared::redis_connection::RedisConnection;
use shared::redis_script::Script;

use crate::metrics as m;
use crate::seal::SealKey;

/// The lock outlives a token call (bounded by [`FETCH_TIMEOUT`]) but not a dead process for long.
const LOCK_LEASE: Duration = Duration::from_secs(10);
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a caller waits for another process to bring a token before it may try itself.
const WAIT_LIMIT: Duration = Duration::from_secs(12);
const POLL: Duration = Duration::from_millis(50);
/// How long a token due for renewal, which this process is not renewing, is used from memory
/// before Redis is asked again whether the next one has come.
const LOOK_AGAIN_AFTER: Duration = Duration::from_millis(250);
/// How long a refused token is kept out of memory: longer than a read of Redis takes.
const REFUSAL_REMEMBERED: Duration = Duration::from_secs(10);
/// After a failed fetch this process leaves the endpoint alone for this long: its sends use the
/// current token while it lasts, or wait for the next fetch, rather than each calling the
/// endpoint again.
const RETRY_FETCH_AFTER: Duration = Duration::from_secs(1);

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// A token fresh from the provider's endpoint.
pub struct FreshToken {
    pub token: SecretString,
    pub lifetime: Duration,
}

/// Where tokens come from (the provider's token endpoint).
pub trait TokenSource: Send + Sync {
    fn fetch(&self) -> impl Future<Output = Result<FreshToken, String>> + Send;
}

/// A token handed to a sender, with what identifies it in Redis (to invalidate exactly it).
#[derive(Clone)]
pub struct Token {
    pub value: SecretString,
    sealed: Arc<Vec<u8>>,
}

#[derive(Clone)]
struct Cached {
    token: Token,
    /// Past this, someone should fetch the next token.
    refresh_at: Instant,
    expires_at: Instant,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    token: String,
    issued_ms: u64,
    expires_ms: u64,
}

pub struct TokenManager<S> {
    provider: &'static str,
    source: S,
    redis: RedisConnection,
    seal: Arc<SealKey>,
    key: String,
    lock_key: String,
    release: Script,
    cached: Mutex<Option<Cached>>,
    /// One task per process does the slow path; the others wait for it here.
    slow_path: tokio::sync::Mutex<()>,
    /// This process's failed fetches.
    failures: Mutex<FetchFailures>,
    /// The token this process last saw refused (sealed), and when: not taken back into memory
    /// from a read of Redis that began before the refusal. For [`REFUSAL_REMEMBERED`] only: a
    /// token refused by mistake that stays current must not keep every send on the slow path.
    refused: Mutex<Option<(Arc<Vec<u8>>, Instant)>>,
}

/// This process's failed fetches: how many, the last one's time and error.
#[derive(Default)]
struct FetchFailures {
    count: u64,
    last: Option<(Instant, String)>,
}

impl<S: TokenSource> TokenManager<S> {
    pub fn new(
        provider: &'static str,
        source: S,
        redis: RedisConnection,
        namespace: &str,
        seal: Arc<SealKey>,
    ) -> Self {
        let tag = format!("{{{namespace}:{provider}}}");
        Self {
            provider,
            source,
            redis,
            seal,
            key: format!("{namespace}:provider:{tag}:token"),
            lock_key: format!("{namespace}:provider:{tag}:token-lock"),
            release: Script::new(RELEASE),
            cached: Mutex::new(None),
            slow_path: tokio::sync::Mutex::new(()),
            failures: Mutex::default(),
            refused: Mutex::default(),
        }
    }

    /// The current token: from memory while it is fresh, else from Redis, else fetched by
    /// whichever process gets the lock.
    pub async fn token(&self) -> Result<Token, String> {
        if let Some(token) = self.fresh_in_memory() {
            return Ok(token);
        }
        let deadline = Instant::now() + WAIT_LIMIT;
        let failures_before = self.failure_count();
        let no_token = || format!("no {} token arrived within {WAIT_LIMIT:?}", self.provider);
        let Ok(_one_at_a_time) =
            tokio::time::timeout_at(deadline.into(), self.slow_path.lock()).await
        else {
            return Err(no_token());
        };
        if let Some(token) = self.fresh_in_memory() {
            return Ok(token);
        }
        loop {
            let stored = self.read().await.map_err(|e| format!("Redis: {e}"))?;
            if let Some(current) = &stored
                && Instant::now() < current.refresh_at
            {
                self.remember(current.clone());
                return Ok(current.token.clone());
            }
            // None, or due for renewal: one process renews, the others use what there is.
            // Within the pause after a failed fetch, wait as for another process's fetch rather
            // than fail: a burst of sends failing at once would trip the provider's breaker.
            if self.may_fetch()
                && let Some(owner) = self.try_lock().await
            {
                let renewed = self.renew().await;
                self.unlock(&owner).await;
                match renewed {
                    Ok(token) => return Ok(token),
                    Err(e) => {
                        self.fetch_failed(&e);
                        return match stored {
                            // The current token still works: use it, renewing is retried later.
                            Some(current) if Instant::now() < current.expires_at => {
                                tracing::warn!(provider = self.provider, error = %e, "could not renew the provider token; using the current one");
                                let token = current.token.clone();
                                // Never past its expiry, which may be nearer than the pause.
                                self.remember(Cached {
                                    refresh_at: (Instant::now() + RETRY_FETCH_AFTER)
                                        .min(current.expires_at),
                                    ..current
                                });
                                Ok(token)
                            }
                            _ => Err(e),
                        };
                    }
                }
            }
            if let Some(current) = stored
                && Instant::now() < current.expires_at
            {
                // Due for renewal, by another process or after a failed fetch: kept in memory a
                // moment, so that this process's next sends do not each queue for the slow path
                // and Redis until the new token comes.
                let token = current.token.clone();
                self.remember(Cached {
                    refresh_at: (Instant::now() + LOOK_AGAIN_AFTER).min(current.expires_at),
                    ..current
                });
                return Ok(token);
            }
            // A fetch of this process failed while this send waited for it: that is its outcome,
            // as for the sends that waited beside it, rather than a turn at a fetch of its own
            // (one a second, so the last of many waiting sends would wait many seconds).
            if let Some(e) = self.failed_since(failures_before) {
                return Err(e);
            }
            if Instant::now() >= deadline {
                return Err(no_token());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The provider refused `token`: forget it, in Redis only if it is still the current one.
    pub async fn invalidate(&self, token: &Token) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((token.sealed.clone(), Instant::now()));
        {
            let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            if cached.as_ref().is_some_and(|c| {
                Arc::ptr_eq(&c.token.sealed, &token.sealed) || c.token.sealed == token.sealed
            }) {
                *cached = None;
            }
        }
        let deleted: redis::RedisResult<i64> = self
            .release
            .key(&self.key)
            .arg(token.sealed.as_slice())
            .invoke_async(&mut self.redis.clone())
            .await;
        if let Ok(1) = deleted {
            tracing::info!(
                provider = self.provider,
                "the provider rejected its token; a new one will be fetched"
            );
        }
    }

    /// Whether this process may call the token endpoint: not within [`RETRY_FETCH_AFTER`] of a
    /// failed call.
    fn may_fetch(&self) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures
            .last
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= RETRY_FETCH_AFTER)
    }

    fn fetch_failed(&self, error: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.count += 1;
        failures.last = Some((Instant::now(), error.to_owned()));
    }

    fn failure_count(&self) -> u64 {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count
    }

    /// The last fetch's error, if a fetch failed since the count was `before`.
    fn failed_since(&self, before: u64) -> Option<String> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.count == before {
            return None;
        }
        failures.last.as_ref().map(|(_, e)| e.clone())
    }

    fn fresh_in_memory(&self) -> Option<Token> {
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.token.clone())
    }

    fn remember(&self, cached: Cached) {
        let refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused.as_ref().is_some_and(|(token, at)| {
            at.elapsed() < REFUSAL_REMEMBERED && **token == *cached.token.sealed
        }) {
            return;
        }
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(cached);
    }

    async fn read(&self) -> redis::RedisResult<Option<Cached>> {
        let sealed: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&self.key)
            .query_async(&mut self.redis.clone())
            .await?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let stored = self
            .seal
            .open(&self.key, &sealed)
            .ok()
            .and_then(|plain| serde_json::from_slice::<Stored>(&plain).ok());
        let Some(stored) = stored else {
            // Sealed under another key (a rotated WORKER_SEAL_KEY) or damaged: fetch anew.
            tracing::warn!(
                provider = self.provider,
                "the stored provider token cannot be opened; fetching a new one"
            );
            return Ok(None);
        };
        Ok(Some(cached_from(stored, sealed)))
    }

    async fn try_lock(&self) -> Option<String> {
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let set: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(&self.lock_key)
            .arg(&owner)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(LOCK_LEASE.as_millis()).unwrap_or(u64::MAX))
            .query_async(&mut self.redis.clone())
            .await;
        matches!(set, Ok(Some(_))).then_some(owner)
    }

    async fn unlock(&self, owner: &str) {
        let _: redis::RedisResult<i64> = self
            .release
            .key(&self.lock_key)
            .arg(owner)
            .invoke_async(&mut self.redis.clone())
            .await;
    }

    /// Fetches the next token and stores it sealed, under the lock.
    async fn renew(&self) -> Result<Token, String> {
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.source.fetch())
            .await
            .unwrap_or_else(|_| Err("the token endpoint did not answer in time".to_owned()));
        let outcome = if fetched.is_ok() { "fetched" } else { "failed" };
        metrics::counter!(m::TOKEN_REFRESHES, "provider" => self.provider, "outcome" => outcome)
            .increment(1);
        let fresh = fetched?;
        let now_ms = unix_ms();
        let lifetime_ms = u64::try_from(fresh.lifetime.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let stored = Stored {
            token: fresh.token.expose_secret().to_owned(),
            issued_ms: now_ms,
            expires_ms: now_ms.saturating_add(lifetime_ms),
        };
        let plain = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
        let sealed = self
            .seal
            .seal(&self.key, &plain)
            .map_err(|e| e.to_string())?;
        let () = redis::cmd("SET")
            .arg(&self.key)
            .arg(sealed.as_slice())
            .arg("PX")
            .arg(lifetime_ms)
            .query_async(&mut self.redis.clone())
            .await
            .map_err(|e| format!("Redis: {e}"))?;
        tracing::info!(
            provider = self.provider,
            lifetime_secs = fresh.lifetime.as_secs(),
            "fetched a new provider token"
        );
        let cached = cached_from(stored, sealed);
        self.remember(cached.clone());
        Ok(cached.token)
    }
}

/// Renewal starts a fifth of the lifetime before expiry (at least a second before): early
/// enough that a slow token call finishes while the old token still works.
fn cached_from(stored: Stored, sealed: Vec<u8>) -> Cached {
    let now_ms = unix_ms();
    let lifetime = stored.expires_ms.saturating_sub(stored.issued_ms);
    let ahead = (lifetime / 5).max(1_000).min(lifetime / 2);
    let left = Duration::from_millis(stored.expires_ms.saturating_sub(now_ms));
    let until_refresh = Duration::from_millis(
        stored
            .expires_ms
            .saturating_sub(ahead)
            .saturating_sub(now_ms),
    );
    let now = Instant::now();
    Cached {
        token: Token {
            value: SecretString::from(stored.token),
            sealed: Arc::new(sealed),
        },
        refresh_at: now + until_refresh,
        expires_at: now + left,
    }
}
