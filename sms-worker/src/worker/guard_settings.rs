//! Whether this worker's fraud-guard settings are the api's. The worker asks the guard before a
//! resend, with its own `OTP_FRAUD_GUARD*` settings: a worker left in `monitor` (its default)
//! beside an api in `enforce` resends, and pays for, codes to a country the api refuses.
//! Every api notes its settings in Redis every minute (`shared::fraud_guard`); each worker with
//! receipts on compares those of the last minutes with its own as often, and says when any
//! differ: the gauge `sms_fraud_guard_settings_differ` (the `FraudGuardSettingsDiffer` alert) and
//! a warning when they come to differ, an info line when they agree again.

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
                let apis = match store.api_fraud_guard_settings().await {
                    Ok(apis) => apis,
                    Err(e) => {
                        // The last reading stands: Redis away says nothing of the settings.
                        debug!(error = %e, "could not read the apis' fraud guard settings");
                        continue;
                    }
                };
                // No note: no api has run in this namespace for minutes; nothing to compare.
                let differing: Vec<&String> =
                    apis.iter().filter(|api| differs(api, &ours)).collect();
                let differs = !differing.is_empty();
                metrics::gauge!(m::FRAUD_GUARD_SETTINGS_DIFFER).set(f64::from(u8::from(differs)));
                match (differed, differs) {
                    (false, true) => warn!(
                        worker = %ours,
                        apis = ?differing,
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

/// Whether an api's settings differ from the worker's in a way that matters. An api with the
/// guard off counts no codes, so no resend could find it tripped: any worker setting agrees.
fn differs(api: &str, ours: &str) -> bool {
    api != ours && api != "off"
}

impl Drop for SettingsWatch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::differs;

    #[test]
    fn an_api_with_the_guard_off_agrees_with_any_worker() {
        let monitor = "monitor (window 3600 s, at least 20 unverified, ratio 1)";
        let enforce = "enforce (window 3600 s, at least 20 unverified, ratio 1)";
        assert!(differs(enforce, monitor));
        assert!(differs(monitor, "off"));
        assert!(!differs(monitor, monitor));
        assert!(!differs("off", monitor));
    }
}
