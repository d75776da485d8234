//! `sms-worker dlq list|purge`: the operator's view of `{ns}.sms.dlq`.
//!
//! Listing is non-destructive: entries are fetched with `basic.get` without acknowledging them,
//! and closing the channel hands every one back to the queue.

use std::time::Duration;

use anyhow::Context as _;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Serialize;
use shared::CommonConfig;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use shared::amqp::headers::{value_int, value_str};

use super::reason::{
    ATTEMPTS_HEADER, ERROR_HEADER, ERROR_KIND_HEADER, FAILED_AT_HEADER, PROVIDER_CODE_HEADER,
    PROVIDER_STATUS_HEADER, PROVIDERS_HEADER,
};

const TIMEOUT: Duration = Duration::from_secs(15);

/// One dead letter, as shown to an operator: the number masked, never a code.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    pub event_id: Option<String>,
    /// Masked.
    pub phone_number: Option<String>,
    /// `permanent`, `retries_exhausted`, `expired`, `invalid_message`; or the broker's own reason
    /// (`expired`, `delivery_limit`, `maxlen`, `rejected`) for native dead letters.
    pub error_kind: String,
    pub error: String,
    pub provider_status: Option<i64>,
    pub provider_code: Option<i64>,
    pub attempts: Option<i64>,
    /// Every provider tried, `name:status:code`, in order.
    pub providers: Option<String>,
    pub failed_at: Option<String>,
    pub request_id: Option<String>,
    /// `worker` (published by an sms-worker) or `broker` (dead-lettered by RabbitMQ itself).
    pub source: &'static str,
}

/// What `dlq list` found.
pub struct Listing {
    pub queue: String,
    /// Entries in the queue when listing started.
    pub total: u32,
    pub entries: Vec<Entry>,
}

pub async fn list(config: &CommonConfig, limit: usize) -> anyhow::Result<Listing> {
    let queue = config.topology().dead_letter_queue();
    let connection = connect(config).await?;
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| {
            format!("the dead-letter queue {queue} does not exist (is NAMESPACE right?)")
        })?;
    let total = declared.message_count();

    let mut entries = Vec::new();
    while entries.len() < limit {
        let got = tokio::time::timeout(
            TIMEOUT,
            channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }),
        )
        .await
        .context("RabbitMQ did not answer")??;
        let Some(message) = got else { break };
        entries.push(entry(&message.delivery.properties, &message.delivery.data));
    }
    // Nothing was acknowledged: closing the channel returns every entry to the queue.
    let _ = tokio::time::timeout(TIMEOUT, channel.close(200, "listed".into())).await;
    let _ = tokio::time::timeout(TIMEOUT, connection.close(200, "done".into())).await;
    Ok(Listing {
        queue,
        total,
        entries,
    })
}

/// Deletes every entry; returns how many there were.
pub async fn purge(config: &CommonConfig) -> anyhow::Result<(String, u32)> {
    let queue = config.topology().dead_letter_queue();
    let connection = connect(config).await?;
    let channel = connection.create_channel().await?;
    let purged = channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .with_context(|| format!("cannot purge {queue} (does it exist? is NAMESPACE right?)"))?;
    let _ = tokio::time::timeout(TIMEOUT, connection.close(200, "done".into())).await;
    Ok((queue, purged))
}

async fn connect(config: &CommonConfig) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name("sms-worker dlq".into());
    tokio::time::timeout(TIMEOUT, config.amqp.connect(0, properties))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to RabbitMQ timed out"))?
        .map(|(connection, _node)| connection)
        .with_context(|| format!("cannot connect to RabbitMQ at {}", config.amqp.redacted()))
}

/// Reads one entry: the worker's headers when it published the dead letter, else the broker's
/// `x-death` record.
pub fn entry(properties: &BasicProperties, body: &[u8]) -> Entry {
    let headers = properties.headers().as_ref();
    let get = |name: &str| headers.and_then(|h| h.inner().get(name));
    let body: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let body_str = |field: &str| {
        body.as_ref()
            .and_then(|b| b.get(field))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };

    let event_id = properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .or_else(|| body_str("event_id"));
    let phone_number = body_str("phone_number").map(|p| shared::mask_phone(&p));
    let request_id = get(shared::event::REQUEST_ID_HEADER)
        .and_then(value_str)
        .or_else(|| body_str("request_id"));

    if let Some(kind) = get(ERROR_KIND_HEADER).and_then(value_str) {
        return Entry {
            event_id,
            phone_number,
            error_kind: kind,
            error: get(ERROR_HEADER).and_then(value_str).unwrap_or_default(),
            provider_status: get(PROVIDER_STATUS_HEADER).and_then(value_int),
            provider_code: get(PROVIDER_CODE_HEADER).and_then(value_int),
            attempts: get(ATTEMPTS_HEADER).and_then(value_int),
            providers: get(PROVIDERS_HEADER).and_then(value_str),
            failed_at: get(FAILED_AT_HEADER).and_then(value_str),
            request_id,
            source: "worker",
        };
    }

    // Dead-lettered by RabbitMQ: the most recent death comes first.
    let death = match get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().first().and_then(|d| match d {
            AMQPValue::FieldTable(table) => Some(table.clone()),
            _ => None,
        }),
        _ => None,
    };
    let field = |name: &str| death.as_ref().and_then(|d| d.inner().get(name).cloned());
    let reason = field("reason")
        .as_ref()
        .and_then(value_str)
        .or_else(|| get("x-first-death-reason").and_then(value_str))
        .unwrap_or_else(|| "unknown".to_owned());
    let from = field("queue")
        .as_ref()
        .and_then(value_str)
        .unwrap_or_else(|| "a queue".to_owned());
    let failed_at = match field("time") {
        Some(AMQPValue::Timestamp(secs)) => i64::try_from(secs)
            .ok()
            .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
            .and_then(|t| t.format(&Rfc3339).ok()),
        _ => None,
    };
    Entry {
        event_id,
        phone_number,
        error: format!("dead-lettered by RabbitMQ from {from}: {reason}"),
        error_kind: reason,
        provider_status: None,
        provider_code: None,
        attempts: field("count").as_ref().and_then(value_int),
        providers: None,
        failed_at,
        request_id,
        source: "broker",
    }
}

/// The entries as a table for a terminal: a header row, then one row per entry with its
/// columns aligned, the error last (it is the longest).
pub fn format_table(entries: &[Entry]) -> String {
    const HEADER: [&str; 10] = [
        "FAILED AT",
        "EVENT",
        "REQUEST",
        "PHONE",
        "KIND",
        "ATTEMPTS",
        "STATUS",
        "CODE",
        "PROVIDERS",
        "ERROR",
    ];
    let dash = || "-".to_owned();
    let num = |v: Option<i64>| v.map_or_else(dash, |v| v.to_string());
    let rows: Vec<[String; 10]> = entries
        .iter()
        .map(|entry| {
            [
                entry.failed_at.clone().unwrap_or_else(dash),
                entry.event_id.clone().unwrap_or_else(dash),
                entry.request_id.clone().unwrap_or_else(dash),
                entry.phone_number.clone().unwrap_or_else(dash),
                entry.error_kind.clone(),
                num(entry.attempts),
                num(entry.provider_status),
                num(entry.provider_code),
                entry.providers.clone().unwrap_or_else(dash),
                entry.error.clone(),
            ]
            .map(|cell| crate::terminal::printable(&cell))
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 10]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(HEADER);
    for row in &rows {
        out.push('\n');
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

/// `1 entry`, `2 entries`.
pub fn entries(count: u64) -> String {
    match count {
        1 => "1 entry".to_owned(),
        n => format!("{n} entries"),
    }
}

/// How many entries the dead-letter queue holds now.
pub async fn count(config: &CommonConfig) -> anyhow::Result<(String, u32)> {
    let queue = config.topology().dead_letter_queue();
    let connection = connect(config).await?;
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("cannot read {queue} (does it exist? is NAMESPACE right?)"))?;
    let _ = tokio::time::timeout(TIMEOUT, connection.close(200, "done".into())).await;
    Ok((queue, declared.message_count()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    #[test]
    fn reads_worker_dead_letters() {
        let event = r#"{"version":1,"event_id":"0192f0c4-1c2b-7cc3-a5b1-2f0f6c1d9e11","phone_number":"+14155550100","otp":null,"expires_at":"2026-11-22T10:05:00Z","requested_at":"2026-11-22T10:00:00Z","request_id":"req-1"}"#;
        let dead_letter = super::super::reason::DeadLetter {
            kind: super::super::reason::ErrorKind::Permanent,
            error: "twilio answered 400: invalid number".into(),
            attempts: 1,
            provider_status: Some(400),
            provider_code: Some(21211),
            providers: vec!["twilio:400:21211".to_owned()],
        };
        let properties = super::super::publish::properties(
            &BasicProperties::default()
                .with_message_id("0192f0c4-1c2b-7cc3-a5b1-2f0f6c1d9e11".into()),
            &dead_letter,
            OffsetDateTime::UNIX_EPOCH,
        );
        let entry = entry(&properties, event.as_bytes());
        assert_eq!(entry.source, "worker");
        assert_eq!(entry.error_kind, "permanent");
        assert_eq!(entry.provider_code, Some(21211));
        assert_eq!(entry.provider_status, Some(400));
        assert_eq!(entry.attempts, Some(1));
        assert_eq!(entry.phone_number.as_deref(), Some("+1415*****00"));
        assert_eq!(entry.failed_at.as_deref(), Some("1970-01-01T00:00:00Z"));
        let table = format_table(std::slice::from_ref(&entry));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(
            lines[0].starts_with("FAILED AT") && lines[0].contains("REQUEST"),
            "{table}"
        );
        assert!(
            lines[1].contains("permanent") && lines[1].contains("21211"),
            "{table}"
        );
        // Columns line up: each header starts where its cells start.
        let column = lines[0].find("KIND").unwrap();
        assert_eq!(
            &lines[1][column..column + "permanent".len()],
            "permanent",
            "{table}"
        );
        assert!(!table.contains("+14155550100"), "{table}");
        // A provider's, a proxy's or a publisher's escape sequence is written out, not sent to
        // the operator's terminal.
        let hostile = Entry {
            error: "refused \u{1b}]0;owned\u{7}\u{1b}[2J\r\nFAKE \u{9b}2J \u{202e}desrever \u{e0041}\u{200b} C:\\x"
                .to_owned(),
            ..entry
        };
        let table = format_table(std::slice::from_ref(&hostile));
        let raw = |text: &str| {
            text.chars()
                .any(|c| c != '\n' && crate::terminal::unprintable(c))
        };
        assert!(!raw(&table), "{table:?}");
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(table.contains("refused \\u{1b}]0;owned"), "{table}");
        assert!(
            table.contains(r"C:\\x"),
            "a backslash is written out too: {table}"
        );
        let json = crate::terminal::json_line(&hostile).expect("JSON");
        assert!(!raw(&json), "{json:?}");
        let read: serde_json::Value = serde_json::from_str(&json).expect("still JSON");
        assert_eq!(
            read["error"],
            hostile.error.as_str(),
            "the same text, escaped"
        );
        assert_eq!(entries(1), "1 entry");
        assert_eq!(entries(0), "0 entries");
        assert_eq!(entries(2), "2 entries");
    }

    #[test]
    fn reads_the_brokers_x_death() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString("expired".into()));
        death.insert("queue".into(), AMQPValue::LongString("otp.sms".into()));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("time".into(), AMQPValue::Timestamp(0));
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let body = r#"{"event_id":"e1","phone_number":"+14155550100","otp":"123456"}"#;
        let entry = entry(
            &BasicProperties::default().with_headers(headers),
            body.as_bytes(),
        );
        assert_eq!(entry.source, "broker");
        assert_eq!(entry.error_kind, "expired");
        assert_eq!(entry.event_id.as_deref(), Some("e1"));
        assert!(entry.error.contains("otp.sms"));
        let json = serde_json::to_string(&entry).unwrap();
        assert!(!json.contains("123456"), "{json}");
    }
}
