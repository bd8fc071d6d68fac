//! `dw plan`: what the working tree's routes would change, before it happens.
//!
//! The "before" is what the directory serves (its routes in force and live
//! instances); the "after" is the same instances with the working tree's
//! routes. Both go through the directory's own merge and sherlock's own
//! renderer, so the plan shows the real effect, not a second opinion.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::workspace::{short, Workspace};
use super::{output, Failure, Style};
use crate::directory::merge::{merge, Merged};
use crate::model::{Heartbeat, InstanceId, ServiceName, Snapshot};
use crate::protocol::Status;
use crate::routes::{Route, RouteSet};
use crate::sherlock::render::{self, Renderer, Site};

/// A plan, as printed and as saved with `--out`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The commit the directory served when the plan was made.
    pub served_commit: Option<String>,
    /// The clone's HEAD when the plan was made: apply refuses if it moved.
    pub head: String,
    /// A digest of the working tree's routes files: a saved plan is stale
    /// once they change.
    pub routes_digest: String,
    /// Route changes per service.
    pub changes: Vec<RouteChange>,
    /// Share of each changed service's traffic per version and instance.
    pub traffic: Vec<TrafficRow>,
    pub warnings: Vec<String>,
    /// The unified diff of haproxy.cfg as a sherlock would render it.
    pub haproxy_diff: Option<String>,
    pub summary: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Changed,
    Removed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteChange {
    pub service: ServiceName,
    pub kind: ChangeKind,
    pub before: Option<Route>,
    pub after: Option<Route>,
}

/// One line of the traffic table: a version (instance None) or an instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficRow {
    pub service: ServiceName,
    pub version: String,
    pub instance: Option<String>,
    /// Percent of the service's requests now and after the change.
    pub now: f64,
    pub after: f64,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// A stable digest of a set of files (FNV-1a): enough to notice an edit.
pub fn digest(files: &[(String, String)]) -> String {
    let mut hash = crate::fnv::Fnv::default();
    for (path, text) in files {
        for part in [path.as_bytes(), &[0], text.as_bytes(), &[0]] {
            hash.write(part);
        }
    }
    format!("{:016x}", hash.finish())
}

/// Parses the working tree's routes; broken YAML is an error naming file,
/// line and column.
pub fn working_routes(files: &[(String, String)]) -> Result<RouteSet, Failure> {
    crate::routes::parse_files(files.iter().map(|(p, t)| (p.as_str(), t.as_str()))).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        Failure::error(format!("the routes in the working tree do not validate:\n{}", lines.join("\n")))
    })
}

/// Computes the plan of the working tree against what the directory serves.
pub fn compute(ws: &Workspace, status: &Status) -> Result<Plan, Failure> {
    let files = ws.routes_files()?;
    let after_routes = working_routes(&files)?;
    let before_routes = &status.desired;
    let live: Vec<(InstanceId, Heartbeat)> = status
        .instances
        .iter()
        .map(|i| {
            let hb = Heartbeat {
                service: i.service.clone(),
                version: i.version.clone(),
                url: i.url.clone(),
                ttl_ms: i.ttl_ms,
            };
            (i.id.clone(), hb)
        })
        .collect();
    let before = merge(live.iter().map(|(i, h)| (i, h)), before_routes);
    let after = merge(live.iter().map(|(i, h)| (i, h)), &after_routes);

    let changes = route_changes(before_routes, &after_routes);
    let changed: BTreeSet<&ServiceName> = changes.iter().map(|c| &c.service).collect();
    let traffic = traffic(&before, &after, &changed);
    let mut warnings: Vec<String> = after
        .warnings
        .iter()
        .filter(|w| changed.iter().any(|s| w.starts_with(&format!("{s}:")) || w.contains(&format!(" {s}:"))))
        .cloned()
        .collect();
    for row in traffic.iter().filter(|r| r.instance.is_some() && r.after > 0.0 && r.after < 1.0) {
        warnings.push(format!(
            "{}: instance {} would get {:.2}% of requests, less than one in a hundred",
            row.service,
            row.instance.as_deref().unwrap_or("?"),
            row.after
        ));
    }
    let haproxy_diff = haproxy_diff(&before, &after)?;
    let summary = summary(&changes, status.commit.as_deref());
    Ok(Plan {
        served_commit: status.commit.clone(),
        head: ws.head()?.to_string(),
        routes_digest: digest(&files),
        changes,
        traffic,
        warnings,
        haproxy_diff,
        summary,
    })
}

fn route_changes(before: &RouteSet, after: &RouteSet) -> Vec<RouteChange> {
    let names: BTreeSet<&ServiceName> = before.routes.keys().chain(after.routes.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let (b, a) = (before.routes.get(name), after.routes.get(name));
            let kind = match (b, a) {
                (None, Some(_)) => ChangeKind::Added,
                (Some(_), None) => ChangeKind::Removed,
                (Some(b), Some(a)) if b != a => ChangeKind::Changed,
                _ => return None,
            };
            Some(RouteChange { service: name.clone(), kind, before: b.cloned(), after: a.cloned() })
        })
        .collect()
}

/// Per-version and per-instance shares of each changed service.
fn traffic(before: &Merged, after: &Merged, changed: &BTreeSet<&ServiceName>) -> Vec<TrafficRow> {
    let shares = |merged: &Merged, service: &ServiceName| -> (BTreeMap<String, f64>, BTreeMap<String, (String, f64)>) {
        let backends = merged.services.get(service).map(|s| s.backends.as_slice()).unwrap_or_default();
        let total: u32 = backends.iter().map(|b| b.weight).sum();
        let pct = |w: u32| if total == 0 { 0.0 } else { 100.0 * f64::from(w) / f64::from(total) };
        let mut versions = BTreeMap::new();
        let mut instances = BTreeMap::new();
        for b in backends {
            *versions.entry(b.version.to_string()).or_insert(0.0) += pct(b.weight);
            instances.insert(b.url.to_string(), (b.version.to_string(), pct(b.weight)));
        }
        (versions, instances)
    };
    let mut rows = Vec::new();
    for service in changed {
        let (bv, bi) = shares(before, service);
        let (av, ai) = shares(after, service);
        let versions: BTreeSet<&String> = bv.keys().chain(av.keys()).collect();
        for version in versions {
            let get = |m: &BTreeMap<String, f64>| m.get(version).copied().unwrap_or(0.0);
            rows.push(TrafficRow {
                service: (*service).clone(),
                version: version.clone(),
                instance: None,
                now: get(&bv),
                after: get(&av),
            });
            for (url, (v, share)) in &ai {
                if v == version {
                    let now = bi.get(url).map(|(_, s)| *s).unwrap_or(0.0);
                    rows.push(TrafficRow {
                        service: (*service).clone(),
                        version: version.clone(),
                        instance: Some(url.clone()),
                        now,
                        after: *share,
                    });
                }
            }
        }
    }
    rows
}

/// The haproxy.cfg diff a default sherlock (no per-client routes) would apply.
fn haproxy_diff(before: &Merged, after: &Merged) -> Result<Option<String>, Failure> {
    let renderer = Renderer::new(None).map_err(Failure::error)?;
    let site = Site { bind: "127.0.0.1:8000".into(), admin_socket: "/run/dstack/sherlock/admin.sock".into() };
    let snapshot = |m: &Merged| Snapshot { services: m.services.clone(), ..Snapshot::default() };
    let old = renderer.render(&site, &snapshot(before)).map_err(Failure::error)?;
    let new = renderer.render(&site, &snapshot(after)).map_err(Failure::error)?;
    Ok(render::diff(&old, &new))
}

fn summary(changes: &[RouteChange], served: Option<&str>) -> String {
    let served = served.map(short).unwrap_or("(none)");
    if changes.is_empty() {
        return format!("No changes: the working tree matches the routes of commit {served} served by the directory.");
    }
    let count = |k: ChangeKind| changes.iter().filter(|c| c.kind == k).count();
    let names: Vec<&str> = changes.iter().map(|c| c.service.as_str()).collect();
    format!(
        "Plan: {} to add, {} to change, {} to remove ({}), against commit {served}.",
        count(ChangeKind::Added),
        count(ChangeKind::Changed),
        count(ChangeKind::Removed),
        names.join(", ")
    )
}

fn weights_text(route: &Route) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (v, w) in route.weights.iter() {
        out.insert(v.to_string(), w.to_string());
    }
    for (client, weights) in &route.clients {
        for (v, w) in weights.iter() {
            out.insert(format!("clients.{client}.{v}"), w.to_string());
        }
    }
    out
}

/// The plan as people read it.
pub fn print(plan: &Plan, style: &Style) -> String {
    let mut out = String::new();
    if plan.has_changes() {
        let _ = writeln!(out, "{}", style.bold("Route changes (working tree vs the routes the directory serves):"));
        for change in &plan.changes {
            let (mark, color) = match change.kind {
                ChangeKind::Added => ("+", Style::GREEN),
                ChangeKind::Changed => ("~", Style::YELLOW),
                ChangeKind::Removed => ("-", Style::RED),
            };
            let _ = writeln!(out, "  {} {}", style.paint(color, mark), change.service);
            let before = change.before.as_ref().map(weights_text).unwrap_or_default();
            let after = change.after.as_ref().map(weights_text).unwrap_or_default();
            let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
            for key in keys {
                let line = match (before.get(key), after.get(key)) {
                    (Some(b), Some(a)) if b == a => format!("      {key}: {a}"),
                    (Some(b), Some(a)) => style.paint(Style::YELLOW, &format!("    ~ {key}: {b} -> {a}")),
                    (None, Some(a)) => style.paint(Style::GREEN, &format!("    + {key}: {a}")),
                    (Some(b), None) => style.paint(Style::RED, &format!("    - {key}: {b}")),
                    (None, None) => continue,
                };
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", style.bold("Traffic (share of each service's requests, now -> after):"));
        let width =
            plan.traffic.iter().filter_map(|r| r.instance.as_ref().map(|i| i.len() + 2)).max().unwrap_or(0).max(12);
        let _ = writeln!(
            out,
            "  {:<16} {:<10} {:<width$} {:>7}    {:>7}",
            "SERVICE", "VERSION", "INSTANCE", "NOW", "AFTER"
        );
        for row in &plan.traffic {
            let who = row.instance.as_ref().map(|i| format!("  {i}")).unwrap_or_else(|| "(all)".into());
            let line = format!(
                "  {:<16} {:<10} {:<width$} {:>6.1}% -> {:>6.1}%",
                row.service.as_str(),
                row.version,
                who,
                row.now,
                row.after
            );
            let moved = (row.now - row.after).abs() >= 0.05;
            let _ = writeln!(out, "{}", if moved && row.instance.is_none() { style.bold(&line) } else { line });
        }
        if !plan.warnings.is_empty() {
            let _ = writeln!(out);
            for w in &plan.warnings {
                let _ = writeln!(out, "{}", style.paint(Style::YELLOW, &format!("warning: {w}")));
            }
        }
        let _ = writeln!(out);
        match &plan.haproxy_diff {
            Some(diff) => {
                let _ = writeln!(out, "{}", style.bold("haproxy.cfg, as sherlock renders it for these instances:"));
                for line in diff.lines() {
                    let painted = if line.starts_with('+') && !line.starts_with("+++") {
                        style.paint(Style::GREEN, line)
                    } else if line.starts_with('-') && !line.starts_with("---") {
                        style.paint(Style::RED, line)
                    } else {
                        line.to_string()
                    };
                    let _ = writeln!(out, "  {painted}");
                }
            }
            None => {
                let _ = writeln!(out, "haproxy.cfg: no change for the instances live now.");
            }
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "{}", style.bold(&plan.summary));
    out
}

/// `dw plan`: prints the plan; with `detailed`, exit 2 when there are changes.
pub async fn run(
    ctx: &super::Context,
    repo: Option<&Path>,
    routes_dir: &str,
    detailed: bool,
    json: bool,
    out: Option<&Path>,
) -> Result<i32, Failure> {
    let ws = Workspace::open(repo, routes_dir)?;
    let status = ctx.client.status().await.map_err(Failure::error)?;
    let plan = compute(&ws, &status)?;
    if let Some(path) = out {
        let text = serde_json::to_string_pretty(&plan).expect("a plan serializes");
        std::fs::write(path, text).map_err(|e| Failure::error(format!("writing --out {}: {e}", path.display())))?;
    }
    if json {
        output::line(serde_json::to_string_pretty(&plan).expect("a plan serializes"))?;
    } else {
        output::text(print(&plan, &ctx.style))?;
        if let Some(path) = out {
            output::line(format_args!(
                "Saved the plan to {}; apply it with: dw apply {}",
                path.display(),
                path.display()
            ))?;
        }
    }
    Ok(if detailed && plan.has_changes() { 2 } else { 0 })
}
