//! Receipts are applied on tasks of their own, which the worker counts and waits for when it
//! stops.
//!
//! Why not in the request: a receipt's new status is stored before its resend runs, so the
//! provider's retry of a receipt whose request was cut off (the 15 s request timeout, a slow
//! provider answering the resend, an Infobip batch of resends one after another) would find the
//! status final and change nothing, and the resend would be lost. So the request only waits for
//! its task; if the request ends first, the task goes on.
//!
//! Why bounded: a task may outlive its request and its connection, and each holds a provider's
//! connection while it resends. Every task holds one of as many permits as the receipts port has
//! places, so tasks never outnumber places, and the open files the port was sized for (two per
//! place) still hold. A request that finds no permit free within [`PERMIT_WAIT`] is answered
//! 503, and the provider sends it again later. A task only applies: waiting to ask again about a
//! message not recorded yet is the request's, holds no permit, and ends with the request, so a
//! caller that leaves at once costs one pass, not seconds of a permit.
//!
//! Why waited for: a resend cut off by the process ending is one its user never gets (each event
//! has one). A stopping worker gives the tasks until the stop's deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::RedisResult;
use tokio::sync::Semaphore;
use tracing::warn;

use super::context::Context;
use super::resend::{self, Receipted};
use crate::metrics as m;
use crate::receipts::Receipt;
use crate::receipts::store::ReceiptStore;

/// How long a final receipt for a message not yet recorded is asked about again: the record is
/// written just after the send's ack, and a carrier reporting within milliseconds can come
/// first. Twilio sends a callback once (unless its URL asks for retries), so a failure dropped as
/// unknown here would never be resent. Deliveries wait as long: the breaker weighs them against
/// the failures, and counting only the failures that came early would tilt it. The waits double
/// from the first, about 3.75 s in all. `queued` and `sent` only move metrics, and do not wait.
const UNKNOWN_FIRST_WAIT: Duration = Duration::from_millis(250);
const UNKNOWN_TRIES: u32 = 5;
/// How long a request waits for a permit before it is answered 503: a burst of receipts while
/// resends are slow waits its turn instead of being turned away (Twilio would not send it again).
const PERMIT_WAIT: Duration = Duration::from_secs(2);

/// The tasks applying receipts, at most one per place of the receipts port.
#[derive(Clone)]
pub(crate) struct ReceiptTasks {
    permits: Arc<Semaphore>,
    size: u32,
}

/// Every permit was held: the port's places are all taken by receipts still being applied.
#[derive(Debug)]
pub(crate) struct Busy;

impl ReceiptTasks {
    /// Room for `places` tasks at once (the receipts port's connection cap).
    pub(crate) fn new(places: usize) -> Self {
        let size = u32::try_from(places).unwrap_or(u32::MAX).max(1);
        Self {
            permits: Arc::new(Semaphore::new(size as usize)),
            size,
        }
    }

    /// Applies `receipts` in order, each pass on a task of its own, and waits for it. If the
    /// caller is dropped (its request cut off), the pass under way still finishes. Final
    /// receipts naming a message not recorded yet are asked about again a few times, all
    /// together, so a batch of them waits once, not once each. Err(Busy) when no task may start;
    /// the inner error when Redis could not be asked about one of them (the provider should send
    /// them again: those applied already are no-ops then, but for a resend still owed, which the
    /// repeat makes).
    pub(crate) async fn apply(
        &self,
        context: &Arc<Context>,
        store: &ReceiptStore,
        receipts: Vec<Receipt>,
    ) -> Result<RedisResult<()>, Busy> {
        let mut outcome = Ok(());
        let mut pending = receipts;
        let mut wait = UNKNOWN_FIRST_WAIT;
        for try_number in 1..=UNKNOWN_TRIES {
            let pass = apply_once(Arc::clone(context), store.clone(), pending);
            let Some((applied, unknown)) = self.run(pass).await? else {
                return Ok(Err(interrupted()));
            };
            if let Err(e) = applied {
                outcome = Err(e);
            }
            let (worth_asking_again, given_up): (Vec<_>, Vec<_>) = unknown
                .into_iter()
                .partition(|r| r.status.is_final() && try_number < UNKNOWN_TRIES);
            for receipt in given_up {
                metrics::counter!(m::RECEIPTS_IGNORED, "provider" => receipt.provider, "reason" => "unknown")
                    .increment(1);
            }
            if worth_asking_again.is_empty() {
                break;
            }
            pending = worth_asking_again;
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
        Ok(outcome)
    }

    /// Runs `work` on a task of its own, holding a permit until it ends, and waits for it;
    /// `None` only when the runtime is going away. A panic in it goes on in the caller.
    async fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<Option<T>, Busy> {
        let permit = tokio::time::timeout(PERMIT_WAIT, Arc::clone(&self.permits).acquire_owned())
            .await
            .map_err(|_| Busy)?
            .map_err(|_| Busy)?;
        let task = tokio::spawn(async move {
            let done = work.await;
            drop(permit);
            done
        });
        match task.await {
            Ok(done) => Ok(Some(done)),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Ok(None),
        }
    }

    /// Waits until no task is left, for at most `limit`; says whether none is. Call it once the
    /// receipts port has stopped taking requests.
    pub(crate) async fn finished(&self, limit: Duration) -> bool {
        let all = self.permits.acquire_many(self.size);
        match tokio::time::timeout(limit, all).await {
            Ok(Ok(_every_permit)) => true,
            // The semaphore is never closed.
            Ok(Err(_)) => true,
            Err(_) => {
                let left = self.size as usize - self.permits.available_permits();
                warn!(
                    left,
                    "stopping with receipts still being applied; their resends may be cut off"
                );
                false
            }
        }
    }
}

/// One pass over `receipts`: whether Redis could be asked about each (an error is logged here,
/// since the request that would log it may be gone), and the receipts whose message is not
/// recorded (yet).
async fn apply_once(
    context: Arc<Context>,
    store: ReceiptStore,
    receipts: Vec<Receipt>,
) -> (RedisResult<()>, Vec<Receipt>) {
    let mut outcome = Ok(());
    let mut unknown = Vec::new();
    for receipt in receipts {
        match resend::apply(&context, &store, &receipt).await {
            Ok(Receipted::Applied) => {}
            Ok(Receipted::UnknownMessage) => unknown.push(receipt),
            // One failed receipt fails the request, so the provider sends it again.
            Err(e) => {
                warn!(error = %e, provider = receipt.provider, "a delivery receipt was not applied in full (Redis); the provider may send it again");
                outcome = Err(e);
            }
        }
    }
    (outcome, unknown)
}

fn interrupted() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::Interrupted))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_task_outlives_its_caller_and_holds_its_place_until_it_ends() {
        let tasks = ReceiptTasks::new(1);
        let finished = Arc::new(AtomicBool::new(false));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let work = {
            let finished = Arc::clone(&finished);
            async move {
                let _ = released.await;
                finished.store(true, Ordering::SeqCst);
            }
        };
        // The caller gives up (its request is cut off) while the work is under way.
        let cut = tokio::time::timeout(Duration::from_millis(50), tasks.run(work)).await;
        assert!(cut.is_err(), "the caller was cut off");
        let start = tokio::time::Instant::now();
        assert!(
            matches!(tasks.run(async {}).await, Err(Busy)),
            "its place is still held"
        );
        assert!(
            start.elapsed() >= PERMIT_WAIT,
            "a caller waits for a place first"
        );
        assert!(!tasks.finished(Duration::from_millis(50)).await);

        release.send(()).expect("the task still waits");
        assert!(tasks.finished(Duration::from_secs(5)).await);
        assert!(
            finished.load(Ordering::SeqCst),
            "the work went on without its caller"
        );
        assert!(matches!(tasks.run(async { 7 }).await, Ok(Some(7))));
    }
}
