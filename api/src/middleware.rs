//! The api's own middleware functions; [`crate::router`] puts them in order. The request id lives
//! in [`crate::request_id`], authentication in [`crate::auth`], problem rendering and error logging
//! in [`crate::error`].

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::metrics as m;
use crate::request_id::RequestId;

/// A caught panic becomes a 500 problem; the message goes to the log, never to the client.
pub fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    ApiError::Internal(anyhow::anyhow!("handler panicked: {message}")).into_response()
}

/// The span every log line of a request belongs to.
pub fn request_span(request: &Request) -> tracing::Span {
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.as_str())
        .unwrap_or_default();
    // The path only: query strings are not logged, they could carry secrets.
    tracing::info_span!(
        "request",
        method = method_label(request.method()),
        path = %request.uri().path(),
        request_id,
        user_id = tracing::field::Empty,
    )
}

/// The `method` label: a client can send any token as a method, and every distinct label value
/// is a series kept forever, so anything but the standard methods is `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `http_requests_total` and `http_request_duration_seconds`, by route template (never the raw
/// path: unmatched requests are `unmatched`).
pub async fn record_metrics(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(m::HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(m::HTTP_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}
