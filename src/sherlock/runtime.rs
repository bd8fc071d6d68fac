//! Changes without a reload: HAProxy's Runtime API for servers.
//!
//! The plan is read from the rendered configs themselves (the running one
//! and the candidate), not from the snapshot, so it holds for any template:
//! when everything but `server` lines is equal, the difference is a list of
//! server additions, weight changes and removals that the Runtime API can
//! make. Anything else (a new service, a template change, an address that
//! needs DNS) is a reload.

use std::collections::BTreeMap;

/// One `server` line: where it points, its weight, and the rest of its
/// options (health checks), which a server added at run time must repeat:
/// HAProxy applies no `default-server` to those.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerLine {
    pub addr: String,
    pub weight: u32,
    /// The words after the address, `weight N` left out, space-separated.
    pub options: String,
}

impl ServerLine {
    /// The commands that add this server at run time and put it in service
    /// (it starts in maintenance, its checks off).
    pub fn add_commands(&self, backend: &str, server: &str) -> Vec<String> {
        let options = if self.options.is_empty() { String::new() } else { format!(" {}", self.options) };
        let mut commands = vec![format!("add server {backend}/{server} {} weight {}{options}", self.addr, self.weight)];
        if self.options.split_whitespace().any(|w| w == "check") {
            commands.push(format!("enable health {backend}/{server}"));
        }
        commands.push(format!("enable server {backend}/{server}"));
        commands
    }
}

/// backend -> server -> line.
pub type ServerTable = BTreeMap<String, BTreeMap<String, ServerLine>>;

/// What the runtime plan needs of a config, read in one pass: its server
/// lines by backend, and a hash of everything else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// FNV-1a of the lines that are not `server` lines (the header comment,
    /// which carries the snapshot index, left out).
    skeleton: u64,
    pub servers: ServerTable,
}

impl Shape {
    pub fn of(config: &str) -> Shape {
        let mut servers = ServerTable::new();
        let mut skeleton = crate::fnv::Fnv::default();
        let mut backend: Option<String> = None;
        let mut header = true;
        for line in config.lines() {
            header &= line.starts_with('#');
            if header {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let indented = !line.starts_with(char::is_alphanumeric);
            match (words.as_slice(), &backend) {
                (["server", name, addr, rest @ ..], Some(b)) if indented => {
                    let at = rest.iter().position(|w| *w == "weight");
                    let weight = at.and_then(|i| rest.get(i + 1)).and_then(|w| w.parse().ok()).unwrap_or(1);
                    let options: Vec<&str> = rest
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| at.is_none_or(|at| *i != at && *i != at + 1))
                        .map(|(_, w)| *w)
                        .collect();
                    let line = ServerLine { addr: addr.to_string(), weight, options: options.join(" ") };
                    servers.entry(b.clone()).or_default().insert(name.to_string(), line);
                    continue;
                }
                (["backend", name, ..], _) if !indented => {
                    backend = Some(name.to_string());
                    servers.entry(name.to_string()).or_default();
                }
                ([_, ..], _) if !indented => backend = None,
                _ => {}
            }
            skeleton.write(line.as_bytes());
            skeleton.write(b"\n");
        }
        Shape { skeleton: skeleton.finish(), servers }
    }
}

/// One Runtime API change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new server; it starts in maintenance, so it is enabled after.
    Add { backend: String, server: String, line: ServerLine },
    /// A server that stays, with a new weight.
    Weight { backend: String, server: String, weight: u32 },
    /// A server that leaves: no new traffic; deleted once its connections end.
    Drain { backend: String, server: String },
    /// A draining server that is wanted again.
    Undrain { backend: String, server: String, weight: u32 },
}

impl Op {
    /// The Runtime API commands, in order.
    pub fn commands(&self) -> Vec<String> {
        match self {
            Op::Add { backend, server, line } => line.add_commands(backend, server),
            Op::Weight { backend, server, weight } => vec![format!("set server {backend}/{server} weight {weight}")],
            Op::Drain { backend, server } => vec![format!("set server {backend}/{server} state drain")],
            Op::Undrain { backend, server, weight } => vec![
                format!("set server {backend}/{server} state ready"),
                format!("set server {backend}/{server} weight {weight}"),
            ],
        }
    }
}

/// HAProxy 2.6 does not resolve names for servers added at run time.
fn is_ip_port(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(ip, port)| ip.parse::<std::net::Ipv4Addr>().is_ok() && port.parse::<u16>().is_ok())
}

/// The Runtime API changes that turn `running` into `candidate`, or None
/// when they differ in more than servers and a reload is needed.
///
/// `draining` are servers HAProxy still has that `running` no longer lists.
pub fn plan(running: &Shape, candidate: &Shape, draining: &BTreeMap<(String, String), ServerLine>) -> Option<Vec<Op>> {
    if running.skeleton != candidate.skeleton {
        return None;
    }
    let (old, new) = (&running.servers, &candidate.servers);
    let mut ops = Vec::new();
    for (backend, servers) in new {
        let before = old.get(backend)?;
        for (server, line) in servers {
            match before.get(server) {
                Some(prev) if prev.addr != line.addr || prev.options != line.options => return None,
                Some(prev) if prev.weight != line.weight => {
                    ops.push(Op::Weight { backend: backend.clone(), server: server.clone(), weight: line.weight })
                }
                Some(_) => {}
                None => match draining.get(&(backend.clone(), server.clone())) {
                    Some(d) if d.addr == line.addr && d.options == line.options => {
                        ops.push(Op::Undrain { backend: backend.clone(), server: server.clone(), weight: line.weight })
                    }
                    Some(_) => return None,
                    None if is_ip_port(&line.addr) => {
                        ops.push(Op::Add { backend: backend.clone(), server: server.clone(), line: line.clone() })
                    }
                    None => return None,
                },
            }
        }
        for server in before.keys().filter(|s| !servers.contains_key(*s)) {
            ops.push(Op::Drain { backend: backend.clone(), server: server.clone() });
        }
    }
    Some(ops)
}

/// One server as `show servers state` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    /// srv_op_state: 0 stopped (down by its health check), 2 running.
    pub op: u32,
    pub weight: u32,
    /// srv_admin_state: bit 0x01 forced maintenance, 0x08 forced drain.
    pub admin: u32,
}

/// Parses `show servers state` (format version 1).
pub fn parse_servers_state(text: &str) -> BTreeMap<(String, String), ServerState> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight ...
        if f.len() < 8 {
            continue;
        }
        if let (Ok(op), Ok(admin), Ok(weight)) = (f[5].parse(), f[6].parse(), f[7].parse()) {
            out.insert((f[1].to_string(), f[3].to_string()), ServerState { op, weight, admin });
        }
    }
    out
}

/// srv_op_state of a server its health check has marked down.
pub const OP_STOPPED: u32 = 0;

/// Forced maintenance and forced drain, as set by the Runtime API.
pub const ADMIN_FORCED_MAINT: u32 = 0x01;
pub const ADMIN_FORCED_DRAIN: u32 = 0x08;

/// What differs between the servers sherlock wants and what HAProxy runs,
/// as the commands that put it right. Draining servers are left alone.
pub fn drift(
    wanted: &ServerTable,
    actual: &BTreeMap<(String, String), ServerState>,
    draining: &BTreeMap<(String, String), ServerLine>,
) -> Vec<String> {
    let mut fixes = Vec::new();
    for (backend, servers) in wanted {
        for (server, line) in servers {
            match actual.get(&(backend.clone(), server.clone())) {
                // If it cannot be added back at run time, the caller reloads.
                None => fixes.extend(line.add_commands(backend, server)),
                Some(state) => {
                    if state.admin & (ADMIN_FORCED_MAINT | ADMIN_FORCED_DRAIN) != 0 {
                        fixes.push(format!("set server {backend}/{server} state ready"));
                    }
                    if state.weight != line.weight {
                        fixes.push(format!("set server {backend}/{server} weight {}", line.weight));
                    }
                }
            }
        }
    }
    for (backend, server) in actual.keys() {
        let known = wanted.get(backend).is_some_and(|s| s.contains_key(server));
        if !known && !draining.contains_key(&(backend.clone(), server.clone())) && wanted.contains_key(backend) {
            fixes.push(format!("set server {backend}/{server} state drain"));
        }
    }
    fixes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(servers: &[(&str, &str, u32)], extra_backend: bool) -> String {
        let mut c = String::from("# header 1\nglobal\n    master-worker\nbackend svc_a\n    balance roundrobin\n");
        for (name, addr, w) in servers {
            c.push_str(&format!("    server {name} {addr} weight {w} check inter 2s\n"));
        }
        if extra_backend {
            c.push_str("backend svc_b\n    balance roundrobin\n");
        }
        c
    }

    #[test]
    fn server_changes_are_runtime_ops() {
        let running = config(&[("s1", "127.0.0.1:1", 1), ("s2", "127.0.0.1:2", 1)], false);
        let candidate = config(&[("s1", "127.0.0.1:1", 3), ("s3", "127.0.0.1:3", 1)], false);
        let ops = plan(&Shape::of(&running), &Shape::of(&candidate), &BTreeMap::new()).unwrap();
        assert_eq!(
            ops,
            vec![
                Op::Weight { backend: "svc_a".into(), server: "s1".into(), weight: 3 },
                Op::Add {
                    backend: "svc_a".into(),
                    server: "s3".into(),
                    line: ServerLine { addr: "127.0.0.1:3".into(), weight: 1, options: "check inter 2s".into() }
                },
                Op::Drain { backend: "svc_a".into(), server: "s2".into() },
            ]
        );
        assert_eq!(
            ops[1].commands(),
            [
                "add server svc_a/s3 127.0.0.1:3 weight 1 check inter 2s",
                "enable health svc_a/s3",
                "enable server svc_a/s3"
            ]
        );
        // Checks changed on a server: HAProxy cannot change them at run time.
        let other_checks = running.replace("check inter 2s", "check inter 5s");
        assert_eq!(plan(&Shape::of(&running), &Shape::of(&other_checks), &BTreeMap::new()), None);
    }

    #[test]
    fn structure_hostnames_and_moved_addresses_need_a_reload() {
        let running = config(&[("s1", "127.0.0.1:1", 1)], false);
        assert_eq!(
            plan(&Shape::of(&running), &Shape::of(&config(&[("s1", "127.0.0.1:1", 1)], true)), &BTreeMap::new()),
            None
        );
        assert_eq!(
            plan(&Shape::of(&running), &Shape::of(&config(&[("s1", "127.0.0.1:9", 1)], false)), &BTreeMap::new()),
            None
        );
        assert_eq!(
            plan(
                &Shape::of(&running),
                &Shape::of(&config(&[("s1", "127.0.0.1:1", 1), ("s2", "vm102:80", 1)], false)),
                &BTreeMap::new()
            ),
            None
        );
        // The header (snapshot index) alone is no difference.
        let same = running.replace("# header 1", "# header 2");
        assert_eq!(plan(&Shape::of(&running), &Shape::of(&same), &BTreeMap::new()), Some(vec![]));
    }

    #[test]
    fn a_draining_server_that_returns_is_undrained() {
        let running = config(&[("s1", "127.0.0.1:1", 1)], false);
        let candidate = config(&[("s1", "127.0.0.1:1", 1), ("s2", "127.0.0.1:2", 5)], false);
        let mut draining = BTreeMap::new();
        let line = ServerLine { addr: "127.0.0.1:2".into(), weight: 1, options: "check inter 2s".into() };
        draining.insert(("svc_a".to_string(), "s2".to_string()), line);
        let ops = plan(&Shape::of(&running), &Shape::of(&candidate), &draining).unwrap();
        assert_eq!(ops, vec![Op::Undrain { backend: "svc_a".into(), server: "s2".into(), weight: 5 }]);
    }

    #[test]
    fn drift_is_found_and_fixed() {
        let wanted = Shape::of(&config(&[("s1", "127.0.0.1:1", 3), ("s2", "127.0.0.1:2", 1)], false)).servers;
        let text = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight\n\
                    3 svc_a 1 s1 127.0.0.1 2 0 1 1 0\n\
                    3 svc_a 2 s2 127.0.0.1 2 1 1 1 0\n\
                    3 svc_a 3 s9 127.0.0.1 2 0 1 1 0\n";
        let actual = parse_servers_state(text);
        assert_eq!(actual[&("svc_a".to_string(), "s2".to_string())], ServerState { op: 2, weight: 1, admin: 1 });
        let fixes = drift(&wanted, &actual, &BTreeMap::new());
        assert_eq!(
            fixes,
            vec![
                "set server svc_a/s1 weight 3".to_string(),
                "set server svc_a/s2 state ready".to_string(),
                "set server svc_a/s9 state drain".to_string(),
            ]
        );
    }
}
