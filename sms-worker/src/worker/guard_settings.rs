//! Whether this worker's fraud-guard settings are the api's. The worker asks the guard before a
//! resend, with its own `OTP_FRAUD_GUARD*` settings: a worker left in `monitor` (its default)
//! beside an api in `enforce` resends, and pays for, codes to a calling code the api refuses.
//! The api notes its settings in Redis every minute (`shared::fraud_guard`); each worker with
//! receipts on compares them with its own as often, and says when they differ: the gauge
//! `sms_fraud_guard_settings_differ` (the `FraudGuardSettingsDiffer` alert) and a warning when
//! they come to differ, an info line when they agree again.

use std::sync::Arc;

use shared::fraud_guard::SETTINGS_ANNOUNCED_EVERY;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::context::Context;
use crate::metrics as m;

/// The comparison, until dropped.
pub(crate) struct SettingsWatch(JoinHandle<()>);

impl SettingsWatch {
    /// Compares now and every [`SETTINGS_ANNOUNCED_EVERY`]; `None` when receipts are off (no
    /// resends, so the guard is never asked).
    pub(crate) fn start(context: &Arc<Context>) -> Option<Self> {
        let store = context.receipts.clone()?;
        let ours = context.config.fraud_guard.to_string();
        Some(Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(SETTINGS_ANNOUNCED_EVERY);
            let mut differed = false;
            loop {
                tick.tick().await;
                let api = match store.api_fraud_guard_settings().await {
                    Ok(api) => api,
                    Err(e) => {
                        debug!(error = %e, "could not read the api's fraud guard settings");
                        continue;
                    }
                };
                // No note: no api has run in this namespace for minutes; nothing to compare.
                let differs = api.as_ref().is_some_and(|api| *api != ours);
                metrics::gauge!(m::FRAUD_GUARD_SETTINGS_DIFFER).set(f64::from(u8::from(differs)));
                match (differed, differs) {
                    (false, true) => warn!(
                        worker = %ours,
                        api = api.as_deref().unwrap_or_default(),
                        "this worker's fraud guard settings (OTP_FRAUD_GUARD*) are not the api's: resends follow the worker's; set the same on both"
                    ),
                    (true, false) => info!(
                        worker = %ours,
                        "this worker's fraud guard settings are the api's again"
                    ),
                    _ => {}
                }
                differed = differs;
            }
        })))
    }
}

impl Drop for SettingsWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}
