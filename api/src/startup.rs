//! Builds the app from its configuration and serves it until asked to stop.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use sqlx::Postgres;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_scalar::Servable;

use crate::config::ApiConfig;
use crate::error::{ApiError, render_problems};
use crate::openapi::ApiDoc;
use crate::request_id::{RequestId, request_id};
use crate::state::AppState;
use crate::{auth, db, routes};

/// SPEC §3: bodies over 16 KiB are refused with 413.
pub const BODY_LIMIT: usize = 16 * 1024;
/// Longer than any dependency timeout, so a slow dependency answers its own 503 first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const PURGE_EVERY: Duration = Duration::from_secs(600);

pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
}

impl Application {
    /// Binds the listener and prepares the app. Dependencies that are down do not stop it:
    /// connections are made lazily and migrations are retried in the background.
    pub async fn build(config: ApiConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.api_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on API_ADDR {}: {e}", config.api_addr))?;
        let connect: PgConnectOptions = config
            .database_url
            .expose_secret()
            .parse()
            .map_err(|e| anyhow::anyhow!("invalid configuration: DATABASE_URL: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(database_pool_size())
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy_with(connect);
        let redis_client = redis::Client::open(config.common.redis_url.expose_secret())
            .map_err(|e| anyhow::anyhow!("invalid configuration: REDIS_URL: {e}"))?;
        let redis_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_lazy_with_config(redis_client, redis_config)?;
        // Installed before the first request so no sample is lost.
        shared::telemetry::metrics_handle();
        if config.uses_dev_otp_secret() {
            tracing::warn!(
                "OTP_SECRET is not set: using a development value; set it in production, the same on every replica"
            );
        }
        let state = AppState::new(config, pool, redis);
        let router = router(state.clone());
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
        self.router = router_with(self.state.clone(), extra);
        self
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting and finishes in-flight requests.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = self.local_addr();
        tokio::spawn(prepare_database(self.state.clone()));
        tokio::spawn(purge_expired_tokens(self.state.clone()));
        tracing::info!(%addr, "api listening");
        axum::serve(
            self.listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await?;
        tracing::info!("api stopped");
        Ok(())
    }
}

fn database_pool_size() -> u32 {
    std::env::var("DATABASE_POOL_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(10)
}

/// Creates the database if it is missing and runs pending migrations, retrying until
/// PostgreSQL answers. Database routes answer 503 until this is done.
async fn prepare_database(state: AppState) {
    let mut delay = Duration::from_millis(200);
    loop {
        match migrate(&state).await {
            Ok(()) => {
                state.schema_ready.store(true, Ordering::Release);
                tracing::info!("database schema is up to date");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), retry_in_ms = delay.as_millis(), "database not ready");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn migrate(state: &AppState) -> anyhow::Result<()> {
    let url = state.config.database_url.expose_secret();
    if !Postgres::database_exists(url).await? {
        // Another replica may win the race; that is fine.
        if let Err(e) = Postgres::create_database(url).await
            && !Postgres::database_exists(url).await?
        {
            return Err(e.into());
        }
        tracing::info!("created the database");
    }
    sqlx::migrate!("../migrations")
        .run(state.raw_pool())
        .await?;
    Ok(())
}

async fn purge_expired_tokens(state: AppState) {
    let mut every = tokio::time::interval(PURGE_EVERY);
    loop {
        every.tick().await;
        if let Ok(pool) = state.db() {
            match db::purge_expired(pool).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(purged = n, "purged expired tokens"),
                Err(e) => tracing::warn!(error = %e, "could not purge expired tokens"),
            }
        }
    }
}

/// Public so tests can add routes (e.g. one that panics) under the same middleware.
pub fn router(state: AppState) -> Router {
    router_with(state, Router::new())
}

pub fn router_with(state: AppState, extra: Router<AppState>) -> Router {
    // require_user wraps the handlers only, so a wrong method still gets 405, not 401.
    let require_user = || middleware::from_fn(auth::require_user);
    let protected = Router::new()
        .route(
            "/v1/me",
            get(routes::session::me).route_layer(require_user()),
        )
        .route(
            "/v1/logout",
            post(routes::session::logout).route_layer(require_user()),
        );
    let docs: Router<AppState> = utoipa_scalar::Scalar::with_url("/docs", ApiDoc::openapi()).into();
    Router::new()
        .route("/v1/otp", post(routes::otp::request_otp))
        .route("/v1/otp/verify", post(routes::otp::verify_otp))
        .route("/v1/signup", post(routes::otp::signup))
        .route("/v1/token/refresh", post(routes::session::refresh))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .route("/openapi.json", get(openapi_json))
        .merge(protected)
        .merge(docs)
        .merge(extra)
        .fallback(not_found)
        // Layers run outermost-last: request id, problem rendering, metrics, tracing span, panic
        // recovery, timeout, body limit, authenticate (SPEC §3 order).
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(middleware::from_fn(record_metrics))
        .layer(middleware::from_fn(render_problems))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    axum::response::IntoResponse::into_response(ApiError::Internal(anyhow::anyhow!(
        "handler panicked: {message}"
    )))
}

fn request_span(request: &Request) -> tracing::Span {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.as_str())
        .unwrap_or_default();
    // The path only: query strings are not logged, they could carry secrets.
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id,
        user_id = tracing::field::Empty,
    )
}

async fn record_metrics(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
