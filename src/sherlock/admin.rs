//! sherlock's admin endpoint: `/metrics` (Prometheus text) and `/status`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

/// Upper bounds (seconds) of the apply latency histogram's buckets.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Counters every apply updates.
#[derive(Debug, Default)]
pub struct Metrics {
    pub reloads: AtomicU64,
    pub failed_reloads: AtomicU64,
    pub runtime_commands: AtomicU64,
    pub runtime_applies: AtomicU64,
    pub drift_corrections: AtomicU64,
    pub unchanged: AtomicU64,
    pub failed_applies: AtomicU64,
    pub applied_index: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    /// Sum of latencies in microseconds.
    latency_sum_us: AtomicU64,
}

impl Metrics {
    pub fn observe_apply(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        one("dstack_sherlock_reloads_total", "counter", "HAProxy reloads.", get(&self.reloads));
        one("dstack_sherlock_failed_reloads_total", "counter", "Reloads HAProxy refused.", get(&self.failed_reloads));
        one(
            "dstack_sherlock_runtime_commands_total",
            "counter",
            "Runtime API commands sent.",
            get(&self.runtime_commands),
        );
        one(
            "dstack_sherlock_runtime_applies_total",
            "counter",
            "Changes applied without a reload.",
            get(&self.runtime_applies),
        );
        one(
            "dstack_sherlock_drift_corrections_total",
            "counter",
            "Runtime state corrected to match.",
            get(&self.drift_corrections),
        );
        one("dstack_sherlock_unchanged_total", "counter", "Snapshots that changed nothing.", get(&self.unchanged));
        one("dstack_sherlock_failed_applies_total", "counter", "Snapshots not applied.", get(&self.failed_applies));
        one("dstack_sherlock_applied_index", "gauge", "Index of the snapshot applied.", get(&self.applied_index));
        let name = "dstack_sherlock_apply_seconds";
        let _ = write!(
            out,
            "# HELP {name} Time from a snapshot's arrival to HAProxy running it.\n# TYPE {name} histogram\n"
        );
        for (bound, bucket) in BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", get(bucket));
        }
        let count = get(&self.latency_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", get(&self.latency_sum_us) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

/// What `/status` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub name: String,
    pub client: String,
    /// The directory followed now.
    pub directory: Option<String>,
    pub applied_index: u64,
    pub applied_commit: Option<String>,
    pub services: usize,
    pub servers: usize,
    /// Servers being drained before their removal.
    pub draining: usize,
    pub haproxy_running: bool,
    pub last_error: Option<String>,
}

/// Shared between the applier and the admin endpoint.
#[derive(Debug, Default)]
pub struct Shared {
    pub metrics: Metrics,
    pub status: Mutex<Status>,
}

pub fn app(shared: Arc<Shared>) -> Router {
    let m = shared.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.metrics.render()) }),
        )
        .route("/status", get(move || async move { Json(shared.status.lock().unwrap().clone()).into_response() }))
}
