//! What the directory accepts from its clients, so no client can exhaust it
//! or point traffic somewhere it must not go: bounds on the registry, on
//! remembered sherlocks and on waiting blocking queries, and the networks
//! instance URLs may point into (`--allow-network`).
//!
//! Pure: the checks take what they judge as parameters.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::config_file::Seconds;

/// The bounds, from the config file's `limits:` section; each refusal is a
/// 429 naming its key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Instances in the registry, in total.
    pub instances: usize,
    /// Instances of one service.
    pub instances_per_service: usize,
    /// Services with a live instance.
    pub services: usize,
    /// Sherlocks remembered for `/v1/status`; the longest silent is
    /// forgotten first.
    pub sherlocks: usize,
    /// Blocking snapshot queries waiting at once.
    pub waiting_queries: usize,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// How long a client may take to finish its TLS handshake, and then
    /// each request header (slowloris); also how long a kept-alive
    /// connection may sit idle.
    pub header_read_timeout: Seconds,
}

impl Default for Limits {
    fn default() -> Limits {
        // Ten times the largest fleet measured (BENCHMARKS.md, scale), and
        // within what a sherlock accepts in one snapshot (model's limits).
        Limits {
            instances: 100_000,
            instances_per_service: 10_000,
            services: 10_000,
            sherlocks: 10_000,
            waiting_queries: 20_000,
            // One per watson service and per sherlock (each keeps one alive).
            max_connections: 10_000,
            header_read_timeout: Seconds(Duration::from_secs(10)),
        }
    }
}

/// A network in CIDR form: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    base: IpAddr,
    prefix: u8,
}

/// Why a `--allow-network` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid network {0:?}: expected an address with a prefix length, such as 10.0.0.0/8 or fd00::/8")]
pub struct NetworkError(String);

impl FromStr for Network {
    type Err = NetworkError;
    fn from_str(raw: &str) -> Result<Network, NetworkError> {
        let bad = || NetworkError(raw.to_string());
        let (addr, prefix) = match raw.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (raw, None),
        };
        let base: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        // The base must be the network's first address: `10.1.2.3/8` is
        // more likely a typo than a wish.
        let network = Network { base, prefix };
        if network.masked(base) != base {
            return Err(bad());
        }
        Ok(network)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Network {
    /// `addr` with the host bits cleared (`addr` of the same family).
    fn masked(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.base.is_ipv4() && self.masked(addr) == self.base
    }
}

/// Address kinds no instance may have unless a listed network holds them:
/// the cloud metadata service lives at link-local 169.254.169.254, and a
/// multicast or unspecified address is never one server.
fn forbidden_kind(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) if a.is_link_local() => Some("link-local (169.254.0.0/16)"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast (224.0.0.0/4)"),
        IpAddr::V4(a) if a.is_broadcast() || a.is_unspecified() => Some("not one host"),
        IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local (fe80::/10)"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast (ff00::/8)"),
        IpAddr::V6(a) if a.is_unspecified() => Some("not one host"),
        _ => None,
    }
}

/// Whether an instance may have address `addr`, given the allowed networks
/// (empty: any address but the forbidden kinds). The error names the rule.
pub fn check_address(addr: IpAddr, allowed: &[Network]) -> Result<(), String> {
    if allowed.iter().any(|n| n.contains(addr)) {
        return Ok(());
    }
    if let Some(kind) = forbidden_kind(addr) {
        return Err(format!("{addr} is {kind}; refused unless --allow-network lists it"));
    }
    if allowed.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = allowed.iter().map(ToString::to_string).collect();
    Err(format!("{addr} is outside the allowed networks (--allow-network {})", list.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_in_what_a_sherlock_accepts() {
        let d = Limits::default();
        assert!(d.instances_per_service <= crate::model::MAX_BACKENDS_PER_SERVICE);
        assert!(d.instances <= crate::model::MAX_BACKENDS);
        assert!(d.services <= crate::model::MAX_SERVICES);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain() {
        let n: Network = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.200.1.2")) && !n.contains(ip("11.0.0.1")) && !n.contains(ip("::1")));
        let one: Network = "192.168.1.7".parse().unwrap();
        assert_eq!(one.to_string(), "192.168.1.7/32");
        assert!(one.contains(ip("192.168.1.7")) && !one.contains(ip("192.168.1.8")));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in ["", "10.0.0.0/33", "10.1.2.3/8", "x/8", "10.0.0.0/", "fd00::/129"] {
            let err = bad.parse::<Network>().unwrap_err().to_string();
            assert!(err.contains("expected an address with a prefix length"), "{bad}: {err}");
        }
    }

    #[test]
    fn forbidden_kinds_need_a_listed_network() {
        let err = check_address(ip("169.254.169.254"), &[]).unwrap_err();
        assert_eq!(err, "169.254.169.254 is link-local (169.254.0.0/16); refused unless --allow-network lists it");
        assert!(check_address(ip("224.0.0.1"), &[]).unwrap_err().contains("multicast"));
        assert!(check_address(ip("fe80::1"), &[]).unwrap_err().contains("fe80::/10"));
        assert!(check_address(ip("0.0.0.0"), &[]).is_err());
        assert!(check_address(ip("169.254.1.1"), &["169.254.0.0/16".parse().unwrap()]).is_ok());
        assert!(check_address(ip("10.0.0.1"), &[]).is_ok(), "no list: any ordinary address");
    }

    #[test]
    fn a_list_allows_only_its_networks() {
        let allowed: Vec<Network> = vec!["127.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        assert!(check_address(ip("10.1.1.1"), &allowed).is_ok());
        assert_eq!(
            check_address(ip("192.168.0.1"), &allowed).unwrap_err(),
            "192.168.0.1 is outside the allowed networks (--allow-network 127.0.0.0/8, 10.0.0.0/8)"
        );
    }
}
