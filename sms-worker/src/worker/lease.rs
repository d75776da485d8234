//! A claim's lease in the send ledger, kept alive while its holder works on the event, and what
//! the holder can be sure of: a claim whose renewals have failed for a while (Redis away or
//! stalled) may have lapsed in Redis, and another copy of the event taken it over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use uuid::Uuid;

use crate::ledger::{ClaimToken, Renewal, SendLedger};

/// Renewals per lease. Several, so that one failed renewal (a Redis timeout, a reconnect) leaves
/// the claim well inside its lease, above [`SURE_FOR`].
const RENEWALS_PER_LEASE: u32 = 6;
/// After a failed renewal, the next try comes this soon, not a whole renewal period later; after
/// more failures, twice as late each time, up to a renewal period, so that many claims on a sick
/// Redis do not hammer it.
const RETRY_AFTER_A_FAILURE: Duration = Duration::from_millis(100);
/// A provider call starts only while the claim is held for `lease / SURE_FOR` yet: a third.
const SURE_FOR: u32 = 3;

/// Keeps renewing a claim's lease until dropped, and knows until when the claim is surely
/// held: the last renewal's lease, counted from when that renewal was asked for.
pub(super) struct Lease {
    renewing: tokio::task::JoinHandle<()>,
    claim: Arc<HeldClaim>,
}

/// One claim, and until when it is held (`None` once it is known to be lost).
struct HeldClaim {
    ledger: SendLedger,
    event_id: Uuid,
    token: ClaimToken,
    lease: Duration,
    held_until: Mutex<Option<Instant>>,
}

impl HeldClaim {
    /// Asks Redis to extend the lease; `false` when it could not say (the claim is then held
    /// until its last lease ends, no longer).
    async fn renew(&self) -> bool {
        let asked_at = Instant::now();
        let held = match self
            .ledger
            .renew(self.event_id, &self.token, self.lease)
            .await
        {
            Ok(Renewal::Renewed) => Some(asked_at + self.lease),
            Ok(Renewal::Finished) => {
                debug!(event_id = %self.event_id, "the event's outcome is recorded; no claim left to renew");
                None
            }
            Ok(Renewal::Lost) => {
                warn!(event_id = %self.event_id, "lost the claim on this event (its lease lapsed)");
                None
            }
            Err(e) => {
                debug!(event_id = %self.event_id, error = %e, "could not renew the claim");
                return false;
            }
        };
        if let Ok(mut held_until) = self.held_until.lock() {
            // A renewal asked for earlier may answer later: the lease runs to the latest end.
            // A claim lost stays lost.
            *held_until = held.and_then(|new| held_until.map(|old| new.max(old)));
        }
        true
    }

    fn lost(&self) -> bool {
        self.held_until.lock().map_or(true, |held| held.is_none())
    }

    fn surely_held(&self) -> bool {
        let held_until = self.held_until.lock().ok().and_then(|held| *held);
        held_until.is_some_and(|until| Instant::now() + self.lease / SURE_FOR < until)
    }
}

impl Lease {
    /// Only keeps the claim alive: [`Self::make_sure`] would count its lease from now, later
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
        let claim = Arc::new(HeldClaim {
            ledger,
            event_id,
            token,
            lease,
            held_until: Mutex::new(Some(claimed_at + lease)),
        });
        let renewed = claim.clone();
        let renewing = tokio::spawn(async move {
            let every = lease / RENEWALS_PER_LEASE;
            let mut next = every;
            let mut after_a_failure = RETRY_AFTER_A_FAILURE;
            loop {
                tokio::time::sleep(next).await;
                if renewed.renew().await {
                    next = every;
                    after_a_failure = RETRY_AFTER_A_FAILURE;
                } else {
                    // Spread, so that the claims a Redis failure hit together do not all come
                    // back together.
                    next = after_a_failure
                        .min(every)
                        .mul_f64(rand::random_range(0.5..=1.0));
                    // Capped before it doubles, so no run of failures can overflow it.
                    after_a_failure = after_a_failure.min(every) * 2;
                }
                if renewed.lost() {
                    return;
                }
            }
        });
        Self { renewing, claim }
    }

    /// Whether the claim is surely this copy's for a while yet (a third of a lease), renewing
    /// it once more first if that is in doubt. Once Redis cannot renew it, the lease may lapse
    /// there and another copy of the event take the claim and send: no provider call may
    /// start then.
    pub(super) async fn make_sure(&self) -> bool {
        if self.claim.surely_held() {
            return true;
        }
        self.claim.renew().await;
        self.claim.surely_held()
    }
}

impl Lease {
    /// Stops renewing, before the holder itself releases the claim or records the event's
    /// outcome over it.
    pub(super) fn stop(&self) {
        self.renewing.abort();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewing.abort();
    }
}
