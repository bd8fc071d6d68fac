//! The arguments of `dw route set` and `dw route add`, parsed and checked,
//! and `dw route add`'s share arithmetic. Pure functions: the routes file
//! itself is edited by [`super::edit`].

use std::collections::BTreeMap;

use crate::model::{ClientName, ServiceName, Version};
use crate::routes::{weights_text, Weights, WeightsError, WEIGHT_TOTAL};

/// Why `dw route set` or `dw route add` arguments were refused. Each message
/// states the rule and what would be accepted.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    /// `add_share` was given a share over 100.
    #[error("percent {0} is out of range: a share is a whole number from 0 to 100")]
    Percent(u32),
    /// `add_share` has no other version to give the rest of the traffic to.
    #[error("no other version can take the remaining {rest}% from {version}: the route lists no other version (or, with no route yet, no other version is live); give {version} 100%, or set the whole split with `dw route set`")]
    NothingToShare { version: Version, rest: u32 },
    /// A `VERSION=WEIGHT` argument is malformed.
    #[error(
        "invalid weight {arg:?}: {why}; give VERSION=WEIGHT with WEIGHT a whole number from 0 to 100, e.g. `v1=90`"
    )]
    Assignment { arg: String, why: String },
    /// The same version was given twice.
    #[error("version {0} is given twice; give each version's weight once")]
    DuplicateVersion(Version),
    /// No `VERSION=WEIGHT` argument at all.
    #[error("no weights given; give every version's weight as VERSION=WEIGHT, e.g. `v1=90 v2=10`")]
    NoAssignments,
    /// The weights given do not sum to 100.
    #[error("weights sum to {sum} ({given}), they must sum to 100")]
    Sum { sum: u32, given: String },
    /// `dw route add`'s SOURCE is not a service or client name.
    #[error("invalid SOURCE {arg:?}: {why}; give the target's service (`//barker` or `barker`) to move all its traffic, or a client name (`//monolith`) to move only that client's")]
    Source { arg: String, why: String },
    /// `dw route add`'s TARGET is not `SERVICE(VERSION)`.
    #[error("invalid TARGET {arg:?}: {why}; give SERVICE(VERSION), e.g. `//barker(2)`, `barker(v2)` or `//services/barker(v2)`")]
    Target { arg: String, why: String },
    /// `dw route add`'s PERCENT is not a whole number in 0..=100.
    #[error("invalid PERCENT {arg:?}: give a whole number from 0 to 100, with or without `%`, e.g. `10%`")]
    PercentArg { arg: String },
}

/// The `dw route add SOURCE TARGET PERCENT` math: gives `version` exactly
/// `percent` and scales the other versions of `current` to fill the rest.
///
/// The result is whole numbers summing to 100, by largest-remainder rounding
/// with ties going to the first version in version order. With no route yet
/// (`current` is `None`) the others are `live_versions`, split evenly. Other
/// versions all at 0 are also split evenly (scaling 0 fills nothing); at 100%
/// they stay listed with 0. Errors when percent is over 100, or when the rest
/// is not 0 and there is no other version to take it.
pub fn add_share(
    current: Option<&BTreeMap<Version, u32>>,
    live_versions: &[Version],
    version: &Version,
    percent: u32,
) -> Result<BTreeMap<Version, u32>, AssignError> {
    if percent > WEIGHT_TOTAL {
        return Err(AssignError::Percent(percent));
    }
    let rest = WEIGHT_TOTAL - percent;
    // The versions that share the rest, with the weights they are scaled from.
    let mut basis: BTreeMap<&Version, u64> = match current {
        Some(map) => map.iter().filter(|(v, _)| *v != version).map(|(v, w)| (v, u64::from(*w))).collect(),
        None => live_versions.iter().filter(|v| *v != version).map(|v| (v, 1)).collect(),
    };
    if basis.is_empty() && rest > 0 {
        return Err(AssignError::NothingToShare { version: version.clone(), rest });
    }
    if basis.values().all(|w| *w == 0) {
        basis.values_mut().for_each(|w| *w = 1);
    }

    let total: u64 = basis.values().sum();
    let rest = u64::from(rest);
    // (version, whole share, remainder); the BTreeMap gives version order.
    let mut shares: Vec<(&Version, u64, u64)> =
        basis.iter().map(|(v, w)| (*v, rest * w / total.max(1), rest * w % total.max(1))).collect();
    let left = rest - shares.iter().map(|s| s.1).sum::<u64>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    // Stable sort: equal remainders keep version order.
    order.sort_by(|a, b| shares[*b].2.cmp(&shares[*a].2));
    for i in order.into_iter().take(left as usize) {
        shares[i].1 += 1;
    }

    let mut result: BTreeMap<Version, u32> =
        shares.into_iter().map(|(v, share, _)| (v.clone(), share as u32)).collect();
    result.insert(version.clone(), percent);
    Ok(result)
}

/// Parses `dw route set`'s `VERSION=WEIGHT` arguments (`v1=90 v2=10`).
///
/// Refuses a missing `=`, a bad version, a weight that is not a whole number
/// from 0 to 100, a version given twice, no arguments, and a sum other than 100.
pub fn parse_assignments(args: &[String]) -> Result<BTreeMap<Version, u32>, AssignError> {
    if args.is_empty() {
        return Err(AssignError::NoAssignments);
    }
    let mut weights = BTreeMap::new();
    for arg in args {
        let bad = |why: String| AssignError::Assignment { arg: arg.clone(), why };
        let (version, weight) = arg.split_once('=').ok_or_else(|| bad("there is no `=`".to_string()))?;
        let version: Version = version.parse().map_err(|e| bad(format!("{e}")))?;
        let weight = parse_whole(weight).ok_or_else(|| bad(format!("weight {weight:?} is not a whole number")))?;
        if weight > WEIGHT_TOTAL {
            return Err(bad(format!("weight {weight} is over 100")));
        }
        if weights.insert(version.clone(), weight).is_some() {
            return Err(AssignError::DuplicateVersion(version));
        }
    }
    // The weight rule lives in `Weights::new`; only its message is dw's own.
    let given = weights_text(&weights);
    match Weights::new(weights) {
        Ok(valid) => Ok(valid.as_map().clone()),
        Err(WeightsError::Sum(sum)) => Err(AssignError::Sum { sum, given }),
        Err(other) => Err(AssignError::Assignment { arg: given, why: other.to_string() }),
    }
}

/// Digits only (no sign, no space), as a number; `None` when it is not one.
fn parse_whole(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `dw route add SOURCE TARGET PERCENT` in the original dstack forms.
///
/// - TARGET: `//barker(2)`, `barker(v2)`, `//services/barker(v2)`: the
///   service and the version to give traffic to.
/// - SOURCE: `//barker`, `barker` or `//services/barker` when it names the
///   target's service: all traffic (client `None`). Any other name
///   (`//monolith`, `main.example.com`) is the client whose traffic moves.
/// - PERCENT: `10%` or `10`, a whole number from 0 to 100.
///
/// Returns (service, version, client, percent).
pub fn parse_route_add(
    source: &str,
    target: &str,
    percent: &str,
) -> Result<(ServiceName, Version, Option<ClientName>, u32), AssignError> {
    let bad_target = |why: String| AssignError::Target { arg: target.to_string(), why };
    let (name, version) = target
        .strip_suffix(')')
        .and_then(|inner| inner.rsplit_once('('))
        .ok_or_else(|| bad_target("it names no version in parentheses".to_string()))?;
    let service: ServiceName = name.parse().map_err(|e| bad_target(format!("{e}")))?;
    let version: Version = version.parse().map_err(|e| bad_target(format!("{e}")))?;

    // `//services/monolith` and `//monolith` both name `monolith`.
    let name = match source.strip_prefix("//") {
        Some(path) => path.rsplit('/').next().unwrap_or(""),
        None => source,
    };
    let client = if name == service.as_str() {
        None
    } else {
        let client = name
            .parse::<ClientName>()
            .map_err(|e| AssignError::Source { arg: source.to_string(), why: format!("{e}") })?;
        Some(client)
    };

    let digits = percent.strip_suffix('%').unwrap_or(percent);
    let share = parse_whole(digits)
        .filter(|p| *p <= WEIGHT_TOTAL)
        .ok_or_else(|| AssignError::PercentArg { arg: percent.to_string() })?;
    Ok((service, version, client, share))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn w(pairs: &[(&str, u32)]) -> BTreeMap<Version, u32> {
        pairs.iter().map(|(k, n)| (v(k), *n)).collect()
    }

    fn svc(s: &str) -> ServiceName {
        s.parse().unwrap()
    }

    fn client(s: &str) -> ClientName {
        s.parse().unwrap()
    }

    #[test]
    fn add_share_math() {
        let route = w(&[("v1", 100)]);
        assert_eq!(add_share(Some(&route), &[], &v("v2"), 10).unwrap(), w(&[("v1", 90), ("v2", 10)]));
        // 75 scaled over 50/30/20 is 37.5/22.5/15: the tie goes to v1.
        let route = w(&[("v1", 50), ("v2", 30), ("v3", 20)]);
        assert_eq!(
            add_share(Some(&route), &[], &v("v4"), 25).unwrap(),
            w(&[("v1", 38), ("v2", 22), ("v3", 15), ("v4", 25)])
        );
        // Raising a listed version scales only the others.
        let route = w(&[("v1", 60), ("v2", 30), ("v3", 10)]);
        assert_eq!(add_share(Some(&route), &[], &v("v3"), 40).unwrap(), w(&[("v1", 40), ("v2", 20), ("v3", 40)]));
        // No route yet: the live versions split the rest evenly.
        let live = [v("v1"), v("v2"), v("v3")];
        assert_eq!(add_share(None, &live, &v("v3"), 1).unwrap(), w(&[("v1", 50), ("v2", 49), ("v3", 1)]));
        assert_eq!(
            add_share(None, &[v("a"), v("b"), v("c")], &v("d"), 0).unwrap(),
            w(&[("a", 34), ("b", 33), ("c", 33), ("d", 0)])
        );
        // 100% keeps the others listed at 0; 0% gives them everything.
        let route = w(&[("v1", 90), ("v2", 10)]);
        assert_eq!(add_share(Some(&route), &[], &v("v2"), 100).unwrap(), w(&[("v1", 0), ("v2", 100)]));
        assert_eq!(add_share(Some(&route), &[], &v("v2"), 0).unwrap(), w(&[("v1", 100), ("v2", 0)]));
        assert_eq!(add_share(None, &[v("v2")], &v("v2"), 100).unwrap(), w(&[("v2", 100)]));
        // Others all at 0 share the rest evenly.
        let route = w(&[("v1", 0), ("v2", 0), ("v3", 100)]);
        assert_eq!(add_share(Some(&route), &[], &v("v3"), 50).unwrap(), w(&[("v1", 25), ("v2", 25), ("v3", 50)]));

        assert!(matches!(add_share(Some(&route), &[], &v("v1"), 101), Err(AssignError::Percent(101))));
        let err = add_share(None, &[v("v2")], &v("v2"), 50).unwrap_err();
        assert!(matches!(err, AssignError::NothingToShare { rest: 50, .. }), "{err}");
        assert!(add_share(None, &[], &v("v2"), 10).is_err());
        assert!(add_share(Some(&w(&[("v2", 100)])), &[v("v1")], &v("v2"), 90).is_err());
    }

    #[test]
    fn add_share_always_sums_to_100() {
        let versions: Vec<Version> = (1..=7).map(|i| v(&format!("v{i}"))).collect();
        for n in 1..versions.len() {
            for percent in 0..=100 {
                let route: BTreeMap<Version, u32> =
                    versions[..n].iter().enumerate().map(|(i, v)| (v.clone(), (i as u32 * 37) % 11)).collect();
                let out = add_share(Some(&route), &[], &versions[n], percent).unwrap();
                assert_eq!(out.values().sum::<u32>(), 100, "{route:?} {percent}");
                assert_eq!(out[&versions[n]], percent);
            }
        }
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parse_assignments_accepts_a_full_split() {
        assert_eq!(parse_assignments(&args(&["v1=90", "v2=10"])).unwrap(), w(&[("v1", 90), ("v2", 10)]));
        assert_eq!(parse_assignments(&args(&["2=100", "v1=0"])).unwrap(), w(&[("2", 100), ("v1", 0)]));
    }

    #[test]
    fn parse_assignments_errors_state_the_rule() {
        let err = |list: &[&str]| parse_assignments(&args(list)).unwrap_err().to_string();
        assert_eq!(err(&[]), "no weights given; give every version's weight as VERSION=WEIGHT, e.g. `v1=90 v2=10`");
        assert_eq!(
            err(&["v1:90"]),
            "invalid weight \"v1:90\": there is no `=`; give VERSION=WEIGHT with WEIGHT a whole number from 0 to 100, e.g. `v1=90`"
        );
        assert!(err(&["v 1=100"]).contains("invalid version \"v 1\""), "{}", err(&["v 1=100"]));
        assert!(err(&["=100"]).contains("invalid version \"\""));
        for bad in ["v1=", "v1=ten", "v1=+5", "v1=-5", "v1=9.5", "v1= 90", "v1=99999999999"] {
            assert!(err(&[bad]).contains("is not a whole number"), "{bad}: {}", err(&[bad]));
        }
        assert!(err(&["v1=101"]).contains("weight 101 is over 100"));
        assert_eq!(err(&["v1=50", "v1=50"]), "version v1 is given twice; give each version's weight once");
        assert_eq!(err(&["v1=90", "v2=20"]), "weights sum to 110 (v1=90 v2=20), they must sum to 100");
        assert_eq!(err(&["v1=90"]), "weights sum to 90 (v1=90), they must sum to 100");
    }

    #[test]
    fn parse_route_add_forms() {
        let parse = |s: &str, t: &str, p: &str| parse_route_add(s, t, p).unwrap();
        let barker = svc("barker");
        assert_eq!(parse("//monolith", "//barker(2)", "10%"), (barker.clone(), v("2"), Some(client("monolith")), 10));
        assert_eq!(parse("//barker", "//barker(2)", "10%"), (barker.clone(), v("2"), None, 10));
        assert_eq!(parse("barker", "barker(v2)", "10"), (barker.clone(), v("v2"), None, 10));
        assert_eq!(parse("//services/barker", "//services/barker(v2)", "100%"), (barker.clone(), v("v2"), None, 100));
        assert_eq!(
            parse("monolith", "barker(v2-canary)", "0"),
            (barker.clone(), v("v2-canary"), Some(client("monolith")), 0)
        );
        assert_eq!(parse("main.example.com", "barker(v2)", "5%").2, Some(client("main.example.com")));
    }

    #[test]
    fn parse_route_add_errors_state_the_rule() {
        let err = |s: &str, t: &str, p: &str| parse_route_add(s, t, p).unwrap_err().to_string();
        for bad in ["//barker", "barker(v2", "barker()", "barker(v 2)", "Barker(v2)", "(v2)"] {
            assert!(
                err("barker", bad, "10").starts_with(&format!("invalid TARGET {bad:?}: ")),
                "{}",
                err("barker", bad, "10")
            );
        }
        assert!(err("barker", "barker", "10").contains("give SERVICE(VERSION), e.g. `//barker(2)`"));
        for bad in ["", "//", "mono lith", "-x"] {
            assert!(err(bad, "barker(v2)", "10").starts_with(&format!("invalid SOURCE {bad:?}: ")), "{bad:?}");
        }
        for bad in ["101%", "10%%", "-1", "ten", "", "%", "9.5%", " 10"] {
            assert_eq!(
                err("barker", "barker(v2)", bad),
                format!("invalid PERCENT {bad:?}: give a whole number from 0 to 100, with or without `%`, e.g. `10%`")
            );
        }
    }
}
