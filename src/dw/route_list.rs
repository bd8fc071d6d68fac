//! `dw route list`: per service and version, the desired weight, the live
//! instances (URL, health, last heartbeat) and each one's effective share.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::{output, Context, Failure, Style};
use crate::model::{ServiceName, Snapshot, Version};
use crate::protocol::{InstanceStatus, Status};

/// One row: an instance, or a routed version with no live instance.
#[derive(Debug, serde::Serialize)]
struct Row {
    service: ServiceName,
    version: Version,
    /// The weight git gives this version; None when the service has no route.
    desired: Option<u32>,
    instance: Option<InstanceStatus>,
    healthy: bool,
    /// Percent of the service's traffic this instance gets now.
    share: f64,
}

pub async fn run(ctx: &Context, json: bool) -> Result<(), Failure> {
    let status = ctx.client.status().await.map_err(Failure::error)?;
    let snapshot =
        ctx.client.snapshot(Default::default(), std::time::Duration::ZERO, None).await.map_err(Failure::error)?;
    let rows = rows(&status, &snapshot);
    if json {
        output::line(serde_json::to_string_pretty(&rows).expect("rows serialize"))?;
    } else {
        output::text(table(&rows, &snapshot, &ctx.style))?;
    }
    Ok(())
}

fn rows(status: &Status, snapshot: &Snapshot) -> Vec<Row> {
    let mut rows: Vec<Row> = status
        .instances
        .iter()
        .map(|i| {
            let backends = snapshot.services.get(&i.service).map(|s| s.backends.as_slice()).unwrap_or_default();
            let total: u32 = backends.iter().map(|b| b.weight).sum();
            let mine = backends.iter().find(|b| b.id == i.id).map(|b| b.weight).unwrap_or(0);
            let share = if total == 0 { 0.0 } else { 100.0 * f64::from(mine) / f64::from(total) };
            Row {
                service: i.service.clone(),
                version: i.version.clone(),
                desired: status.desired.routes.get(&i.service).map(|r| r.weights.get(&i.version)),
                // Registered means its checks pass; a heartbeat older than two
                // periods (ttl / 3 each) means its watson has gone quiet.
                healthy: i.last_heartbeat_ms <= i.ttl_ms * 2 / 3,
                instance: Some(i.clone()),
                share,
            }
        })
        .collect();
    // Routed versions with nothing live are worth a row: their share moved.
    let live: BTreeSet<(&ServiceName, &Version)> = status.instances.iter().map(|i| (&i.service, &i.version)).collect();
    for (service, route) in &status.desired.routes {
        for (version, weight) in route.weights.iter() {
            if !live.contains(&(service, version)) {
                rows.push(Row {
                    service: service.clone(),
                    version: version.clone(),
                    desired: Some(weight),
                    instance: None,
                    healthy: false,
                    share: 0.0,
                });
            }
        }
    }
    let key = |r: &Row| (r.service.clone(), r.version.clone(), r.instance.as_ref().map(|i| i.url.to_string()));
    rows.sort_by_key(key);
    rows
}

fn table(rows: &[Row], snapshot: &Snapshot, style: &Style) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no instances registered and no routes\n");
    } else {
        let url =
            |r: &Row| r.instance.as_ref().map(|i| i.url.to_string()).unwrap_or_else(|| "(no live instance)".into());
        let width = rows.iter().map(|r| url(r).len()).max().unwrap_or(3).max(3);
        let header = format!(
            "{:<16} {:<10} {:>6} {:<width$} {:<8} {:>6} {:>9}",
            "SERVICE", "VERSION", "WEIGHT", "URL", "HEALTHY", "SHARE", "HEARTBEAT"
        );
        let _ = writeln!(out, "{}", style.bold(&header));
        for r in rows {
            let desired = r.desired.map(|w| w.to_string()).unwrap_or_else(|| "-".into());
            let (health, beat) = match &r.instance {
                Some(i) => (
                    if r.healthy { "yes" } else { "late" },
                    format!("{:>7.1}s ago", i.last_heartbeat_ms as f64 / 1000.0),
                ),
                None => ("-", "-".to_string()),
            };
            let line = format!(
                "{:<16} {:<10} {:>6} {:<width$} {:<8} {:>5.1}% {:>9}",
                r.service.as_str(),
                r.version.as_str(),
                desired,
                url(r),
                health,
                r.share,
                beat
            );
            let _ = writeln!(out, "{}", if r.instance.is_none() { style.paint(Style::YELLOW, &line) } else { line });
        }
    }
    for w in &snapshot.warnings {
        let _ = writeln!(out, "{}", style.paint(Style::YELLOW, &format!("warning: {w}")));
    }
    out
}
