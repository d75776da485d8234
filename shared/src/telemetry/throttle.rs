//! A warning that every request repeats while a dependency is away (Redis not counting a
//! refresh, say) would otherwise write one line per request: at a few thousand requests a
//! second, the outage buries every other line and costs the log shipper more than the outage
//! costs users. [`Throttle`] lets one such line through per interval and says how many it held
//! back, so the log still tells when the trouble started, that it goes on, and how often.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Throttle {
    interval: Duration,
    seen: Mutex<Seen>,
}

struct Seen {
    last_let_through: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: Mutex::new(Seen {
                last_let_through: None,
                held_back: 0,
            }),
        }
    }

    /// `Some(held_back)` when this occurrence should be logged, with how many were held back
    /// since the last one logged; `None` when it should not.
    pub fn let_through(&self) -> Option<u64> {
        self.let_through_at(Instant::now())
    }

    fn let_through_at(&self, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let due = seen
            .last_let_through
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if !due {
            seen.held_back += 1;
            return None;
        }
        seen.last_let_through = Some(now);
        Some(std::mem::take(&mut seen.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(throttle.let_through_at(start), Some(0));
        for second in 1..=9 {
            assert_eq!(
                throttle.let_through_at(start + Duration::from_secs(second)),
                None
            );
        }
        assert_eq!(
            throttle.let_through_at(start + Duration::from_secs(10)),
            Some(9)
        );
        assert_eq!(
            throttle.let_through_at(start + Duration::from_secs(11)),
            None
        );
        // A quiet spell: the next occurrence is logged at once, with the one held back.
        assert_eq!(
            throttle.let_through_at(start + Duration::from_secs(60)),
            Some(1)
        );
    }
}
