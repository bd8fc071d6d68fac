//! The chaos suite (issue 10): each fault below is played under continuous
//! load through sherlock, keep-alive and new-connection clients together;
//! every request and every failure (by kind) is counted, HAProxy's weights
//! are read from its runtime socket every 50 ms and compared with git's,
//! and one table comes out: fault | requests | failed | routes intact |
//! time to recover.
//!
//! `cargo bench --bench chaos [-- N...]` plays the faults numbered N (all
//! when none is given), e.g. `-- 7 12`; `14` plays 14a and 14b, `14b`
//! one. Loopback only, in a temp dir; every process it starts (directories,
//! watsons, instances, sherlock, HAProxy) is ended before it returns, on a
//! panic too. It needs `haproxy` and `git`
//! on the PATH, and root for the run dir's tmpfs (fault 14). It exits 1
//! when a fault misses the goal or could not be played.
//!
//! The faults, as [`faults::FAULTS`] lists them: the directory SIGKILLed
//! and restarted with its remote reachable (1) and unreachable (2), down
//! for 30 s (3), one of two SIGKILLed (4); sherlock SIGKILLed and restarted
//! while the directory is silent (5); HAProxy's worker (6) and master (7)
//! SIGKILLed; an instance SIGKILLed (8), SIGSTOPped for 20 s (9), answering
//! 5 s late (10); the git remote hanging (11); a force-push rewind (12); a
//! commit deleting all routes (13); the run dir full (14a) or read-only
//! (14b) during an apply; a watson SIGKILLed with its instance (15).

// The end-to-end tests' process and repo helpers.
#[path = "../../tests/common/mod.rs"]
mod common;

mod env;
mod faults;
mod gitserver;
mod load;

use std::time::{Duration, Instant};

/// The first argument that makes this binary an instance of the suite
/// (re-executed, so that it can be SIGKILLed and SIGSTOPped for real).
pub const INSTANCE_FLAG: &str = "--chaos-instance";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(INSTANCE_FLAG) {
        instance(&args[2], args[3].parse().expect("an instance's port"));
        return;
    }
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` plays.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let filters: Vec<String> = args.iter().skip(1).filter(|a| !a.starts_with('-')).cloned().collect();
    let selected: Vec<&'static faults::Fault> = faults::FAULTS
        .iter()
        .filter(|f| filters.is_empty() || filters.iter().any(|n| n == f.number || n == f.id))
        .collect();
    if selected.is_empty() {
        let numbers: Vec<&str> = faults::FAULTS.iter().map(|f| f.id).collect();
        eprintln!("chaos: no fault numbered {filters:?}; choose among {numbers:?}");
        std::process::exit(2);
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let rows = rt.block_on(faults::run(selected));
    rt.shutdown_timeout(Duration::from_secs(5));
    println!("\n==================== chaos (markdown) ====================\n");
    println!("{}", faults::table(&rows));
    println!("whole run: {:.0} s", started.elapsed().as_secs_f64());
    let short: Vec<&str> = rows.iter().filter(|r| !r.met()).map(|r| r.id()).collect();
    if !short.is_empty() {
        eprintln!("chaos: goal not met or fault not played: {}", short.join(", "));
        std::process::exit(1);
    }
}

/// An instance: answers `NAME URI` (and `alive` on `.../liveness_check`);
/// after SIGUSR1 every answer comes 5 s late, after SIGUSR2 on time again.
fn instance(name: &str, port: u16) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("chaos instance {name}: binding {port}: {e}");
                std::process::exit(1);
            }
        };
        let slow = Arc::new(AtomicBool::new(false));
        for (kind, value) in [(libc::SIGUSR1, true), (libc::SIGUSR2, false)] {
            let mut signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(kind)).unwrap();
            let slow = slow.clone();
            tokio::spawn(async move {
                while signal.recv().await.is_some() {
                    slow.store(value, Ordering::SeqCst);
                }
            });
        }
        let name = name.to_string();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let (slow, name) = (slow.clone(), name.clone());
            async move {
                if slow.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                if uri.path().ends_with("/liveness_check") {
                    "alive".to_string()
                } else {
                    format!("{name} {uri}")
                }
            }
        });
        axum::serve(listener, app).await.ok();
    });
}
