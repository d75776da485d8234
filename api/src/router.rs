//! The routes and the middleware stack around them (docs/api.md#middleware).

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::Redirect;
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::error::{ApiError, log_errors, render_problems};
use crate::middleware::{panic_response, record_metrics, request_span};
use crate::request_id::request_id;
use crate::state::AppState;
use crate::{auth, demo, docs, routes};

/// Bodies over 16 KiB are refused with 413.
const BODY_LIMIT: usize = 16 * 1024;
/// Longer than any dependency timeout, so a slow dependency answers its own 503 first.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Every route under the middleware stack, plus `extra` routes (tests add one that panics).
pub fn router(state: AppState, extra: Router<AppState>) -> Router {
    // require_user wraps the handlers only, so a wrong method still gets 405, not 401. The
    // token is looked up only on the routes that need it: elsewhere an Authorization header
    // must not cost a database query.
    let require_user = || from_fn(auth::require_user);
    let protected = Router::new()
        .route(
            "/v1/me",
            get(routes::session::me).route_layer(require_user()),
        )
        .route(
            "/v1/logout",
            post(routes::session::logout).route_layer(require_user()),
        )
        .route_layer(from_fn_with_state(state.clone(), auth::authenticate));
    let docs = docs::router(&state);
    let mut pages = Router::new()
        .route("/", get(|| async { Redirect::temporary("/docs/") }))
        // Browsers ask for it on every page; "nothing here" without a 404 in their console.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }));
    if state.config.demo_page {
        pages = pages.route("/demo", get(demo::page));
    }
    Router::new()
        .route("/v1/otp", post(routes::otp::request_otp))
        .route("/v1/otp/verify", post(routes::otp::verify_otp))
        .route("/v1/signup", post(routes::otp::signup))
        .route("/v1/token/refresh", post(routes::session::refresh))
        .route("/healthz", get(routes::health::healthz))
        .route("/readyz", get(routes::health::readyz))
        .route("/metrics", get(routes::health::metrics))
        .merge(protected)
        .merge(docs)
        .merge(pages)
        .merge(extra)
        .fallback(not_found)
        // Layers run outermost-last: request id, problem rendering, metrics, tracing span, error
        // logging, panic recovery, timeout, body limit; authenticate sits on the protected
        // routes above.
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(from_fn(log_errors))
        // Failures are logged once, by log_errors, at the level they deserve (a 503 from
        // /readyz is news for a dashboard, not an error); the trace layer only makes the span.
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_failure(()),
        )
        .layer(from_fn(record_metrics))
        .layer(from_fn(render_problems))
        .layer(from_fn(request_id))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}
