//! `/demo` (with `DEMO_PAGE=true`): a sign-in page that shows the API's flow in a browser. The
//! page is compiled into the binary and needs nothing from the network; it keeps its tokens in
//! memory only. Off by default: a production api serves no pages.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("../assets/demo.html");

/// The page's own inline script and style, and calls to this origin: nothing else may load.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}
