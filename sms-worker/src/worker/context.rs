//! What every delivery task shares.

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::dead_letter;
use shared::Topology;

use crate::config::Config;
use crate::http::Readiness;
use crate::ledger::SendLedger;
use crate::provider::Providers;
use crate::receipts::store::ReceiptStore;
use crate::shutdown::{GraceOver, Shutdown};
use crate::trace::Timelines;

/// What the worker keeps in Redis.
pub(crate) struct Stores {
    pub(crate) ledger: SendLedger,
    pub(crate) receipts: Option<ReceiptStore>,
    pub(crate) timelines: Timelines,
}

/// Configuration, clients and signals, built once by [`super::Worker::bind`] and shared by the
/// consume loop and every delivery task.
pub(crate) struct Context {
    pub(crate) config: Config,
    pub(crate) topology: Topology,
    pub(crate) ledger: SendLedger,
    pub(crate) providers: Providers,
    /// Sent messages awaiting receipts; `None` when receipts are off.
    pub(crate) receipts: Option<ReceiptStore>,
    pub(crate) timelines: Timelines,
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) shutdown: Shutdown,
    /// Fired when a stop's grace period ends.
    pub(crate) grace_over: GraceOver,
    /// The dead-letter route of the current connection. Tasks read it when they need it, so a
    /// task that outlived its connection still dead-letters through the new one.
    dead_letter_route: Mutex<Option<dead_letter::Route>>,
    /// Dead-letter copies an alarm holds in this process, whatever the connection.
    pub(crate) held_dead_letters: Arc<dead_letter::HeldCopies>,
    /// Room for `sent` records that wait for Redis in the background.
    pub(crate) records_waiting: Arc<Semaphore>,
}

impl Context {
    pub(crate) fn new(
        config: Config,
        stores: Stores,
        providers: Providers,
        readiness: Arc<Readiness>,
        shutdown: Shutdown,
    ) -> Self {
        let held_dead_letters =
            Arc::new(dead_letter::HeldCopies::new(config.dead_letters_held_max));
        Self {
            topology: config.common.topology(),
            config,
            ledger: stores.ledger,
            receipts: stores.receipts,
            timelines: stores.timelines,
            providers,
            readiness,
            shutdown,
            grace_over: GraceOver::new(),
            dead_letter_route: Mutex::new(None),
            held_dead_letters,
            records_waiting: Arc::new(Semaphore::new(super::sent::RECORDS_WAITING_MAX as usize)),
        }
    }

    pub(crate) fn dead_letter_route(&self) -> Option<dead_letter::Route> {
        self.dead_letter_route
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_dead_letter_route(&self, route: Option<dead_letter::Route>) {
        *self
            .dead_letter_route
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = route;
    }
}
