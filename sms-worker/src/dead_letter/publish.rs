//! Publishing a dead letter: the copy goes to `{ns}.dlx` with the reason in its headers, and the
//! original is acknowledged only once the broker confirmed the copy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ConnectionStatus};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;

use shared::amqp::{ConfirmError, PERSISTENT, held_now, publish_confirmed, wait_while_held};
use shared::event::{CONTENT_TYPE, REQUEST_ID_HEADER};

use crate::shutdown::Shutdown;

use super::reason::{
    ATTEMPTS_HEADER, DeadLetter, ERROR_HEADER, ERROR_KIND_HEADER, FAILED_AT_HEADER,
    PROVIDER_CODE_HEADER, PROVIDER_STATUS_HEADER, PROVIDERS_HEADER,
};

/// Without a quorum majority a confirm never comes; the message then goes back to the queue.
/// Not while the broker blocks the connection (a memory or disk alarm): see [`Route::publish`].
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a dead letter waiting out an alarm looks whether its delivery's channel is still
/// open: lapin's channel status has no notification.
const CHANNEL_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Where dead letters go: a confirm-mode channel, the status of its connection (which the
/// broker blocks during an alarm), and the copies an alarm holds on it.
#[derive(Clone)]
pub struct Route {
    pub channel: Channel,
    pub connection: ConnectionStatus,
    pub held: Arc<HeldCopies>,
}

/// The dead-letter copies an alarm holds in this worker's memory, and how many it may hold
/// (`SMS_DEAD_LETTERS_HELD_MAX`). One count per process, kept across reconnects: a connection
/// given up during an alarm may still hold its copies until it closes.
#[derive(Debug)]
pub struct HeldCopies {
    now: AtomicUsize,
    max: usize,
    /// Wakes the dead letters waiting for room when the count starts again.
    room: tokio::sync::Notify,
}

impl HeldCopies {
    pub fn new(max: usize) -> Self {
        Self {
            now: AtomicUsize::new(0),
            max,
            room: tokio::sync::Notify::new(),
        }
    }

    fn one_more(&self) {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::counter!(crate::metrics::DEAD_LETTERS_HELD).increment(1);
        metrics::gauge!(crate::metrics::DEAD_LETTERS_HELD_NOW).set(now as f64);
    }

    fn full(&self) -> bool {
        self.now.load(Ordering::Relaxed) >= self.max
    }

    /// No dead-letter connection is blocked any more: what they held has been written.
    pub fn written(&self) {
        if self.now.swap(0, Ordering::Relaxed) > 0 {
            metrics::gauge!(crate::metrics::DEAD_LETTERS_HELD_NOW).set(0.0);
            self.room.notify_waiters();
        }
    }

    /// So that a long alarm cannot fill the worker's memory with copies, about
    /// `SMS_DEAD_LETTERS_HELD_MAX` at most are held (a copy counts once it has been held for a
    /// second, so dead letters arriving together may pass the count by up to the sends in
    /// flight). Past that, a dead letter waits here for the alarm to end before its copy is
    /// written, its original unacknowledged: a slot of the prefetch each, so the worker slows
    /// down rather than grow. Returns once a copy may be written: no dead-letter connection is
    /// held any more (their copies are then written, and the count starts again).
    ///
    /// [`PublishError::NoRoom`] when the worker starts to stop or `delivery_channel_open` says
    /// the original's channel is gone first: the original then goes back to the queue (the
    /// broker's consumer timeout closes a channel whose delivery waits 30 minutes by default).
    pub(crate) async fn wait_for_room(
        &self,
        shutdown: &Shutdown,
        delivery_channel_open: impl Fn() -> bool,
    ) -> Result<(), PublishError> {
        // The count starts again only once no dead-letter connection is held, the current one
        // or one kept from before a reconnect (the consume loop looks every second). So the wait
        // is on the count, not on a connection: after a reconnect during the alarm, the new
        // connection is not blocked until it publishes, and would let a fresh batch through.
        if !self.full() {
            return Ok(());
        }
        tracing::warn!(
            most = self.max,
            "RabbitMQ's alarm already holds SMS_DEAD_LETTERS_HELD_MAX dead letters in this worker's memory: this one waits for the alarm to end, its original unacknowledged"
        );
        let _waiting = WaitingForRoom::count();
        loop {
            // Made before the look at the count, so a reset in between still wakes it.
            let room = self.room.notified();
            if !self.full() {
                break;
            }
            tokio::select! {
                () = room => {}
                () = tokio::time::sleep(CHANNEL_CHECK_EVERY) => {}
                () = shutdown.recv() => return Err(PublishError::NoRoom),
            }
            if !delivery_channel_open() {
                return Err(PublishError::NoRoom);
            }
        }
        Ok(())
    }
}

/// One dead letter in `sms_dead_letters_waiting_for_room`, for as long as this lives (a guard,
/// so that a delivery task cut off at the end of the grace period still counts itself out).
struct WaitingForRoom(metrics::Gauge);

impl WaitingForRoom {
    fn count() -> Self {
        let gauge = metrics::gauge!(crate::metrics::DEAD_LETTERS_WAITING_FOR_ROOM);
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for WaitingForRoom {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Route {
    /// Publishes `body` into `queue` (through the default exchange) and waits for the confirm.
    ///
    /// A copy held by an alarm counts as published (`held` says so in the log, and
    /// `sms_dead_letters_held_total` counts it): the broker blocks the connection, the copy
    /// waits in lapin's buffers or unread in the broker's socket, and is stored when the alarm
    /// ends. Its original is then acknowledged as dead-lettered: given back to the queue, it would
    /// go to the provider again and leave one more copy each time, or, held, keep a slot of the
    /// prefetch for the whole alarm. A stopping worker waits, within its grace period, for the
    /// alarm to end; if the process ends or the connection drops first, the copy is lost, and the
    /// log's warning and the counter keep the record. The worker's own dead letters first wait
    /// for room ([`HeldCopies::wait_for_room`]).
    async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        held: impl FnOnce(),
    ) -> Result<(), PublishError> {
        let published = publish_confirmed(
            &self.channel,
            "",
            queue,
            body,
            properties,
            CONFIRM_TIMEOUT,
            Some(&self.connection),
        )
        .await;
        match published {
            Err(ConfirmError::HeldByAlarm) => {
                self.held.one_more();
                held();
                Ok(())
            }
            published => Ok(published?),
        }
    }

    /// Waits while the broker blocks this route's connection (a memory or disk alarm), until
    /// `until` if given. `false` when the dead letter is not to be published: the worker began to
    /// stop, or `delivery_channel_open` says the channel its delivery came on is gone (the broker
    /// has put the delivery back in its queue). `true` once the alarm is over or `until` passed.
    pub(crate) async fn wait_out_alarm(
        &self,
        until: Option<Instant>,
        shutdown: &Shutdown,
        delivery_channel_open: impl Fn() -> bool,
    ) -> bool {
        loop {
            let look_again = Instant::now() + CHANNEL_CHECK_EVERY;
            let step_until = until.map_or(look_again, |until| until.min(look_again));
            tokio::select! {
                _ = wait_while_held(&self.connection, step_until) => {}
                () = shutdown.recv() => return false,
            }
            if !delivery_channel_open() {
                return false;
            }
            if !held_now(&self.connection) || until.is_some_and(|until| Instant::now() >= until) {
                return true;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no channel to RabbitMQ")]
    NoChannel,
    #[error(
        "RabbitMQ's alarm holds SMS_DEAD_LETTERS_HELD_MAX dead letters, and the worker began to stop (or the delivery's channel closed) before it ended"
    )]
    NoRoom,
    #[error(
        "RabbitMQ's alarm already holds SMS_DEAD_LETTERS_HELD_MAX dead letters in this worker; this broker dead letter stays in its queue until the alarm ends"
    )]
    Full,
    #[error("dead letter: {0}")]
    Confirm(#[from] ConfirmError),
}

/// Publishes the copy straight into the dead-letter queue `queue` (through the default
/// exchange) and waits for the broker's confirm. `body` is the event without its code, or the
/// raw bytes of a message that could not be parsed. A copy that reaches no queue comes back as
/// an error, and the original then stays in the work queue.
pub async fn publish(
    route: &Route,
    queue: &str,
    original: &BasicProperties,
    body: &[u8],
    dead_letter: &DeadLetter,
) -> Result<(), PublishError> {
    let properties = properties(original, dead_letter, OffsetDateTime::now_utc());
    route
        .publish(queue, body, properties, || {
            tracing::warn!(
                kind = dead_letter.kind.as_str(),
                attempts = dead_letter.attempts,
                "RabbitMQ is blocking dead letters (a memory or disk alarm): this one is stored when the alarm ends; acknowledging the original now"
            );
        })
        .await
}

/// Moves one of RabbitMQ's own dead letters (from the holding queue) into the dead-letter
/// queue with its code removed: the broker's `x-death` and every other header stay, so
/// `dlq list` still shows why it died.
pub async fn forward_broker_copy(
    route: &Route,
    queue: &str,
    original: &BasicProperties,
    body: &[u8],
) -> Result<(), PublishError> {
    // Past the most held, the copy stays where it is safe: in the broker's queue (the caller
    // hands it back), not in this process's memory.
    if route.held.full() {
        return Err(PublishError::Full);
    }
    let body = without_code(body);
    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(ShortString::from(CONTENT_TYPE));
    if let Some(headers) = original.headers() {
        properties = properties.with_headers(headers.clone());
    }
    if let Some(id) = original.message_id() {
        properties = properties.with_message_id(id.clone());
    }
    if let Some(kind) = original.kind() {
        properties = properties.with_type(kind.clone());
    }
    if let Some(timestamp) = original.timestamp() {
        properties = properties.with_timestamp(*timestamp);
    }
    route
        .publish(queue, &body, properties, || {
            tracing::warn!(
                "RabbitMQ is blocking dead letters (a memory or disk alarm): this broker dead letter is stored when the alarm ends; acknowledging the original now"
            );
        })
        .await
}

/// The body with `otp` set to null when it is a JSON object. Anything else was never a valid
/// event and is kept as it came.
pub fn without_code(body: &[u8]) -> Vec<u8> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut event)) => {
            if event.contains_key("otp") {
                event.insert("otp".to_owned(), serde_json::Value::Null);
            }
            serde_json::to_vec(&event).unwrap_or_else(|_| body.to_vec())
        }
        _ => body.to_vec(),
    }
}

/// Persistent, JSON, the original's id, type and `x-request-id`, plus the failure headers. No
/// `expiration`: the original's TTL would make the copy vanish from the dead-letter queue.
pub fn properties(
    original: &BasicProperties,
    dead_letter: &DeadLetter,
    now: OffsetDateTime,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(request_id) = original
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(REQUEST_ID_HEADER))
    {
        headers.insert(REQUEST_ID_HEADER.into(), request_id.clone());
    }
    insert_str(&mut headers, ERROR_KIND_HEADER, dead_letter.kind.as_str());
    insert_str(
        &mut headers,
        ERROR_HEADER,
        &truncate(&dead_letter.error, 1_000),
    );
    headers.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(dead_letter.attempts)),
    );
    let failed_at = now.format(&Rfc3339).unwrap_or_default();
    insert_str(&mut headers, FAILED_AT_HEADER, &failed_at);
    if let Some(status) = dead_letter.provider_status {
        headers.insert(
            PROVIDER_STATUS_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(status)),
        );
    }
    if let Some(code) = dead_letter.provider_code {
        headers.insert(PROVIDER_CODE_HEADER.into(), AMQPValue::LongLongInt(code));
    }
    if !dead_letter.providers.is_empty() {
        insert_str(
            &mut headers,
            PROVIDERS_HEADER,
            &dead_letter.providers.join(","),
        );
    }

    let mut properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_timestamp(u64::try_from(now.unix_timestamp()).unwrap_or_default())
        .with_headers(headers);
    if let Some(id) = original.message_id() {
        properties = properties.with_message_id(id.clone());
    }
    if let Some(kind) = original.kind() {
        properties = properties.with_type(kind.clone());
    }
    properties
}

fn insert_str(headers: &mut FieldTable, name: &str, value: &str) {
    headers.insert(name.into(), AMQPValue::LongString(value.into()));
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_copies_lose_their_code() {
        let body = br#"{"version":1,"otp":"123456","phone_number":"+14155550100"}"#;
        let scrubbed = String::from_utf8(without_code(body)).unwrap();
        assert!(!scrubbed.contains("123456"), "{scrubbed}");
        assert!(scrubbed.contains(r#""otp":null"#), "{scrubbed}");
        assert_eq!(without_code(b"not json"), b"not json");
    }
}
