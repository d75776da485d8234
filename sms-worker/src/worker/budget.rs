//! The budget one event's retries must stay within.

use std::time::{Duration, Instant};

use backon::ExponentialBackoff;

use crate::dead_letter::ErrorKind;

/// Below this, an OTP is as good as expired: Twilio's smallest ValidityPeriod is one second.
pub(crate) const MIN_MILLIS_LEFT: u64 = 1_000;

/// The backoff of one event and the budget it must stay within.
pub(crate) struct Retries {
    pub(crate) budget: Budget,
    pub(crate) backoff: ExponentialBackoff,
}

impl Retries {
    pub(crate) fn next_delay(
        &mut self,
        retry_after: Option<Duration>,
    ) -> Result<Duration, ErrorKind> {
        self.budget.next_delay(&mut self.backoff, retry_after)
    }

    /// `delay`, a pause outside the backoff, if the budget has room for an attempt after it.
    pub(crate) fn pause(&self, delay: Duration) -> Result<Duration, ErrorKind> {
        self.budget.fits(delay)
    }
}

/// Retrying ends at `RETRY_MAX_ELAPSED_SECS` or at the OTP's expiry, whichever is first.
pub(crate) struct Budget {
    pub(crate) retry_deadline: Instant,
    pub(crate) expires: Instant,
}

impl Budget {
    /// The next backoff delay, at least `retry_after`; or, when the next attempt would come too
    /// late, why retrying stops.
    fn next_delay(
        &self,
        backoff: &mut ExponentialBackoff,
        retry_after: Option<Duration>,
    ) -> Result<Duration, ErrorKind> {
        let delay = backoff.next().unwrap_or(Duration::from_secs(20));
        self.fits(retry_after.map_or(delay, |after| after.max(delay)))
    }

    /// `delay`, or why an attempt after it would come too late.
    fn fits(&self, delay: Duration) -> Result<Duration, ErrorKind> {
        let Some(next_attempt) = Instant::now().checked_add(delay) else {
            return Err(ErrorKind::RetriesExhausted);
        };
        // The next attempt also needs a moment before the OTP expires to be worth it.
        if next_attempt + Duration::from_millis(MIN_MILLIS_LEFT) > self.expires {
            Err(ErrorKind::Expired)
        } else if next_attempt > self.retry_deadline {
            Err(ErrorKind::RetriesExhausted)
        } else {
            Ok(delay)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::{BackoffBuilder, ExponentialBuilder};

    #[test]
    fn the_budget_ends_at_expiry_or_the_retry_limit() {
        let now = Instant::now();
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .without_max_times()
            .build();
        let budget = Budget {
            retry_deadline: now + Duration::from_secs(60),
            expires: now + Duration::from_secs(600),
        };
        assert_eq!(
            budget.next_delay(&mut backoff, None),
            Ok(Duration::from_millis(100))
        );
        assert_eq!(
            budget.next_delay(&mut backoff, Some(Duration::from_secs(3))),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(
            budget.next_delay(&mut backoff, Some(Duration::from_secs(61))),
            Err(ErrorKind::RetriesExhausted)
        );
        // A pause outside the backoff is held to the same budget.
        assert_eq!(
            budget.fits(Duration::from_secs(1)),
            Ok(Duration::from_secs(1))
        );
        assert_eq!(
            budget.fits(Duration::from_secs(61)),
            Err(ErrorKind::RetriesExhausted)
        );
        // A delay no clock can add is no reason to panic.
        assert_eq!(budget.fits(Duration::MAX), Err(ErrorKind::RetriesExhausted));

        let budget = Budget {
            retry_deadline: now + Duration::from_secs(60),
            expires: now + Duration::from_secs(5),
        };
        assert_eq!(
            budget.next_delay(&mut backoff, Some(Duration::from_secs(10))),
            Err(ErrorKind::Expired)
        );
    }
}
