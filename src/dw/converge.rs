//! Convergence: whether every sherlock has applied the snapshot that put a
//! commit in force. `dw apply` and `dw rollback` wait for it; `dw status`
//! shows how far each sherlock lags.
//!
//! Snapshots are ordered by (epoch, index), never by the index alone: a
//! restarted directory starts a new epoch whose indexes start low again, and
//! a sherlock that applied snapshot 500 of the old run has not applied
//! snapshot 3 of the new one.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use super::workspace::short;
use super::{output, Context, Failure};
use crate::model::SnapshotId;
use crate::protocol::Status;

/// A sherlock not seen for this long is gone, not lagging: its long polls
/// last 30 s at most.
pub const SHERLOCK_GONE_MS: u64 = 70_000;

/// How many snapshots `applied` is behind `served`; None when the two are
/// of different directory runs, whose indexes do not compare.
pub fn lag(applied: SnapshotId, served: SnapshotId) -> Option<u64> {
    (applied.epoch == served.epoch).then(|| served.index.saturating_sub(applied.index))
}

/// A sherlock as the wait sees it.
#[derive(Debug, Clone)]
pub struct Sherlock {
    pub name: String,
    pub applied: SnapshotId,
    pub last_seen_ms: u64,
}

/// One look at the directory's status, reduced to what the wait needs.
#[derive(Debug, Clone)]
pub struct Look {
    /// The commit in force.
    pub commit: Option<String>,
    /// The snapshot served.
    pub served: SnapshotId,
    /// The commit the directory refused, with its errors.
    pub rejected: Option<(String, Vec<String>)>,
    pub sherlocks: Vec<Sherlock>,
}

impl Look {
    pub fn of(status: &Status) -> Look {
        let rejected = status.routes.as_ref().and_then(|r| r.rejected.as_ref());
        Look {
            commit: status.commit.clone(),
            served: status.snapshot_id(),
            rejected: rejected.map(|r| (r.commit.clone(), r.errors.clone())),
            sherlocks: status
                .sherlocks
                .iter()
                .map(|s| Sherlock { name: s.name.clone(), applied: s.applied_id(), last_seen_ms: s.last_seen_ms })
                .collect(),
        }
    }
}

/// Where the wait stands after one look.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The directory refused the commit: waiting longer changes nothing.
    Rejected(Vec<String>),
    /// The commit is in force and every live sherlock has applied it.
    Converged { target: SnapshotId, sherlocks: usize },
    /// Not yet.
    Waiting {
        /// Whether the directory serves the commit yet.
        served: bool,
        /// Live sherlocks that have applied it, of all live sherlocks.
        done: usize,
        live: usize,
        /// What is missing, for the timeout's message.
        why: String,
    },
}

/// The wait for one commit to reach every sherlock.
#[derive(Debug)]
pub struct Convergence {
    commit: String,
    /// The snapshot that first put the commit in force in the directory's
    /// current run; a sherlock has the commit once it applied this or later.
    target: Option<SnapshotId>,
}

impl Convergence {
    pub fn new(commit: &str) -> Convergence {
        Convergence { commit: commit.to_string(), target: None }
    }

    /// Takes one look at the directory and says where the wait stands.
    pub fn observe(&mut self, look: &Look) -> Step {
        if let Some((_, errors)) = look.rejected.as_ref().filter(|(c, _)| *c == self.commit) {
            return Step::Rejected(errors.clone());
        }
        let served = look.commit.as_deref() == Some(self.commit.as_str());
        // A restarted directory numbers its snapshots anew: aim at the first
        // of its run that serves the commit.
        if served && self.target.is_none_or(|t| t.epoch != look.served.epoch) {
            self.target = Some(look.served);
        }
        let live: Vec<&Sherlock> = look.sherlocks.iter().filter(|s| s.last_seen_ms < SHERLOCK_GONE_MS).collect();
        let has_it = |s: &Sherlock| self.target.is_some_and(|t| s.applied >= t);
        let done = live.iter().filter(|s| has_it(s)).count();
        match self.target {
            // No sherlock listed is no sherlock that has the commit, not all of them.
            Some(target) if served && !live.is_empty() && done == live.len() => {
                Step::Converged { target, sherlocks: done }
            }
            _ => {
                let why = if !served {
                    format!("the directory still serves {}", look.commit.as_deref().map(short).unwrap_or("nothing"))
                } else if look.sherlocks.is_empty() {
                    "no sherlock is subscribed to the directory, so none has applied it".to_string()
                } else if live.is_empty() {
                    let gone: Vec<&str> = look.sherlocks.iter().map(|s| s.name.as_str()).collect();
                    format!(
                        "no sherlock has been seen in the last {}s, so none has applied it (gone: {})",
                        SHERLOCK_GONE_MS / 1000,
                        gone.join(", ")
                    )
                } else {
                    let lagging: Vec<String> = live
                        .iter()
                        .filter(|s| !has_it(s))
                        .map(|s| {
                            let run =
                                if lag(s.applied, look.served).is_none() { " of another directory run" } else { "" };
                            format!(
                                "{} (applied snapshot {}{run}, seen {:.1}s ago)",
                                s.name,
                                s.applied.index,
                                s.last_seen_ms as f64 / 1000.0
                            )
                        })
                        .collect();
                    format!("lagging: {}", lagging.join(", "))
                };
                Step::Waiting { served, done, live: live.len(), why }
            }
        }
    }
}

/// Waits until the directory serves `commit` and every live sherlock has
/// applied a snapshot built from it; shows progress on a terminal.
pub async fn wait_converged(ctx: &Context, commit: &str, started: Instant, timeout: Duration) -> Result<(), Failure> {
    let tty = std::io::stdout().is_terminal();
    let mut wait = Convergence::new(commit);
    loop {
        let status = ctx.client.status().await.map_err(Failure::error)?;
        match wait.observe(&Look::of(&status)) {
            Step::Rejected(errors) => {
                if tty {
                    output::progress("\n");
                }
                return Err(Failure::error(format!(
                    "the directory rejected {}:\n{}",
                    short(commit),
                    errors.join("\n")
                )));
            }
            Step::Converged { target, sherlocks } => {
                if tty {
                    output::progress("\r\x1b[K");
                }
                output::progress(format_args!(
                    "The directory serves {} (snapshot {}); {sherlocks}/{sherlocks} sherlocks applied it in {:.1}s.\n",
                    short(commit),
                    target.index,
                    started.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            Step::Waiting { served, done, live, why } => {
                if tty {
                    output::progress(format_args!(
                        "\r\x1b[Kwaiting: directory {}, {done}/{live} sherlocks",
                        if served { "serves it" } else { "fetching" },
                    ));
                }
                if started.elapsed() > timeout {
                    if tty {
                        output::progress("\n");
                    }
                    return Err(Failure::error(format!(
                        "timed out after {}s waiting for {} to converge; {why}",
                        timeout.as_secs(),
                        short(commit)
                    )));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "c0ffee0000000000000000000000000000000000";
    const OLDER: &str = "0ld0000000000000000000000000000000000000";

    fn mark(epoch: u64, index: u64) -> SnapshotId {
        SnapshotId { epoch, index }
    }

    fn sherlock(name: &str, applied: SnapshotId) -> Sherlock {
        Sherlock { name: name.into(), applied, last_seen_ms: 500 }
    }

    fn look(commit: &str, served: SnapshotId, sherlocks: Vec<Sherlock>) -> Look {
        Look { commit: Some(commit.into()), served, rejected: None, sherlocks }
    }

    fn why(step: Step) -> String {
        match step {
            Step::Waiting { why, .. } => why,
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn marks_order_by_epoch_then_index() {
        assert!(mark(1, 500) < mark(2, 3));
        assert!(mark(2, 3) < mark(2, 4));
        assert_eq!(lag(mark(2, 3), mark(2, 7)), Some(4));
        assert_eq!(lag(mark(2, 9), mark(2, 7)), Some(0));
        assert_eq!(lag(mark(1, 500), mark(2, 3)), None, "a run's indexes say nothing about another's");
    }

    #[test]
    fn converges_once_every_live_sherlock_applied_the_commit() {
        let mut wait = Convergence::new(COMMIT);
        let gone = Sherlock { last_seen_ms: SHERLOCK_GONE_MS, ..sherlock("gone", mark(1, 1)) };
        let step = wait.observe(&look(OLDER, mark(1, 9), vec![sherlock("a", mark(1, 9)), gone.clone()]));
        assert_eq!(why(step), "the directory still serves 0ld0000000");
        // In force at snapshot 10: b has applied it, a not yet.
        let step =
            wait.observe(&look(COMMIT, mark(1, 10), vec![sherlock("a", mark(1, 9)), sherlock("b", mark(1, 10))]));
        assert_eq!(
            step,
            Step::Waiting {
                served: true,
                done: 1,
                live: 2,
                why: "lagging: a (applied snapshot 9, seen 0.5s ago)".into()
            }
        );
        // A later snapshot (an instance joined) counts: it holds the commit too.
        let sherlocks = vec![sherlock("a", mark(1, 12)), sherlock("b", mark(1, 10)), gone];
        let step = wait.observe(&look(COMMIT, mark(1, 12), sherlocks));
        assert_eq!(step, Step::Converged { target: mark(1, 10), sherlocks: 2 });
    }

    #[test]
    fn a_restarted_directorys_low_index_is_not_convergence() {
        let mut wait = Convergence::new(COMMIT);
        // The restarted directory serves the commit at snapshot 3 of run 2; a
        // sherlock still on snapshot 500 of run 1 has not applied it.
        let step = wait.observe(&look(COMMIT, mark(2, 3), vec![sherlock("a", mark(1, 500))]));
        assert_eq!(why(step), "lagging: a (applied snapshot 500 of another directory run, seen 0.5s ago)");
        let step = wait.observe(&look(COMMIT, mark(2, 4), vec![sherlock("a", mark(2, 3))]));
        assert_eq!(step, Step::Converged { target: mark(2, 3), sherlocks: 1 });
    }

    #[test]
    fn a_restart_during_the_wait_aims_at_the_new_run() {
        let mut wait = Convergence::new(COMMIT);
        let step = wait.observe(&look(COMMIT, mark(1, 40), vec![sherlock("a", mark(1, 39))]));
        assert!(matches!(step, Step::Waiting { served: true, done: 0, .. }), "{step:?}");
        // The new run does not serve the commit yet: its first snapshots do not count.
        let step = wait.observe(&look(OLDER, mark(2, 1), vec![sherlock("a", mark(2, 1))]));
        assert!(matches!(step, Step::Waiting { served: false, .. }), "{step:?}");
        // Once it does, the old run's snapshot 40 is no longer the target.
        let step = wait.observe(&look(COMMIT, mark(2, 2), vec![sherlock("a", mark(1, 41))]));
        assert!(matches!(step, Step::Waiting { served: true, done: 0, .. }), "{step:?}");
        let step = wait.observe(&look(COMMIT, mark(2, 2), vec![sherlock("a", mark(2, 2))]));
        assert_eq!(step, Step::Converged { target: mark(2, 2), sherlocks: 1 });
    }

    #[test]
    fn no_sherlock_listed_is_not_convergence() {
        let mut wait = Convergence::new(COMMIT);
        let step = wait.observe(&look(COMMIT, mark(1, 5), vec![]));
        assert_eq!(
            step,
            Step::Waiting {
                served: true,
                done: 0,
                live: 0,
                why: "no sherlock is subscribed to the directory, so none has applied it".into()
            }
        );
        let gone = Sherlock { last_seen_ms: SHERLOCK_GONE_MS + 1, ..sherlock("old-host", mark(1, 5)) };
        let step = wait.observe(&look(COMMIT, mark(1, 5), vec![gone]));
        assert_eq!(why(step), "no sherlock has been seen in the last 70s, so none has applied it (gone: old-host)");
    }

    #[test]
    fn a_rejected_commit_ends_the_wait() {
        let mut wait = Convergence::new(COMMIT);
        let mut rejected = look(OLDER, mark(1, 5), vec![sherlock("a", mark(1, 5))]);
        rejected.rejected = Some((COMMIT.into(), vec!["routes/barker.yaml:3:7: weights sum to 120".into()]));
        assert_eq!(wait.observe(&rejected), Step::Rejected(vec!["routes/barker.yaml:3:7: weights sum to 120".into()]));
        // Another commit's rejection is not this wait's business.
        rejected.rejected = Some((OLDER.into(), vec![]));
        assert!(matches!(wait.observe(&rejected), Step::Waiting { .. }));
    }
}
