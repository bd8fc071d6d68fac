//! Batching of snapshot changes (consul-template's quiescence): a change
//! after a quiet spell is applied at once; changes that follow an apply
//! closely are gathered until a quiet period passes without another, and
//! never held longer than a cap.
//!
//! Pure: time is a parameter, so it is unit-tested without sleeping.

use std::time::{Duration, Instant};

/// The batching state.
#[derive(Debug, Clone)]
pub struct Quiescence {
    /// How long without a change ends a burst; zero turns batching off.
    quiet: Duration,
    /// The longest a change is held back.
    cap: Duration,
    /// When the last apply ended.
    last_apply: Option<Instant>,
    /// When the first change not yet applied arrived.
    first_pending: Option<Instant>,
}

impl Quiescence {
    pub fn new(quiet: Duration, cap: Duration) -> Quiescence {
        Quiescence { quiet, cap, last_apply: None, first_pending: None }
    }

    /// A change arrived at `now`: when to apply what has arrived so far.
    pub fn on_change(&mut self, now: Instant) -> Instant {
        let first = *self.first_pending.get_or_insert(now);
        let busy = self.last_apply.is_some_and(|t| now.saturating_duration_since(t) < self.quiet);
        if !busy && first == now {
            return now;
        }
        (now + self.quiet).min(first + self.cap)
    }

    /// An apply ended at `now`; returns how long the applied changes waited
    /// since the first of them arrived.
    pub fn applied(&mut self, now: Instant) -> Duration {
        self.last_apply = Some(now);
        self.first_pending.take().map_or(Duration::ZERO, |first| now.saturating_duration_since(first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_change_after_a_quiet_spell_goes_at_once() {
        let t0 = Instant::now();
        let mut q = Quiescence::new(ms(50), ms(1000));
        assert_eq!(q.on_change(t0), t0);
        assert_eq!(q.applied(t0 + ms(3)), ms(3));
        assert_eq!(q.on_change(t0 + ms(200)), t0 + ms(200), "quiet for longer than 50 ms");
    }

    #[test]
    fn a_burst_waits_for_quiet_but_never_past_the_cap() {
        let t0 = Instant::now();
        let mut q = Quiescence::new(ms(50), ms(1000));
        q.on_change(t0);
        q.applied(t0);
        // Changes right after an apply: each pushes the deadline 50 ms out.
        assert_eq!(q.on_change(t0 + ms(10)), t0 + ms(60));
        assert_eq!(q.on_change(t0 + ms(40)), t0 + ms(90));
        // A steady stream stops being deferred at the cap.
        assert_eq!(q.on_change(t0 + ms(990)), t0 + ms(1010));
        assert_eq!(q.on_change(t0 + ms(1005)), t0 + ms(1010));
        assert_eq!(q.applied(t0 + ms(1010)), ms(1000));
    }

    #[test]
    fn zero_turns_batching_off() {
        let t0 = Instant::now();
        let mut q = Quiescence::new(Duration::ZERO, ms(1000));
        for n in 0..5 {
            let t = t0 + ms(n);
            assert_eq!(q.on_change(t), t);
            q.applied(t);
        }
    }
}
