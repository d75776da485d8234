//! The HTTP server loop both programs use: what `axum::serve` does, plus the limits an exposed
//! server needs. The api serves its clients with it, and the worker its receipts port (which
//! anyone on the internet can reach) and its health port.
//!
//! `axum::serve` has no header timeout, no connection cap and no shutdown deadline, so a client
//! that trickles a request head holds a connection (and a task) as long as it likes, and a
//! half-sent request keeps the process alive after SIGTERM until the client gives up.
//!
//! hyper's own `http1().header_read_timeout` is not used: its timer starts whenever the
//! connection waits for a head (`poll_read_head` in hyper 1.x), including while an idle
//! keep-alive connection waits for its next request, so it also closes idle connections after
//! the same few seconds. Idle connections must outlive the load balancer's idle timeout (60 s on
//! AWS ALB): if we closed first, the balancer could send a request on a connection we had just
//! closed and answer 502. So the two timeouts are separate here. Each connection's IO is wrapped
//! to see when bytes move, its service to see when a request head was parsed, when its body had
//! all come and when its response future finished, and a per-connection watchdog closes the
//! connection when
//! - a request head is not complete `header_timeout` after its first byte (on a new connection,
//!   after the accept: a client that connects and stays silent is a trickle too),
//! - a request body is not complete `header_timeout` after the handler first asked for it (a
//!   body trickled or held back would keep the connection, and its place, for as long as the
//!   handler's own timeout, if it has one),
//! - no request is in flight and no byte has moved for `idle_timeout`, or
//! - a client waits for a place under the connection cap and the connection has been idle for
//!   `header_timeout` (`places.rs`).
//!
//! Shutdown has a hard deadline because graceful shutdown waits for every in-flight request,
//! and a request whose body never arrives is in flight for as long as the client wants.
//!
//! HTTP/1.1 only, and without upgrades (no route upgrades, and an upgraded socket would leave
//! its place and its watchdog behind), like `axum::serve` in this workspace: axum's `http2` feature
//! is off and `h2` is not in Cargo.lock. HTTP/2 would need its own idle rules (client PINGs on an
//! idle connection would look like the start of a request head here).

use std::io::{self, ErrorKind::ConnectionAborted, ErrorKind::ConnectionReset};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::sleep;
use tower::ServiceExt;

use places::{Place, Places};
use watchdog::{Activity, Close, OpenConnection, Watched, WatchedBody};

use crate::config::{ConfigError, Env};

/// About the most a connection's read buffer holds (hyper may read up to as much again in one go
/// before it checks), and so the largest request head. hyper's default is about 400 KiB, which a
/// few hundred connections trickling heads would turn into a few hundred MiB. Heads here are a
/// few hundred bytes. At 64 KiB, heads up to about twice that still pass (hyper checks between
/// reads), above what proxies pass on (nginx 32 KiB, AWS's load balancer 64 KiB plus the headers
/// it adds), so a proxy refuses an oversized head first; a connection holds at most about
/// 128 KiB of head. A head that fills it is answered 431.
const READ_BUFFER_LIMIT: usize = 64 * 1024;

mod open_files;
pub use open_files::OWN_OPEN_FILES;
mod places;
mod watchdog;

/// Gauge, label `port`: connections open now.
pub const OPEN_CONNECTIONS: &str = "http_open_connections";
/// Counter, labels `port` and `reason`: `header_timeout`, `body_timeout`, `idle_timeout`,
/// `crowded`, `shutdown_deadline`.
pub const CONNECTIONS_CLOSED: &str = "http_connections_closed_total";

/// Gauge, label `port`: clients accepted and waiting for a place under `HTTP_MAX_CONNECTIONS`
/// (0 or 1: the rest wait in the kernel's backlog).
pub const CLIENTS_WAITING: &str = "http_clients_waiting";

/// `# HELP` for the server's metrics.
pub fn describe() {
    metrics::describe_gauge!(OPEN_CONNECTIONS, "Client connections open now.");
    metrics::describe_gauge!(
        CLIENTS_WAITING,
        "Clients accepted and waiting for a place under HTTP_MAX_CONNECTIONS (more wait in the backlog)."
    );
    metrics::describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections the server closed: header_timeout, body_timeout, idle_timeout, crowded, shutdown_deadline."
    );
}

/// Long enough not to flood the log while out of file descriptors, short enough to recover fast.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Time to send a whole request head from its first byte (from the accept on a new
    /// connection), and a whole body from the handler asking for it.
    pub header_timeout: Duration,
    /// A connection with no request in flight and no bytes moving for this long is closed.
    /// Keep it above the load balancer's idle timeout so the balancer closes first.
    pub idle_timeout: Duration,
    /// Beyond it, connections wait in the kernel's backlog until one of ours closes; a client
    /// waiting makes a connection idle for `header_timeout` close. Per port.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(75),
            max_connections: 10_000,
        }
    }
}

impl ServerLimits {
    /// `HTTP_HEADER_TIMEOUT_SECS`, `HTTP_IDLE_TIMEOUT_SECS` and `HTTP_MAX_CONNECTIONS`, the same
    /// names in both programs. Each program picks its own connection cap: the worker's must leave
    /// file descriptors for its own connections to the providers.
    pub fn from_env(env: &Env, default_max_connections: usize) -> Result<Self, ConfigError> {
        Ok(Self {
            header_timeout: env.seconds("HTTP_HEADER_TIMEOUT_SECS", 5, 1..=300)?,
            idle_timeout: env.seconds("HTTP_IDLE_TIMEOUT_SECS", 75, 1..=3_600)?,
            max_connections: env.integer_in(
                "HTTP_MAX_CONNECTIONS",
                default_max_connections,
                1..=1_000_000,
            )?,
        })
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, lets in-flight
/// requests finish for as long as `shutdown` resolved with, and closes what is left. The grace
/// comes with the signal because the worker knows how long it can give only when it stops. Every
/// request carries `ConnectInfo<SocketAddr>`. Accept errors are logged and retried, never
/// returned. `port` names the port in the metrics' label `port` (`api`; a worker's `http` and
/// `receipts`).
pub async fn serve(
    port: &'static str,
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = Duration> + Send + 'static,
) -> io::Result<()> {
    let places = Places::new(limits.max_connections, port);
    let (stop_tx, stop_rx) = watch::channel(());
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    let shutdown_grace = {
        // Kept across turns of the loop: it may hold a client accepted and waiting for a place,
        // which a new future would drop.
        let mut accepting = pin!(accept(&listener, &places));
        loop {
            let accepted = tokio::select! {
                // Checked first so that a flood of connections cannot delay the shutdown.
                biased;
                grace = &mut shutdown => break grace,
                Some(ended) = connections.join_next() => {
                    if let Err(e) = ended
                        && e.is_panic()
                    {
                        tracing::error!(error = %e, "connection task panicked");
                    }
                    continue;
                }
                accepted = accepting.as_mut() => {
                    accepting.set(accept(&listener, &places));
                    accepted
                }
            };
            if let Some((stream, peer, place)) = accepted {
                let stop = stop_rx.clone();
                connections.spawn(connection(
                    stream,
                    peer,
                    router.clone(),
                    limits,
                    stop,
                    Arc::clone(&places),
                    place,
                ));
            }
        }
    };
    // Closing the listening socket makes new clients fail fast instead of queueing unserved.
    drop(listener);
    stop_tx.send_replace(());
    let drained = tokio::time::timeout(shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "shutdown grace elapsed: closing the remaining connections"
        );
        Close::ShutdownDeadline.record(port, connections.len() as u64);
        connections.shutdown().await;
    }
    Ok(())
}

/// Accepts the next client, then waits for room under the cap: at the cap the rest wait in the
/// kernel's backlog, and this one, held, tells idle connections that someone waits.
async fn accept(
    listener: &TcpListener,
    places: &Arc<Places>,
) -> Option<(TcpStream, SocketAddr, Place)> {
    match listener.accept().await {
        Ok((stream, peer)) => {
            // A client that leaves before sending a byte (a port scan, a balancer's TCP check) is
            // let go, so that no idle connection closes to make room for no one. One that sends
            // a byte and then leaves is not seen: it costs one idle connection, as any client does.
            // Nor is one whose close comes after room was asked for: the idle connections hear
            // of the ask at once, and giving it a moment to leave would hold every client behind
            // it in the backlog for that moment, which a stream of silent clients could use.
            let place = tokio::select! {
                // A free place first: no look at the socket when none is needed.
                biased;
                place = places.take() => place,
                () = left_without_a_word(&stream) => return None,
            };
            Some((stream, peer, place))
        }
        // The client gave up before we accepted it: nothing is wrong on our side.
        Err(e) if matches!(e.kind(), ConnectionAborted | ConnectionReset) => None,
        // EMFILE and friends: retrying at once would spin until a descriptor frees up.
        Err(e) => {
            tracing::error!(error = %e, "accepting a connection failed; backing off");
            sleep(ACCEPT_BACKOFF).await;
            None
        }
    }
}

/// Resolves when the client closes (or resets) the connection before sending anything; never
/// once it has sent something, which is what a client that stays does.
async fn left_without_a_word(stream: &TcpStream) {
    let mut first = [0u8; 1];
    if let Ok(1..) = stream.peek(&mut first).await {
        std::future::pending::<()>().await;
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ServerLimits,
    mut stop: watch::Receiver<()>,
    places: Arc<Places>,
    place: Place,
) {
    let _open = OpenConnection::new(place);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        stream,
        activity: Arc::clone(&activity),
    });
    let service = {
        let activity = Arc::clone(&activity);
        service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            // Taken when hyper hands over a parsed head, released when the response is ready.
            let in_flight = activity.request_started();
            let request = request.map(|body| WatchedBody::new(body, &activity));
            let response = router.clone().oneshot(request);
            async move {
                let response = response.await;
                drop(in_flight);
                response
            }
        })
    };
    // Off explicitly: hyper's header timer also runs while a keep-alive connection waits for its
    // next request, so it would cut idle connections (see the module doc).
    let conn = http1::Builder::new()
        .header_read_timeout(None)
        .max_buf_size(READ_BUFFER_LIMIT)
        .serve_connection(io, service);
    let mut conn = pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            close = activity.expired(&limits, &places) => {
                tracing::debug!(%peer, reason = close.as_str(), "closing connection");
                close.record(places.port, 1);
                return;
            }
            // Err means the server is gone, which is a stop too.
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests;
