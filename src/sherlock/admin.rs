//! sherlock's admin endpoint: `/metrics` (Prometheus text) and `/status`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::metrics::{self, Counter, IntGauge, Seconds};

/// What every apply and HAProxy's supervision count; README.md ("Metrics")
/// lists them with their Prometheus names.
#[derive(Debug)]
pub struct Metrics {
    pub reloads: Counter,
    pub failed_reloads: Counter,
    pub runtime_commands: Counter,
    pub runtime_applies: Counter,
    pub drift_corrections: Counter,
    pub unchanged: Counter,
    pub failed_applies: Counter,
    pub applied_index: IntGauge,
    /// 1 while HAProxy runs, 0 while sherlock is restarting it.
    pub haproxy_up: IntGauge,
    /// Unexpected exits of HAProxy's master (a crash, a SIGKILL).
    pub haproxy_exits: Counter,
    /// Successful starts after such an exit.
    pub haproxy_restarts: Counter,
    /// Starts that failed (each is retried with backoff).
    pub haproxy_failed_starts: Counter,
    /// Files sherlock could not write (haproxy.cfg, snapshot.json): a full
    /// disk or a read-only run dir.
    pub failed_writes: Counter,
    /// From a snapshot's arrival to HAProxy running it (quiescence included).
    apply: Seconds,
    registry: metrics::Metrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = metrics::Metrics::default();
        Metrics {
            reloads: r.counter("dstack_sherlock_reloads", "HAProxy reloads."),
            failed_reloads: r.counter("dstack_sherlock_failed_reloads", "Reloads HAProxy refused."),
            runtime_commands: r.counter("dstack_sherlock_runtime_commands", "Runtime API commands sent."),
            runtime_applies: r.counter("dstack_sherlock_runtime_applies", "Changes applied without a reload."),
            drift_corrections: r.counter("dstack_sherlock_drift_corrections", "Runtime state corrected to match."),
            unchanged: r.counter("dstack_sherlock_unchanged", "Snapshots that changed nothing."),
            failed_applies: r.counter("dstack_sherlock_failed_applies", "Snapshots not applied."),
            applied_index: r.gauge("dstack_sherlock_applied_index", "Index of the snapshot applied."),
            haproxy_up: r.gauge("dstack_sherlock_haproxy_up", "1 while HAProxy runs, 0 while it is being restarted."),
            haproxy_exits: r.counter("dstack_sherlock_haproxy_exits", "Unexpected exits of HAProxy's master."),
            haproxy_restarts: r.counter("dstack_sherlock_haproxy_restarts", "HAProxy started again after an exit."),
            haproxy_failed_starts: r
                .counter("dstack_sherlock_haproxy_failed_starts", "HAProxy starts that failed (retried with backoff)."),
            failed_writes: r.counter(
                "dstack_sherlock_failed_writes",
                "Files not written (disk full, read-only run dir); the running config stays.",
            ),
            apply: r.seconds("dstack_sherlock_apply", "Time from a snapshot's arrival to HAProxy running it."),
            registry: r,
        }
    }
}

impl Metrics {
    pub fn observe_apply(&self, took: Duration) {
        self.apply.observe(took);
    }

    /// The `/metrics` answer: (content type, body).
    pub fn render(&self, accept: Option<&str>) -> (&'static str, String) {
        self.registry.encode(accept)
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
        .route(
            "/metrics",
            get(move |headers: HeaderMap| async move {
                let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
                let (kind, body) = m.metrics.render(accept);
                ([(header::CONTENT_TYPE, kind)], body)
            }),
        )
        .route("/status", get(move || async move { Json(shared.status.lock().unwrap().clone()).into_response() }))
}
