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
    /// No confirm in time because the broker blocks the connection (a memory or disk alarm): the
    /// message waits unread and is stored when the alarm ends, unless the connection is lost
    /// first. Only with [`publish_confirmed`]'s `held_by`.
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
/// With `held_by`, a timeout while the broker blocks that connection (a memory or disk alarm) is
/// [`ConfirmError::HeldByAlarm`], not [`ConfirmError::Timeout`]: the message is then in the
/// connection's buffers, unread, and the broker stores it once the alarm ends, so a retry would
/// store it twice.
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
    match tokio::time::timeout(timeout, confirm).await {
        // Connected too: lapin keeps a dead connection's `blocked` flag, and its frames are lost.
        Err(_) if held_by.is_some_and(|c| c.blocked() && c.connected()) => {
            Err(ConfirmError::HeldByAlarm)
        }
        Err(_) => Err(ConfirmError::Timeout),
        Ok(answer) => confirmation(answer),
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
