//! The broker's nodes: `AMQP_URL` is one URI or a comma-separated list of them, one per node of a
//! RabbitMQ cluster (`amqp://u:p@rmq1:5672/%2f,amqp://u:p@rmq2:5672/%2f,…`).
//!
//! lapin connects to one URI. Both programs connect through [`BrokerNodes::connect`], which tries
//! the nodes in turn from a given one and says which answered, so that a reconnect after that
//! node died starts with the next: a dead node costs one connect timeout at most, not one per
//! reconnect.

use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

/// How long one node may take to accept a connection before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The heartbeat asked for, in seconds, unless the URI names one (`?heartbeat=`). lapin gives up
/// on a connection after two heartbeats without a byte from the broker, so a node that stops
/// answering without closing its sockets (frozen, cut off) is left within 30 s. RabbitMQ's
/// default of 60 s meant two minutes, long enough to matter when nothing else notices: a
/// connection blocked by a memory alarm sends nothing, and neither does an idle worker.
const HEARTBEAT_SECS: u16 = 15;

/// The URIs of the broker's nodes, in the order given.
#[derive(Clone)]
pub struct BrokerNodes(Vec<SecretString>);

impl std::fmt::Debug for BrokerNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl BrokerNodes {
    /// Parses `AMQP_URL`: one URI or several, separated by commas (spaces around them allowed).
    /// Every one must be an AMQP URI.
    pub fn parse(urls: &SecretString) -> Result<Self, String> {
        let mut nodes = Vec::new();
        for (i, url) in urls.expose_secret().split(',').map(str::trim).enumerate() {
            if url.is_empty() {
                return Err(format!("URI {} of the list is empty", i + 1));
            }
            if url.parse::<AMQPUri>().is_err() {
                // Not lapin's message: for some malformed URIs it quotes the URI, password and all.
                return Err(format!(
                    "URI {} is not an AMQP URI (amqp://user:password@host:port/vhost)",
                    i + 1
                ));
            }
            nodes.push(SecretString::from(url.to_owned()));
        }
        Ok(Self(nodes))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The list with every password replaced, for logs.
    pub fn redacted(&self) -> String {
        self.0
            .iter()
            .map(crate::config::redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connects to the first node that answers, trying them in turn from node `from` (wrapping
    /// around), each for at most [`CONNECT_TIMEOUT`]. Returns the connection and the index of
    /// the node it is to; the error is the last node's.
    pub async fn connect(
        &self,
        from: usize,
        properties: ConnectionProperties,
    ) -> Result<(Connection, usize), lapin::Error> {
        let mut last_error = None;
        for offset in 0..self.0.len() {
            let node = (from + offset) % self.0.len();
            let uri = with_heartbeat(self.0[node].expose_secret())?;
            let attempt = Connection::connect_uri(uri, properties.clone());
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(connection)) => return Ok((connection, node)),
                Ok(Err(e)) => {
                    tracing::warn!(node = %crate::config::redact_url(&self.0[node]), error = %e, "cannot connect to this RabbitMQ node; trying the next");
                    last_error = Some(e);
                }
                Err(_) => {
                    tracing::warn!(node = %crate::config::redact_url(&self.0[node]), "this RabbitMQ node did not answer in time; trying the next");
                    last_error = Some(lapin::Error::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )));
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound))
        }))
    }
}

/// `uri` parsed, with [`HEARTBEAT_SECS`] unless it asks for a heartbeat of its own.
fn with_heartbeat(uri: &str) -> Result<AMQPUri, lapin::Error> {
    // Checked by `parse` already. lapin's message can quote the URI, password and all.
    let mut uri: AMQPUri = uri
        .parse()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an AMQP URI"))?;
    uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_heartbeat_unless_the_uri_names_one() {
        let uri = with_heartbeat("amqp://u:p@rmq1:5672/%2f").unwrap();
        assert_eq!(uri.query.heartbeat, Some(HEARTBEAT_SECS));
        let uri = with_heartbeat("amqp://u:p@rmq1:5672/%2f?heartbeat=5").unwrap();
        assert_eq!(uri.query.heartbeat, Some(5));
        // lapin then takes the broker's value.
        let uri = with_heartbeat("amqp://rmq1?heartbeat=0").unwrap();
        assert_eq!(uri.query.heartbeat, Some(0));
    }

    fn parse(urls: &str) -> Result<BrokerNodes, String> {
        BrokerNodes::parse(&SecretString::from(urls.to_owned()))
    }

    #[test]
    fn one_uri_or_a_list() {
        assert_eq!(parse("amqp://127.0.0.1:5672/%2f").unwrap().len(), 1);
        let nodes =
            parse("amqp://u:hunter2@rmq1:5672/%2f, amqp://u:hunter2@rmq2:5672/%2f ,amqp://rmq3")
                .unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(
            nodes.redacted(),
            "amqp://u:***@rmq1:5672/%2f,amqp://u:***@rmq2:5672/%2f,amqp://rmq3"
        );
        assert!(!format!("{nodes:?}").contains("hunter2"));
    }

    #[test]
    fn every_uri_must_be_one() {
        assert!(parse("amqp://rmq1,").unwrap_err().contains("URI 2"));
        assert!(
            parse("amqp://rmq1,http://u:hunter2@rmq2")
                .unwrap_err()
                .contains("URI 2 is not an AMQP URI")
        );
        assert!(
            !parse("amqp://rmq1,http://u:hunter2@rmq2")
                .unwrap_err()
                .contains("hunter2")
        );
        // amq-protocol-uri quotes this one whole in its own message.
        let error = parse("amqp:guest:hunter2@rmq").unwrap_err();
        assert!(error.contains("URI 1"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
