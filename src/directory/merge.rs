//! Live instances + desired routes -> the services of a snapshot.
//!
//! A pure function: the directory runs it on every membership or routes
//! change, and `dw plan` runs the same one to preview a change.

use std::collections::BTreeMap;

use crate::model::{Backend, ClientName, Heartbeat, InstanceId, ServiceBackends, ServiceName, Version};
use crate::routes::weights::server_weights;
use crate::routes::{RouteSet, Weights};

/// The services of a snapshot and the warnings an operator should see.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Merged {
    pub services: BTreeMap<ServiceName, ServiceBackends>,
    /// Per-client overrides: only the services whose route has a `clients`
    /// entry for that client.
    pub clients: BTreeMap<ClientName, BTreeMap<ServiceName, ServiceBackends>>,
    pub warnings: Vec<String>,
}

/// Groups live instances by service and gives each backend its weight from
/// the service's route (equal shares when it has none).
///
/// HAProxy replaces `/<service>` with one path per backend section, so the
/// instances of a service must share a path. Where they do not, the path most
/// instances use wins (ties: the smallest), the others get weight 0 and a
/// warning: traffic is never sent to a path the instance did not ask for.
pub fn merge<'a>(instances: impl IntoIterator<Item = (&'a InstanceId, &'a Heartbeat)>, routes: &RouteSet) -> Merged {
    let mut by_service: BTreeMap<ServiceName, Vec<(&InstanceId, &Heartbeat)>> = BTreeMap::new();
    for (id, hb) in instances {
        by_service.entry(hb.service.clone()).or_default().push((id, hb));
    }
    // A routed service with no live instance is still a service: clients get
    // a 503 from it, not a 404, and the warning says why.
    for service in routes.routes.keys() {
        if !by_service.contains_key(service) {
            by_service.insert(service.clone(), Vec::new());
        }
    }
    let mut merged = Merged::default();
    for (service, mut members) in by_service {
        members.sort_by(|a, b| a.0.cmp(b.0));
        let route = routes.routes.get(&service);
        if members.is_empty() {
            merged.warnings.push(format!("{service}: routed in git but no instance is live; clients get 503"));
            merged.services.insert(service, ServiceBackends::default());
            continue;
        }
        let path = dominant_path(&members);
        for (id, hb) in members.iter().filter(|(_, hb)| hb.url.path() != path) {
            merged.warnings.push(format!(
                "{service}: instance {id} has path {:?} but the service's other instances use {path:?}; it gets no traffic",
                hb.url.path()
            ));
        }
        let backends = |weights: Option<&Weights>, warnings: &mut Vec<String>| {
            // Only instances on the service's path share the traffic.
            let usable: Vec<&Version> =
                members.iter().filter(|(_, hb)| hb.url.path() == path).map(|(_, hb)| &hb.version).collect();
            let assignment = server_weights(&service, weights, &usable);
            warnings.extend(assignment.warnings);
            let mut next = assignment.weights.into_iter();
            members
                .iter()
                .map(|(id, hb)| Backend {
                    id: (*id).clone(),
                    url: hb.url.clone(),
                    version: hb.version.clone(),
                    weight: if hb.url.path() == path { next.next().unwrap_or(0) } else { 0 },
                })
                .collect::<Vec<_>>()
        };
        let mut warnings = Vec::new();
        let main = backends(route.map(|r| &r.weights), &mut warnings);
        for (client, weights) in route.map(|r| &r.clients).into_iter().flatten() {
            let mut client_warnings = Vec::new();
            let list = backends(Some(weights), &mut client_warnings);
            warnings.extend(client_warnings.into_iter().map(|w| format!("(client {client}) {w}")));
            merged
                .clients
                .entry(client.clone())
                .or_default()
                .insert(service.clone(), ServiceBackends { backends: list });
        }
        merged.warnings.extend(warnings);
        merged.services.insert(service, ServiceBackends { backends: main });
    }
    merged
}

fn dominant_path(members: &[(&InstanceId, &Heartbeat)]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, hb) in members {
        *counts.entry(hb.url.path()).or_default() += 1;
    }
    // BTreeMap iterates in key order, and max_by_key keeps the last maximum,
    // so reverse to prefer the smallest path on a tie.
    counts.into_iter().rev().max_by_key(|(_, n)| *n).map(|(p, _)| p.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(service: &str, version: &str, url: &str) -> Heartbeat {
        Heartbeat {
            service: service.parse().unwrap(),
            version: version.parse().unwrap(),
            url: url.parse().unwrap(),
            ttl_ms: 1000,
        }
    }

    fn ids(n: usize) -> Vec<InstanceId> {
        (0..n).map(|i| format!("i{i}").parse().unwrap()).collect()
    }

    #[test]
    fn groups_by_service_sorted_by_id_with_equal_weights() {
        let items = [
            ("b".parse().unwrap(), hb("emitter", "v1", "http://h:2/emitter")),
            ("a".parse().unwrap(), hb("emitter", "v1", "http://h:1/emitter")),
            ("c".parse().unwrap(), hb("transform", "v1", "http://h:3")),
        ];
        let m = merge(items.iter().map(|(i, h)| (i, h)), &RouteSet::default());
        let emitter = &m.services[&"emitter".parse().unwrap()];
        assert_eq!(emitter.backends.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(emitter.backends.iter().all(|b| b.weight == 1));
        assert_eq!(m.services.len(), 2);
        assert!(m.warnings.is_empty());
    }

    #[test]
    fn an_instance_with_another_path_gets_no_traffic_and_a_warning() {
        let items = [
            ("a".parse().unwrap(), hb("emitter", "v1", "http://h:1/emitter")),
            ("b".parse().unwrap(), hb("emitter", "v1", "http://h:2/emitter")),
            ("c".parse().unwrap(), hb("emitter", "v1", "http://h:3/other")),
        ];
        let m = merge(items.iter().map(|(i, h)| (i, h)), &RouteSet::default());
        let weights: Vec<u32> = m.services[&"emitter".parse().unwrap()].backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [1, 1, 0]);
        assert_eq!(m.warnings.len(), 1);
        assert!(m.warnings[0].contains("instance c has path \"/other\""), "{}", m.warnings[0]);
    }

    #[test]
    fn routes_weigh_versions_and_clients_get_their_own() {
        let routes = crate::routes::parse_files([(
            "routes/barker.yaml",
            "barker:\n  weights: {v1: 90, v2: 10}\n  clients:\n    monolith: {v1: 50, v2: 50}\nghost: {v1: 100}\n",
        )])
        .unwrap();
        let ids = ids(5);
        let hbs = [
            hb("barker", "v1", "http://h:1"),
            hb("barker", "v1", "http://h:2"),
            hb("barker", "v1", "http://h:3"),
            hb("barker", "v2", "http://h:4"),
            hb("barker", "v3", "http://h:5"),
        ];
        let m = merge(ids.iter().zip(hbs.iter()), &routes);
        let share = |backends: &[Backend], version: &str| {
            let total: u32 = backends.iter().map(|b| b.weight).sum();
            let mine: u32 = backends.iter().filter(|b| b.version.as_str() == version).map(|b| b.weight).sum();
            100.0 * f64::from(mine) / f64::from(total)
        };
        let barker = &m.services[&"barker".parse().unwrap()].backends;
        assert!((share(barker, "v2") - 10.0).abs() <= 0.5, "{barker:?}");
        assert_eq!(share(barker, "v3"), 0.0, "an unlisted version is staged");
        let monolith = &m.clients[&"monolith".parse().unwrap()][&"barker".parse().unwrap()].backends;
        assert!((share(monolith, "v2") - 50.0).abs() <= 0.5, "{monolith:?}");
        assert!(m.services[&"ghost".parse().unwrap()].backends.is_empty());
        assert!(m.warnings.iter().any(|w| w.contains("ghost")), "{:?}", m.warnings);
    }
}
