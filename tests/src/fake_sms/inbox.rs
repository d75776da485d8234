//! The inbox: `GET /messages?to=` and `GET /requests?to=` as JSON, `DELETE /messages` to forget
//! both, and `GET /`, an HTML page where a developer reads the codes.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::FakeState;

#[derive(Deserialize)]
pub(super) struct ToFilter {
    to: Option<String>,
}

pub(super) async fn list_messages(
    State(state): State<Arc<FakeState>>,
    Query(filter): Query<ToFilter>,
) -> Response {
    axum::Json(state.messages(filter.to.as_deref())).into_response()
}

pub(super) async fn list_requests(
    State(state): State<Arc<FakeState>>,
    Query(filter): Query<ToFilter>,
) -> Response {
    axum::Json(state.requests(filter.to.as_deref())).into_response()
}

pub(super) async fn clear(State(state): State<Arc<FakeState>>) -> StatusCode {
    state.clear();
    StatusCode::NO_CONTENT
}

pub(super) async fn page(
    State(state): State<Arc<FakeState>>,
    Query(filter): Query<ToFilter>,
) -> Html<String> {
    let messages = state.messages(filter.to.as_deref());
    let mut rows = String::new();
    for message in messages.iter().rev().take(200) {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td><td>{}</td></tr>\n",
            escape(
                &message
                    .received_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
            escape(&message.to),
            escape(
                message
                    .from
                    .as_deref()
                    .or(message.messaging_service_sid.as_deref())
                    .unwrap_or("")
            ),
            escape(&message.body),
            message
                .validity_period
                .map(|v| format!("{v} s"))
                .unwrap_or_default(),
        ));
    }
    let filter_note = filter
        .to
        .as_deref()
        .map(|to| format!(" to {}", escape(to)))
        .unwrap_or_default();
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="3">
<title>fake-sms inbox</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ddd;padding:.4em;text-align:left;vertical-align:top}}pre{{margin:0;white-space:pre-wrap}}</style>
</head><body>
<h1>fake-sms inbox</h1>
<p>{count} message(s){filter_note}, newest first; refreshes every 3 seconds. Filter with <code>?to=+14155550100</code>. JSON: <a href="/messages">/messages</a>.</p>
<table><thead><tr><th>received</th><th>to</th><th>from</th><th>body</th><th>validity</th></tr></thead>
<tbody>
{rows}</tbody></table>
</body></html>
"#,
        count = messages.len(),
    ))
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html() {
        assert_eq!(escape("<script>&\"'"), "&lt;script&gt;&amp;&quot;&#39;");
    }
}
