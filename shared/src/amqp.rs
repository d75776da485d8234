//! Publishing with confirms, the one way both programs put messages on the broker, and reading
//! the headers of what comes back.

pub mod alarms;
pub mod headers;
pub mod nodes;

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, ConnectionStatus};

use crate::OtpRequested;
use crate::event::{CONTENT_TYPE, MESSAGE_TYPE, REQUEST_ID_HEADER};

/// AMQP delivery mode 2: the broker writes the message to disk.
pub const PERSISTENT: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    /// The channel or connection failed before the message was all written: the broker cannot
    /// have stored it.
    #[error("the publish could not be sent: {0}")]
    NotSent(lapin::Error),
    /// The message was sent, and the channel or connection failed before the confirm: the broker
    /// may have stored it.
    #[error("RabbitMQ did not confirm the publish: {0}")]
    Broker(lapin::Error),
    /// Without a quorum majority a confirm never comes.
    #[error("RabbitMQ did not confirm the publish in time")]
    Timeout,
    #[error("RabbitMQ nacked the publish")]
    Nacked,
    #[error("the message reached no queue")]
    Unroutable,
    /// No confirm because the broker blocks the connection (a memory or disk alarm): the message
    /// waits unread and is stored when the alarm ends, unless the connection is lost first. Only
    /// with [`publish_confirmed`]'s `held_by`.
    #[error(
        "RabbitMQ is blocking the connection (a memory or disk alarm); the message is stored when it ends"
    )]
    HeldByAlarm,
}

impl ConfirmError {
    /// Whether the channel is suspect and a fresh one should be used for the next publish. After
    /// a quorum queue's leader changes, RabbitMQ 3.10 can keep nacking every publish on a channel
    /// that saw a nack, although the new leader is up; a fresh channel works at once.
    pub fn channel_suspect(&self) -> bool {
        matches!(
            self,
            Self::NotSent(_) | Self::Broker(_) | Self::Timeout | Self::Nacked
        )
    }
}

/// Publishes on a confirm-mode channel and waits up to `timeout` for the broker to confirm it
/// stored the message. `mandatory` is set: a message that reaches no queue comes back as an
/// error instead of vanishing.
///
/// With `held_by`, a publish whose connection the broker blocks (a memory or disk alarm) ends as
/// [`ConfirmError::HeldByAlarm`], not [`ConfirmError::Timeout`]: the message is then in the
/// connection's buffers, unread, and the broker stores it once the alarm ends, so a retry would
/// store it twice. That is known once the connection has stayed blocked for [`BLOCKED_GRACE`],
/// so the publish does not wait out `timeout`.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
    held_by: Option<&ConnectionStatus>,
) -> Result<(), ConfirmError> {
    let confirm = async {
        // lapin resolves this once every frame of the message is written.
        let pending = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .map_err(ConfirmError::NotSent)?;
        pending.await.map_err(ConfirmError::Broker)
    };
    let held = async {
        match held_by {
            Some(connection) => held_by_alarm(connection).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        // An answer that is there wins over the alarm and the timeout seen in the same poll: a
        // nack or a return must not pass for a copy the broker will store.
        biased;
        answer = confirm => confirmation(answer),
        () = held => Err(ConfirmError::HeldByAlarm),
        () = tokio::time::sleep(timeout) => {
            if held_by.is_some_and(held_now) {
                Err(ConfirmError::HeldByAlarm)
            } else {
                Err(ConfirmError::Timeout)
            }
        }
    }
}

/// How long a connection must stay blocked before a publish on it counts as held by the alarm.
/// Frames the broker read before it blocked the connection are still confirmed, within
/// milliseconds; after that nothing more is read until the alarm ends, so there is no point
/// waiting out the whole confirm timeout (a dead letter holds one of the worker's slots
/// meanwhile).
const BLOCKED_GRACE: Duration = Duration::from_secs(1);
/// How often [`held_by_alarm`] looks at the connection: lapin's flag has no notification.
const BLOCKED_CHECK_EVERY: Duration = Duration::from_millis(100);

/// Blocked, and still connected: lapin keeps a dead connection's `blocked` flag, and a dead
/// connection's frames are lost rather than held.
pub fn held_now(connection: &ConnectionStatus) -> bool {
    connection.blocked() && connection.connected()
}

/// Waits while `connection` is held (see [`held_now`]), until `until` at the latest. Returns
/// whether the alarm is over for it.
pub async fn wait_while_held(connection: &ConnectionStatus, until: tokio::time::Instant) -> bool {
    while held_now(connection) && tokio::time::Instant::now() < until {
        tokio::time::sleep(BLOCKED_CHECK_EVERY).await;
    }
    !held_now(connection)
}

/// Resolves once `connection` has been held (see [`held_now`]) for [`BLOCKED_GRACE`] without a
/// break.
async fn held_by_alarm(connection: &ConnectionStatus) {
    let mut held_since = None;
    loop {
        let now = tokio::time::Instant::now();
        if held_now(connection) {
            let since = *held_since.get_or_insert(now);
            if now.duration_since(since) >= BLOCKED_GRACE {
                return;
            }
        } else {
            held_since = None;
        }
        tokio::time::sleep(BLOCKED_CHECK_EVERY).await;
    }
}

fn confirmation(answer: Result<Confirmation, ConfirmError>) -> Result<(), ConfirmError> {
    match answer {
        Err(e) => Err(e),
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(_))) => Err(ConfirmError::Unroutable),
        Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => Err(ConfirmError::Nacked),
    }
}

/// The properties of an `OtpRequested` message (docs/messaging.md#the-otprequested-message): persistent, JSON, `message_id` =
/// `event_id`, `type`, the `x-request-id` header, and `expiration` = `ttl_ms`, so the broker
/// dead-letters the event (x-death reason `expired`) rather than deliver a code that no longer
/// works.
pub fn event_properties(event: &OtpRequested, ttl_ms: u64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(REQUEST_ID_HEADER),
        AMQPValue::LongString(event.request_id.clone().into()),
    );
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(CONTENT_TYPE.into())
        .with_message_id(event.event_id.to_string().into())
        .with_type(MESSAGE_TYPE.into())
        .with_timestamp(u64::try_from(event.requested_at.unix_timestamp()).unwrap_or_default())
        .with_headers(headers)
        .with_expiration(ttl_ms.to_string().into())
}
