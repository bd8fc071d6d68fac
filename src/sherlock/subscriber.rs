//! The subscriber: long-polls every directory for its snapshot, chooses
//! which one to follow, and drops each new snapshot of that one into a
//! `watch` channel (which keeps only the newest, so a burst is applied once).
//!
//! Several directories follow the same routes repo and hear the same
//! heartbeats (README.md, "Several directories"). Each has one follower
//! task with its own blocking query, so a switch needs no new round trip.
//! The one followed is, among those that answer, the one whose routes
//! commit is furthest along (its `commit_count`), then one past warming,
//! then the first listed: a directory that is behind is never preferred
//! over a current one, and order decides between equals.
//!
//! Each directory numbers its snapshots in its own epoch, so a switch
//! changes (epoch, index) even when nothing else changed: what HAProxy
//! runs is decided by content (the applier renders and diffs, and an equal
//! config is left alone), and each directory is told the snapshot of its
//! own that holds what is applied, whichever directory it came from, so
//! `dw apply` against any of them sees this sherlock converge.
//!
//! Only checked snapshots reach the channel: the client decodes each with
//! every check of `Snapshot::from_json`, and a refused one is logged, shown
//! in `/status` as `last_error`, and never applied.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::admin;
use super::config::Config;
use crate::backoff::Backoff;
use crate::client::{ClientError, DirectoryClient, Reporter};
use crate::model::{ClientName, Snapshot, SnapshotId};

/// How long one blocking query waits for a change.
const POLL_WAIT: Duration = Duration::from_secs(30);
/// How many snapshots sent to the applier are remembered, to know which
/// one its applied id names (it applies the newest of a burst).
const SENT_KEPT: usize = 4;

/// Whether two snapshots make the same HAProxy config: the same commit and
/// the same backends, whatever directory or run numbered them.
pub fn same_content(a: &Snapshot, b: &Snapshot) -> bool {
    a.commit == b.commit && a.services == b.services && a.clients == b.clients
}

/// Which directory to follow: among those that answered last time (`Some`),
/// the furthest along in the routes history; of those, one past warming
/// over one still warming (a restarted directory's registry is still
/// filling); then the first listed. None when none answers: the running
/// config stays (fail static).
pub fn choose(latest: &[Option<&Snapshot>]) -> Option<usize> {
    // `Option` orders None first: a directory with no commit counted is
    // behind one with a count.
    latest
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, (s.commit_count, !s.warming))))
        .max_by(|(i, a), (j, b)| a.cmp(b).then(j.cmp(i)))
        .map(|(i, _)| i)
}

/// What one follower saw: directory `index` answered with a snapshot or
/// failed.
struct Event {
    index: usize,
    result: Result<Snapshot, ClientError>,
}

/// Follows the directories' snapshots until `shutdown`. `applied` is the
/// applier's last applied snapshot; every directory is told its own
/// snapshot of that content, at once when it changes (for `dw apply`).
pub async fn run(
    config: Config,
    tx: watch::Sender<Option<Snapshot>>,
    mut applied: watch::Receiver<SnapshotId>,
    shared: Arc<admin::Shared>,
    shutdown: CancellationToken,
) {
    let clients: Vec<DirectoryClient> = config
        .directories
        .iter()
        .map(|d| {
            DirectoryClient::with_tls(d.clone(), Duration::from_secs(5), &config.tls).with_token(config.token.as_ref())
        })
        .collect();
    let (events_tx, mut events) = mpsc::channel::<Event>(clients.len() * 2);
    let mut reports = Vec::new();
    let mut followers = tokio::task::JoinSet::new();
    for (index, client) in clients.iter().cloned().enumerate() {
        let (report_tx, report_rx) = watch::channel(*applied.borrow());
        reports.push(report_tx);
        let me = (config.name.to_string(), config.client.clone());
        followers.spawn(follow(index, client, me, report_rx, events_tx.clone(), shutdown.clone()));
    }
    drop(events_tx);

    // The newest snapshot of each directory while it answers; None while it fails.
    let mut latest: Vec<Option<Snapshot>> = vec![None; clients.len()];
    let mut followed: Option<usize> = None;
    // The snapshots handed to the applier, newest last.
    let mut sent: VecDeque<Snapshot> = VecDeque::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.recv() => {
                let Some(Event { index, result }) = event else { return };
                let addr = &clients[index].addr;
                match result {
                    Ok(snapshot) => {
                        tracing::debug!(epoch = snapshot.epoch, index = snapshot.index, directory = %addr, "snapshot received");
                        latest[index] = Some(snapshot);
                    }
                    Err(e) => {
                        log_failure(&e);
                        shared.status.lock().unwrap().last_error = Some(e.to_string());
                        latest[index] = None;
                    }
                }
            }
            changed = applied.changed() => if changed.is_err() { return },
        }
        let choice = choose(&latest.iter().map(Option::as_ref).collect::<Vec<_>>());
        if choice != followed {
            if let Some(now) = choice {
                let why = match followed {
                    None => "the first that answers".to_string(),
                    Some(was) if latest[was].is_none() => format!("{} does not answer", clients[was].addr),
                    Some(was) => format!("{} is behind in the routes history", clients[was].addr),
                };
                tracing::info!(directory = %clients[now].addr, %why, "following this directory");
                shared.status.lock().unwrap().directory = Some(clients[now].addr.to_string());
            }
            followed = choice.or(followed);
        }
        if let Some(snapshot) = choice.and_then(|i| latest[i].as_ref()) {
            if sent.back().is_none_or(|s| s.id() != snapshot.id()) {
                sent.push_back(snapshot.clone());
                if sent.len() > SENT_KEPT {
                    sent.pop_front();
                }
                tx.send_replace(Some(snapshot.clone()));
            }
        }
        // Each directory hears of the content applied in its own numbers:
        // its newest snapshot when that is what runs, else the applied one
        // if it is of its own run (an older snapshot, during a burst).
        let applied_id = *applied.borrow_and_update();
        if let Some(content) = sent.iter().rev().find(|s| s.id() == applied_id) {
            for (report, mine) in reports.iter().zip(&latest) {
                let own = match mine {
                    Some(mine) if same_content(mine, content) => mine.id(),
                    Some(mine) if mine.epoch == applied_id.epoch => applied_id,
                    _ => continue,
                };
                report.send_if_modified(|r| std::mem::replace(r, own) != own);
            }
        }
    }
}

/// A failure to follow one directory, logged by what it means.
fn log_failure(e: &ClientError) {
    if matches!(e, ClientError::BadSnapshot { .. }) {
        // Refused whole, like a bad commit at the directory: another
        // directory, or this one's next snapshot, may be good.
        tracing::error!(error = %e, "snapshot refused; keeping the running config");
    } else if e.is_refusal() {
        // A 401 or 403 is a token problem an operator must fix, not an
        // outage: say so.
        tracing::error!(error = %e, "the directory refused this sherlock (check its token); keeping the running config");
    } else {
        tracing::warn!(error = %e, "directory unreachable; keeping the running config");
    }
}

/// Long-polls one directory until `shutdown`, sending every answer and
/// every failure. Each query reports `report`, the snapshot of this
/// directory's that sherlock has applied; when that changes, the query is
/// restarted so the directory learns at once.
async fn follow(
    index: usize,
    client: DirectoryClient,
    (name, client_name): (String, ClientName),
    mut report: watch::Receiver<SnapshotId>,
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    // This directory's snapshot held: (epoch, index) tells a restarted
    // directory's snapshot from an old one, whatever the index.
    let mut held = SnapshotId::default();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let me = Reporter { name: name.as_str(), client: &client_name, applied: *report.borrow_and_update() };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.snapshot(held, POLL_WAIT, Some(me)) => r,
            changed = report.changed() => {
                if changed.is_err() { return }
                continue;
            }
        };
        let failed = result.is_err();
        match &result {
            // The wait ended without a change.
            Ok(snapshot) if snapshot.id() == held => continue,
            Ok(snapshot) => {
                backoff.reset();
                held = snapshot.id();
            }
            // Asked afresh, the directory answers at once when it is back,
            // even with the snapshot held before: it counts as up again.
            Err(_) => held = SnapshotId::default(),
        }
        if events.send(Event { index, result }).await.is_err() {
            return;
        }
        if failed {
            let delay = backoff.next_delay();
            tracing::debug!(directory = %client.addr, retry_in = ?delay, "retrying the directory");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(epoch: u64, count: Option<u64>) -> Snapshot {
        Snapshot {
            epoch,
            index: 1,
            commit: count.map(|n| format!("{n:07x}")),
            commit_count: count,
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_first_listed_of_the_furthest_along_is_followed() {
        let (a, b, c) = (snap(1, Some(5)), snap(2, Some(5)), snap(3, Some(6)));
        assert_eq!(choose(&[Some(&a), Some(&b)]), Some(0), "equals: the order decides");
        assert_eq!(choose(&[None, Some(&b)]), Some(1), "the first does not answer");
        assert_eq!(choose(&[Some(&a), Some(&b), Some(&c)]), Some(2), "the others are behind");
        assert_eq!(choose(&[Some(&c), Some(&a)]), Some(0));
        let none = snap(4, None);
        assert_eq!(choose(&[Some(&none), Some(&a)]), Some(1), "no commit counted is behind any");
        assert_eq!(choose(&[Some(&none), Some(&none)]), Some(0), "no counts at all: the order decides");
        assert_eq!(choose(&[None, None]), None);
        let warming = Snapshot { warming: true, ..a.clone() };
        assert_eq!(choose(&[Some(&warming), Some(&b)]), Some(1), "a warm directory over a warming one");
        let ahead_warming = Snapshot { warming: true, ..c.clone() };
        assert_eq!(choose(&[Some(&a), Some(&ahead_warming)]), Some(1), "but the routes history first");
    }

    #[test]
    fn content_is_compared_not_ids() {
        let (a, b) = (snap(1, Some(5)), snap(2, Some(5)));
        assert!(same_content(&a, &b));
        let warming = Snapshot { warming: true, index: 9, ..b.clone() };
        assert!(same_content(&a, &warming));
        assert!(!same_content(&a, &snap(1, Some(6))));
    }
}
