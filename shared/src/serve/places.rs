//! The connection cap (`HTTP_MAX_CONNECTIONS`): places for connections, and a client waiting
//! for one.
//!
//! At the cap, new clients wait in the kernel's backlog, except one: the accept loop takes the
//! next client first and holds it until a place frees, which is how the server knows that
//! someone waits. Without more, a client that makes one quick request on each of its connections
//! and then leaves them idle would hold every place for the whole idle timeout (75 s by
//! default), turning everyone else away. So while a client waits, a connection idle for the
//! header timeout or longer gives its place up ([`Places::make_room`], which each idle
//! connection's watchdog asks every header timeout): one connection per waiting client, and none
//! while no one waits, so that a server that is merely at its cap (an api holding its load
//! balancer's keep-alive connections) keeps them all.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub(super) struct Places {
    free: Arc<Semaphore>,
    /// A client waits for a place, and no idle connection has offered its own yet.
    room_wanted: AtomicBool,
}

impl Places {
    pub(super) fn new(max_connections: usize) -> Arc<Self> {
        Arc::new(Self {
            free: Arc::new(Semaphore::new(
                max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            room_wanted: AtomicBool::new(false),
        })
    }

    /// Waits for a free place for a client already accepted.
    pub(super) async fn take(&self) -> OwnedSemaphorePermit {
        if let Ok(place) = Arc::clone(&self.free).try_acquire_owned() {
            return place;
        }
        let _waiting = Waiting::begin(&self.room_wanted);
        Arc::clone(&self.free)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Asked by a connection idle for the header timeout or longer: whether to close it to make
    /// room for a waiting client. Yes to one connection per wait, and to none when a place has
    /// freed meanwhile (the waiting client is about to take it).
    pub(super) fn make_room(&self) -> bool {
        self.free.available_permits() == 0
            && self
                .room_wanted
                .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }
}

/// Room is wanted while this lives: also when the wait ends because the server stops.
struct Waiting<'a>(&'a AtomicBool);

impl<'a> Waiting<'a> {
    fn begin(room_wanted: &'a AtomicBool) -> Self {
        room_wanted.store(true, Ordering::Release);
        metrics::gauge!(super::CLIENTS_WAITING).increment(1.0);
        Self(room_wanted)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
        metrics::gauge!(super::CLIENTS_WAITING).decrement(1.0);
    }
}
