//! The subscriber: long-polls the directories for the snapshot, failing
//! over from one to the next, and drops each new snapshot into a `watch`
//! channel (which keeps only the newest, so a burst is applied once).
//!
//! Only checked snapshots reach the channel: the client decodes each with
//! every check of `Snapshot::from_json`, and a refused one is logged, shown
//! in `/status` as `last_error`, and never applied.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::admin;
use super::config::Config;
use crate::backoff::Backoff;
use crate::client::{ClientError, DirectoryClient, Reporter};
use crate::model::{Snapshot, SnapshotId};

/// How long one blocking query waits for a change.
const POLL_WAIT: Duration = Duration::from_secs(30);

/// Follows the directories' snapshots, failing over in order, until
/// `shutdown`. Every query reports the snapshot applied; when that changes,
/// the query is restarted so the directory learns at once (for `dw apply`).
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
    let mut current = 0;
    // The snapshot received last: (epoch, index) tells a restarted or
    // another directory's snapshot from an old one, whatever the index.
    let mut held = SnapshotId::default();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let client = &clients[current];
        shared.status.lock().unwrap().directory = Some(client.addr.to_string());
        let me = Reporter { name: config.name.as_str(), client: &config.client, applied: *applied.borrow_and_update() };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.snapshot(held, POLL_WAIT, Some(me)) => r,
            changed = applied.changed() => {
                if changed.is_err() { return }
                continue;
            }
        };
        match result {
            Ok(snapshot) => {
                backoff.reset();
                if snapshot.id() == held {
                    continue; // the wait ended without a change
                }
                held = snapshot.id();
                tracing::debug!(epoch = held.epoch, index = held.index, directory = %client.addr, "snapshot received");
                tx.send_replace(Some(snapshot));
            }
            Err(e) => {
                let delay = backoff.next_delay();
                if matches!(e, ClientError::BadSnapshot { .. }) {
                    // Refused whole, like a bad commit at the directory: the
                    // next directory, or this one's next snapshot, may be good.
                    tracing::error!(error = %e, retry_in = ?delay, "snapshot refused; keeping the running config");
                } else if e.is_refusal() {
                    // A 401 or 403 is a token problem an operator must fix,
                    // not an outage: say so.
                    tracing::error!(error = %e, retry_in = ?delay, "the directory refused this sherlock (check its token); keeping the running config");
                } else {
                    tracing::warn!(error = %e, retry_in = ?delay, "directory unreachable; keeping the running config");
                }
                shared.status.lock().unwrap().last_error = Some(e.to_string());
                if clients.len() > 1 {
                    current = (current + 1) % clients.len();
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
