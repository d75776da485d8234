//! What every handler shares, built once at start-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shared::redis_connection::RedisConnection;
use shared::telemetry::throttle::Throttle;
use sqlx::PgPool;

use crate::config::ApiConfig;
use crate::error::{ApiError, Dependency};
use crate::limits::{FraudAlarm, Limits};
use crate::otp::OtpHasher;
use crate::otp::store::OtpStore;
use crate::publisher::Publisher;
use crate::signin::promotion::DeferredPromotions;

/// See [`Inner::late_refresh_counts`].
const LATE_REFRESH_COUNTS: usize = 256;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: ApiConfig,
    pool: PgPool,
    /// Reconnects by itself; created lazily so the api starts while Redis is down.
    redis: RedisConnection,
    pub otp_store: OtpStore,
    pub limits: Limits,
    pub fraud_alarm: FraudAlarm,
    /// Warnings that Redis could not count a refresh against its daily cap: one every few
    /// seconds while Redis is away, not one per refresh.
    pub refresh_cap_warnings: Throttle,
    /// Room for refresh counts that Redis answered late, each waiting to be given back: at most
    /// this many at once, so that a slow Redis is not sent twice the scripts.
    pub late_refresh_counts: Arc<tokio::sync::Semaphore>,
    pub hasher: OtpHasher,
    pub publisher: Publisher,
    /// Confirmed codes that Redis has yet to make current, retried in the background.
    pub deferred_promotions: DeferredPromotions,
    /// Set once the migrations have run; until then database routes answer 503.
    pub schema_ready: AtomicBool,
    /// Which dependencies the last `/readyz` found down, to log changes only.
    readiness_down: std::sync::Mutex<std::collections::HashSet<&'static str>>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: ApiConfig, pool: PgPool, redis: RedisConnection) -> Self {
        let topology = config.common.topology();
        Self(Arc::new(Inner {
            otp_store: OtpStore::new(&config.common.namespace),
            limits: Limits::new(&config.common.namespace),
            fraud_alarm: FraudAlarm::default(),
            refresh_cap_warnings: Throttle::new(std::time::Duration::from_secs(10)),
            late_refresh_counts: Arc::new(tokio::sync::Semaphore::new(LATE_REFRESH_COUNTS)),
            hasher: OtpHasher::new(&config.otp_secret),
            publisher: Publisher::new(config.common.amqp.clone(), topology),
            deferred_promotions: DeferredPromotions::default(),
            schema_ready: AtomicBool::new(false),
            readiness_down: std::sync::Mutex::default(),
            config,
            pool,
            redis,
        }))
    }

    /// Records whether `dependency` is down now; says whether it was down at the last check.
    pub fn readiness_seen(&self, dependency: &'static str, down: bool) -> bool {
        let mut seen = self
            .readiness_down
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if down {
            !seen.insert(dependency)
        } else {
            seen.remove(dependency)
        }
    }

    /// The pool, once the schema is in place.
    pub fn db(&self) -> Result<&PgPool, ApiError> {
        if self.schema_ready.load(Ordering::Acquire) {
            Ok(&self.pool)
        } else {
            Err(ApiError::unavailable(
                Dependency::Postgres,
                anyhow::anyhow!("the database schema is not migrated yet"),
            ))
        }
    }

    /// The pool even before migrations (for running them and for health checks).
    pub fn raw_pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn redis(&self) -> RedisConnection {
        self.redis.clone()
    }
}
