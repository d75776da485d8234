//! One connection's watchdog: what it knows about the connection (bytes moving, requests in
//! flight, when the current request started and whether its body is still coming) and the
//! deadlines that follow from it.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};

use super::ServerLimits;
use super::places::{Place, Places};

/// Why we closed a connection: the only values of the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Close {
    HeaderTimeout,
    /// A request's body not in within the header timeout of the handler asking for it.
    BodyTimeout,
    IdleTimeout,
    /// Idle for the header timeout or longer, with a client waiting for a place under the cap.
    Crowded,
    ShutdownDeadline,
}

impl Close {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::BodyTimeout => "body_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::Crowded => "crowded",
            Self::ShutdownDeadline => "shutdown_deadline",
        }
    }

    pub(super) fn record(self, port: &'static str, connections: u64) {
        metrics::counter!(super::CONNECTIONS_CLOSED, "port" => port, "reason" => self.as_str())
            .increment(connections);
    }
}

/// Counts the connection in `http_open_connections` and holds its place under the cap until
/// dropped, which also happens when the task is aborted at the shutdown deadline.
pub(super) struct OpenConnection {
    place: Place,
}

impl OpenConnection {
    pub(super) fn new(place: Place) -> Self {
        place.places().open.increment(1.0);
        Self { place }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.place.places().open.decrement(1.0);
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
    /// While a request's body is still coming: when the handler first asked for it.
    body_pending_since: Option<Instant>,
}

impl Activity {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                in_flight: 0,
                last_io: now,
                head_started: Some(now),
                body_pending_since: None,
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

    /// A request head was parsed.
    pub(super) fn request_started(self: &Arc<Self>) -> InFlight {
        let mut state = self.lock();
        state.in_flight += 1;
        state.head_started = None;
        InFlight(Arc::clone(self))
    }

    /// The handler asked for the body: from now it must all come within the header timeout. The
    /// clock starts here, not at the head, so that a server slow to read (a middleware waiting
    /// for a database) is never blamed on the client.
    fn body_wanted(&self) {
        let mut state = self.lock();
        if state.body_pending_since.is_none() {
            state.body_pending_since = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    fn body_ended(&self) {
        self.lock().body_pending_since = None;
    }

    /// Resolves when the connection has broken one of the limits: a request head not in within
    /// the header timeout of its first byte, a body not in within the header timeout of the
    /// handler asking for it, or no request in flight and nothing moving for the idle timeout.
    /// A connection idle for the header timeout also offers its place to a waiting client: at
    /// once, and then whenever a client begins to wait (see `places.rs`).
    pub(super) async fn expired(&self, limits: &ServerLimits, places: &Places) -> Close {
        // Woken by a client beginning to wait, and not yet answered with `make_room`.
        let mut asked = false;
        loop {
            let mut offering = false;
            let deadline = {
                let state = self.lock();
                let now = Instant::now();
                if state.in_flight > 0 {
                    match state.body_pending_since.map(|t| t + limits.header_timeout) {
                        Some(body) if body <= now => return Close::BodyTimeout,
                        body => body,
                    }
                } else {
                    let idle = state.last_io + limits.idle_timeout;
                    match state.head_started.map(|t| t + limits.header_timeout) {
                        Some(head) if head <= now => return Close::HeaderTimeout,
                        _ if idle <= now => return Close::IdleTimeout,
                        Some(head) => Some(head.min(idle)),
                        None => {
                            let may_offer = state.last_io + limits.header_timeout;
                            if may_offer <= now {
                                if places.make_room() {
                                    return Close::Crowded;
                                }
                                asked = false;
                                offering = true;
                                Some(idle)
                            } else {
                                Some(may_offer.min(idle))
                            }
                        }
                    }
                }
            };
            if std::mem::take(&mut asked) {
                // Asked for room, but a request came in meanwhile: another idle connection may
                // still give its place, or the waiting client would wait for an idle timeout.
                places.pass_on();
            }
            // A missed notification is kept by `Notify` until the next `notified().await`; so is
            // a begun wait no idle connection was there to hear (`notify_one`).
            let room_wanted = places.room_wanted();
            match deadline {
                Some(deadline) => tokio::select! {
                    () = sleep_until(deadline) => {}
                    () = self.changed.notified() => {}
                    () = room_wanted, if offering => asked = true,
                },
                None => self.changed.notified().await,
            }
        }
    }
}

/// A request's body, telling the watchdog when the handler first asks for it and when it has
/// all come (or is no longer read).
pub(super) struct WatchedBody {
    body: Incoming,
    /// `None` once the body has ended, or when there is none.
    activity: Option<Arc<Activity>>,
    wanted: bool,
}

impl WatchedBody {
    pub(super) fn new(body: Incoming, activity: &Arc<Activity>) -> Self {
        let activity = (!body.is_end_stream()).then(|| Arc::clone(activity));
        Self {
            body,
            activity,
            wanted: false,
        }
    }

    fn ended(&mut self) {
        if let Some(activity) = self.activity.take() {
            activity.body_ended();
        }
    }
}

impl Body for WatchedBody {
    type Data = <Incoming as Body>::Data;
    type Error = <Incoming as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if !self.wanted {
            self.wanted = true;
            if let Some(activity) = &self.activity {
                activity.body_wanted();
            }
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || self.body.is_end_stream() {
            self.ended();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for WatchedBody {
    /// A handler that drops the body unread is done with it; the connection then closes or reads
    /// the rest as a new head, whose own deadline applies.
    fn drop(&mut self) {
        self.ended();
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An idle connection whose watchdog runs, asked for room in its turn.
    fn idle(
        places: &Arc<Places>,
        limits: ServerLimits,
    ) -> (Arc<Activity>, tokio::task::JoinHandle<Close>) {
        let activity = Arc::new(Activity::new());
        drop(activity.request_started());
        let watchdog = tokio::spawn({
            let activity = Arc::clone(&activity);
            let places = Arc::clone(places);
            async move { activity.expired(&limits, &places).await }
        });
        (activity, watchdog)
    }

    /// The idle connection told first that a client waits takes a request at that moment: it
    /// cannot give its place, so the call goes on to the other idle one. Kept, the client waited
    /// for the other's idle timeout. Which of the two wake-ups its watchdog sees first is up to
    /// `select!`, so the race is run several times.
    #[tokio::test]
    async fn a_call_for_room_that_meets_a_request_goes_on_to_another_idle_connection() {
        let limits = ServerLimits {
            header_timeout: Duration::from_millis(20),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1,
        };
        for _ in 0..10 {
            let places = Places::new(1, "test");
            let _held = places.take().await;
            let (busy, first) = idle(&places, limits);
            tokio::time::sleep(Duration::from_millis(5)).await;
            let (_, second) = idle(&places, limits);
            // Both idle past the header timeout, both waiting to be asked.
            tokio::time::sleep(Duration::from_millis(50)).await;
            // A client begins to wait: the call reaches the first idle connection, and before
            // its watchdog runs, a request comes in on it.
            let mut waiting = std::pin::pin!(places.take());
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(
                waiting.as_mut().poll(&mut cx).is_pending(),
                "a place was free"
            );
            let _request = busy.request_started();
            let closed = tokio::time::timeout(Duration::from_secs(2), second).await;
            assert!(
                matches!(closed, Ok(Ok(Close::Crowded))),
                "the other idle connection was not asked: {closed:?}"
            );
            assert!(!first.is_finished(), "the busy connection closed");
            first.abort();
        }
    }
}
