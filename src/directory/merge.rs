//! Live instances + desired routes -> the services of a snapshot.
//!
//! A pure function: the directory runs it on every membership or routes
//! change, and `dw plan` runs the same one to preview a change.

use std::collections::BTreeMap;

use crate::model::{equal_weights, Backend, Heartbeat, InstanceId, ServiceBackends, ServiceName};

/// The services of a snapshot and the warnings an operator should see.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Merged {
    pub services: BTreeMap<ServiceName, ServiceBackends>,
    pub warnings: Vec<String>,
}

/// Groups live instances by service and gives each backend its weight.
///
/// HAProxy replaces `/<service>` with one path per backend section, so the
/// instances of a service must share a path. Where they do not, the path most
/// instances use wins (ties: the smallest), the others get weight 0 and a
/// warning: traffic is never sent to a path the instance did not ask for.
pub fn merge<'a>(instances: impl IntoIterator<Item = (&'a InstanceId, &'a Heartbeat)>) -> Merged {
    let mut by_service: BTreeMap<ServiceName, Vec<(&InstanceId, &Heartbeat)>> = BTreeMap::new();
    for (id, hb) in instances {
        by_service.entry(hb.service.clone()).or_default().push((id, hb));
    }
    let mut merged = Merged::default();
    for (service, mut members) in by_service {
        members.sort_by(|a, b| a.0.cmp(b.0));
        let path = dominant_path(&members);
        let weights = equal_weights(members.len());
        let backends = members
            .iter()
            .zip(weights)
            .map(|((id, hb), weight)| {
                let weight = if hb.url.path == path {
                    weight
                } else {
                    merged.warnings.push(format!(
                        "{service}: instance {id} has path {:?} but the service's other instances use {path:?}; it gets no traffic",
                        hb.url.path
                    ));
                    0
                };
                Backend { id: (*id).clone(), url: hb.url.clone(), version: hb.version.clone(), weight }
            })
            .collect();
        merged.services.insert(service, ServiceBackends { backends });
    }
    merged
}

fn dominant_path(members: &[(&InstanceId, &Heartbeat)]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, hb) in members {
        *counts.entry(hb.url.path.as_str()).or_default() += 1;
    }
    // BTreeMap iterates in key order, and max_by_key keeps the last maximum,
    // so reverse to prefer the smallest path on a tie.
    counts.into_iter().rev().max_by_key(|(_, n)| *n).map(|(p, _)| p.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(service: &str, url: &str) -> Heartbeat {
        Heartbeat {
            service: service.parse().unwrap(),
            version: "v1".parse().unwrap(),
            url: url.parse().unwrap(),
            ttl_ms: 1000,
        }
    }

    #[test]
    fn groups_by_service_sorted_by_id_with_equal_weights() {
        let items = [
            ("b".parse().unwrap(), hb("emitter", "http://h:2/emitter")),
            ("a".parse().unwrap(), hb("emitter", "http://h:1/emitter")),
            ("c".parse().unwrap(), hb("transform", "http://h:3")),
        ];
        let m = merge(items.iter().map(|(i, h)| (i, h)));
        let emitter = &m.services[&"emitter".parse().unwrap()];
        assert_eq!(emitter.backends.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(emitter.backends.iter().all(|b| b.weight == 1));
        assert_eq!(m.services.len(), 2);
        assert!(m.warnings.is_empty());
    }

    #[test]
    fn an_instance_with_another_path_gets_no_traffic_and_a_warning() {
        let items = [
            ("a".parse().unwrap(), hb("emitter", "http://h:1/emitter")),
            ("b".parse().unwrap(), hb("emitter", "http://h:2/emitter")),
            ("c".parse().unwrap(), hb("emitter", "http://h:3/other")),
        ];
        let m = merge(items.iter().map(|(i, h)| (i, h)));
        let weights: Vec<u32> = m.services[&"emitter".parse().unwrap()].backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [1, 1, 0]);
        assert_eq!(m.warnings.len(), 1);
        assert!(m.warnings[0].contains("instance c has path \"/other\""), "{}", m.warnings[0]);
    }
}
