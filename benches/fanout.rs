//! Benchmark: the directory's snapshot fan-out. A real directory holding
//! 10,000 instances over 1,000 services (registered through the API), N
//! subscribers speaking the real blocking-query protocol (as sherlock
//! does: its name, its client, the snapshot it holds, `wait=30s`), and 20
//! membership changes 250 ms apart. For N = 10, 100, 300, 1000, plain JSON
//! and gzip:
//!
//! - the time from a change (its `PUT` or `DELETE` sent) until each
//!   subscriber has read the whole answer holding it: p50, p99, max;
//! - the directory's CPU over the changes, in cores (utime + stime from
//!   `/proc/PID/stat`);
//! - the bytes sent per change per subscriber (answer bodies).
//!
//! `cargo bench --bench fanout [-- N...]` (all four N when none is given).
//! The subscribers read every body whole but do not parse it (only its
//! first bytes, for the index): a sherlock's parse costs its own host, not
//! the directory. They share the machine's cores with the directory, so
//! the latencies are upper bounds of what the directory alone would give.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dstack::model::Heartbeat;
use dstack::protocol::WriteAck;
use tokio_util::sync::CancellationToken;

const SERVICES: usize = 1_000;
const INSTANCES: usize = 10_000;
const CHANGES: usize = 20;
const APART: Duration = Duration::from_millis(250);
const SUBSCRIBERS: [usize; 4] = [10, 100, 300, 1_000];
/// Long enough that no instance expires during the run.
const TTL_MS: u64 = 600_000;
/// main before this change, measured the same way (issue 12): N, p50 ms,
/// p99 ms, cores.
const BEFORE: [(usize, &str, &str, &str); 3] =
    [(10, "37", "-", "0.16"), (100, "189", "-", "0.97"), (300, "505", "601", "1.36")];

fn main() {
    // `cargo test --all-targets` runs bench targets too; only `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let wanted: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let counts: Vec<usize> = if wanted.is_empty() { SUBSCRIBERS.to_vec() } else { wanted };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run(&counts));
}

/// One subscriber's answers: (index, when its body was read, its bytes).
type Answers = Vec<(u64, Instant, usize)>;

struct Run {
    n: usize,
    gzip: bool,
    latencies: Vec<Duration>,
    cores: f64,
    bytes_per_change: f64,
    errors: u64,
    missed: usize,
}

async fn run(counts: &[usize]) {
    let tmp = tempfile::Builder::new().prefix("dstack-fanout").tempdir().unwrap();
    let (base, directory) = common::lone_directory(tmp.path(), &["--max-ttl", "10m"]).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .unwrap();
    let started = Instant::now();
    register_all(&http, &base).await;
    let plain = http.get(format!("{base}/v1/snapshot")).send().await.unwrap().bytes().await.unwrap();
    let gzipped = http
        .get(format!("{base}/v1/snapshot"))
        .header(reqwest::header::ACCEPT_ENCODING, "gzip")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    println!(
        "fanout: {INSTANCES} instances over {SERVICES} services registered in {:.1} s; snapshot {} KB plain, {} KB gzip",
        started.elapsed().as_secs_f64(),
        plain.len() / 1000,
        gzipped.len() / 1000
    );
    sherlock_memory(&http, tmp.path(), &base).await;
    println!("{CHANGES} membership changes {} ms apart per row\n", APART.as_millis());
    println!(
        "{:>5} {:>5} {:>9} {:>9} {:>9} {:>7} {:>12} {:>7}",
        "N", "body", "p50 ms", "p99 ms", "max ms", "cores", "KB/chg/sub", "errors"
    );
    let mut runs = Vec::new();
    let mut change = 0;
    for &n in counts {
        for gzip in [false, true] {
            let r = fan_out(&http, &base, directory.pid(), n, gzip, &mut change).await;
            print_run(&r);
            runs.push(r);
        }
    }
    println!("\nmain before this change (issue 12, plain JSON): N, p50 ms, p99 ms, cores");
    for (n, p50, p99, cores) in BEFORE {
        println!("{n:>5} {p50:>9} {p99:>9} {cores:>7}");
    }
    drop(directory);
}

/// A real sherlock (and its HAProxy) following the 10,000 instances: its
/// resident memory once it has applied them (issue 12: < 100 MiB).
async fn sherlock_memory(http: &reqwest::Client, dir: &std::path::Path, base: &str) {
    let index = |v: &serde_json::Value| v["index"].as_u64().unwrap_or(0);
    let wanted = index(&http.get(format!("{base}/v1/status")).send().await.unwrap().json().await.unwrap());
    let (listen, admin) = (common::free_port(), common::free_port());
    let run_dir = dir.join("sherlock");
    let args = [
        "-d".to_string(),
        base.to_string(),
        "--listen".into(),
        format!("127.0.0.1:{listen}"),
        "--admin".into(),
        format!("127.0.0.1:{admin}"),
        "--run-dir".into(),
        run_dir.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sherlock = common::Proc::start(dir, "sherlock", &args);
    let started = Instant::now();
    let status = format!("http://127.0.0.1:{admin}/status");
    loop {
        let applied = match http.get(&status).send().await {
            Ok(resp) => resp.json::<serde_json::Value>().await.ok().and_then(|v| v["applied_index"].as_u64()),
            Err(_) => None,
        };
        if applied.is_some_and(|a| a >= wanted) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "sherlock did not apply 10,000 instances in 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kib = |field: &str| -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", sherlock.pid())).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix(" kB")?.trim().parse().ok()).unwrap_or(0)
    };
    let haproxy_kib: u64 = common::haproxy_pids(&run_dir)
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|t| {
            t.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok())
        })
        .sum();
    println!(
        "sherlock following {INSTANCES} instances: applied in {:.1} s; RSS {:.1} MiB (peak {:.1} MiB); its HAProxy processes {:.1} MiB",
        started.elapsed().as_secs_f64(),
        kib("VmRSS:") as f64 / 1024.0,
        kib("VmHWM:") as f64 / 1024.0,
        haproxy_kib as f64 / 1024.0
    );
    drop(sherlock);
}

fn print_run(r: &Run) {
    let mut l = r.latencies.clone();
    l.sort();
    let pct = |p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied();
    let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0));
    let missed = if r.missed > 0 { format!(" ({} never seen)", r.missed) } else { String::new() };
    println!(
        "{:>5} {:>5} {:>9} {:>9} {:>9} {:>7.2} {:>12.1} {:>7}{missed}",
        r.n,
        if r.gzip { "gzip" } else { "json" },
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(l.last().copied()),
        r.cores,
        r.bytes_per_change / 1000.0,
        r.errors
    );
}

fn heartbeat(service: usize, i: usize) -> String {
    let hb = Heartbeat {
        service: format!("svc{service}").parse().unwrap(),
        version: if i.is_multiple_of(10) { "v2" } else { "v1" }.parse().unwrap(),
        url: format!("http://10.{}.{}.{}:8080/svc{service}", i / 65536, (i / 256) % 256, i % 256).parse().unwrap(),
        ttl_ms: TTL_MS,
    };
    serde_json::to_string(&hb).unwrap()
}

/// Registers every instance through the API, 32 requests at a time.
async fn register_all(http: &reqwest::Client, base: &str) {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..32 {
        let (http, base) = (http.clone(), base.to_string());
        tasks.spawn(async move {
            for i in (c..INSTANCES).step_by(32) {
                let s = i % SERVICES;
                let resp = http
                    .put(format!("{base}/v1/instances/svc{s}-i{i}"))
                    .header("content-type", "application/json")
                    .body(heartbeat(s, i))
                    .send()
                    .await
                    .unwrap();
                assert!(resp.status().is_success(), "registering svc{s}-i{i}: {}", resp.status());
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
}

/// The epoch and index at the start of a snapshot body, decoding only its
/// first bytes.
fn snapshot_id(head: &[u8], gzip: bool) -> Option<(u64, u64)> {
    let mut text = vec![0u8; 96];
    if gzip {
        let mut d = flate2::read::GzDecoder::new(head);
        let mut n = 0;
        while n < text.len() {
            match d.read(&mut text[n..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        text.truncate(n);
    } else {
        text = head[..head.len().min(96)].to_vec();
    }
    let text = std::str::from_utf8(&text).ok()?;
    let number = |key: &str| -> Option<u64> {
        let rest = &text[text.find(key)? + key.len()..];
        rest[..rest.find(|c: char| !c.is_ascii_digit())?].parse().ok()
    };
    Some((number("\"epoch\":")?, number("\"index\":")?))
}

/// One subscriber: blocking queries back to back, as sherlock makes them.
async fn subscriber(
    http: reqwest::Client,
    base: String,
    me: usize,
    gzip: bool,
    latest: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Answers {
    let (mut epoch, mut index) = (0, 0);
    let mut answers = Answers::new();
    loop {
        let url = format!(
            "{base}/v1/snapshot?epoch={epoch}&index={index}&wait=30s&sherlock=fan{me}&client=host{me}\
             &applied_epoch={epoch}&applied={index}"
        );
        let mut req = http.get(url);
        if gzip {
            req = req.header(reqwest::header::ACCEPT_ENCODING, "gzip");
        }
        let answer = async {
            let mut resp = req.send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let (mut head, mut bytes) = (Vec::new(), 0);
            while let Some(chunk) = resp.chunk().await.ok()? {
                if head.len() < 4096 {
                    head.extend_from_slice(&chunk[..chunk.len().min(4096)]);
                }
                bytes += chunk.len();
            }
            Some((head, bytes))
        };
        let answer = tokio::select! {
            _ = stop.cancelled() => return answers,
            a = answer => a,
        };
        let Some((head, bytes)) = answer else {
            errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let now = Instant::now();
        match snapshot_id(&head, gzip) {
            Some((e, i)) => {
                (epoch, index) = (e, i);
                answers.push((i, now, bytes));
                latest.store(i, Ordering::Release);
            }
            None => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Waits until every subscriber holds `index` or later; false after `limit`.
async fn all_hold(latest: &[Arc<AtomicU64>], index: u64, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if latest.iter().all(|l| l.load(Ordering::Acquire) >= index) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Directory CPU seconds so far (user + system).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// One membership change: a new instance of some service, or its removal.
async fn membership_change(http: &reqwest::Client, base: &str, change: usize) -> u64 {
    let i = INSTANCES + change / 2;
    let s = (change / 2 * 37) % SERVICES;
    let url = format!("{base}/v1/instances/svc{s}-extra{i}");
    let req = if change.is_multiple_of(2) {
        http.put(url).header("content-type", "application/json").body(heartbeat(s, i))
    } else {
        http.delete(url)
    };
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "change {change}: {}", resp.status());
    let ack = resp.json::<WriteAck>().await.unwrap();
    assert_ne!(ack.removed, Some(false), "change {change} removed nothing");
    ack.index
}

async fn fan_out(http: &reqwest::Client, base: &str, pid: i32, n: usize, gzip: bool, change: &mut usize) -> Run {
    // Even changes add an instance and odd ones remove it: start on an even one.
    *change += *change % 2;
    let stop = CancellationToken::new();
    let errors = Arc::new(AtomicU64::new(0));
    let latest: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let tasks: Vec<_> = (0..n)
        .map(|me| {
            tokio::spawn(subscriber(
                http.clone(),
                base.to_string(),
                me,
                gzip,
                latest[me].clone(),
                errors.clone(),
                stop.clone(),
            ))
        })
        .collect();
    // Every subscriber holds the snapshot in force before the first change.
    let status: serde_json::Value = http.get(format!("{base}/v1/status")).send().await.unwrap().json().await.unwrap();
    let index = status["index"].as_u64().unwrap();
    assert!(all_hold(&latest, index, Duration::from_secs(120)).await, "{n} subscribers did not all start");
    let errors_before = errors.load(Ordering::Relaxed);

    let (cpu0, t_start) = (cpu_seconds(pid), Instant::now());
    let mut changes = Vec::new();
    for k in 0..CHANGES {
        let sent = Instant::now();
        let index = membership_change(http, base, *change).await;
        *change += 1;
        changes.push((index, sent));
        tokio::time::sleep_until((t_start + APART * (k as u32 + 1)).into()).await;
    }
    let last = changes.last().unwrap().0;
    all_hold(&latest, last, Duration::from_secs(60)).await;
    let cpu1 = cpu_seconds(pid);
    let secs = t_start.elapsed().as_secs_f64();
    stop.cancel();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }

    let (mut latencies, mut missed, mut bytes) = (Vec::new(), 0, 0usize);
    for seen in &answers {
        for &(index, sent) in &changes {
            match seen.iter().find(|(i, at, _)| *i >= index && *at >= sent) {
                Some((_, at, _)) => latencies.push(at.duration_since(sent)),
                None => missed += 1,
            }
        }
        bytes += seen.iter().filter(|(_, at, _)| *at >= t_start).map(|(_, _, b)| b).sum::<usize>();
    }
    Run {
        n,
        gzip,
        latencies,
        cores: (cpu1 - cpu0) / secs,
        bytes_per_change: bytes as f64 / (n * CHANGES) as f64,
        errors: errors.load(Ordering::Relaxed) - errors_before,
        missed,
    }
}
