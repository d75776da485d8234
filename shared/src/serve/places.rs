//! The connection cap (`HTTP_MAX_CONNECTIONS`): places for connections, and whether the server is
//! "crowded", every place taken so that the next client waits for one.
//!
//! At the cap, new clients wait in the kernel's backlog. Without more, a client that makes one
//! quick request on each of its connections and then leaves them idle would hold every place for
//! the whole idle timeout (75 s by default), turning everyone else away. So while the server is
//! crowded, idle connections get only the header timeout (the watchdog reads
//! [`Places::crowding`]): a place then costs its holder a request every few seconds, as a
//! trickled head already does.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

pub(super) struct Places {
    free: Arc<Semaphore>,
    crowded: watch::Sender<bool>,
    /// Free places at which crowding ends. More than one, so that a server hovering at the cap
    /// does not wake every connection's watchdog on each accept.
    calm_at: usize,
}

impl Places {
    pub(super) fn new(max_connections: usize) -> Arc<Self> {
        let places = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            free: Arc::new(Semaphore::new(places)),
            crowded: watch::Sender::new(false),
            calm_at: (places / 8).max(1),
        })
    }

    /// `true` while every place is taken.
    pub(super) fn crowding(&self) -> watch::Receiver<bool> {
        self.crowded.subscribe()
    }

    /// Waits for a free place (the accept loop takes one before each accept). Having to wait
    /// means the server is crowded.
    pub(super) async fn take(self: &Arc<Self>) -> Place {
        let permit = match Arc::clone(&self.free).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.crowded
                    .send_if_modified(|crowded| !std::mem::replace(crowded, true));
                Arc::clone(&self.free)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        Place {
            permit: Some(permit),
            places: Arc::clone(self),
        }
    }
}

/// One place, given back when dropped.
pub(super) struct Place {
    permit: Option<OwnedSemaphorePermit>,
    places: Arc<Places>,
}

impl Drop for Place {
    fn drop(&mut self) {
        // A place given back goes to a client waiting for one first, so crowding ends only once
        // no one waits and enough places are free.
        drop(self.permit.take());
        if *self.places.crowded.borrow()
            && self.places.free.available_permits() >= self.places.calm_at
        {
            self.places
                .crowded
                .send_if_modified(|crowded| std::mem::replace(crowded, false));
        }
    }
}
