//! The connection cap (`HTTP_MAX_CONNECTIONS`): places for connections, and a client waiting
//! for one.
//!
//! At the cap, new clients wait in the kernel's backlog, except one: the accept loop takes the
//! next client first and holds it until a place frees (or until it leaves before sending a byte,
//! as a port scan does), which is how the server knows that someone waits. Without more, a
//! client that makes one quick request on each of its connections and then leaves them idle
//! would hold every place for the whole idle timeout (75 s by default), turning everyone else
//! away. So while a client waits, a connection idle for the
//! header timeout or longer gives its place up ([`Places::make_room`]): one connection per
//! waiting client, and none while no one waits, so that a server that is merely at its cap (an
//! api holding its load balancer's keep-alive connections) keeps them all.
//!
//! An idle connection asks once when it has been idle for the header timeout, and after that only
//! when told that a client has begun to wait ([`Places::room_wanted`]), which wakes one of them.
//! Asking on a timer instead woke every idle connection every header timeout, with no one
//! waiting: 2,000 wake-ups a second for 10,000 idle connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics::Gauge;
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

pub(super) struct Places {
    free: Arc<Semaphore>,
    /// A client waits for a place, and no idle connection has offered its own yet.
    room_wanted: AtomicBool,
    /// Told when a client begins to wait: wakes one idle connection that could make room (or,
    /// with none waiting to be told, the next to ask).
    room_asked: Notify,
    /// The port's name in the metrics' label `port`: a worker serves two.
    pub(super) port: &'static str,
    /// `http_open_connections` and `http_clients_waiting` of this port, looked up once.
    pub(super) open: Gauge,
    waiting: Gauge,
}

impl Places {
    pub(super) fn new(max_connections: usize, port: &'static str) -> Arc<Self> {
        Arc::new(Self {
            free: Arc::new(Semaphore::new(
                max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            room_wanted: AtomicBool::new(false),
            room_asked: Notify::new(),
            port,
            open: metrics::gauge!(super::OPEN_CONNECTIONS, "port" => port),
            waiting: metrics::gauge!(super::CLIENTS_WAITING, "port" => port),
        })
    }

    /// Waits for a free place for a client already accepted, asking for room while it waits.
    pub(super) async fn take(self: &Arc<Self>) -> Place {
        if let Some(place) = self.try_take() {
            return place;
        }
        let _waiting = Waiting::begin(self);
        let permit = Arc::clone(&self.free)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.place(permit)
    }

    /// Asked by a connection idle for the header timeout or longer: whether to close it to make
    /// room for a waiting client. Yes to one connection per wait, and to none once any place has
    /// been given back meanwhile (it went to the waiting client).
    pub(super) fn make_room(&self) -> bool {
        self.room_wanted
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Resolves when a client may have begun to wait: then ask [`Places::make_room`]. Awaited by
    /// connections idle for the header timeout; each begun wait wakes one of them. One woken
    /// that stops waiting for something else passes the call on (`Notify` does); one woken that
    /// can no longer offer its place (a request came in meanwhile) must [`Places::pass_on`].
    pub(super) fn room_wanted(&self) -> Notified<'_> {
        self.room_asked.notified()
    }

    /// Hands a call for room that this connection cannot answer to another idle one, while the
    /// client still waits.
    pub(super) fn pass_on(&self) {
        if self.room_wanted.load(Ordering::Acquire) {
            self.room_asked.notify_one();
        }
    }

    /// A free place, if there is one, without waiting (and so without asking for room).
    fn try_take(self: &Arc<Self>) -> Option<Place> {
        let permit = Arc::clone(&self.free).try_acquire_owned().ok()?;
        Some(self.place(permit))
    }

    fn place(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Place {
        Place {
            places: Arc::clone(self),
            _permit: permit,
        }
    }
}

/// A connection's place, given back when dropped.
pub(super) struct Place {
    places: Arc<Places>,
    /// Dropped after [`Place::drop`] has run (fields drop after the body).
    _permit: OwnedSemaphorePermit,
}

impl Place {
    pub(super) fn places(&self) -> &Places {
        &self.places
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        // A place given back goes straight to the client waiting, if one is: no room is wanted
        // any more. Said before the place goes back, so that no idle connection closes for it.
        self.places.room_wanted.store(false, Ordering::Release);
    }
}

/// Room is wanted while this lives: also when the wait ends because the server stops.
struct Waiting<'a>(&'a Places);

impl<'a> Waiting<'a> {
    fn begin(places: &'a Places) -> Self {
        places.room_wanted.store(true, Ordering::Release);
        places.room_asked.notify_one();
        places.waiting.increment(1.0);
        Self(places)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.room_wanted.store(false, Ordering::Release);
        self.0.waiting.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use tokio::task::JoinHandle;

    use super::*;

    /// One place, held, and a client waiting for it (once room is wanted).
    async fn full_with_a_client_waiting() -> (Arc<Places>, Place, JoinHandle<Place>) {
        let places = Places::new(1, "test");
        let held = places.take().await;
        let waiting = tokio::spawn({
            let places = Arc::clone(&places);
            async move { places.take().await }
        });
        while !places.room_wanted.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        (places, held, waiting)
    }

    #[tokio::test]
    async fn a_place_given_back_to_a_waiting_client_wants_no_more_room() {
        let (places, held, waiting) = full_with_a_client_waiting().await;
        // The only place closes on its own: it goes to the waiting client, and no idle
        // connection needs to close for it.
        drop(held);
        assert!(!places.make_room(), "room made for a client already served");
        let _served = waiting.await.expect("the waiting client got the place");
    }

    #[tokio::test]
    async fn one_connection_makes_room_per_waiting_client() {
        let (places, _held, waiting) = full_with_a_client_waiting().await;
        assert!(places.make_room());
        assert!(!places.make_room(), "two connections closed for one client");
        waiting.abort();
    }
}
