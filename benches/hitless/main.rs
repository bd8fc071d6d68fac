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
//!
//! `DSTACK_BENCH_SECURE=1` runs sections 1 to 3 with tokens and TLS, as on
//! a real network: the shared directory serves TLS (a private CA made at
//! run time) with an auth file, the bench heartbeats with a watson token,
//! and sherlock and the naive loop subscribe with a sherlock token.
//! `DSTACK_BENCH_SECURE=both` runs each of them twice, plain then secure
//! against two directories started side by side, and ends with a table of
//! each figure in both modes and their ratio. Sections 4 and 5 stay plain:
//! 5 touches no network, and 4's load client speaks raw HTTP (what TLS
//! costs per heartbeat is measured by `what_tls_costs` in tests/tls.rs).

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

use common::panic_text;
use env::{Env, Figure, Section, Wire};

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
    let wires = match std::env::var("DSTACK_BENCH_SECURE").as_deref() {
        Err(_) | Ok("" | "0") => vec![Wire::Plain],
        Ok("1") => vec![Wire::Secure],
        Ok("both") => vec![Wire::Plain, Wire::Secure],
        Ok(other) => {
            eprintln!(
                "hitless: DSTACK_BENCH_SECURE={other:?}: expected 1 (tokens and TLS), both (plain, then secure), or 0"
            );
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (report, failed) = rt.block_on(run(selected, wires));
    rt.shutdown_timeout(Duration::from_secs(5));
    println!("\n==================== report (markdown) ====================\n");
    println!("{report}");
    println!("whole run: {:.0} s", started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        eprintln!("hitless: FAILED: {}", failed.join(", "));
        std::process::exit(1);
    }
}

/// Runs the sections in order, the shared ones once per wire; the report
/// and the sections that failed.
async fn run(selected: Vec<&'static str>, wires: Vec<Wire>) -> (String, Vec<&'static str>) {
    let mut out = env::machine();
    let labels: Vec<&str> = wires.iter().map(|w| w.label()).collect();
    out.push_str(&format!("\nSections 1 to 3: {}.\n", labels.join(", then ")));
    println!("{out}");
    let mut failed = Vec::new();
    let mut envs: Vec<Arc<Env>> = Vec::new();
    if selected.iter().any(|b| SHARED.contains(b)) {
        // Started together (each waits out its warming), each in its own
        // task: a directory that does not start fails the sections that
        // need it, not the others.
        let starts: Vec<_> = wires.iter().map(|w| tokio::spawn(Env::start(*w))).collect();
        for start in starts {
            match start.await {
                Ok(env) => envs.push(Arc::new(env)),
                Err(e) => {
                    let why = panic_text(e);
                    for name in selected.iter().filter(|b| SHARED.contains(b)) {
                        if !failed.contains(name) {
                            out.push_str(&format!(
                                "\n## {name}\n\n**FAILED**: a shared directory did not start: {why}\n"
                            ));
                            failed.push(*name);
                        }
                    }
                }
            }
        }
        if envs.len() < wires.len() {
            envs.clear();
        }
    }
    // Each wire's figures, to set side by side.
    let mut figures: Vec<(Wire, Vec<Figure>)> = Vec::new();
    for name in selected {
        if failed.contains(&name) {
            continue;
        }
        let runs: Vec<Option<Arc<Env>>> =
            if SHARED.contains(&name) { envs.iter().cloned().map(Some).collect() } else { vec![None] };
        for env in runs {
            let wire = env.as_ref().map(|e| e.wire);
            let t0 = Instant::now();
            let mode = match wire {
                Some(w) if wires.len() > 1 => format!(" ({})", w.label()),
                _ => String::new(),
            };
            eprintln!("--- {name}{mode} ...");
            // Each in its own task: a panic in one is reported, the others still run.
            let section = tokio::spawn(async move {
                let plain = |text: String| Section { text, figures: Vec::new() };
                match name {
                    "propagation" => propagation::run(env.unwrap()).await,
                    "failures" => failures::run(env.unwrap()).await,
                    "reloads" => reloads::run(env.unwrap()).await,
                    "capacity" => plain(capacity::run().await),
                    "scale" => plain(scale::run().await),
                    _ => unreachable!(),
                }
            })
            .await;
            let text = match section {
                Ok(section) => {
                    if let Some(wire) = wire {
                        figures.push((wire, section.figures));
                    }
                    section.text
                }
                Err(e) => {
                    if !failed.contains(&name) {
                        failed.push(name);
                    }
                    format!("\n## {name}\n\n**FAILED**: {}\n", panic_text(e))
                }
            };
            // A section's title names its wire when both run.
            let text = match text.split_once("\n\n") {
                Some((title, rest)) if !mode.is_empty() => format!("{title}{mode}\n\n{rest}"),
                _ => text,
            };
            let text = format!("{text}\n_{name}{mode}: {:.0} s of wall time._\n", t0.elapsed().as_secs_f64());
            println!("{text}");
            out.push_str(&text);
        }
    }
    if wires.len() > 1 {
        let text = side_by_side(&figures);
        println!("{text}");
        out.push_str(&text);
    }
    for env in envs {
        match Arc::try_unwrap(env) {
            Ok(env) => env.stop().await,
            Err(_) => eprintln!("hitless: a shared directory is still in use; it ends with the process"),
        }
    }
    (out, failed)
}

/// Every figure of the plain runs beside the same figure of the secure
/// runs, and secure ÷ plain.
fn side_by_side(figures: &[(Wire, Vec<Figure>)]) -> String {
    let of = |wire: Wire| -> Vec<&Figure> {
        figures.iter().filter(|(w, _)| *w == wire).flat_map(|(_, f)| f.iter()).collect()
    };
    let secure = of(Wire::Secure);
    let mut out = String::from(
        "\n## Tokens and TLS beside plain HTTP\n\n\
         Each figure of sections 1 to 3 from this run, with the shared directory plain (auth off on \
         loopback, as in the demo) and with tokens and TLS (a private CA, an auth file; the bench \
         heartbeats with a watson token, sherlock and the naive loop subscribe with a sherlock token, \
         all over https). Both directories ran side by side; each section ran plain, then secure.\n\n\
         | figure | plain | tokens + TLS | TLS ÷ plain |\n|---|---|---|---|\n",
    );
    let show = |f: &Figure| match f.unit {
        "" => format!("{}", f.value),
        unit => format!("{:.1} {unit}", f.value),
    };
    for p in of(Wire::Plain) {
        let Some(s) = secure.iter().find(|s| s.name == p.name) else { continue };
        let ratio = if p.value == 0.0 && s.value == 0.0 {
            "= (both 0)".to_string()
        } else if p.value == 0.0 {
            "—".to_string()
        } else {
            format!("{:.2}", s.value / p.value)
        };
        // The leading section number only orders the rows.
        let name = p.name.split_once(' ').map(|(_, n)| n).unwrap_or(&p.name);
        out.push_str(&format!("| {name} | {} | {} | {ratio} |\n", show(p), show(s)));
    }
    out
}
