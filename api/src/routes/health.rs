//! `/healthz`, `/readyz`, `/metrics`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Up")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn probe<F, E>(check: F) -> Result<(), String>
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Whether PostgreSQL, Redis and RabbitMQ are reachable (and the schema migrated).
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "Ready"),
    (status = 503, description = "`unavailable`, naming the dependency that is down"),
))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let postgres = probe(async {
        sqlx::query("SELECT 1").execute(state.raw_pool()).await?;
        if state.db().is_err() {
            return Err(anyhow::anyhow!("migrations not applied yet"));
        }
        Ok::<_, anyhow::Error>(())
    });
    let redis = probe(async {
        let mut conn = state.redis();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
    });
    let rabbitmq = probe(state.publisher.ensure_connected());
    let (postgres, redis, rabbitmq) = tokio::join!(postgres, redis, rabbitmq);
    let results = [
        ("postgres", postgres),
        ("redis", redis),
        ("rabbitmq", rabbitmq),
    ];
    let down: Vec<&str> = results
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(name, _)| *name)
        .collect();
    // Anyone may call /readyz: it says which dependency is down, never why (an error's text can
    // name hosts, users or versions). The why goes to the log.
    let checks: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .map(|(name, result)| {
            // Logged when a dependency's state changes, not on every poll: load balancers (and
            // scripts/dev) poll while a dependency is down, and a line per poll buries the news.
            let was_down = state.readiness_seen(name, result.is_err());
            let value = match result {
                Ok(()) => {
                    if was_down {
                        tracing::info!(dependency = name, "readiness check passes again");
                    }
                    json!("up")
                }
                Err(e) if was_down => {
                    tracing::debug!(dependency = name, error = %e, "readiness check still failing");
                    json!("down")
                }
                Err(e) => {
                    tracing::warn!(dependency = name, error = %e, "readiness check failed");
                    json!("down")
                }
            };
            ((*name).to_owned(), value)
        })
        .collect();
    if !down.is_empty() {
        return Err(ApiError::NotReady {
            down,
            checks: checks.into(),
        });
    }
    Ok(Json(json!({"status": "ready", "checks": checks})))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared::telemetry::render_metrics(),
    )
}
