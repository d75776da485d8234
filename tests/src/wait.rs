//! Waiting on a condition with a deadline. The suites never sleep a fixed time hoping something
//! has happened by then: that is slow when it happens early and flaky when it happens late.

use std::future::Future;
use std::time::{Duration, Instant};

/// What a check returns: `true`, or `Some(value)`, once the condition holds.
pub trait Holds {
    type Value;
    fn value(self) -> Option<Self::Value>;
}

impl Holds for bool {
    type Value = ();
    fn value(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Holds for Option<T> {
    type Value = T;
    fn value(self) -> Option<T> {
        self
    }
}

/// How often a condition is checked: from `first`, doubling up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    first: Duration,
    max: Duration,
}

impl Pace {
    /// Short enough not to slow a test down, long enough not to hammer a server.
    pub const TEST: Self = Self::every(Duration::from_millis(25));

    pub const fn every(interval: Duration) -> Self {
        Self {
            first: interval,
            max: interval,
        }
    }

    /// Quick first looks for what is usually there at once, without spinning on what is not.
    pub const fn doubling(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }
}

/// Runs `check` at `pace` until it holds and returns what it found, or `None` once `deadline`
/// has passed (it always runs at least once).
pub async fn poll<F, Fut>(
    deadline: Duration,
    pace: Pace,
    mut check: F,
) -> Option<<Fut::Output as Holds>::Value>
where
    F: FnMut() -> Fut,
    Fut: Future,
    Fut::Output: Holds,
{
    let started = Instant::now();
    let mut pause = pace.first;
    loop {
        if let Some(value) = check().await.value() {
            return Some(value);
        }
        if started.elapsed() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(pace.max);
    }
}

/// [`poll`] for tests: panics with `what` once `deadline` has passed. A
/// [`crate::program::Program`] alive at that moment shows its logs.
pub async fn eventually<F, Fut>(
    deadline: Duration,
    what: &str,
    check: F,
) -> <Fut::Output as Holds>::Value
where
    F: FnMut() -> Fut,
    Fut: Future,
    Fut::Output: Holds,
{
    poll(deadline, Pace::TEST, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {deadline:?} waiting for {what}"))
}
