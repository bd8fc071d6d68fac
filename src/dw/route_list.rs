//! `dw route list`: every service, its instances, and their share.

use std::fmt::Write as _;
use std::time::Duration;

use super::Failure;
use crate::client::DirectoryClient;
use crate::directory::api::InstanceStatus;
use crate::model::{DirectoryAddr, Snapshot};

/// One row of the table.
#[derive(Debug, serde::Serialize)]
struct Row<'a> {
    #[serde(flatten)]
    instance: &'a InstanceStatus,
    healthy: bool,
    /// Percent of the service's traffic this instance gets.
    share: f64,
}

pub async fn run(directory: &DirectoryAddr, json: bool) -> Result<(), Failure> {
    let client = DirectoryClient::new(directory.clone(), Duration::from_secs(5));
    let instances = client.instances().await.map_err(Failure::error)?;
    let snapshot = client.snapshot(0, Duration::ZERO, None).await.map_err(Failure::error)?;
    let rows: Vec<Row> = instances.iter().map(|i| row(i, &snapshot)).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).expect("rows serialize"));
    } else {
        print!("{}", table(&rows, &snapshot));
    }
    Ok(())
}

fn row<'a>(instance: &'a InstanceStatus, snapshot: &Snapshot) -> Row<'a> {
    let backends = snapshot.services.get(&instance.service).map(|s| s.backends.as_slice()).unwrap_or_default();
    let total: u32 = backends.iter().map(|b| b.weight).sum();
    let mine = backends.iter().find(|b| b.id == instance.id).map(|b| b.weight).unwrap_or(0);
    let share = if total == 0 { 0.0 } else { 100.0 * f64::from(mine) / f64::from(total) };
    // Registered means its last checks passed; a heartbeat older than two
    // periods (ttl / 3 each) means its watson has gone quiet.
    let healthy = instance.last_heartbeat_ms <= instance.ttl_ms * 2 / 3;
    Row { instance, healthy, share }
}

fn table(rows: &[Row], snapshot: &Snapshot) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no instances registered\n");
    } else {
        let url_width = rows.iter().map(|r| r.instance.url.to_string().len()).max().unwrap_or(3).max(3);
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:<url_width$} {:<8} {:>6} {:>9}",
            "SERVICE", "VERSION", "URL", "HEALTHY", "SHARE", "HEARTBEAT"
        );
        for r in rows {
            let _ = writeln!(
                out,
                "{:<16} {:<10} {:<url_width$} {:<8} {:>5.1}% {:>7.1}s ago",
                r.instance.service.as_str(),
                r.instance.version.as_str(),
                r.instance.url.to_string(),
                if r.healthy { "yes" } else { "late" },
                r.share,
                r.instance.last_heartbeat_ms as f64 / 1000.0,
            );
        }
    }
    for w in &snapshot.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}
