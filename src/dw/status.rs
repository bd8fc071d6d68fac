//! `dw status`: the commit served, a rejected commit, instances per service
//! and version, and each sherlock with the snapshot it applied.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::converge;
use super::workspace::short;
use super::{output, Context, Failure, Style};
use crate::protocol::{RejectKind, Status};

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
            // A restarted directory serves its mirror's commit until it fetches.
            let when = match (&r.stale, &r.fetched_at) {
                (Some(stale), _) => stale.clone(),
                (None, Some(at)) => format!("fetched {at}"),
                (None, None) => "fetched ?".to_string(),
            };
            match &r.commit {
                Some(c) => {
                    let line = format!("  serving   {}  \"{}\"  {when}", short(c), r.summary.as_deref().unwrap_or(""));
                    let _ =
                        writeln!(out, "{}", if r.stale.is_some() { style.paint(Style::YELLOW, &line) } else { line });
                }
                None => {
                    let _ = writeln!(out, "  serving   nothing yet ({when})");
                }
            }
            if let Some(since) = &r.fetching_since {
                let _ = writeln!(out, "  fetching  since {since}");
            }
            if let Some(rej) = &r.rejected {
                let kind = match rej.kind {
                    RejectKind::Invalid => "invalid routes",
                    RejectKind::Rewind => "history moved back",
                    RejectKind::Empty => "removes every route",
                };
                let _ = writeln!(
                    out,
                    "{}",
                    style.paint(
                        Style::RED,
                        &format!("  REJECTED  {}  \"{}\"  at {} ({kind})", short(&rej.commit), rej.summary, rej.at)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Rejected, RoutesStatus};

    fn status(routes: RoutesStatus) -> Status {
        Status {
            name: "services".into(),
            address: None,
            uptime_s: 1,
            epoch: 1,
            index: 2,
            commit: routes.commit.clone(),
            warming: true,
            warnings: vec![],
            instances: vec![],
            sherlocks: vec![],
            routes: Some(routes),
            desired: Default::default(),
        }
    }

    #[test]
    fn a_warm_restart_a_fetch_under_way_and_the_kind_of_a_rejection_show() {
        let routes = RoutesStatus {
            repo: "/srv/routes".into(),
            branch: "main".into(),
            commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            summary: Some("all on v2".into()),
            stale: Some("not fetched since start: serving the commit in force before the restart".into()),
            fetching_since: Some("2026-01-01T00:00:00Z".into()),
            rejected: Some(Rejected {
                commit: "fedcba9876543210fedcba9876543210fedcba98".into(),
                summary: "rewound".into(),
                kind: RejectKind::Rewind,
                errors: vec!["history moved back: ...".into()],
                at: "2026-01-01T00:00:01Z".into(),
            }),
            ..RoutesStatus::default()
        };
        let out = render(&status(routes), &Style { color: false });
        assert!(
            out.contains("  serving   0123456789  \"all on v2\"  not fetched since start: serving the commit in force"),
            "{out}"
        );
        assert!(out.contains("  fetching  since 2026-01-01T00:00:00Z\n"), "{out}");
        assert!(
            out.contains("  REJECTED  fedcba9876  \"rewound\"  at 2026-01-01T00:00:01Z (history moved back)"),
            "{out}"
        );
        assert!(out.contains("            history moved back: ..."), "{out}");

        let fetched = RoutesStatus {
            commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
            fetched_at: Some("2026-01-01T00:00:02Z".into()),
            ..RoutesStatus::default()
        };
        let out = render(&status(fetched), &Style { color: false });
        assert!(out.contains("  serving   0123456789  \"\"  fetched 2026-01-01T00:00:02Z\n"), "{out}");
        assert!(!out.contains("fetching") && !out.contains("REJECTED"), "{out}");
    }
}
