//! One Redis connection type for a single server and for a Redis Cluster.
//!
//! `REDIS_URL` is either a plain URL (`redis://host:6379/0`, `rediss://…`), served by a
//! `ConnectionManager` that reconnects by itself, or a cluster's seed nodes,
//! `redis+cluster://[user:password@]host:port,host:port,…` (`rediss+cluster://` for TLS), served
//! by the redis crate's cluster connection: it keeps a connection per node, follows `MOVED` and
//! `ASK`, refreshes the slot map after a failover and retries.
//!
//! Every multi-key script of both programs keeps its keys in one hash slot (a `{…}` hash tag:
//! the phone, the client network, the calling code, the event), which is what lets them run on a
//! cluster unchanged. Both kinds connect lazily, so a program started while Redis is away still
//! starts, answers 503 or waits, and recovers without a restart.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use secrecy::{ExposeSecret, SecretString};

/// Per command: a dependency that does not answer is an error, not a hung request.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What `REDIS_URL` names. Its URLs may hold a password: Debug shows them redacted.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server.
    Single(String),
    /// A Redis Cluster's seed nodes, as `redis://` (or `rediss://`) URLs.
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |url: &String| crate::config::redact_url(&SecretString::from(url.clone()));
        match self {
            Self::Single(url) => write!(f, "Single({})", redact(url)),
            Self::Cluster(nodes) => {
                let nodes: Vec<String> = nodes.iter().map(redact).collect();
                write!(f, "Cluster({})", nodes.join(","))
            }
        }
    }
}

impl RedisTarget {
    /// Parses `REDIS_URL`. The error never quotes the URL (it may hold a password).
    pub fn parse(url: &SecretString) -> Result<Self, String> {
        let url = url.expose_secret().trim();
        let cluster = [
            ("redis+cluster://", "redis://"),
            ("rediss+cluster://", "rediss://"),
        ]
        .into_iter()
        .find_map(|(prefix, scheme)| url.strip_prefix(prefix).map(|rest| (rest, scheme)));
        let Some((rest, scheme)) = cluster else {
            redis::Client::open(url).map_err(|e| format!("not a Redis URL ({:?})", e.kind()))?;
            return Ok(Self::Single(url.to_owned()));
        };
        // Credentials, if any, come once, before the first node, and apply to every node.
        let (userinfo, hosts) = match rest.rfind('@') {
            Some(at) => (&rest[..=at], &rest[at + 1..]),
            None => ("", rest),
        };
        let mut nodes = Vec::new();
        for (i, host) in hosts.split(',').map(str::trim).enumerate() {
            if host.is_empty() || host.contains('/') && !host.ends_with('/') {
                return Err(format!(
                    "node {} of the cluster list is not host:port (no database path: a cluster has only database 0)",
                    i + 1
                ));
            }
            let node = format!("{scheme}{userinfo}{}", host.trim_end_matches('/'));
            redis::Client::open(node.as_str())
                .map_err(|e| format!("node {} is not a Redis address ({:?})", i + 1, e.kind()))?;
            nodes.push(node);
        }
        Ok(Self::Cluster(nodes))
    }
}

/// A connection to a single server or to a cluster; cheap to clone, and every clone shares it.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// The cluster connection, made on first use.
pub struct LazyCluster {
    client: ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
    attempts: std::sync::Mutex<Attempts>,
}

/// After a failed connect, callers fail at once for this long rather than dial again: while the
/// cluster is unreachable, every request would otherwise start a connect of its own as soon as
/// the last one failed.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Attempts {
    /// The connect under way, if any, shared by every caller waiting for it.
    under_way: Option<Connecting>,
    /// When the last connect failed.
    failed_at: Option<std::time::Instant>,
}

type Connecting = Shared<BoxFuture<'static, Result<ClusterConnection, String>>>;

impl LazyCluster {
    /// The connection, made on a task of its own, one attempt at a time. A caller's deadline may
    /// end its wait but not the connect: with a hung seed node, connecting takes that node's
    /// whole connect timeout, longer than callers wait, and a connect made inside the callers'
    /// futures was cancelled every time and never finished. One attempt at a time, so that
    /// callers arriving during an outage wait for the attempt under way instead of each
    /// queueing one of their own.
    async fn get(self: &Arc<Self>) -> RedisResult<ClusterConnection> {
        if let Some(connection) = self.connection.get() {
            return Ok(connection.clone());
        }
        let connecting = {
            let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
            // The attempt may have finished between the check above and the lock.
            if let Some(connection) = self.connection.get() {
                return Ok(connection.clone());
            }
            // An attempt whose task never ran (aborted with its runtime before its first poll)
            // ended without clearing itself: it is over, not under way. Polling a clone says so
            // even when no caller has seen it end.
            if attempts
                .under_way
                .as_ref()
                .is_some_and(|attempt| attempt.clone().now_or_never().is_some())
            {
                attempts.under_way = None;
            }
            if attempts.under_way.is_none()
                && attempts
                    .failed_at
                    .is_some_and(|at| at.elapsed() < RECONNECT_PAUSE)
            {
                return Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "cannot connect to the Redis Cluster",
                    "the last attempt failed moments ago".to_owned(),
                )));
            }
            attempts
                .under_way
                .get_or_insert_with(|| self.attempt())
                .clone()
        };
        connecting.await.map_err(|e| {
            RedisError::from((
                redis::ErrorKind::Io,
                "cannot connect to the Redis Cluster",
                e,
            ))
        })
    }

    /// Starts one connect on a task of its own.
    fn attempt(self: &Arc<Self>) -> Connecting {
        let lazy = Arc::clone(self);
        let attempt = tokio::spawn(async move {
            // However the task ends (done, panicked, aborted with the runtime), the next caller
            // after it may start a new attempt.
            let _clear = ClearAttempt(Arc::clone(&lazy));
            let result = lazy.client.get_async_connection().await;
            match &result {
                Ok(connection) => {
                    let _ = lazy.connection.set(connection.clone());
                }
                Err(_) => {
                    lazy.attempts
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .failed_at = Some(std::time::Instant::now());
                }
            }
            result.map_err(|e| e.to_string())
        });
        attempt
            .map(|joined| joined.unwrap_or_else(|e| Err(e.to_string())))
            .boxed()
            .shared()
    }
}

/// Frees [`LazyCluster::attempts`]' attempt when its task ends.
struct ClearAttempt(Arc<LazyCluster>);

impl Drop for ClearAttempt {
    fn drop(&mut self) {
        self.0
            .attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .under_way = None;
    }
}

impl RedisConnection {
    /// A connection to `target`, made lazily: nothing is dialled until the first command.
    pub fn new(target: &RedisTarget) -> RedisResult<Self> {
        match target {
            RedisTarget::Single(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let client = redis::Client::open(url.as_str())?;
                Ok(Self::Single(ConnectionManager::new_lazy_with_config(
                    client, config,
                )?))
            }
            RedisTarget::Cluster(nodes) => {
                // Retries short and many (redirections, refused connections, CLUSTERDOWN while a
                // master's replica takes over), all within one command's overall deadline:
                // RESPONSE_TIMEOUT from first try to last, so a hung or failing node holds no
                // caller longer than a single server would. A failover that takes longer
                // (cluster-node-timeout plus the election) is an error for the callers, which
                // retry or answer 503 themselves.
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .overall_response_timeout(Some(RESPONSE_TIMEOUT))
                    .retries(20)
                    .min_retry_wait(100)
                    .max_retry_wait(300)
                    .build()?;
                Ok(Self::Cluster(Arc::new(LazyCluster {
                    client,
                    connection: tokio::sync::OnceCell::new(),
                    attempts: std::sync::Mutex::default(),
                })))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                connection.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(lazy) => Box::pin(async move {
                let mut connection = lazy.get().await?;
                connection
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<RedisTarget, String> {
        RedisTarget::parse(&SecretString::from(url.to_owned()))
    }

    #[test]
    fn a_single_server_or_a_cluster() {
        assert_eq!(
            parse("redis://127.0.0.1:6379/2").unwrap(),
            RedisTarget::Single("redis://127.0.0.1:6379/2".into())
        );
        assert_eq!(
            parse("redis+cluster://127.0.0.1:7001, 127.0.0.1:7002,127.0.0.1:7003").unwrap(),
            RedisTarget::Cluster(vec![
                "redis://127.0.0.1:7001".into(),
                "redis://127.0.0.1:7002".into(),
                "redis://127.0.0.1:7003".into(),
            ])
        );
        assert_eq!(
            parse("redis+cluster://app:hunter2@r1:6380,r2:6380").unwrap(),
            RedisTarget::Cluster(vec![
                "redis://app:hunter2@r1:6380".into(),
                "redis://app:hunter2@r2:6380".into(),
            ])
        );
        let target = parse("redis+cluster://app:hunter2@r1:6380").unwrap();
        assert!(!format!("{target:?}").contains("hunter2"));
    }

    #[test]
    fn bad_lists_are_refused_without_quoting_them() {
        for url in [
            "redis+cluster://",
            "redis+cluster://r1:7001,,r2:7002",
            "redis+cluster://u:hunter2@r1:7001/3",
            "http://u:hunter2@r1",
        ] {
            let error = parse(url).unwrap_err();
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    /// A cluster seed node that hangs up on every connection, and counts them.
    async fn node_that_hangs_up() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = format!("redis://{}", listener.local_addr().unwrap());
        let dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&dials);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(socket);
            }
        });
        (node, dials)
    }

    #[tokio::test]
    async fn a_failed_cluster_connect_is_not_redialled_at_once_but_is_after_a_pause() {
        let (node, dials) = node_that_hangs_up().await;
        let dialled = || dials.load(std::sync::atomic::Ordering::SeqCst);
        let RedisConnection::Cluster(lazy) =
            RedisConnection::new(&RedisTarget::Cluster(vec![node])).unwrap()
        else {
            panic!("a cluster target makes a cluster connection");
        };
        assert!(lazy.get().await.is_err());
        let failed = std::time::Instant::now();
        let after_first = dialled();
        assert!(after_first > 0, "the first connect never dialled");
        assert!(lazy.get().await.is_err());
        // (On a machine so busy that the pause passed in between, a redial is right.)
        if failed.elapsed() < RECONNECT_PAUSE {
            assert_eq!(
                dialled(),
                after_first,
                "dialled again at once after a failure"
            );
        }

        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dialled() == after_first {
            assert!(
                std::time::Instant::now() < deadline,
                "never dialled again after the pause"
            );
            assert!(lazy.get().await.is_err());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
