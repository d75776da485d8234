//! Telling every part of the worker that it is time to stop.
//!
//! One [`ShutdownTrigger`] is fired once, when the process is asked to stop (SIGTERM, Ctrl-C, or
//! a test's stop future). Every task that must notice holds a [`Shutdown`], a cheap clone of the
//! same signal: the consume loop stops taking messages, a send waiting between retries gives its
//! message back instead of sleeping on, and `/readyz` starts answering 503.
//!
//! A second signal, [`GraceOver`], ends the grace period that the stop gives sends in flight.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Fires the signal. Dropping it without firing does not stop anything.
pub(crate) struct ShutdownTrigger(watch::Sender<Option<Instant>>);

/// Listens for the signal, which says when it was fired.
#[derive(Clone)]
pub(crate) struct Shutdown(watch::Receiver<Option<Instant>>);

/// A wait that was cut short because the worker is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShuttingDown;

pub(crate) fn channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(None);
    (ShutdownTrigger(sender), Shutdown(receiver))
}

impl ShutdownTrigger {
    /// Fires the signal, once: a second call changes nothing.
    pub(crate) fn fire(&self) {
        self.0.send_if_modified(|fired| {
            let first = fired.is_none();
            fired.get_or_insert_with(Instant::now);
            first
        });
    }
}

impl Shutdown {
    pub(crate) fn is_shutdown(&self) -> bool {
        self.0.borrow().is_some()
    }

    /// When the signal was fired: where a stop's grace period starts.
    pub(crate) fn fired_at(&self) -> Option<Instant> {
        *self.0.borrow()
    }

    /// Resolves once the signal has fired (at once if it already has).
    pub(crate) async fn recv(&self) {
        let mut receiver = self.0.clone();
        // An error means the trigger is gone without firing: then the signal never comes.
        if receiver.wait_for(Option::is_some).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Sleeps for `delay`, unless the worker starts stopping first.
    pub(crate) async fn sleep(&self, delay: Duration) -> Result<(), ShuttingDown> {
        if self.is_shutdown() {
            return Err(ShuttingDown);
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            () = self.recv() => Err(ShuttingDown),
        }
    }
}

/// The end of the stop's grace period, fired by the drain (the one part of the worker that
/// knows when the grace is over) and heard by every delivery still sending: those that have no
/// answer from a provider yet stop at once, and those past it finish.
pub(crate) struct GraceOver {
    trigger: ShutdownTrigger,
    heard: Shutdown,
}

impl GraceOver {
    pub(crate) fn new() -> Self {
        let (trigger, heard) = channel();
        Self { trigger, heard }
    }

    pub(crate) fn fire(&self) {
        self.trigger.fire();
    }

    /// Resolves once the grace period is over.
    pub(crate) async fn recv(&self) {
        self.heard.recv().await;
    }

    pub(crate) fn is_over(&self) -> bool {
        self.heard.is_shutdown()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fired_signal_cuts_sleeps_short() {
        let (trigger, shutdown) = channel();
        assert!(!shutdown.is_shutdown());
        assert_eq!(shutdown.sleep(Duration::from_millis(1)).await, Ok(()));

        let sleeper = shutdown.clone();
        let long_sleep = tokio::spawn(async move { sleeper.sleep(Duration::from_secs(60)).await });
        trigger.fire();
        assert_eq!(long_sleep.await.unwrap(), Err(ShuttingDown));
        assert!(shutdown.is_shutdown());
        // The grace period counts from the first signal, however often it comes.
        let fired_at = shutdown.fired_at().expect("the time of the signal");
        tokio::time::sleep(Duration::from_millis(5)).await;
        trigger.fire();
        assert_eq!(shutdown.fired_at(), Some(fired_at));
        shutdown.recv().await;
        assert_eq!(
            shutdown.sleep(Duration::from_secs(60)).await,
            Err(ShuttingDown)
        );
    }
}
