//! When the directory's one publisher task runs next: the earliest of the
//! next instance expiry, the next publish a burst allows, and the end of
//! warming (mini-redis's `purge_expired_tasks` pattern: sleep until the
//! earliest deadline or a wake-up, never on a fixed tick).
//!
//! Pure: time is a parameter, so every deadline is unit-tested.

use std::time::{Duration, Instant};

/// Publishes are at least this far apart...
pub const MIN_PUBLISH_INTERVAL: Duration = Duration::from_millis(10);
/// ...and at least this many times their own cost apart, so that a burst
/// (10,000 watsons re-registering with a restarted directory) costs at most
/// a quarter of a core in merges instead of one full merge per heartbeat.
pub const PUBLISH_COST_FACTOR: u32 = 4;

/// While instances are registered the publisher runs at least this often,
/// so it can tell when the directory itself did not run (SIGSTOP, a paused
/// VM, a starved host): see [`Schedule::stalled`].
pub const TICK: Duration = Duration::from_millis(250);

/// The publisher's clock.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    /// When the publisher last ran.
    pub last_pass: Option<Instant>,
    /// A change waits to be published.
    pub pending: bool,
    /// When the last publish ran, and how long its merge took.
    pub last_publish: Option<(Instant, Duration)>,
    /// The earliest time an instance may expire (a lower bound: a refresh
    /// only moves expiries later, so an early wake-up finds nothing).
    pub next_expiry: Option<Instant>,
    /// While the published snapshot says `warming`: when warming ends.
    pub warming_until: Option<Instant>,
}

/// What is due at a given moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Due {
    /// Scan the registry for expired instances.
    pub expire: bool,
    /// Warming has ended: the next snapshot must say so.
    pub end_warming: bool,
    /// A pending change may be published now.
    pub publish: bool,
}

impl Schedule {
    /// The earliest moment the next publish is allowed.
    pub fn publish_allowed_at(&self) -> Option<Instant> {
        self.last_publish.map(|(at, cost)| at + MIN_PUBLISH_INTERVAL.max(cost * PUBLISH_COST_FACTOR))
    }

    /// What is due at `now`. Expiry and the end of warming make a change
    /// pending themselves; the caller reports what they changed.
    pub fn due(&self, now: Instant) -> Due {
        let expire = self.next_expiry.is_some_and(|t| t <= now);
        let end_warming = self.warming_until.is_some_and(|t| t <= now);
        let allowed = self.publish_allowed_at().is_none_or(|t| t <= now);
        Due { expire, end_warming, publish: allowed && (self.pending || end_warming) }
    }

    /// When to wake next if nothing else happens: the earliest deadline.
    /// None: sleep until a change arrives.
    pub fn next_wake(&self) -> Option<Instant> {
        let publish = if self.pending { self.publish_allowed_at() } else { None };
        let tick = self.next_expiry.and(self.last_pass).map(|t| t + TICK);
        [self.next_expiry, self.warming_until, publish, tick].into_iter().flatten().min()
    }

    /// Records a pass at `now`, and returns how long before it the
    /// directory did not run at all, when that is more than a tick late: no
    /// heartbeat could be heard meanwhile, so no instance may be blamed for
    /// that time (the registry postpones every expiry by it).
    pub fn stalled(&mut self, now: Instant) -> Option<Duration> {
        let gap = self.last_pass.map(|t| now.saturating_duration_since(t));
        self.last_pass = Some(now);
        gap.filter(|gap| *gap > 2 * TICK).map(|gap| gap - TICK)
    }

    /// Whether a wake-up by a new change could bring work forward. While a
    /// publish is already pending it could not: the publish waits for its
    /// allowed time anyway, so the publisher sleeps through the wake-ups of
    /// a burst instead of re-checking on every heartbeat.
    pub fn listens_for_changes(&self) -> bool {
        !self.pending
    }

    /// Records a publish (or a publish found unnecessary) at `at`.
    pub fn published(&mut self, at: Instant, cost: Duration) {
        self.pending = false;
        self.last_publish = Some((at, cost));
    }

    /// A new instance may expire before the earliest expiry known.
    pub fn expiry_at_most(&mut self, at: Instant) {
        self.next_expiry = Some(self.next_expiry.map_or(at, |t| t.min(at)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lone_change_is_published_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule { pending: true, ..Schedule::default() };
        assert!(s.due(t0).publish);
        assert_eq!(s.next_wake(), None, "nothing else to wait for");
        s.published(t0, ms(1));
        assert!(!s.pending);
        // Long after, a new change goes out at once again.
        s.pending = true;
        assert!(s.due(t0 + ms(500)).publish);
    }

    #[test]
    fn a_burst_waits_for_the_interval_and_four_times_the_cost() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.published(t0, ms(1));
        s.pending = true;
        assert!(!s.due(t0 + ms(5)).publish, "10 ms apart at least");
        assert_eq!(s.next_wake(), Some(t0 + ms(10)));
        assert!(s.due(t0 + ms(10)).publish);
        assert!(!s.listens_for_changes(), "a burst does not wake the publisher per change");
        // An expensive merge spaces publishes out further.
        s.published(t0, ms(20));
        s.pending = true;
        assert_eq!(s.next_wake(), Some(t0 + ms(80)));
        assert!(!s.due(t0 + ms(79)).publish);
        assert!(s.due(t0 + ms(80)).publish);
    }

    #[test]
    fn a_pass_long_after_the_last_is_a_stall_of_the_directory_itself() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        assert_eq!(s.stalled(t0), None, "the first pass");
        s.expiry_at_most(t0 + ms(3000));
        assert_eq!(s.next_wake(), Some(t0 + TICK), "with instances, a pass every tick");
        assert_eq!(s.stalled(t0 + ms(250)), None);
        assert_eq!(s.stalled(t0 + ms(700)), None, "a tick late at most is no stall");
        assert_eq!(s.stalled(t0 + ms(5700)), Some(ms(4750)), "stopped for 5 s");
        s.next_expiry = None;
        assert_eq!(s.next_wake(), None, "no instance: no tick");
    }

    #[test]
    fn expiry_and_warming_are_deadlines() {
        let t0 = Instant::now();
        let mut s = Schedule { warming_until: Some(t0 + ms(3000)), ..Schedule::default() };
        s.expiry_at_most(t0 + ms(900));
        s.expiry_at_most(t0 + ms(1200)); // later: the bound stays
        assert_eq!(s.next_wake(), Some(t0 + ms(900)));
        assert_eq!(s.due(t0 + ms(899)), Due::default());
        assert!(s.due(t0 + ms(900)).expire);
        assert!(!s.due(t0 + ms(900)).publish, "an expiry scan decides whether anything changed");
        s.next_expiry = None;
        assert_eq!(s.next_wake(), Some(t0 + ms(3000)));
        let due = s.due(t0 + ms(3000));
        assert!(due.end_warming && due.publish, "the end of warming is published");
        assert!(s.listens_for_changes());
    }
}
