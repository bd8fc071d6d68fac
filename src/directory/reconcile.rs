//! The GitOps reconciler: fetch the routes repo, validate the commit whole,
//! and hand it to the directory, or reject it and keep the last good one.
//!
//! One pass is idempotent and does not care why it was woken: the poll
//! timer, a webhook (`POST /v1/reconcile`) and a file-system watch on a
//! local repo all send the same trigger. Retry timing lives in the loop.
//!
//! A pass runs on a thread of its own and is bounded (`--fetch-timeout`),
//! so the loop stays free and shutdown never waits for git. A trigger that
//! arrives during a pass runs one more pass when this one ends (the push it
//! announces may have come after this pass's fetch); its webhook waits for
//! that pass, unless the pass under way has run [`BUSY_AT_ONCE`] already
//! (a slow or hung git server): then it is answered at once, "fetch in
//! progress since ...".

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use git2::Oid;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Directory, RepoConfig};
use crate::backoff::Backoff;
use crate::gitsync::{self, GitError, Mirror, MirrorLock, Relation, ALLOW_EMPTY_TRAILER};
use crate::protocol::{RejectKind, Rejected, RoutesStatus};
use crate::routes::{RouteError, RouteSet, MAX_ERRORS};

/// The answer to a trigger that asked for one (a webhook).
#[derive(Debug, Clone)]
pub enum Reply {
    /// A pass ran for this trigger; the routes state after it.
    Done(RoutesStatus),
    /// A pass was already under way (its start is in `fetching_since`);
    /// another runs when it ends.
    Busy(RoutesStatus),
}

/// A wake-up for the reconciler; a webhook passes a channel for the outcome.
pub type Trigger = Option<oneshot::Sender<Reply>>;

/// How long a pass may have run before a webhook that arrives during it
/// is answered at once instead of waiting for the pass that follows.
/// Fetches from a healthy server take well under it.
pub const BUSY_AT_ONCE: Duration = Duration::from_secs(1);

/// What a run starts with in `stale` until its first successful fetch.
pub const NOT_FETCHED: &str = "not fetched since start";

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// What a pass needs to know of the directory's state. Only the
/// reconciler changes these, so they hold for the whole pass.
#[derive(Debug, Clone, Default)]
struct Known {
    /// The commit in force.
    in_force: Option<Oid>,
    /// The rejected commit, while it is the head.
    rejected: Option<String>,
    /// Whether the commit in force routes any service.
    has_routes: bool,
}

/// What to do with the branch head.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// It is the commit in force already.
    InForce,
    /// It is the commit rejected already.
    StillRejected,
    /// Put it in force (it is recorded in the mirror already).
    Accept(RouteSet),
    Reject(RejectKind, Vec<String>),
}

/// Decides on the head, given where it stands relative to the commit in
/// force, its routes parsed (lazily: a commit seen before is not read
/// again) and whether its message allows removing every route.
fn judge(
    head: Oid,
    known: &Known,
    relation: Result<Relation, String>,
    allow_rewind: bool,
    parse: impl FnOnce() -> Result<RouteSet, Vec<RouteError>>,
    allows_empty: bool,
) -> Verdict {
    if known.in_force == Some(head) {
        return Verdict::InForce;
    }
    if known.rejected.as_deref() == Some(head.to_string().as_str()) {
        return Verdict::StillRejected;
    }
    let short = |oid: Oid| oid.to_string()[..7].to_string();
    if !allow_rewind {
        let old = known.in_force.map(short).unwrap_or_default();
        let why = match relation {
            Ok(Relation::Same | Relation::Forward) => None,
            Ok(Relation::Rewind) => Some(format!(
                "history moved back: {} does not descend from {old}, the commit in force (a force-push?)",
                short(head)
            )),
            Err(e) => {
                Some(format!("cannot tell whether {} descends from {old}, the commit in force: {e}", short(head)))
            }
        };
        if let Some(why) = why {
            return Verdict::Reject(
                RejectKind::Rewind,
                vec![format!(
                    "{why}; it stays rejected until the branch moves forward of {old} or back to it, \
                     or the directory runs with --allow-rewind"
                )],
            );
        }
    }
    let routes = match parse() {
        Ok(routes) => routes,
        Err(errors) => {
            // The first errors say what to fix; a commit with thousands must
            // not make every status answer huge.
            let total = errors.len();
            let mut errors: Vec<String> = errors.iter().take(MAX_ERRORS).map(ToString::to_string).collect();
            if total > MAX_ERRORS {
                errors.push(format!("... and {} more errors", total - MAX_ERRORS));
            }
            return Verdict::Reject(RejectKind::Invalid, errors);
        }
    };
    if routes.routes.is_empty() && known.has_routes && !allows_empty {
        return Verdict::Reject(
            RejectKind::Empty,
            vec![format!(
                "it removes every route (no service is left in the routes files); if that is meant, \
                 commit it with the trailer \"{ALLOW_EMPTY_TRAILER}: yes\" in its message"
            )],
        );
    }
    Verdict::Accept(routes)
}

/// What one pass found.
struct Outcome {
    commit: Oid,
    summary: String,
    verdict: Verdict,
    /// An accepted commit's history length, by which sherlocks tell a
    /// directory that is behind (README.md, "Several directories").
    count: Option<u64>,
}

/// `commit`'s history length, or None with a warning: sherlocks then rank
/// this directory by its other merits.
fn count(mirror: &Mirror, commit: Oid) -> Option<u64> {
    mirror.commit_count(commit).map_err(|e| tracing::warn!(error = %e, "cannot count the commits")).ok()
}

/// One pass, blocking: fetch, judge the head and, when it is accepted,
/// record it in the mirror before anyone serves it.
fn pass(
    repo: &RepoConfig,
    mirror_path: &Path,
    known: &Known,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<Outcome, GitError> {
    let mirror = Mirror::open_or_clone(&repo.url, mirror_path, &repo.branch)?;
    let head = mirror.fetch(deadline, cancel)?;
    let mut read_error = None;
    let verdict = judge(
        head,
        known,
        mirror.relation(head, known.in_force).map_err(|e| e.to_string()),
        repo.allow_rewind,
        || match mirror.routes_files(head, &repo.routes_dir) {
            Ok(files) => crate::routes::read_files(files),
            Err(e) => {
                read_error = Some(e);
                Ok(RouteSet::default())
            }
        },
        gitsync::allows_empty(&mirror.message(head)),
    );
    if let Some(e) = read_error {
        return Err(e);
    }
    if matches!(verdict, Verdict::Accept(_)) {
        mirror
            .set_in_force(head)
            .map_err(|e| GitError::Other(format!("{e}; the commit is not put in force until it can be recorded")))?;
    }
    let count = if matches!(verdict, Verdict::Accept(_)) { count(&mirror, head) } else { None };
    Ok(Outcome { commit: head, summary: mirror.summary(head), verdict, count })
}

/// Hands a pass's outcome to the directory.
fn apply(directory: &Directory, outcome: Outcome) {
    let commit = outcome.commit.to_string();
    match outcome.verdict {
        Verdict::InForce => directory.routes_fetched(None, true),
        Verdict::StillRejected => directory.routes_fetched(None, false),
        Verdict::Accept(routes) => {
            tracing::info!(commit = %commit, services = routes.routes.len(), "routes commit accepted");
            // Before the routes, so that their first snapshot carries it.
            if let Some(n) = outcome.count {
                directory.set_commit_count(&commit, n);
            }
            directory.set_routes(commit, outcome.summary, routes);
        }
        Verdict::Reject(kind, errors) => {
            tracing::error!(commit = %commit, ?kind, errors = ?errors, "routes commit rejected; the last good commit stays in force");
            let rejected = Rejected { commit, summary: outcome.summary, kind, errors, at: now_rfc3339() };
            directory.routes_fetched(Some(rejected), false);
        }
    }
}

/// Puts the commit a previous run accepted back in force, from the mirror
/// in the state dir, before any fetch: a directory restarted while its
/// remote is away serves the routes it served, not equal shares. The
/// commit is validated again (the rules or `--routes-dir` may have
/// changed); one that fails is not served.
///
/// It first takes the mirror's lock, held for the process's life, and
/// clears the lock files a killed run may have left.
pub fn warm_start(directory: &Directory, repo: &RepoConfig, mirror_path: &Path) -> Result<MirrorLock, GitError> {
    let lock = MirrorLock::acquire(mirror_path)?;
    let removed = gitsync::remove_stale_locks(mirror_path);
    if !removed.is_empty() {
        tracing::warn!(files = ?removed, "removed lock files a killed directory left in the routes mirror");
    }
    restore(directory, repo, mirror_path);
    Ok(lock)
}

fn restore(directory: &Directory, repo: &RepoConfig, mirror_path: &Path) {
    let Some(mirror) = Mirror::open(&repo.url, mirror_path, &repo.branch) else { return };
    let Some(commit) = mirror.in_force() else {
        tracing::info!("the mirror records no commit in force for this branch; waiting for the first fetch");
        return;
    };
    let routes = mirror.routes_files(commit, &repo.routes_dir).map_err(|e| e.to_string()).and_then(|files| {
        crate::routes::read_files(files).map_err(|errors| {
            let first = errors.first().map(ToString::to_string).unwrap_or_default();
            format!("{} errors, the first: {first}", errors.len())
        })
    });
    match routes {
        Ok(routes) => {
            tracing::info!(commit = %commit, services = routes.routes.len(), "serving the commit in force before the restart until the first fetch");
            if let Some(n) = count(&mirror, commit) {
                directory.set_commit_count(&commit.to_string(), n);
            }
            directory.restore_routes(commit.to_string(), mirror.summary(commit), routes);
        }
        Err(e) => {
            tracing::warn!(commit = %commit, error = %e, "the commit in force before the restart does not validate; waiting for the first fetch")
        }
    }
}

/// A pass under way on its own thread.
struct Running {
    started: Instant,
    /// Set at the deadline or at shutdown; libgit2 sees it at its next
    /// progress callback.
    cancel: Arc<AtomicBool>,
    deadline: tokio::time::Instant,
    /// Whether the deadline was reported already.
    overdue: bool,
    done: oneshot::Receiver<Result<Outcome, GitError>>,
    /// Webhooks waiting for this pass.
    waiters: Vec<oneshot::Sender<Reply>>,
}

fn start(directory: &Directory, repo: &RepoConfig, mirror_path: &Path) -> Running {
    let (_, routes, status) = directory.in_force();
    let known = Known {
        in_force: status.commit.as_deref().and_then(|c| Oid::from_str(c).ok()),
        rejected: status.rejected.map(|r| r.commit),
        has_routes: !routes.routes.is_empty(),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + repo.fetch_timeout;
    let (tx, done) = oneshot::channel();
    let (repo_c, path, flag) = (repo.clone(), mirror_path.to_path_buf(), cancel.clone());
    // A thread of its own, not spawn_blocking: the runtime waits for its
    // blocking tasks when it shuts down, and shutdown must not wait for git.
    let spawned = std::thread::Builder::new().name("routes-fetch".into()).spawn(move || {
        let _span = tracing::info_span!("reconcile", repo = %repo_c.url).entered();
        let _ = tx.send(pass(&repo_c, &path, &known, deadline, &flag));
    });
    if let Err(e) = spawned {
        // The receiver sees the sender dropped: reported as a failed pass.
        tracing::error!(error = %e, "cannot start a thread for the fetch");
    }
    directory.fetch_started(Some(now_rfc3339()));
    Running { started: Instant::now(), cancel, deadline: deadline.into(), overdue: false, done, waiters: Vec::new() }
}

/// Runs reconciles until `shutdown`: at once, on every trigger, on the poll
/// timer, and sooner after a failure (capped exponential backoff with
/// jitter).
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
    let mut running: Option<Running> = None;
    // A trigger came during a pass: run another as soon as it ends, since
    // the push it announces may have come after this pass's fetch.
    let mut again = false;
    // Webhooks waiting for that next pass.
    let mut followers: Vec<oneshot::Sender<Reply>> = Vec::new();
    loop {
        let busy = running.is_some();
        let overdue_at = running.as_ref().filter(|r| !r.overdue).map(|r| r.deadline);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                if let Some(r) = &running {
                    r.cancel.store(true, Ordering::Relaxed);
                }
                return;
            }
            result = async { (&mut running.as_mut().expect("busy").done).await }, if busy => {
                let r = running.take().expect("busy");
                directory.fetch_started(None);
                let result = match result {
                    Ok(Ok(outcome)) => {
                        apply(&directory, outcome);
                        Ok(())
                    }
                    Ok(Err(e)) => Err(repo.url.scrub(&e.to_string())),
                    Err(_) => Err("the fetch thread ended without an answer".to_string()),
                };
                directory.metrics.reconciles.inc();
                directory.metrics.reconcile.observe(r.started.elapsed());
                next = tokio::time::Instant::now()
                    + match &result {
                        Ok(()) => {
                            backoff.reset();
                            repo.poll
                        }
                        Err(e) => {
                            directory.routes_error(e.clone());
                            let delay = backoff.next_delay();
                            tracing::warn!(error = %e, retry_in = ?delay, "cannot fetch the routes repo; the last good commit stays in force");
                            delay
                        }
                    };
                if std::mem::take(&mut again) {
                    next = tokio::time::Instant::now();
                }
                let status = directory.routes_status();
                for waiter in r.waiters {
                    let _ = waiter.send(Reply::Done(status.clone()));
                }
            }
            _ = tokio::time::sleep_until(overdue_at.unwrap_or_else(tokio::time::Instant::now)), if overdue_at.is_some() => {
                // libgit2's read timeout ends a server that says nothing;
                // this ends the pass of one that keeps trickling, at its
                // next callback. Either way the pass is reported failed now.
                let r = running.as_mut().expect("busy");
                r.cancel.store(true, Ordering::Relaxed);
                r.overdue = true;
                let e = format!(
                    "fetching branch {} from {}: no complete answer within {} (--fetch-timeout); given up",
                    repo.branch,
                    repo.url,
                    humantime::format_duration(repo.fetch_timeout)
                );
                tracing::warn!(error = %e, "the routes fetch is overdue; the last good commit stays in force");
                directory.routes_error(e);
                let status = directory.routes_status();
                for waiter in r.waiters.drain(..) {
                    let _ = waiter.send(Reply::Done(status.clone()));
                }
            }
            trigger = triggers.recv() => match trigger {
                None => return,
                Some(reply) => match running.as_mut() {
                    Some(r) => {
                        again = true;
                        match reply {
                            Some(reply) if r.overdue || r.started.elapsed() >= BUSY_AT_ONCE => {
                                let _ = reply.send(Reply::Busy(directory.routes_status()));
                            }
                            Some(reply) => followers.push(reply),
                            None => {}
                        }
                    }
                    None => {
                        let mut r = start(&directory, &repo, &mirror_path);
                        r.waiters.extend(reply);
                        r.waiters.append(&mut followers);
                        running = Some(r);
                    }
                },
            },
            _ = tokio::time::sleep_until(next), if !busy => {
                let mut r = start(&directory, &repo, &mirror_path);
                r.waiters.append(&mut followers);
                running = Some(r);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::Content;

    fn oid(n: u8) -> Oid {
        Oid::from_bytes(&[n; 20]).unwrap()
    }

    fn routes(yaml: &str) -> Result<RouteSet, Vec<RouteError>> {
        crate::routes::read_files(vec![("routes/r.yaml".into(), Content::Bytes(yaml.as_bytes().to_vec()))])
    }

    fn known(in_force: Option<u8>, has_routes: bool) -> Known {
        Known { in_force: in_force.map(oid), rejected: None, has_routes }
    }

    #[test]
    fn the_head_in_force_or_rejected_already_is_not_read_again() {
        let unread = || -> Result<RouteSet, Vec<RouteError>> { panic!("read") };
        assert_eq!(judge(oid(1), &known(Some(1), true), Ok(Relation::Same), false, unread, false), Verdict::InForce);
        let k = Known { rejected: Some(oid(2).to_string()), ..known(Some(1), true) };
        assert_eq!(judge(oid(2), &k, Ok(Relation::Rewind), false, unread, false), Verdict::StillRejected);
    }

    #[test]
    fn a_rewind_is_rejected_unless_allowed() {
        let good = || routes("barker: {v1: 100}\n");
        let Verdict::Reject(kind, errors) =
            judge(oid(2), &known(Some(1), true), Ok(Relation::Rewind), false, good, false)
        else {
            panic!("accepted")
        };
        assert_eq!(kind, RejectKind::Rewind);
        assert!(errors[0].starts_with("history moved back: 0202020 does not descend from 0101010"), "{errors:?}");
        assert!(errors[0].contains("--allow-rewind"), "{errors:?}");
        assert!(matches!(
            judge(oid(2), &known(Some(1), true), Ok(Relation::Rewind), true, good, false),
            Verdict::Accept(_)
        ));
        assert!(matches!(
            judge(oid(2), &known(Some(1), true), Ok(Relation::Forward), false, good, false),
            Verdict::Accept(_)
        ));
        // When git cannot tell, history is not taken to move forward.
        let Verdict::Reject(kind, errors) =
            judge(oid(2), &known(Some(1), true), Err("object not found".into()), false, good, false)
        else {
            panic!("accepted")
        };
        assert_eq!(kind, RejectKind::Rewind);
        assert!(errors[0].contains("cannot tell whether 0202020 descends") && errors[0].contains("object not found"));
    }

    #[test]
    fn removing_every_route_needs_the_trailer() {
        let empty = || Ok(RouteSet::default());
        let Verdict::Reject(kind, errors) =
            judge(oid(2), &known(Some(1), true), Ok(Relation::Forward), false, empty, false)
        else {
            panic!("accepted")
        };
        assert_eq!(kind, RejectKind::Empty);
        assert!(errors[0].contains("Dstack-Allow-Empty: yes"), "{errors:?}");
        assert_eq!(
            judge(oid(2), &known(Some(1), true), Ok(Relation::Forward), false, empty, true),
            Verdict::Accept(RouteSet::default())
        );
        // Nothing to remove: a first commit, or one after an empty one.
        assert!(matches!(
            judge(oid(2), &known(None, false), Ok(Relation::Same), false, empty, false),
            Verdict::Accept(_)
        ));
        assert!(matches!(
            judge(oid(2), &known(Some(1), false), Ok(Relation::Forward), false, empty, false),
            Verdict::Accept(_)
        ));
    }

    #[test]
    fn invalid_routes_are_rejected_with_their_places() {
        let Verdict::Reject(kind, errors) =
            judge(oid(2), &known(Some(1), true), Ok(Relation::Forward), false, || routes("barker: {v1: 90}\n"), false)
        else {
            panic!("accepted")
        };
        assert_eq!(kind, RejectKind::Invalid);
        assert!(errors[0].starts_with("routes/r.yaml:1:"), "{errors:?}");
    }
}
