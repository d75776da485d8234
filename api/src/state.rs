//! What every handler shares, built once at start-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::config::ApiConfig;
use crate::db::TokenLifetimes;
use crate::error::{ApiError, Dependency};
use crate::otp::{OtpHasher, OtpStore};
use crate::publisher::Publisher;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: ApiConfig,
    pool: PgPool,
    /// Reconnects by itself; created lazily so the api starts while Redis is down.
    redis: ConnectionManager,
    pub otp_store: OtpStore,
    pub hasher: OtpHasher,
    pub publisher: Publisher,
    pub lifetimes: TokenLifetimes,
    /// Set once the migrations have run; until then database routes answer 503.
    pub schema_ready: AtomicBool,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: ApiConfig, pool: PgPool, redis: ConnectionManager) -> Self {
        let topology = config.common.topology();
        Self(Arc::new(Inner {
            otp_store: OtpStore::new(&config.common.namespace),
            hasher: OtpHasher::new(config.otp_secret.clone()),
            publisher: Publisher::new(config.common.amqp_url.clone(), topology),
            lifetimes: TokenLifetimes {
                access: config.access_token_ttl,
                refresh: config.refresh_token_ttl,
            },
            schema_ready: AtomicBool::new(false),
            config,
            pool,
            redis,
        }))
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

    pub fn redis(&self) -> ConnectionManager {
        self.redis.clone()
    }
}

/// Database failures that mean "PostgreSQL is away or overloaded" are 503s; anything else is a
/// bug and a 500.
pub fn db_error(error: sqlx::Error) -> ApiError {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => ApiError::unavailable(Dependency::Postgres, error),
        sqlx::Error::Database(ref db)
            if db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300") =>
        {
            // 08: connection exceptions; 57P: admin shutdown / cannot connect now; 53300: too many connections.
            ApiError::unavailable(Dependency::Postgres, error)
        }
        other => ApiError::Internal(other.into()),
    }
}

/// Every Redis failure seen here is the server being away, slow or refusing: a 503.
pub fn redis_error(error: redis::RedisError) -> ApiError {
    ApiError::unavailable(Dependency::Redis, error)
}
