//! A claim's lease in the send ledger, kept alive while its holder works on the event, and what
//! the holder can be sure of: a claim whose renewals have failed for a while (Redis away or
//! stalled) may have lapsed in Redis, and another copy of the event taken it over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use uuid::Uuid;

use crate::ledger::{ClaimToken, SendLedger};

/// Keeps renewing a claim's lease until dropped, and knows until when the claim is surely
/// held: the lease renewed last, counted from when that renewal was asked for.
pub(super) struct Lease {
    renewing: tokio::task::JoinHandle<()>,
    /// `None` once the claim is known to be lost.
    held_until: Arc<Mutex<Option<Instant>>>,
    /// How long a lease runs.
    lease: Duration,
}

impl Lease {
    /// Only keeps the claim alive: [`Self::surely_held`] would count its lease from now, later
    /// than its last renewal.
    pub(super) fn keep(
        ledger: SendLedger,
        event_id: Uuid,
        token: ClaimToken,
        lease: Duration,
    ) -> Self {
        Self::keep_from(ledger, event_id, token, lease, Instant::now())
    }

    /// For a claim asked for at `claimed_at`.
    pub(super) fn keep_from(
        ledger: SendLedger,
        event_id: Uuid,
        token: ClaimToken,
        lease: Duration,
        claimed_at: Instant,
    ) -> Self {
        let held_until = Arc::new(Mutex::new(Some(claimed_at + lease)));
        let renewed = held_until.clone();
        let renewing = tokio::spawn(async move {
            let every = lease / 3;
            loop {
                tokio::time::sleep(every).await;
                let asked_at = Instant::now();
                let held = match ledger.renew(event_id, &token, lease).await {
                    Ok(true) => Some(asked_at + lease),
                    Ok(false) => {
                        warn!(%event_id, "lost the claim on this event (its lease lapsed)");
                        None
                    }
                    Err(e) => {
                        debug!(%event_id, error = %e, "could not renew the claim");
                        continue;
                    }
                };
                if let Ok(mut held_until) = renewed.lock() {
                    *held_until = held;
                }
                if held.is_none() {
                    return;
                }
            }
        });
        Self {
            renewing,
            held_until,
            lease,
        }
    }

    /// Whether the claim is surely this copy's for a while yet: a third of a lease, the time
    /// between two renewals. Once renewals fail for longer (Redis away or stalled), the lease
    /// may lapse in Redis and another copy of the event take the claim and send: no provider
    /// call may start then.
    pub(super) fn surely_held(&self) -> bool {
        let held_until = self.held_until.lock().ok().and_then(|held| *held);
        held_until.is_some_and(|until| Instant::now() + self.lease / 3 < until)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewing.abort();
    }
}
