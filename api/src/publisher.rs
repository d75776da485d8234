//! Publishes `OtpRequested` with publisher confirms. Many publishes share one confirm-mode
//! channel and their confirms are awaited concurrently, so throughput is not bound by one round
//! trip per request. The connection is (re)made on demand: an api started while the broker is
//! down keeps serving, answers 503 for OTP requests, and recovers by itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};
use shared::amqp::{ConfirmError, event_properties, publish_confirmed};
use shared::event::ROUTING_KEY;
use shared::{OtpRequested, Topology};
use time::OffsetDateTime;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Without a quorum majority a confirm never comes; a request must not wait forever for it.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connect, fail fast for this long instead of making every request wait for
/// its own connect attempt.
const RECONNECT_COOLDOWN: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(String),
    #[error(transparent)]
    Confirm(#[from] ConfirmError),
    #[error("the OTP expired before it could be published")]
    Expired,
}

/// One AMQP connection and its confirm-mode channel.
struct BrokerConnection {
    // Kept so the connection lives as long as its channel.
    _connection: Connection,
    channel: Channel,
}

pub struct Publisher {
    url: SecretString,
    topology: Topology,
    connection: Mutex<Option<Arc<BrokerConnection>>>,
    connecting: tokio::sync::Mutex<Option<Instant>>,
}

impl Publisher {
    pub fn new(url: SecretString, topology: Topology) -> Self {
        Self {
            url,
            topology,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Arc<BrokerConnection>> {
        let connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        connection
            .as_ref()
            .filter(|c| c.channel.status().connected())
            .cloned()
    }

    /// A connected confirm-mode channel, connecting first if need be (one connect at a time).
    async fn channel(&self) -> Result<Channel, PublishError> {
        if let Some(connection) = self.current() {
            return Ok(connection.channel.clone());
        }
        let mut last_failure = self.connecting.lock().await;
        if let Some(connection) = self.current() {
            return Ok(connection.channel.clone());
        }
        if last_failure.is_some_and(|at| at.elapsed() < RECONNECT_COOLDOWN) {
            return Err(PublishError::Connect(
                "recently failed; retrying shortly".into(),
            ));
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
            Ok(Ok(connection)) => {
                *last_failure = None;
                let channel = connection.channel.clone();
                *self.connection.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Arc::new(connection));
                tracing::info!("connected to RabbitMQ");
                Ok(channel)
            }
            Ok(Err(e)) => {
                *last_failure = Some(Instant::now());
                Err(PublishError::Connect(e.to_string()))
            }
            Err(_) => {
                *last_failure = Some(Instant::now());
                Err(PublishError::Connect("timed out".into()))
            }
        }
    }

    async fn connect(&self) -> lapin::Result<BrokerConnection> {
        let properties = ConnectionProperties::default().with_connection_name("otp-api".into());
        let connection = Connection::connect(self.url.expose_secret(), properties).await?;
        let channel = connection.create_channel().await?;
        self.topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(BrokerConnection {
            _connection: connection,
            channel,
        })
    }

    /// Forgets a channel that failed, so the next publish opens a fresh one (a channel can keep
    /// rejecting publishes after a broker restart or a quorum leader change).
    fn discard(&self, failed: &Channel) {
        let mut connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        if connection
            .as_ref()
            .is_some_and(|c| c.channel.id() == failed.id())
        {
            *connection = None;
        }
    }

    /// Returns once the broker has confirmed that the event is stored.
    pub async fn publish(&self, event: &OtpRequested) -> Result<(), PublishError> {
        let ttl_ms = event.millis_left(OffsetDateTime::now_utc());
        if ttl_ms == 0 {
            return Err(PublishError::Expired);
        }
        let channel = self.channel().await?;
        let body = serde_json::to_vec(event).expect("an event always serialises");
        let result = publish_confirmed(
            &channel,
            &self.topology.events_exchange(),
            ROUTING_KEY,
            &body,
            event_properties(event, ttl_ms),
            CONFIRM_TIMEOUT,
        )
        .await;
        if let Err(e) = &result
            && e.channel_suspect()
        {
            self.discard(&channel);
        }
        Ok(result?)
    }

    /// For `/readyz`: opens the channel if it is not open, and says whether that worked.
    pub async fn ensure_connected(&self) -> Result<(), PublishError> {
        self.channel().await.map(|_| ())
    }
}
