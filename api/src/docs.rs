//! `/docs`: Swagger UI over `/openapi.json`. Its files are compiled into the binary
//! (utoipa-swagger-ui's `vendored` feature), so the page works with no network at all.

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::header;
use axum::middleware::map_response;
use axum::response::Response;
use utoipa_swagger_ui::SwaggerUi;

use crate::openapi;
use crate::state::AppState;

/// What the page's tab says instead of Swagger UI's own "Swagger UI".
const TITLE: &str = "otp-auth API docs";
/// Swagger UI's pages are a few kilobytes; anything larger is passed through untouched.
const HTML_LIMIT: usize = 64 * 1024;

pub fn router(state: &AppState) -> Router<AppState> {
    let docs: Router<AppState> = SwaggerUi::new("/docs")
        .url("/openapi.json", openapi::document(&state.config))
        .into();
    docs.layer(map_response(retitle))
}

/// Names the product in the HTML page's `<title>`.
async fn retitle(response: Response) -> Response {
    let is_html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if !is_html {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, HTML_LIMIT).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let html = String::from_utf8_lossy(&bytes).replace(
        "<title>Swagger UI</title>",
        &format!("<title>{TITLE}</title>"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(html))
}
