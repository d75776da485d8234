//! Suites that need something a machine may lack (Chromium, `redis-server`). On a laptop without
//! it they are skipped with a message; under `CI` they fail, because there a skip would hide a
//! broken set-up.

use std::io::Write as _;

/// Runs `setup` off the async runtime. `None`, after saying why on stderr, when it cannot run
/// here and `CI` is not set; a panic when `CI` is set.
pub async fn or_skip<T: Send + 'static>(
    what: &str,
    setup: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(setup).await.expect("set-up") {
        Ok(ready) => Some(ready),
        Err(reason) if std::env::var_os("CI").is_some() => {
            panic!("{what} cannot run, and CI is set, so it must: {reason}")
        }
        Err(reason) => {
            // Straight to stderr: the harness captures `eprintln!` of passing tests.
            let _ = writeln!(std::io::stderr(), "skipped: {what}: {reason}");
            None
        }
    }
}
