//! The GitOps reconciler: fetch the routes repo, validate the commit whole,
//! and hand it to the directory, or reject it and keep the last good one.
//!
//! `reconcile` is idempotent and does not care why it was woken: the poll
//! timer, a webhook (`POST /v1/reconcile`) and a file-system watch on a
//! local repo all send the same trigger. Retry timing lives in the loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use tracing::Instrument as _;

use super::{Directory, RepoConfig};
use crate::backoff::Backoff;
use crate::gitsync::{self, Mirror};
use crate::protocol::{Rejected, RoutesStatus};
use crate::routes::MAX_ERRORS;

/// A wake-up for the reconciler; a webhook passes a channel for the outcome.
pub type Trigger = Option<oneshot::Sender<RoutesStatus>>;

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// What one fetch found.
struct Fetched {
    commit: String,
    summary: String,
    files: Vec<crate::routes::RawFile>,
    /// Its history's length, by which sherlocks tell a directory behind.
    count: Option<u64>,
}

fn fetch(repo: &RepoConfig, mirror_path: &std::path::Path) -> Result<Fetched, gitsync::GitError> {
    let mirror = Mirror::open_or_clone(&repo.url, mirror_path, &repo.branch)?;
    let oid = mirror.fetch()?;
    Ok(Fetched {
        commit: oid.to_string(),
        summary: mirror.summary(oid),
        files: mirror.routes_files(oid, &repo.routes_dir)?,
        count: mirror.commit_count(oid).map_err(|e| tracing::warn!(error = %e, "cannot count the commits")).ok(),
    })
}

/// One reconcile: fetch, and if the head moved, validate and apply or reject.
///
/// The span is attached with `.instrument`, not entered: an entered guard
/// held across `.await` would put other tasks' log lines in this span.
async fn reconcile(directory: &Directory, repo: &RepoConfig, mirror_path: &std::path::Path) -> Result<(), String> {
    reconcile_once(directory, repo, mirror_path).instrument(tracing::info_span!("reconcile", repo = %repo.url)).await
}

async fn reconcile_once(directory: &Directory, repo: &RepoConfig, mirror_path: &std::path::Path) -> Result<(), String> {
    let (repo_c, path) = (repo.clone(), mirror_path.to_path_buf());
    let fetched = tokio::task::spawn_blocking(move || fetch(&repo_c, &path))
        .await
        .map_err(|e| format!("fetch task failed: {e}"))?
        .map_err(|e| repo.url.scrub(&e.to_string()));
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => {
            directory.routes_error(e.clone());
            return Err(e);
        }
    };
    if let Some(count) = fetched.count {
        directory.set_commit_count(&fetched.commit, count);
    }
    let status = directory.routes_status();
    let in_force = status.commit.as_deref() == Some(&fetched.commit);
    if in_force || status.rejected.as_ref().is_some_and(|r| r.commit == fetched.commit) {
        directory.routes_fetched(None, in_force);
        return Ok(());
    }
    let parsed = crate::routes::read_files(fetched.files);
    match parsed {
        Ok(routes) => {
            tracing::info!(commit = %fetched.commit, services = routes.routes.len(), "routes commit accepted");
            directory.set_routes(fetched.commit, fetched.summary, routes);
        }
        Err(errors) => {
            // The first errors say what to fix; a commit with thousands must
            // not make every status answer huge.
            let total = errors.len();
            let mut errors: Vec<String> = errors.iter().take(MAX_ERRORS).map(ToString::to_string).collect();
            if total > MAX_ERRORS {
                errors.push(format!("... and {} more errors", total - MAX_ERRORS));
            }
            tracing::error!(commit = %fetched.commit, errors = ?errors, "routes commit rejected; the last good commit stays in force");
            directory.routes_fetched(
                Some(Rejected { commit: fetched.commit, summary: fetched.summary, errors, at: now_rfc3339() }),
                false,
            );
        }
    }
    Ok(())
}

/// Runs reconciles until `shutdown`: on every trigger, on the poll timer,
/// and sooner after a failure (capped exponential backoff with jitter).
pub async fn run(
    directory: Arc<Directory>,
    repo: RepoConfig,
    mirror_path: PathBuf,
    mut triggers: mpsc::Receiver<Trigger>,
    shutdown: CancellationToken,
) {
    let _watch = watch_local(&repo, directory.reconcile_sender());
    let mut backoff = Backoff::new(Duration::from_millis(500), repo.poll.max(Duration::from_secs(1)));
    let mut next = tokio::time::Instant::now();
    loop {
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => None,
            trigger = triggers.recv() => match trigger { Some(t) => t, None => return },
        };
        let result = reconcile(&directory, &repo, &mirror_path).await;
        directory.metrics.reconciles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        next = tokio::time::Instant::now()
            + match &result {
                Ok(()) => {
                    backoff.reset();
                    repo.poll
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot fetch the routes repo; the last good commit stays in force");
                    delay
                }
            };
        if let Some(reply) = reply {
            let _ = reply.send(directory.routes_status());
        }
    }
}

/// For a repo on a local path, a file-system watch on its git dir triggers a
/// reconcile whenever a ref moves. The watcher lives as long as the guard.
fn watch_local(repo: &RepoConfig, tx: Option<mpsc::Sender<Trigger>>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let git_dir = gitsync::local_git_dir(repo.url.expose())?;
    let tx = tx?;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // A full channel already holds a pending reconcile: that will do.
            let _ = tx.try_send(None);
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "cannot watch the local repo; polling only"))
    .ok()?;
    if let Err(e) = watcher.watch(&git_dir, notify::RecursiveMode::Recursive) {
        tracing::warn!(error = %e, dir = %git_dir.display(), "cannot watch the local repo; polling only");
        return None;
    }
    tracing::info!(dir = %git_dir.display(), "watching the local routes repo for commits");
    Some(watcher)
}
