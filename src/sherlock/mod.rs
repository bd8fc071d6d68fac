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
pub mod pid1;
pub mod quiescence;
pub mod render;
pub mod runtime;
pub mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::{Snapshot, SnapshotError, SnapshotId, MAX_SNAPSHOT_BYTES};
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

/// Reads the snapshot saved by the last run: None when there is none, an
/// error when it is larger than a snapshot may be or fails its checks.
fn load_saved(path: &std::path::Path) -> Result<Option<Snapshot>, SavedError> {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    // One byte over the limit is enough to refuse it, whatever its size.
    let mut body = Vec::new();
    file.take(MAX_SNAPSHOT_BYTES as u64 + 1).read_to_end(&mut body)?;
    Ok(Some(Snapshot::from_json(&body)?))
}

/// Why the saved snapshot was not served.
#[derive(Debug, thiserror::Error)]
enum SavedError {
    #[error("cannot read it: {0}")]
    Read(#[from] std::io::Error),
    #[error(transparent)]
    Refused(#[from] SnapshotError),
}

/// Runs sherlock until `shutdown`, then stops its HAProxy.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Whoever can write the run dir can plant the snapshot served at start
    // or replace HAProxy's sockets: it is this user's alone.
    crate::private_dir::ensure(&config.run_dir, "--run-dir")?;
    // HAProxy reads a relative socket path as host:port: make it absolute.
    let run_dir =
        std::fs::canonicalize(&config.run_dir).with_context(|| format!("--run-dir {}", config.run_dir.display()))?;
    let paths = Paths::new(&run_dir);
    let renderer = Renderer::new(config.template.as_deref())?;
    let site = Site { bind: config.listen.to_string(), admin_socket: paths.admin_socket.clone() };
    render::check_site(&site)?;
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

    // Fail static across restarts: serve the last applied snapshot at once,
    // if it passes the checks a directory's snapshot gets.
    let saved = run_dir.join("snapshot.json");
    let cached = match load_saved(&saved) {
        Ok(Some(snapshot)) => {
            tracing::info!(file = %saved.display(), index = snapshot.index, "serving the saved snapshot until the directory answers");
            snapshot
        }
        Ok(None) => Snapshot::default(),
        Err(e) => {
            let e = format!("{}: {e}", saved.display());
            tracing::error!(error = %e, "saved snapshot refused; starting with no services");
            shared.status.lock().unwrap().last_error = Some(format!("saved snapshot refused: {e}"));
            Snapshot::default()
        }
    };
    let (applied_tx, applied_rx) = watch::channel(SnapshotId::default());
    let haproxy = Haproxy::new(config.haproxy.clone(), paths, config.listen);
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
    // A signal during the start (up to 10 s on a loaded host) stops it:
    // the dropped start leaves its master for `stop` to end.
    let started = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        started = applier.start_haproxy(&cached) => Some(started),
    };
    let Some(started) = started else {
        applier.haproxy.stop().await;
        return Ok(());
    };
    started?;
    let serving = format!("HAProxy serving on {}", config.listen);
    crate::systemd::ready_when_accepting(config.listen, Duration::from_secs(10), &serving).await;
    let mut watchdog = crate::systemd::Watchdog::from_env();

    let (tx, mut rx) = watch::channel::<Option<Snapshot>>(None);
    let subscriber = tokio::spawn(subscriber::run(config.clone(), tx, applied_rx, shared.clone(), shutdown.clone()));

    let server_changed = applier.haproxy.server_changed.clone();
    let mut reap_every = tokio::time::interval(REAP_EVERY);
    let mut drift_every = tokio::time::interval(DRIFT_EVERY);
    drift_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the next apply pass is due: a batch of changes, or a retry.
    let mut apply_at: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            // Shutdown first: on Ctrl-C the terminal signals HAProxy too,
            // and its exit must not look like a crash to restart from.
            biased;
            _ = shutdown.cancelled() => break,
            changed = rx.changed() => {
                if changed.is_err() { break }
                rx.borrow_and_update();
                apply_at = Some(applier.on_change(std::time::Instant::now()));
            }
            _ = sleep_until(apply_at) => {
                let next = rx.borrow().clone();
                // A pass may wait up to 10 s for a reload's worker, which a
                // Ctrl-C (sent to HAProxy too) means never comes: shutdown
                // cuts it short, and the master is stopped below.
                apply_at = match next {
                    Some(next) => tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        next_run = applier.pass(&next) => next_run,
                    },
                    None => None,
                };
            }
            _ = reap_every.tick() => applier.reap().await,
            _ = drift_every.tick() => {
                if applier.correct_drift().await {
                    apply_at = Some(std::time::Instant::now());
                }
            }
            // HAProxy logged a server going down or up: its version's
            // weight is spread again over the servers up (applier.rs).
            _ = server_changed.notified() => {
                if applier.observe_health().await {
                    apply_at = Some(std::time::Instant::now());
                }
            }
            _ = watchdog.tick() => crate::systemd::watchdog(),
            exited = applier.haproxy.restart_due() => {
                // A signal may have reached HAProxy and sherlock together.
                if shutdown.is_cancelled() { break }
                match exited {
                    Some(status) => applier.haproxy_exited(&status),
                    // Changes that came while it was down apply now.
                    None => {
                        let restarted = tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break,
                            restarted = applier.restart_haproxy() => restarted,
                        };
                        if restarted {
                            apply_at = Some(std::time::Instant::now());
                        }
                    }
                }
            }
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
