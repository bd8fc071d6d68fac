//! From a route and the live instances of a service to one HAProxy server
//! weight per instance. Pure functions: the directory calls them for every
//! snapshot, `dw route list` for display.
//!
//! The rules (README.md, "Routes in git"):
//! - no route: every instance gets weight 1, an equal split;
//! - a live version the route does not list gets 0 (a staged canary), and so
//!   does a version listed with weight 0;
//! - within a version, traffic splits equally across its live instances;
//! - a weighted version with no live instance hands its share to the other
//!   live weighted versions in proportion to their weights, with a warning;
//! - if no weighted version is live at all, traffic splits equally across
//!   every live instance, with a loud warning: nothing is silently dropped.

use std::collections::BTreeMap;

use super::Weights;
use crate::model::{ServiceName, Version};

/// The largest server weight HAProxy accepts.
pub const MAX_SERVER_WEIGHT: u32 = 256;

/// How far (in percentage points) a realized share may miss its target
/// before the operator is warned.
pub const TOLERANCE_PP: f64 = 0.5;

/// The server weights of one service's instances, and what an operator
/// should know about them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assignment {
    /// One HAProxy server weight (0..=256) per instance, in the input order.
    pub weights: Vec<u32>,
    /// Redistributions and misses, ready for the snapshot's `warnings`.
    pub warnings: Vec<String>,
}

/// The share of traffic (percent) each live version should get once the
/// route is applied to what is actually live.
///
/// `live` counts the live instances per version; versions counted 0 are not
/// live and are left out. The result has every live version, 0.0 for a
/// staged one, and sums to 100 (or is empty when nothing is live).
pub fn effective_shares(route: Option<&Weights>, live: &BTreeMap<Version, usize>) -> BTreeMap<Version, f64> {
    let live: Vec<(&Version, usize)> = live.iter().filter(|(_, n)| **n > 0).map(|(v, n)| (v, *n)).collect();
    let instances: usize = live.iter().map(|(_, n)| n).sum();
    let routed: u32 = route.map_or(0, |w| live.iter().map(|(v, _)| w.get(v)).sum());
    live.into_iter()
        .map(|(version, count)| {
            let share = match route {
                Some(w) if routed > 0 => 100.0 * f64::from(w.get(version)) / f64::from(routed),
                // No route, or no weighted version live: equal per instance.
                _ => 100.0 * count as f64 / instances as f64,
            };
            (version.clone(), share)
        })
        .collect()
}

/// The realized share (percent) of each version present in `instances`,
/// given one server weight per instance; all 0.0 if every weight is 0.
pub fn realized_shares(instances: &[&Version], weights: &[u32]) -> BTreeMap<Version, f64> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let mut shares = BTreeMap::new();
    for (version, weight) in instances.iter().zip(weights) {
        let share = if total == 0 { 0.0 } else { 100.0 * f64::from(*weight) / total as f64 };
        *shares.entry((*version).clone()).or_insert(0.0) += share;
    }
    shares
}

/// One HAProxy server weight per instance of `service`, following `route`.
///
/// `instances[i]` is the version of live instance i. All instances of one
/// version get the same weight, so a version's traffic splits equally across
/// them. See [`fit`] for how shares become whole numbers; when the best fit
/// still misses a version's target by more than [`TOLERANCE_PP`], a warning
/// names the service, version, target and realized share.
pub fn server_weights(service: &ServiceName, route: Option<&Weights>, instances: &[&Version]) -> Assignment {
    let Some(route) = route else {
        // No route: an equal split, exactly as without dstack routes.
        return Assignment { weights: vec![1; instances.len()], warnings: Vec::new() };
    };
    let mut live: BTreeMap<Version, usize> = BTreeMap::new();
    for version in instances {
        *live.entry((*version).clone()).or_insert(0) += 1;
    }
    if live.is_empty() {
        return Assignment::default();
    }
    let mut warnings = redistribution_warnings(service, route, &live);
    let targets = effective_shares(Some(route), &live);
    let per_version = fit(&targets, &live);
    let weights: Vec<u32> = instances.iter().map(|v| per_version[*v]).collect();

    let realized = realized_shares(instances, &weights);
    for (version, target) in &targets {
        let got = realized[version];
        if (got - target).abs() > TOLERANCE_PP {
            let count = live[version];
            warnings.push(format!(
                "{service}: version {version} gets {got:.1}% of traffic instead of its target {target:.1}%: \
                 HAProxy server weights are whole numbers up to {MAX_SERVER_WEIGHT}, and each of its {count} \
                 live instance(s) needs at least 1; this is the closest split"
            ));
        }
    }
    Assignment { weights, warnings }
}

/// The warnings for weighted versions that have no live instance.
fn redistribution_warnings(service: &ServiceName, route: &Weights, live: &BTreeMap<Version, usize>) -> Vec<String> {
    let weighted: Vec<(&Version, u32)> = route.iter().filter(|(_, w)| *w > 0).collect();
    let (receivers, missing): (Vec<_>, Vec<_>) = weighted.iter().partition(|(v, _)| live.contains_key(*v));
    if receivers.is_empty() {
        let wanted: Vec<String> = weighted.iter().map(|(v, w)| format!("{v} {w}%")).collect();
        let present: Vec<&str> = live.keys().map(Version::as_str).collect();
        let instances: usize = live.values().sum();
        return vec![format!(
            "{service}: NO live instance of any version with weight ({}); traffic is split equally across all \
             {instances} live instance(s) ({}) so that it keeps flowing: start a weighted version or fix the route",
            wanted.join(", "),
            present.join(", ")
        )];
    }
    let to: Vec<&str> = receivers.iter().map(|(v, _)| v.as_str()).collect();
    let to = match to.len() {
        1 => to[0].to_string(),
        _ => format!("{} in proportion to their weights", to.join(", ")),
    };
    missing
        .iter()
        .map(|(v, w)| format!("{service}: version {v} has weight {w} but no live instance; its share goes to {to}"))
        .collect()
}

/// Whole-number server weights per version, as close to `targets` as HAProxy
/// allows.
///
/// Each instance of version v should get p(v) = target(v) / count(v) percent.
/// Let top be the version with the largest p. For every scale m in 1..=256,
/// top's instances get m and every other version gets round(m * p(v) / p(top)),
/// raised to 1 if its target is positive (a version meant to get traffic must
/// get some), and 0 if its target is 0. The m whose realized shares have the
/// smallest worst-case error (in percentage points) wins; on a tie the
/// smallest m, so equal splits stay at weight 1. It stops early at an exact fit.
fn fit(targets: &BTreeMap<Version, f64>, live: &BTreeMap<Version, usize>) -> BTreeMap<Version, u32> {
    // (version, target, instance count, per-instance share)
    let versions: Vec<(&Version, f64, usize, f64)> =
        targets.iter().map(|(v, t)| (v, *t, live[v], *t / live[v] as f64)).collect();
    let top = versions.iter().map(|(_, _, _, p)| *p).fold(0.0, f64::max);
    if top <= 0.0 {
        // Nothing should get traffic (cannot happen with shares summing to 100).
        return versions.iter().map(|(v, ..)| ((*v).clone(), 0)).collect();
    }

    let mut best: Option<(f64, Vec<u32>)> = None;
    for m in 1..=MAX_SERVER_WEIGHT {
        let scaled: Vec<u32> = versions
            .iter()
            .map(|(_, target, _, p)| match *target > 0.0 {
                // p <= top, so the rounded value is at most m.
                true => ((f64::from(m) * p / top).round() as u32).clamp(1, m),
                false => 0,
            })
            .collect();
        let total: f64 = versions.iter().zip(&scaled).map(|((_, _, n, _), w)| *n as f64 * f64::from(*w)).sum();
        let error = versions
            .iter()
            .zip(&scaled)
            .map(|((_, target, n, _), w)| (100.0 * *n as f64 * f64::from(*w) / total - target).abs())
            .fold(0.0, f64::max);
        // A strict improvement only (beyond float noise): ties keep the smaller m.
        if best.as_ref().is_none_or(|(e, _)| error < e - 1e-9) {
            best = Some((error, scaled));
        }
        if error < 1e-9 {
            break;
        }
    }
    let (_, weights) = best.expect("the loop runs at least once");
    versions.iter().zip(weights).map(|((v, ..), w)| ((*v).clone(), w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn barker() -> ServiceName {
        "barker".parse().unwrap()
    }

    fn route(pairs: &[(&str, u32)]) -> Weights {
        Weights::new(pairs.iter().map(|(k, w)| (v(k), *w)).collect()).unwrap()
    }

    /// Versions by name, one entry per instance.
    fn instances(names: &[&str]) -> Vec<Version> {
        names.iter().map(|n| v(n)).collect()
    }

    fn assign(route: Option<&Weights>, versions: &[Version]) -> (Assignment, BTreeMap<Version, f64>) {
        let refs: Vec<&Version> = versions.iter().collect();
        let a = server_weights(&barker(), route, &refs);
        assert_eq!(a.weights.len(), versions.len());
        assert!(a.weights.iter().all(|w| *w <= MAX_SERVER_WEIGHT), "{a:?}");
        let shares = realized_shares(&refs, &a.weights);
        (a, shares)
    }

    #[test]
    fn no_route_is_an_equal_split() {
        let (a, shares) = assign(None, &instances(&["v1", "v2", "v2"]));
        assert_eq!(a, Assignment { weights: vec![1, 1, 1], warnings: vec![] });
        assert!((shares[&v("v2")] - 200.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn ninety_ten_over_three_v1_and_one_v2() {
        let r = route(&[("v1", 90), ("v2", 10)]);
        let (a, shares) = assign(Some(&r), &instances(&["v1", "v1", "v2", "v1"]));
        assert!((shares[&v("v2")] - 10.0).abs() <= 0.5, "{shares:?}");
        assert!((shares[&v("v1")] - 90.0).abs() <= 0.5, "{shares:?}");
        assert_eq!(a.weights, [3, 3, 1, 3], "exact at the smallest scale");
        assert!(a.warnings.is_empty(), "{:?}", a.warnings);
    }

    #[test]
    fn an_unlisted_version_is_staged_and_a_zero_weight_gets_nothing() {
        let r = route(&[("v1", 90), ("v2", 10), ("v4", 0)]);
        let (a, shares) = assign(Some(&r), &instances(&["v1", "v3", "v2", "v4"]));
        assert_eq!(a.weights[1], 0, "v3 is not listed: staged");
        assert_eq!(a.weights[3], 0, "v4 has weight 0");
        assert_eq!((shares[&v("v3")], shares[&v("v4")]), (0.0, 0.0));
        assert!((shares[&v("v2")] - 10.0).abs() <= 0.5, "{shares:?}");
        assert!(a.warnings.is_empty(), "{:?}", a.warnings);
    }

    #[test]
    fn a_missing_weighted_version_hands_its_share_on_with_a_warning() {
        let r = route(&[("v1", 90), ("v2", 10)]);
        let (a, shares) = assign(Some(&r), &instances(&["v1", "v1", "v3"]));
        assert_eq!(a.weights, [1, 1, 0]);
        assert_eq!(shares[&v("v1")], 100.0);
        assert_eq!(a.warnings, ["barker: version v2 has weight 10 but no live instance; its share goes to v1"]);

        // With two receivers the share is split in proportion: 60/30 -> 2:1.
        let r = route(&[("v1", 60), ("v2", 30), ("v3", 10)]);
        let (a, shares) = assign(Some(&r), &instances(&["v1", "v2"]));
        assert!((shares[&v("v1")] - 200.0 / 3.0).abs() <= 0.5, "{shares:?}");
        assert_eq!(
            a.warnings,
            ["barker: version v3 has weight 10 but no live instance; its share goes to v1, v2 in proportion to their weights"]
        );
        let live = BTreeMap::from([(v("v1"), 1), (v("v2"), 1), (v("v3"), 0)]);
        let targets = effective_shares(Some(&r), &live);
        assert_eq!(targets.len(), 2, "v3 is not live: {targets:?}");
        assert!((targets[&v("v1")] - 200.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn no_weighted_version_live_splits_equally_and_warns_loudly() {
        let r = route(&[("v1", 90), ("v2", 10)]);
        let (a, _) = assign(Some(&r), &instances(&["v3", "v3", "v4"]));
        assert_eq!(a.weights, [1, 1, 1]);
        assert_eq!(
            a.warnings,
            ["barker: NO live instance of any version with weight (v1 90%, v2 10%); traffic is split equally across \
              all 3 live instance(s) (v3, v4) so that it keeps flowing: start a weighted version or fix the route"]
        );
    }

    #[test]
    fn no_instances_at_all() {
        let r = route(&[("v1", 100)]);
        assert_eq!(server_weights(&barker(), Some(&r), &[]), Assignment::default());
        assert_eq!(server_weights(&barker(), None, &[]), Assignment::default());
        assert!(effective_shares(Some(&r), &BTreeMap::new()).is_empty());
    }

    #[test]
    fn one_percent_on_ten_instances_is_a_best_effort_with_a_warning() {
        let r = route(&[("big", 99), ("small", 1)]);
        let mut versions = instances(&["small"; 10]);
        versions.push(v("big"));
        let (a, shares) = assign(Some(&r), &versions);
        // Every small instance needs at least 1 against at most 256: 10/266.
        assert_eq!(a.weights[..10], [1; 10]);
        assert_eq!(a.weights[10], MAX_SERVER_WEIGHT);
        assert!((shares[&v("small")] - 1000.0 / 266.0).abs() < 1e-9, "{shares:?}");
        assert_eq!(
            a.warnings,
            [
                "barker: version big gets 96.2% of traffic instead of its target 99.0%: HAProxy server weights are \
                 whole numbers up to 256, and each of its 1 live instance(s) needs at least 1; this is the closest split",
                "barker: version small gets 3.8% of traffic instead of its target 1.0%: HAProxy server weights are \
                 whole numbers up to 256, and each of its 10 live instance(s) needs at least 1; this is the closest split",
            ]
        );
    }

    #[test]
    fn awkward_splits_land_within_tolerance() {
        // 1% of one instance against 99% on one: 1:99 fits in 0..=256.
        let r = route(&[("v1", 99), ("v2", 1)]);
        let (a, shares) = assign(Some(&r), &instances(&["v1", "v2"]));
        assert_eq!(a.weights, [99, 1]);
        assert!(a.warnings.is_empty());
        assert!((shares[&v("v2")] - 1.0).abs() < 1e-9);
        // Thirds over seven instances of one version and two of another.
        let r = route(&[("v1", 33), ("v2", 67)]);
        let (a, shares) = assign(Some(&r), &instances(&["v1", "v1", "v1", "v1", "v1", "v1", "v1", "v2", "v2"]));
        assert!(a.warnings.is_empty(), "{:?}", a.warnings);
        assert!((shares[&v("v1")] - 33.0).abs() <= TOLERANCE_PP, "{shares:?}");
    }

    #[test]
    fn weights_stay_in_range_and_follow_the_rules_everywhere() {
        // Every split of 100 in steps of 5 over 1..=4 instances of v1 and
        // 1..=12 of v2, plus a staged v3.
        for w1 in (0..=100).step_by(5) {
            let r = route(&[("v1", w1), ("v2", 100 - w1)]);
            for n1 in 1..=4 {
                for n2 in 1..=12 {
                    let mut versions = instances(&vec!["v1"; n1]);
                    versions.extend(instances(&vec!["v2"; n2]));
                    versions.push(v("v3"));
                    let (a, shares) = assign(Some(&r), &versions);
                    assert_eq!(*a.weights.last().unwrap(), 0, "v3 is staged");
                    // Equal within a version.
                    assert!(a.weights[..n1].iter().all(|w| *w == a.weights[0]));
                    assert!(a.weights[n1..n1 + n2].iter().all(|w| *w == a.weights[n1]));
                    // A positive target gets traffic; a zero target gets none.
                    assert_eq!(a.weights[0] > 0, w1 > 0, "{w1} {n1} {n2} {a:?}");
                    assert_eq!(a.weights[n1] > 0, w1 < 100, "{w1} {n1} {n2} {a:?}");
                    let miss = (shares[&v("v1")] - f64::from(w1)).abs();
                    assert_eq!(miss > TOLERANCE_PP, !a.warnings.is_empty(), "{w1} {n1} {n2} {a:?}");
                }
            }
        }
    }

    #[test]
    fn realized_shares_of_all_zero_weights() {
        let versions = instances(&["v1", "v2"]);
        let refs: Vec<&Version> = versions.iter().collect();
        assert_eq!(realized_shares(&refs, &[0, 0]), BTreeMap::from([(v("v1"), 0.0), (v("v2"), 0.0)]));
    }
}
