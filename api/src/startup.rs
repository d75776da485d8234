//! `Application`: builds the api from its configuration and serves it until asked to stop.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use secrecy::ExposeSecret;
use shared::redis_connection::RedisConnection;
use shared::serve;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;

use crate::config::ApiConfig;
use crate::state::AppState;

use crate::{jobs, router};

/// How long a stopping api waits for codes Redis has yet to make current (see
/// `signin::promotion`), after the in-flight requests: only while Redis has been failing.
const PROMOTIONS_AT_SHUTDOWN: Duration = Duration::from_secs(5);

/// The api's pool, its connections made lazily, each with PostgreSQL's `statement_timeout` set to
/// `statement_timeout` (`DATABASE_STATEMENT_TIMEOUT_MS`; zero leaves the server's).
///
/// PostgreSQL then ends a statement of ours that runs, or waits for a lock, longer than that. A
/// sign-in stuck behind a lock fails inside its request's 10 s (2 s at most for each Redis step,
/// 3 s for a pooled connection, and 3 s by default for the statement) and puts the code back;
/// without it, the client got its 503 from the request's timeout while the statement went on to
/// create a session no one would receive, having used up the code. Set on each new connection
/// (`set_config`) rather than as a startup option, which PgBouncer refuses unless told to ignore
/// it. Migrations run on a connection of their own, without it.
fn database_pool(connect: PgConnectOptions, size: u32, statement_timeout: Duration) -> PgPool {
    let millis = statement_timeout.as_millis();
    let options = PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(3));
    let options = if millis == 0 {
        options
    } else {
        options.after_connect(move |connection, _| {
            Box::pin(async move {
                sqlx::query("SELECT set_config('statement_timeout', $1, false)")
                    .bind(millis.to_string())
                    .execute(connection)
                    .await?;
                Ok(())
            })
        })
    };
    options.connect_lazy_with(connect)
}

pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
}

impl Application {
    /// Binds the listener and prepares the app. Dependencies that are down do not stop it:
    /// connections are made lazily and migrations are retried in the background.
    pub async fn build(config: ApiConfig) -> anyhow::Result<Self> {
        crate::phone::enlarge_pattern_cache();
        let listener = TcpListener::bind(config.api_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on API_ADDR {}: {e}", config.api_addr))?;
        let connect: PgConnectOptions = config
            .database_url
            .expose_secret()
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid configuration: DATABASE_URL: {e}"))?;
        let pool = database_pool(
            connect,
            config.database_pool_size,
            config.database_statement_timeout,
        );
        let redis = RedisConnection::new(&config.common.redis)
            .map_err(|e| anyhow::anyhow!("invalid configuration: REDIS_URL: {e}"))?;
        // Installed before the first request so no sample is lost.
        shared::telemetry::metrics_handle();
        crate::metrics::describe();
        if !config.phone.test_numbers.is_empty() {
            let numbers: Vec<String> = config
                .phone
                .test_numbers
                .keys()
                .map(|n| shared::mask_phone(n))
                .collect();
            tracing::warn!(
                ?numbers,
                "OTP_TEST_NUMBERS is set: these numbers get no SMS and accept a fixed code; keep it to app-store review and CI, never real users' numbers"
            );
        }
        if config.uses_dev_otp_secret() {
            tracing::warn!(
                "OTP_SECRET is not set: using a development value; set it in production, the same on every replica"
            );
        }
        if config.believes_any_forwarder() {
            tracing::warn!(
                trusted_hops = config.client_ip.trusted_hops,
                "TRUST_PROXY is set without TRUSTED_PROXIES: X-Forwarded-For is believed from any peer, so a client that reaches the api without going through the proxy picks its own address for every per-IP limit; set TRUSTED_PROXIES to the proxies' networks"
            );
        }
        let state = AppState::new(config, pool, redis);
        let router = router::router(state.clone(), Router::new());
        Ok(Self {
            listener,
            router,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Adds routes under the same middleware (tests use it for a handler that panics).
    pub fn with_extra_routes(mut self, extra: Router<AppState>) -> Self {
        self.router = router::router(self.state.clone(), extra);
        self
    }

    /// Serves until `shutdown` resolves, then stops accepting and finishes in-flight requests
    /// within `SHUTDOWN_GRACE_SECS`.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = self.local_addr();
        tokio::spawn(jobs::prepare_database(self.state.clone()));
        tokio::spawn(jobs::purge_expired_tokens(self.state.clone()));
        tokio::spawn(jobs::announce_fraud_guard_settings(self.state.clone()));
        let config = &self.state.config;
        // The workers ask the same guard before a resend: their settings should agree.
        tracing::info!(%addr, fraud_guard = %config.fraud_guard, "api listening");
        let reserved = serve::OWN_OPEN_FILES + u64::from(config.database_pool_size);
        let limits = config.server.within_open_files(reserved, 1);
        let grace = config.shutdown_grace;
        let shutdown = async move {
            shutdown.await;
            grace
        };
        serve::serve("api", self.listener, self.router, limits, shutdown).await?;
        self.state
            .deferred_promotions
            .finish(PROMOTIONS_AT_SHUTDOWN)
            .await;
        tracing::info!("api stopped");
        Ok(())
    }
}
