//! One connection's watchdog: what it knows about the connection (bytes moving, requests in
//! flight, when the current head started) and the deadlines that follow from it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};

use super::ServerLimits;
use super::places::Place;

/// Why we closed a connection: the only values of the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Close {
    HeaderTimeout,
    IdleTimeout,
    /// Idle for the header timeout while every place under the cap was taken.
    Crowded,
    ShutdownDeadline,
}

impl Close {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::Crowded => "crowded",
            Self::ShutdownDeadline => "shutdown_deadline",
        }
    }

    pub(super) fn record(self, connections: u64) {
        metrics::counter!(super::CONNECTIONS_CLOSED, "reason" => self.as_str())
            .increment(connections);
    }
}

/// Counts the connection in `http_open_connections` and holds its place under the cap until
/// dropped, which also happens when the task is aborted at the shutdown deadline.
pub(super) struct OpenConnection {
    _place: Place,
}

impl OpenConnection {
    pub(super) fn new(place: Place) -> Self {
        metrics::gauge!(super::OPEN_CONNECTIONS).increment(1.0);
        Self { _place: place }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(super::OPEN_CONNECTIONS).decrement(1.0);
    }
}

/// What the watchdog of one connection knows about it.
pub(super) struct Activity {
    state: Mutex<State>,
    /// Signalled when a deadline may have moved earlier; later deadlines need no wake-up.
    changed: Notify,
}

struct State {
    in_flight: usize,
    last_io: Instant,
    /// When the head being read started; `None` while a request is in flight or none started.
    head_started: Option<Instant>,
}

impl Activity {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                in_flight: 0,
                last_io: now,
                head_started: Some(now),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing can panic while the lock is held, and the state stays consistent if it did.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bytes_read(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        state.last_io = now;
        // Bytes with no request in flight are the start of the next head (or trailing body
        // bytes of a request whose handler ignored them: those must not trickle either).
        if state.in_flight == 0 && state.head_started.is_none() {
            state.head_started = Some(now);
            drop(state);
            self.changed.notify_one();
        }
    }

    fn bytes_written(&self) {
        self.lock().last_io = Instant::now();
    }

    pub(super) fn request_started(self: &Arc<Self>) -> InFlight {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_started = None;
        InFlight(Arc::clone(self))
    }

    /// Resolves when the connection has broken one of the limits. While `crowded` says every
    /// place is taken, an idle connection gets only the header timeout: otherwise anyone could
    /// hold every place for the whole idle timeout with one quick request per connection.
    pub(super) async fn expired(
        &self,
        limits: &ServerLimits,
        crowded: &mut watch::Receiver<bool>,
    ) -> Close {
        loop {
            let deadline = {
                let is_crowded = *crowded.borrow_and_update();
                let (idle_timeout, idle_close) = if is_crowded {
                    (
                        limits.idle_timeout.min(limits.header_timeout),
                        Close::Crowded,
                    )
                } else {
                    (limits.idle_timeout, Close::IdleTimeout)
                };
                let state = self.lock();
                let now = Instant::now();
                if state.in_flight > 0 {
                    None
                } else {
                    let idle = state.last_io + idle_timeout;
                    let head = state.head_started.map(|t| t + limits.header_timeout);
                    match head {
                        Some(head) if head <= now => return Close::HeaderTimeout,
                        _ if idle <= now => return idle_close,
                        Some(head) => Some(head.min(idle)),
                        None => Some(idle),
                    }
                }
            };
            // A missed notification is kept by `Notify` until the next `notified().await`, and a
            // change of `crowded` by the receiver until the next `changed()`. Err: the server is
            // gone, and its stop reaches the connection another way.
            let crowding = async {
                if crowded.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            match deadline {
                Some(deadline) => tokio::select! {
                    () = sleep_until(deadline) => {}
                    () = self.changed.notified() => {}
                    () = crowding => {}
                },
                None => tokio::select! {
                    () = self.changed.notified() => {}
                    () = crowding => {}
                },
            }
        }
    }
}

/// One request between its parsed head and its response future's end.
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.in_flight -= 1;
        // The idle time starts now, not at the last byte read before a slow handler.
        state.last_io = Instant::now();
        drop(state);
        self.0.changed.notify_one();
    }
}

/// The socket, reporting every byte that moves to the watchdog.
pub(super) struct Watched {
    pub(super) stream: TcpStream,
    pub(super) activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.bytes_written();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.bytes_written();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
