//! Benchmark: the hitless figures, each run beside the naive method (render
//! `haproxy.cfg` and `haproxy -sf` on every change, as the original dstack
//! did) in the same run, and reported as figures and as a ratio.
//!
//! `cargo bench --bench hitless [-- NAME...]`, NAME among `propagation`,
//! `failures`, `reloads`, `capacity`, `scale` (all when none is given).
//! Everything runs on 127.0.0.1 in a temp dir; every process it starts
//! (directory, sherlock, HAProxy, wrk) is ended before it returns.
//!
//! 1. propagation: a directory change (PUT or DELETE) until HAProxy's
//!    `show servers state` shows it; p50 and p99 over 200 changes.
//! 2. failures: failed requests under load (wrk keep-alive, plus a client
//!    opening a new connection per request) through 100 instance changes
//!    and through 100 forced reloads, by status code and socket error; the
//!    naive method several times, for its spread.
//! 3. reloads: HAProxy reloads caused by 1,000 instance changes, each
//!    waited for in HAProxy's own state, with the snapshots and applies
//!    that carried them.
//! 4. capacity: the directory's CPU and memory with 10,000 instances
//!    heartbeating once a second.
//! 5. scale: sherlock's render + diff with 1,000 services and 10,000
//!    instances, and one weight change applied to a real HAProxy.
//!
//! Every reload count is read from both sides: the proxy's own counter and
//! HAProxy's (the master CLI's `show proc`). A section that panics, or a
//! tool answer that cannot be read, is reported and makes the run exit
//! non-zero; the other sections still run.

// The end-to-end tests' process and port helpers.
#[path = "../../tests/common/mod.rs"]
mod common;

mod capacity;
mod env;
mod failures;
mod naive;
mod propagation;
mod reloads;
mod scale;

use std::sync::Arc;
use std::time::{Duration, Instant};

use env::Env;

const BENCHES: [&str; 5] = ["propagation", "failures", "reloads", "capacity", "scale"];
/// The sections that follow the shared directory.
const SHARED: [&str; 3] = ["propagation", "failures", "reloads"];

fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&'static str> =
        BENCHES.into_iter().filter(|b| filters.is_empty() || filters.iter().any(|f| b.contains(f.as_str()))).collect();
    if selected.is_empty() {
        eprintln!("hitless: no benchmark matches {filters:?}; choose among {BENCHES:?}");
        std::process::exit(2);
    }
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (report, failed) = rt.block_on(run(selected));
    rt.shutdown_timeout(Duration::from_secs(5));
    println!("\n==================== report (markdown) ====================\n");
    println!("{report}");
    println!("whole run: {:.0} s", started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        eprintln!("hitless: FAILED: {}", failed.join(", "));
        std::process::exit(1);
    }
}

/// Runs the sections in order; the report and the sections that failed.
async fn run(selected: Vec<&'static str>) -> (String, Vec<&'static str>) {
    let mut out = env::machine();
    println!("{out}");
    let mut failed = Vec::new();
    let env = if selected.iter().any(|b| SHARED.contains(b)) {
        // Its own task too: a directory that does not start fails the
        // sections that need it, not the others.
        match tokio::spawn(Env::start()).await {
            Ok(env) => Some(Arc::new(env)),
            Err(e) => {
                let why = panic_text(e);
                for name in selected.iter().filter(|b| SHARED.contains(b)) {
                    out.push_str(&format!("\n## {name}\n\n**FAILED**: the shared directory did not start: {why}\n"));
                    failed.push(*name);
                }
                None
            }
        }
    } else {
        None
    };
    for name in selected {
        if failed.contains(&name) {
            continue;
        }
        let env = env.clone();
        let t0 = Instant::now();
        eprintln!("--- {name} ...");
        // Each in its own task: a panic in one is reported, the others still run.
        let section = tokio::spawn(async move {
            match name {
                "propagation" => propagation::run(env.unwrap()).await,
                "failures" => failures::run(env.unwrap()).await,
                "reloads" => reloads::run(env.unwrap()).await,
                "capacity" => capacity::run().await,
                "scale" => scale::run().await,
                _ => unreachable!(),
            }
        })
        .await;
        let text = match section {
            Ok(text) => text,
            Err(e) => {
                failed.push(name);
                format!("\n## {name}\n\n**FAILED**: {}\n", panic_text(e))
            }
        };
        let text = format!("{text}\n_{name}: {:.0} s of wall time._\n", t0.elapsed().as_secs_f64());
        println!("{text}");
        out.push_str(&text);
    }
    if let Some(env) = env {
        match Arc::try_unwrap(env) {
            Ok(env) => env.stop().await,
            Err(_) => eprintln!("hitless: the shared directory is still in use; it ends with the process"),
        }
    }
    (out, failed)
}

/// What a section's panic said.
fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}
