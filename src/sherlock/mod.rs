//! sherlock: follows the directory's snapshot and keeps a local HAProxy
//! configured to match it (ARCHITECTURE.md, "sherlock").
//!
//! Two tasks: the [`subscriber`] long-polls the directories and drops each
//! snapshot into a `watch` channel; the [`applier`] takes the newest one,
//! renders, diffs and applies it, batched by [`quiescence`]. The main loop
//! below only dispatches: each arm of its `select!` is one call.

pub mod admin;
pub mod applier;
pub mod config;
pub mod haproxy;
pub mod quiescence;
pub mod render;
pub mod runtime;
pub mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::{Snapshot, SnapshotId};
use applier::Applier;
pub use config::{ApplyMode, Config};
use haproxy::{Haproxy, Paths};
use render::{Renderer, Site};

/// How often drained servers are checked for their last connection.
const REAP_EVERY: Duration = Duration::from_millis(500);
/// How often runtime state is read back and compared.
const DRIFT_EVERY: Duration = Duration::from_secs(5);

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs sherlock until `shutdown`, then stops its HAProxy.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.run_dir)
        .with_context(|| format!("creating --run-dir {}", config.run_dir.display()))?;
    // HAProxy reads a relative socket path as host:port: make it absolute.
    let run_dir = std::fs::canonicalize(&config.run_dir)?;
    let paths = Paths::new(&run_dir);
    let renderer = Renderer::new(config.template.as_deref())?;
    let site = Site { bind: config.listen.to_string(), admin_socket: paths.admin_socket.clone() };
    let shared = Arc::new(admin::Shared::default());
    {
        let mut status = shared.status.lock().unwrap();
        status.name = config.name.to_string();
        status.client = config.client.to_string();
    }
    let admin_server = match config.admin {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding --admin {addr}"))?;
            tracing::info!(%addr, "admin endpoint listening (/metrics, /status)");
            let app = admin::app(shared.clone());
            let stop = shutdown.clone();
            Some(tokio::spawn(async move {
                axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await.ok();
            }))
        }
        None => None,
    };

    // Fail static across restarts: serve the last applied snapshot at once.
    let cached: Snapshot = std::fs::read_to_string(run_dir.join("snapshot.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let (applied_tx, applied_rx) = watch::channel(SnapshotId::default());
    let haproxy = Haproxy::new(config.haproxy.clone(), paths);
    let mut applier = Applier::new(
        renderer,
        site,
        haproxy,
        config.mode,
        config.client.clone(),
        config.coalesce,
        applied_tx,
        shared.clone(),
    );
    applier.start_haproxy(&cached).await?;

    let (tx, mut rx) = watch::channel::<Option<Snapshot>>(None);
    let subscriber = tokio::spawn(subscriber::run(config.clone(), tx, applied_rx, shared.clone(), shutdown.clone()));

    let mut reap_every = tokio::time::interval(REAP_EVERY);
    let mut drift_every = tokio::time::interval(DRIFT_EVERY);
    drift_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the next apply pass is due: a batch of changes, or a retry.
    let mut apply_at: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = rx.changed() => {
                if changed.is_err() { break }
                rx.borrow_and_update();
                apply_at = Some(applier.on_change(std::time::Instant::now()));
            }
            _ = sleep_until(apply_at) => {
                let next = rx.borrow().clone();
                apply_at = match next {
                    Some(next) => applier.pass(&next).await,
                    None => None,
                };
            }
            _ = reap_every.tick() => applier.reap().await,
            _ = drift_every.tick() => applier.correct_drift().await,
            _ = applier.haproxy.restart_due() => applier.restart_haproxy().await,
        }
    }
    subscriber.abort();
    applier.haproxy.stop().await;
    if let Some(server) = admin_server {
        server.await.ok();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Regression: a span guard held across `.await` made sherlock's future
    /// `!Send`, so it could not be spawned on a multi-threaded runtime.
    #[test]
    fn the_run_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let config = super::config::resolve(
            super::config::Args { directories: vec!["d".into()], ..Default::default() },
            None,
            "h",
        )
        .unwrap();
        let future = super::run(config, tokio_util::sync::CancellationToken::new());
        assert_send(&future);
    }
}
