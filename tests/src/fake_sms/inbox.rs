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

impl ToFilter {
    /// The number asked for. A `+` typed into a URL arrives as a space (form encoding), so
    /// `?to=+14155550100` comes in as " 14155550100": a leading space is taken as the `+`, and
    /// a number without either gets one.
    fn number(&self) -> Option<String> {
        let to = self.to.as_deref()?.trim_end();
        if to.is_empty() {
            return None;
        }
        let digits = to.trim_start().trim_start_matches('+');
        Some(format!("+{digits}"))
    }
}

pub(super) async fn list_messages(
    State(state): State<Arc<FakeState>>,
    Query(filter): Query<ToFilter>,
) -> Response {
    axum::Json(state.messages(filter.number().as_deref())).into_response()
}

/// `{"count": n}`, every message received since start: for waiting on deliveries without copying
/// the whole inbox every time.
pub(super) async fn count_messages(State(state): State<Arc<FakeState>>) -> Response {
    axum::Json(serde_json::json!({ "count": state.message_count() })).into_response()
}

pub(super) async fn list_requests(
    State(state): State<Arc<FakeState>>,
    Query(filter): Query<ToFilter>,
) -> Response {
    axum::Json(state.requests(filter.number().as_deref())).into_response()
}

pub(super) async fn clear(State(state): State<Arc<FakeState>>) -> StatusCode {
    state.clear();
    StatusCode::NO_CONTENT
}

pub(super) async fn page(
    State(state): State<Arc<FakeState>>,
    Query(filter): Query<ToFilter>,
) -> Html<String> {
    let number = filter.number();
    let messages = state.messages(number.as_deref());
    let mut rows = String::new();
    for message in messages.iter().rev().take(200) {
        let received = message
            .received_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let from = message
            .from
            .as_deref()
            .or(message.messaging_service_sid.as_deref())
            .unwrap_or("");
        rows.push_str(&format!(
            "<tr><td>{}</td><td><a href=\"/?to={}\" title=\"only this number\">{}</a></td><td>{}</td><td>{}</td><td><pre>{}</pre></td><td>{}</td></tr>\n",
            escape(&received),
            escape(&message.to.replace('+', "%2B")),
            escape(&message.to),
            message.provider.as_str(),
            escape(from),
            escape(&message.body),
            message
                .validity_period
                .map(|v| format!("{v} s"))
                .unwrap_or_default(),
        ));
    }
    let count = match messages.len() {
        1 => "1 message".to_owned(),
        n => format!("{n} messages"),
    };
    let filter_note = number
        .as_deref()
        .map(|to| format!(" to {} (<a href=\"/\">all numbers</a>)", escape(to)))
        .unwrap_or_default();
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="3">
<title>fake-sms inbox</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ddd;padding:.4em;text-align:left;vertical-align:top}}pre{{margin:0;white-space:pre-wrap}}</style>
</head><body>
<h1>fake-sms inbox</h1>
<p>{count}{filter_note}, newest first; refreshes every 3 seconds. Click a number to see only its messages, or add <code>?to=+14155550100</code>. JSON: <a href="/messages">/messages</a>.</p>
<table><thead><tr><th>received</th><th>to</th><th>provider</th><th>from</th><th>body</th><th>validity</th></tr></thead>
<tbody>
{rows}</tbody></table>
</body></html>
"#,
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
    fn a_plus_typed_in_a_url_is_a_plus() {
        let filter = |to: &str| {
            ToFilter {
                to: Some(to.to_owned()),
            }
            .number()
        };
        assert_eq!(filter(" 14155550100").as_deref(), Some("+14155550100"));
        assert_eq!(filter("+14155550100").as_deref(), Some("+14155550100"));
        assert_eq!(filter("14155550100").as_deref(), Some("+14155550100"));
        assert_eq!(filter("").as_deref(), None);
        assert_eq!(ToFilter { to: None }.number(), None);
    }

    #[test]
    fn escapes_html() {
        assert_eq!(escape("<script>&\"'"), "&lt;script&gt;&amp;&quot;&#39;");
    }
}
