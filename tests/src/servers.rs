//! Where the suites find PostgreSQL, Redis and RabbitMQ: `TEST_DATABASE_URL` (a server URL without
//! a database name), `TEST_REDIS_URL` and `TEST_AMQP_URL`, each defaulting to the local server a
//! developer runs, so a machine with other ports or passwords runs the suites unchanged.
//!
//! Every program a test starts gets these as `DATABASE_URL`, `REDIS_URL` and `AMQP_URL`. A test
//! calls [`Server::require`] before it needs a server: the first call in a test binary logs in to
//! it, and a server that does not answer fails each test that needs it at once, named with its
//! URL and variable, instead of as a timeout further on.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::OnceLock;
use std::time::Duration;

use reqwest::Url;
use sqlx::Connection as _;

/// One login must not hold a test up for long: a server that takes this long is as good as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Postgres,
    Redis,
    RabbitMq,
}

/// One of the three servers.
pub struct Server {
    kind: Kind,
    /// What a person calls it in a failure message.
    pub name: &'static str,
    /// The variable that points the suites elsewhere.
    pub variable: &'static str,
    url: Url,
    /// The outcome of the first login, shared by every test of this binary.
    login: OnceLock<Result<(), String>>,
}

pub struct Servers {
    pub postgres: Server,
    pub redis: Server,
    pub rabbitmq: Server,
}

/// The servers of this test run, read from the environment once.
pub fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| Servers::from_lookup(|name| std::env::var(name).ok()))
}

impl Servers {
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let server = |kind, name, variable, default: &str| {
            let text = lookup(variable)
                .filter(|value| !value.trim().is_empty())
                .unwrap_or_else(|| default.to_owned());
            Server::new(kind, name, variable, text.trim())
        };
        Self {
            postgres: server(
                Kind::Postgres,
                "PostgreSQL",
                "TEST_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432",
            ),
            redis: server(
                Kind::Redis,
                "Redis",
                "TEST_REDIS_URL",
                shared::config::DEFAULT_REDIS_URL,
            ),
            rabbitmq: server(
                Kind::RabbitMq,
                "RabbitMQ",
                "TEST_AMQP_URL",
                shared::config::DEFAULT_AMQP_URL,
            ),
        }
    }

    /// [`Server::require`] for all three.
    pub fn require_all(&self) -> &Self {
        for server in [&self.postgres, &self.redis, &self.rabbitmq] {
            server.require();
        }
        self
    }

    /// `REDIS_URL` and `AMQP_URL` for a program under test.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("REDIS_URL".to_owned(), self.redis.url().to_owned()),
            ("AMQP_URL".to_owned(), self.rabbitmq.url().to_owned()),
        ]
    }

    /// The `DATABASE_URL` of `database` on the test PostgreSQL.
    pub fn database_url(&self, database: &str) -> String {
        database_url(self.postgres.url(), database)
    }
}

/// `server_url` (no database name, possibly with `?options`) with `database` in its path.
pub fn database_url(server_url: &str, database: &str) -> String {
    let mut url = Url::parse(server_url).expect("a PostgreSQL URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

impl Server {
    fn new(kind: Kind, name: &'static str, variable: &'static str, text: &str) -> Self {
        let url = Url::parse(text)
            .ok()
            .filter(|url| url.host().is_some())
            .unwrap_or_else(|| panic!("{variable}={text:?} is not a URL with a host"));
        Self {
            kind,
            name,
            variable,
            url,
            login: OnceLock::new(),
        }
    }

    pub fn url(&self) -> &str {
        // `Url` keeps its serialisation, so this is the text as given (normalised).
        self.url.as_str()
    }

    /// The URL with its password masked, for messages.
    pub fn redacted(&self) -> String {
        let mut url = self.url.clone();
        if url.password().is_some() {
            let _ = url.set_password(Some("***"));
        }
        url.to_string()
    }

    fn port(&self) -> u16 {
        self.url.port().unwrap_or(match self.kind {
            Kind::Postgres => 5432,
            Kind::Redis => 6379,
            Kind::RabbitMq if self.url.scheme() == "amqps" => 5671,
            Kind::RabbitMq => 5672,
        })
    }

    /// The server's socket address, for a [`crate::proxy::TcpProxy`] in front of it.
    /// Whether it is the AMQP broker (a proxy in front of it can speak for it: see
    /// `TcpProxy::block_like_an_alarm`).
    pub fn is_broker(&self) -> bool {
        matches!(self.kind, Kind::RabbitMq)
    }

    pub fn addr(&self) -> SocketAddr {
        // An IPv6 host comes in brackets, which resolving does not take.
        let host = self.url.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (host, self.port())
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .unwrap_or_else(|| panic!("{} ({}) does not resolve", self.redacted(), self.variable))
    }

    /// This URL with `proxy` as the host and port: the same credentials and options, through
    /// the proxy.
    pub fn url_via(&self, proxy: SocketAddr) -> String {
        let mut url = self.url.clone();
        let host = match proxy.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        url.set_host(Some(&host)).expect("an IP address is a host");
        url.set_port(Some(proxy.port()))
            .expect("a URL with a host takes a port");
        url.to_string()
    }

    /// Panics, naming the server, its URL and its variable, unless it accepts a login. Only the
    /// first call in a test binary logs in; the rest reuse the outcome.
    pub fn require(&self) -> &Self {
        let login = self.login.get_or_init(|| {
            // Each test has its own runtime, and this may run inside one: log in from a thread
            // of its own so the outcome does not depend on which test asked first.
            let url = self.url.clone();
            let kind = self.kind;
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    tokio::time::timeout(PROBE_TIMEOUT, log_in(kind, &url))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {PROBE_TIMEOUT:?}")))
                })
            })
            .join()
            .unwrap_or_else(|_| Err("the login panicked".to_owned()))
        });
        if let Err(error) = login {
            panic!(
                "cannot reach {} at {} ({}): {error}",
                self.name,
                self.redacted(),
                self.variable
            );
        }
        self
    }
}

async fn log_in(kind: Kind, url: &Url) -> Result<(), String> {
    let text = |e: &dyn std::fmt::Display| e.to_string();
    match kind {
        Kind::Postgres => {
            let connection = sqlx::PgConnection::connect(&database_url(url.as_str(), "postgres"))
                .await
                .map_err(|e| text(&e))?;
            connection.close().await.map_err(|e| text(&e))
        }
        Kind::Redis => {
            let client = redis::Client::open(url.as_str()).map_err(|e| text(&e))?;
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| text(&e))?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .map(drop)
                .map_err(|e| text(&e))
        }
        Kind::RabbitMq => {
            let connection =
                lapin::Connection::connect(url.as_str(), lapin::ConnectionProperties::default())
                    .await
                    .map_err(|e| text(&e))?;
            connection
                .close(200, "reachability check".into())
                .await
                .map_err(|e| text(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers_with(pairs: &[(&str, &str)]) -> Servers {
        Servers::from_lookup(|name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        })
    }

    #[test]
    fn defaults_are_the_local_servers() {
        let servers = servers_with(&[]);
        assert_eq!(servers.postgres.url(), "postgres://postgres@127.0.0.1:5432");
        assert_eq!(servers.redis.url(), "redis://127.0.0.1:6379");
        assert_eq!(
            servers.rabbitmq.url(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            servers.database_url("otp_test_1"),
            "postgres://postgres@127.0.0.1:5432/otp_test_1"
        );
        assert_eq!(
            servers.rabbitmq.redacted(),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(servers.rabbitmq.addr(), "127.0.0.1:5672".parse().unwrap());
    }

    #[test]
    fn variables_move_the_servers_and_proxies_keep_credentials_and_options() {
        let servers = servers_with(&[
            (
                "TEST_DATABASE_URL",
                "postgres://app:secret@localhost:5433?sslmode=disable",
            ),
            ("TEST_REDIS_URL", "redis://:pw@127.0.0.1:6380"),
            ("TEST_AMQP_URL", " "),
        ]);
        assert_eq!(
            servers.database_url("db"),
            "postgres://app:secret@localhost:5433/db?sslmode=disable"
        );
        let proxy: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(
            servers.postgres.url_via(proxy),
            "postgres://app:secret@127.0.0.1:40000?sslmode=disable"
        );
        assert_eq!(
            database_url(&servers.postgres.url_via(proxy), "db"),
            "postgres://app:secret@127.0.0.1:40000/db?sslmode=disable"
        );
        assert_eq!(servers.redis.url_via(proxy), "redis://:pw@127.0.0.1:40000");
        assert_eq!(servers.redis.redacted(), "redis://:***@127.0.0.1:6380");
        assert_eq!(
            servers.rabbitmq.url(),
            shared::config::DEFAULT_AMQP_URL,
            "blank is unset"
        );
    }

    #[test]
    fn an_unreachable_server_is_named() {
        let servers = servers_with(&[("TEST_REDIS_URL", "redis://127.0.0.1:1")]);
        let panic = std::panic::catch_unwind(|| {
            servers.redis.require();
        })
        .expect_err("nothing listens on port 1");
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            message.starts_with("cannot reach Redis at redis://127.0.0.1:1 (TEST_REDIS_URL): "),
            "{message}"
        );
    }
}
