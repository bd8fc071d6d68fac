//! The live registry: instances known from heartbeats, each kept until its
//! TTL runs out without another heartbeat.
//!
//! Pure data: time is a parameter, so expiry is unit-tested without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::model::{Heartbeat, InstanceId, ServiceName};

/// One registered instance.
#[derive(Debug, Clone)]
pub struct Entry {
    /// What the instance's watson last said about it.
    pub heartbeat: Heartbeat,
    /// When that heartbeat arrived; expiry counts from here.
    pub last_seen: Instant,
}

impl Entry {
    fn expires_at(&self) -> Instant {
        self.last_seen + Duration::from_millis(self.heartbeat.ttl_ms)
    }
}

/// What a heartbeat did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new instance, or one whose service, version or URL changed: the
    /// snapshot must be rebuilt.
    Membership,
    /// Only the TTL clock was reset: no subscriber cares.
    Refreshed,
}

#[derive(Debug, Default)]
pub struct Registry {
    instances: HashMap<InstanceId, Entry>,
    /// Instances per service, kept with every change so a limit check does
    /// not scan the registry.
    per_service: HashMap<ServiceName, usize>,
}

impl Registry {
    pub fn heartbeat(&mut self, id: InstanceId, heartbeat: Heartbeat, now: Instant) -> Change {
        let change = match self.instances.get(&id) {
            Some(old)
                if old.heartbeat.service == heartbeat.service
                    && old.heartbeat.version == heartbeat.version
                    && old.heartbeat.url == heartbeat.url =>
            {
                Change::Refreshed
            }
            _ => Change::Membership,
        };
        *self.per_service.entry(heartbeat.service.clone()).or_default() += 1;
        if let Some(old) = self.instances.insert(id, Entry { heartbeat, last_seen: now }) {
            self.uncount(&old.heartbeat.service);
        }
        change
    }

    fn uncount(&mut self, service: &ServiceName) {
        if let Some(n) = self.per_service.get_mut(service) {
            *n -= 1;
            if *n == 0 {
                self.per_service.remove(service);
            }
        }
    }

    /// Services with a live instance.
    pub fn service_count(&self) -> usize {
        self.per_service.len()
    }

    /// Live instances of `service`.
    pub fn count_of(&self, service: &ServiceName) -> usize {
        self.per_service.get(service).copied().unwrap_or(0)
    }

    /// Removes an instance; true when it was registered.
    pub fn remove(&mut self, id: &InstanceId) -> bool {
        match self.instances.remove(id) {
            Some(old) => {
                self.uncount(&old.heartbeat.service);
                true
            }
            None => false,
        }
    }

    /// Removes every instance whose TTL has run out at `now`, and returns them.
    /// Moves every instance's expiry `by` later: for a time in which the
    /// directory could not hear any heartbeat.
    pub fn postpone(&mut self, by: Duration) {
        for entry in self.instances.values_mut() {
            entry.last_seen += by;
        }
    }

    pub fn expire(&mut self, now: Instant) -> Vec<(InstanceId, Entry)> {
        let dead: Vec<InstanceId> =
            self.instances.iter().filter(|(_, e)| e.expires_at() <= now).map(|(id, _)| id.clone()).collect();
        let gone: Vec<(InstanceId, Entry)> =
            dead.into_iter().filter_map(|id| self.instances.remove_entry(&id)).collect();
        for (_, entry) in &gone {
            self.uncount(&entry.heartbeat.service);
        }
        gone
    }

    /// When the next instance will expire, if any is registered.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.instances.values().map(Entry::expires_at).min()
    }

    pub fn get(&self, id: &InstanceId) -> Option<&Entry> {
        self.instances.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&InstanceId, &Entry)> {
        self.instances.iter()
    }

    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(url: &str, ttl_ms: u64) -> Heartbeat {
        Heartbeat {
            service: "emitter".parse().unwrap(),
            version: "v1".parse().unwrap(),
            url: url.parse().unwrap(),
            ttl_ms,
        }
    }

    fn id(s: &str) -> InstanceId {
        s.parse().unwrap()
    }

    #[test]
    fn postponed_expiry() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        reg.heartbeat(id("a"), hb("http://a", 1000), t0);
        reg.postpone(Duration::from_millis(5000));
        assert!(reg.expire(t0 + Duration::from_millis(5999)).is_empty());
        assert_eq!(reg.next_expiry(), Some(t0 + Duration::from_millis(6000)));
        assert_eq!(reg.expire(t0 + Duration::from_millis(6000)).len(), 1);
    }

    #[test]
    fn ttl_expiry() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        assert_eq!(reg.heartbeat(id("a"), hb("http://a", 3000), t0), Change::Membership);
        assert_eq!(reg.heartbeat(id("b"), hb("http://b", 1000), t0), Change::Membership);
        assert_eq!(reg.next_expiry(), Some(t0 + Duration::from_millis(1000)));

        // A refresh of a known instance resets its clock without a membership change.
        assert_eq!(reg.heartbeat(id("a"), hb("http://a", 3000), t0 + Duration::from_millis(900)), Change::Refreshed);
        assert!(reg.expire(t0 + Duration::from_millis(999)).is_empty());

        let gone = reg.expire(t0 + Duration::from_millis(1000));
        assert_eq!(gone.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(), ["b"]);
        assert!(reg.expire(t0 + Duration::from_millis(3899)).is_empty());
        assert_eq!(reg.expire(t0 + Duration::from_millis(3900)).len(), 1);
        assert!(reg.is_empty());
        assert_eq!(reg.next_expiry(), None);
        assert_eq!(reg.count_of(&"emitter".parse().unwrap()), 0, "expiry uncounts");
    }

    #[test]
    fn a_moved_instance_is_a_membership_change() {
        let t0 = Instant::now();
        let mut reg = Registry::default();
        reg.heartbeat(id("a"), hb("http://a", 3000), t0);
        assert_eq!(reg.heartbeat(id("a"), hb("http://a2", 3000), t0), Change::Membership);
        assert_eq!(reg.count_of(&"emitter".parse().unwrap()), 1, "a move is not a second instance");
        let mut moved = hb("http://a2", 3000);
        moved.service = "barker".parse().unwrap();
        reg.heartbeat(id("a"), moved, t0);
        assert_eq!((reg.count_of(&"emitter".parse().unwrap()), reg.count_of(&"barker".parse().unwrap())), (0, 1));
        assert!(reg.remove(&id("a")));
        assert_eq!(reg.count_of(&"barker".parse().unwrap()), 0);
        assert!(!reg.remove(&id("a")));
    }
}
