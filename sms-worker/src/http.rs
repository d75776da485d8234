//! The worker's own HTTP port (`WORKER_ADDR`): `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::worker::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Ready while consuming: connected to RabbitMQ, Redis answering, not shutting down. A 503 names
/// what is missing, so an operator sees why the replica is out of rotation.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let mut failing = Vec::new();
    if shared.stopping.load(Ordering::Relaxed) {
        failing.push("shutting_down");
    }
    if !shared.consuming.load(Ordering::Relaxed) {
        failing.push("rabbitmq");
    }
    let ping = async {
        redis::cmd("PING")
            .query_async::<String>(&mut shared.redis.clone())
            .await
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(2), ping).await,
        Ok(Ok(_))
    ) {
        failing.push("redis");
    }
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
        shared::telemetry::metrics_handle().render(),
    )
        .into_response()
}
