//! `dw status`: the commit served, a rejected commit, instances per service
//! and version, and each sherlock with the snapshot it applied.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::converge;
use super::workspace::short;
use super::{output, Context, Failure, Style};
use crate::protocol::Status;

pub async fn run(ctx: &Context, json: bool) -> Result<(), Failure> {
    let status = ctx.client.status().await.map_err(Failure::error)?;
    if json {
        output::line(serde_json::to_string_pretty(&status).expect("status serializes"))?;
    } else {
        output::text(render(&status, &ctx.style))?;
    }
    Ok(())
}

pub fn render(status: &Status, style: &Style) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        style.bold(&format!(
            "directory {} — snapshot {}, up {}s{}",
            status.name,
            status.index,
            status.uptime_s,
            if status.warming { ", warming" } else { "" }
        ))
    );
    match &status.routes {
        None => {
            let _ = writeln!(out, "routes: none (no --repo); every live instance gets an equal share");
        }
        Some(r) => {
            let _ = writeln!(out, "routes: {} (branch {})", r.repo, r.branch);
            match &r.commit {
                Some(c) => {
                    let _ = writeln!(
                        out,
                        "  serving   {}  \"{}\"  fetched {}",
                        short(c),
                        r.summary.as_deref().unwrap_or(""),
                        r.fetched_at.as_deref().unwrap_or("?")
                    );
                }
                None => {
                    let _ = writeln!(out, "  serving   nothing yet");
                }
            }
            if let Some(rej) = &r.rejected {
                let _ = writeln!(
                    out,
                    "{}",
                    style.paint(
                        Style::RED,
                        &format!("  REJECTED  {}  \"{}\"  at {}", short(&rej.commit), rej.summary, rej.at)
                    )
                );
                for e in &rej.errors {
                    let _ = writeln!(out, "{}", style.paint(Style::RED, &format!("            {e}")));
                }
            }
            if let Some(e) = &r.error {
                let _ = writeln!(out, "{}", style.paint(Style::YELLOW, &format!("  fetch failing: {e}")));
            }
        }
    }
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for i in &status.instances {
        *counts.entry((i.service.to_string(), i.version.to_string())).or_default() += 1;
    }
    let _ = writeln!(out, "\n{}", style.bold("instances"));
    if counts.is_empty() {
        let _ = writeln!(out, "  none registered");
    } else {
        let _ = writeln!(out, "  {:<20} {:<12} {:>5}", "SERVICE", "VERSION", "LIVE");
        for ((service, version), n) in &counts {
            let _ = writeln!(out, "  {service:<20} {version:<12} {n:>5}");
        }
    }
    let _ = writeln!(out, "\n{}", style.bold("sherlocks"));
    if status.sherlocks.is_empty() {
        let _ = writeln!(out, "  none subscribed");
    } else {
        let _ = writeln!(out, "  {:<28} {:<16} {:>8} {:>5} {:>10}", "NAME", "CLIENT", "APPLIED", "LAG", "LAST SEEN");
        let served = status.snapshot_id();
        let mut other_run = false;
        for s in &status.sherlocks {
            // A snapshot of another directory run has an index that says nothing about this one's.
            let lag = converge::lag(s.applied_id(), served);
            other_run |= lag.is_none();
            let lag_text = lag.map_or("-".to_string(), |n| n.to_string());
            let client = s.client.as_deref().unwrap_or("-");
            let seen = s.last_seen_ms as f64 / 1000.0;
            let line = format!("  {:<28} {client:<16} {:>8} {:>5} {seen:>9.1}s", s.name, s.applied, lag_text);
            let _ = writeln!(out, "{}", if lag != Some(0) { style.paint(Style::YELLOW, &line) } else { line });
        }
        if other_run {
            let _ = writeln!(
                out,
                "  (LAG -: it applied a snapshot of another run of the directory, and none of this run yet)"
            );
        }
    }
    if !status.warnings.is_empty() {
        let _ = writeln!(out);
        for w in &status.warnings {
            let _ = writeln!(out, "{}", style.paint(Style::YELLOW, &format!("warning: {w}")));
        }
    }
    out
}
