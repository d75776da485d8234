//! The worker's own HTTP port (`WORKER_ADDR`): `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use shared::redis_connection::RedisConnection;

use crate::shutdown::Shutdown;

/// What `/readyz` reports on. The consume loop flips `consuming`; the rest is looked up when asked.
pub(crate) struct Readiness {
    consuming: AtomicBool,
    shutdown: Shutdown,
    redis: RedisConnection,
}

impl Readiness {
    pub(crate) fn new(shutdown: Shutdown, redis: RedisConnection) -> Self {
        Self {
            consuming: AtomicBool::new(false),
            shutdown,
            redis,
        }
    }

    /// Connected to RabbitMQ with a consumer open.
    pub(crate) fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Relaxed);
    }

    /// What keeps this replica from being ready; empty when it is.
    async fn failing(&self) -> Vec<&'static str> {
        let mut failing = Vec::new();
        if self.shutdown.is_shutdown() {
            failing.push("shutting_down");
        }
        if !self.consuming.load(Ordering::Relaxed) {
            failing.push("rabbitmq");
        }
        let ping = async {
            redis::cmd("PING")
                .query_async::<String>(&mut self.redis.clone())
                .await
        };
        if !matches!(
            tokio::time::timeout(Duration::from_secs(2), ping).await,
            Ok(Ok(_))
        ) {
            failing.push("redis");
        }
        failing
    }
}

pub(crate) fn router(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Ready while consuming: connected to RabbitMQ, Redis answering, not shutting down. A 503 names
/// what is missing, so an operator sees why the replica is out of rotation.
async fn readyz(State(readiness): State<Arc<Readiness>>) -> Response {
    let failing = readiness.failing().await;
    if failing.is_empty() {
        axum::Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unavailable", "failing": failing})),
        )
            .into_response()
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared::telemetry::render_metrics(),
    )
        .into_response()
}
