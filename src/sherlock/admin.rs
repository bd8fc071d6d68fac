//! sherlock's admin endpoint: `/metrics` (Prometheus text) and `/status`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::prometheus::{Exposition, CONTENT_TYPE};

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
    /// 1 while HAProxy runs, 0 while sherlock is restarting it.
    pub haproxy_up: AtomicU64,
    /// Unexpected exits of HAProxy's master (a crash, a SIGKILL).
    pub haproxy_exits: AtomicU64,
    /// Successful starts after such an exit.
    pub haproxy_restarts: AtomicU64,
    /// Starts that failed (each is retried with backoff).
    pub haproxy_failed_starts: AtomicU64,
    /// Files sherlock could not write (haproxy.cfg, snapshot.json): a full
    /// disk or a read-only run dir.
    pub failed_writes: AtomicU64,
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
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Exposition::default();
        out.counter("dstack_sherlock_reloads_total", "HAProxy reloads.", get(&self.reloads));
        out.counter("dstack_sherlock_failed_reloads_total", "Reloads HAProxy refused.", get(&self.failed_reloads));
        out.counter(
            "dstack_sherlock_runtime_commands_total",
            "Runtime API commands sent.",
            get(&self.runtime_commands),
        );
        out.counter(
            "dstack_sherlock_runtime_applies_total",
            "Changes applied without a reload.",
            get(&self.runtime_applies),
        );
        out.counter(
            "dstack_sherlock_drift_corrections_total",
            "Runtime state corrected to match.",
            get(&self.drift_corrections),
        );
        out.counter("dstack_sherlock_unchanged_total", "Snapshots that changed nothing.", get(&self.unchanged));
        out.counter("dstack_sherlock_failed_applies_total", "Snapshots not applied.", get(&self.failed_applies));
        out.gauge("dstack_sherlock_applied_index", "Index of the snapshot applied.", get(&self.applied_index));
        out.gauge(
            "dstack_sherlock_haproxy_up",
            "1 while HAProxy runs, 0 while it is being restarted.",
            get(&self.haproxy_up),
        );
        out.counter(
            "dstack_sherlock_haproxy_exits_total",
            "Unexpected exits of HAProxy's master.",
            get(&self.haproxy_exits),
        );
        out.counter(
            "dstack_sherlock_haproxy_restarts_total",
            "HAProxy started again after an exit.",
            get(&self.haproxy_restarts),
        );
        out.counter(
            "dstack_sherlock_haproxy_failed_starts_total",
            "HAProxy starts that failed (retried with backoff).",
            get(&self.haproxy_failed_starts),
        );
        out.counter(
            "dstack_sherlock_failed_writes_total",
            "Files not written (disk full, read-only run dir); the running config stays.",
            get(&self.failed_writes),
        );
        let buckets: Vec<(f64, u64)> = BUCKETS.iter().zip(&self.latency_buckets).map(|(b, n)| (*b, get(n))).collect();
        out.histogram(
            "dstack_sherlock_apply_seconds",
            "Time from a snapshot's arrival to HAProxy running it.",
            &buckets,
            get(&self.latency_count),
            get(&self.latency_sum_us) as f64 / 1e6,
        );
        out.finish()
    }
}

/// What `/status` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub name: String,
    pub client: String,
    /// The directory followed now.
    pub directory: Option<String>,
    /// The snapshot applied: (applied_epoch, applied_index).
    pub applied_epoch: u64,
    pub applied_index: u64,
    pub applied_commit: Option<String>,
    pub services: usize,
    pub servers: usize,
    /// Servers being drained before their removal.
    pub draining: usize,
    pub haproxy_running: bool,
    /// Why HAProxy is not running (its exit, the last failed start); None
    /// while it runs.
    pub haproxy_error: Option<String>,
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
        .route("/metrics", get(move || async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], m.metrics.render()) }))
        .route("/status", get(move || async move { Json(shared.status.lock().unwrap().clone()).into_response() }))
}
