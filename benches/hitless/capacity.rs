//! Benchmark 4, directory capacity: 10,000 instances heartbeating once a second, a
//! cold start, and propagation through a proxy following that directory.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::env::{heartbeat, metric_f64, ms, pct, ratio, Delta, DirectoryProc, Method, Target};

pub const INSTANCES: usize = 10_000;
pub const SERVICES: usize = 1_000;
const CAP_CONNS: usize = 50;
const CAP_TTL_MS: u64 = 3_000;
const CAP_WINDOW: Duration = Duration::from_secs(20);

/// One keep-alive connection heartbeating its share of the instances, each
/// once a second, spread evenly over the second.
#[allow(clippy::too_many_arguments)]
async fn heartbeat_conn(
    addr: SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    offset: Duration,
    catch_up: bool,
    stop: CancellationToken,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let period = Duration::from_secs(1) / requests.len() as u32;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    tick.set_missed_tick_behavior(if catch_up {
        tokio::time::MissedTickBehavior::Burst
    } else {
        tokio::time::MissedTickBehavior::Delay
    });
    let mut stream: Option<tokio::net::TcpStream> = None;
    let mut buf = vec![0u8; 4096];
    let mut i = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if stream.is_none() {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    s.set_nodelay(true).ok();
                    stream = Some(s);
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        match exchange(stream.as_mut().unwrap(), &requests[i], &mut buf).await {
            Ok(true) => ok.fetch_add(1, Ordering::Relaxed),
            Ok(false) => failed.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                stream = None;
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        i = (i + 1) % requests.len();
    }
}

/// One request and its whole answer on a keep-alive connection; true on 200.
async fn exchange(stream: &mut tokio::net::TcpStream, request: &[u8], buf: &mut Vec<u8>) -> std::io::Result<bool> {
    stream.write_all(request).await?;
    let mut have = 0;
    loop {
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if have >= end + 4 + length {
            return Ok(head.starts_with("http/1.1 200"));
        }
    }
}

struct HeartbeatLoad {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HeartbeatLoad {
    fn start(
        addr: SocketAddr,
        shares: &[Arc<Vec<Vec<u8>>>],
        catch_up: bool,
        ok: &Arc<AtomicU64>,
        failed: &Arc<AtomicU64>,
    ) -> HeartbeatLoad {
        let stop = CancellationToken::new();
        let tasks = shares
            .iter()
            .enumerate()
            .map(|(c, share)| {
                let offset = Duration::from_secs(1) / share.len() as u32 * c as u32 / CAP_CONNS as u32;
                tokio::spawn(heartbeat_conn(
                    addr,
                    share.clone(),
                    offset,
                    catch_up,
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                ))
            })
            .collect();
        HeartbeatLoad { stop, tasks }
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// Every instance's `PUT`, split over the connections.
fn heartbeat_requests(addr: SocketAddr, ttl_ms: u64) -> Vec<Arc<Vec<Vec<u8>>>> {
    (0..CAP_CONNS)
        .map(|c| {
            Arc::new(
                (c..INSTANCES)
                    .step_by(CAP_CONNS)
                    .map(|i| {
                        let s = i % SERVICES;
                        let url = format!("http://10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256);
                        let body = heartbeat(&format!("cap{s}"), &url, ttl_ms).to_string();
                        format!(
                            "PUT /v1/instances/cap{s}-i{i} HTTP/1.1\r\nHost: {addr}\r\n\
                             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes()
                    })
                    .collect(),
            )
        })
        .collect()
}

/// Sends each request of `share` once, back to back, on one connection.
async fn register_all(addr: SocketAddr, share: Arc<Vec<Vec<u8>>>, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 4096];
    let mut stream = None;
    for request in share.iter() {
        if stream.is_none() {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).ok();
            stream = Some(s);
        }
        match exchange(stream.as_mut().unwrap(), request, &mut buf).await {
            Ok(true) => ok.fetch_add(1, Ordering::Relaxed),
            Ok(false) => failed.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                stream = None;
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// What the directory does when 10,000 watsons (1/s, TTL 3 s) find it
/// fresh: (seconds, live instances at the end, heartbeats answered per
/// second, snapshots published, expiries, directory CPU in cores).
async fn cold_with_watson_ttl(tmp: &Path) -> (f64, f64, f64, f64, f64, f64) {
    let directory = DirectoryProc::start(tmp, "10s").await;
    let pid = directory.pid();
    let addr: SocketAddr = directory.base.trim_start_matches("http://").parse().unwrap();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let load = HeartbeatLoad::start(addr, &heartbeat_requests(addr, CAP_TTL_MS), false, &ok, &failed);
    tokio::time::sleep(COLD_WINDOW).await;
    let (cpu1, secs) = (cpu_seconds(pid), t0.elapsed().as_secs_f64());
    let answered = ok.load(Ordering::SeqCst) as f64 / secs;
    let m = async |name: &'static str| directory.metric(name).await as f64;
    let (live, published, expired) = (
        m("dstack_directory_instances").await,
        m("dstack_directory_snapshots_published_total").await,
        m("dstack_directory_expiries_total").await,
    );
    load.stop().await;
    (secs, live, answered, published, expired, (cpu1 - cpu0) / secs)
}

/// The first heartbeats' instance ids, as (backend, server) in HAProxy.
fn all_servers() -> Vec<(String, String)> {
    (0..INSTANCES).map(|i| (format!("svc_cap{}", i % SERVICES), format!("cap{}-i{i}", i % SERVICES))).collect()
}

/// Registrations propagated to a proxy that follows the 10,000-instance
/// directory.
struct AtScale {
    method: Method,
    latencies: Vec<Duration>,
    delta: Delta,
    /// sherlock's mean apply time in ms, from its histogram.
    apply_ms: Option<f64>,
    /// The instances it registered, deregistered once every method has run:
    /// a deregistration published late would be the next method's change.
    ids: Vec<String>,
}

async fn propagation_at_scale(tmp: &Path, directory: &DirectoryProc, method: Method) -> AtScale {
    let target = Target::start(method, tmp, directory).await;
    target.wait_servers(&all_servers()).await;
    let before = target.counts(directory).await;
    let apply_metrics = async || {
        let text = target.sherlock_metrics().await?;
        Some((
            metric_f64(&text, "dstack_sherlock_apply_seconds_sum"),
            metric_f64(&text, "dstack_sherlock_apply_seconds_count"),
        ))
    };
    let first = apply_metrics().await;
    let (mut latencies, mut ids) = (Vec::new(), Vec::new());
    for k in 0..SCALE_CHANGES {
        let service = format!("cap{}", (k * 37) % SERVICES);
        let id = format!("{service}-{}-n{k}", method.prefix());
        let hb = heartbeat(&service, &format!("http://10.200.0.{}:8080", k + 1), 600_000);
        let sent = Instant::now();
        directory.put(&id, &hb).await;
        latencies.push(target.until(&format!("svc_{service}"), &id, true, sent).await);
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delta = target.counts(directory).await.since(&before);
    let apply_ms = match (first, apply_metrics().await) {
        (Some((sum0, count0)), Some((sum1, count1))) if count1 > count0 => {
            Some((sum1 - sum0) * 1000.0 / (count1 - count0))
        }
        _ => None,
    };
    target.stop().await;
    AtScale { method, latencies, delta, apply_ms, ids }
}

const COLD_WINDOW: Duration = Duration::from_secs(15);
const SCALE_CHANGES: usize = 20;

pub async fn run() -> String {
    let tmp = tempfile::Builder::new().prefix("dstack-bench").tempdir().unwrap();
    eprintln!("capacity: {INSTANCES} watsons (1/s, ttl 3 s) on a fresh directory for {COLD_WINDOW:?}");
    let cold = cold_with_watson_ttl(tmp.path()).await;

    // A long --max-ttl: registering 10,000 instances from cold takes far
    // longer than watson's 3 s TTL (see above), so the one-off registration
    // asks for a long TTL; the steady load then uses 3 s.
    let directory = DirectoryProc::start(tmp.path(), "600s").await;
    let pid = directory.pid();
    let addr: SocketAddr = directory.base.trim_start_matches("http://").parse().unwrap();
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    // Every instance's first heartbeat is a membership change that rebuilds
    // the snapshot; sent once each, 50 at a time.
    eprintln!("capacity: registering {INSTANCES} instances once each (ttl 600 s)");
    let cpu0 = cpu_seconds(pid);
    let started = Instant::now();
    let tasks: Vec<_> = heartbeat_requests(addr, 600_000)
        .into_iter()
        .map(|share| tokio::spawn(register_all(addr, share, ok.clone(), failed.clone())))
        .collect();
    let mut progress = Vec::new();
    let mut next_sample = Duration::from_secs(10);
    while !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() >= next_sample {
            progress.push((next_sample.as_secs(), ok.load(Ordering::SeqCst)));
            next_sample += Duration::from_secs(10);
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let registered = (started.elapsed(), cpu_seconds(pid) - cpu0, status_mib(pid, "VmHWM:"));
    let registration_failed = failed.load(Ordering::SeqCst);
    eprintln!("capacity: registered in {:.1} s", registered.0.as_secs_f64());

    // Steady state: refreshes only; clients catch up if they fall behind.
    let load = HeartbeatLoad::start(addr, &heartbeat_requests(addr, CAP_TTL_MS), true, &ok, &failed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = async |name: &'static str| directory.metric(name).await as f64;
    let (hb0, pub0, exp0) = (
        m("dstack_directory_heartbeats_total").await,
        m("dstack_directory_snapshots_published_total").await,
        m("dstack_directory_expiries_total").await,
    );
    let (ok0, failed0) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let (cpu0, self0, t0) = (cpu_seconds(pid), cpu_seconds(std::process::id() as i32), Instant::now());
    tokio::time::sleep(CAP_WINDOW).await;
    let (cpu1, self1, secs) = (cpu_seconds(pid), cpu_seconds(std::process::id() as i32), t0.elapsed().as_secs_f64());
    let (ok1, failed1) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let (rss, hwm) = (status_mib(pid, "VmRSS:"), status_mib(pid, "VmHWM:"));
    let (hb1, pub1, exp1) = (
        m("dstack_directory_heartbeats_total").await,
        m("dstack_directory_snapshots_published_total").await,
        m("dstack_directory_expiries_total").await,
    );
    let instances = m("dstack_directory_instances").await;
    // With the heartbeat load still running: propagation at full scale.
    let mut at_scale = Vec::new();
    for method in [Method::Runtime, Method::Naive] {
        eprintln!("capacity: propagation at full scale, {}", method.label());
        at_scale.push(propagation_at_scale(tmp.path(), &directory, method).await);
    }
    for id in at_scale.iter().flat_map(|r| &r.ids) {
        directory.delete(id).await;
    }
    load.stop().await;
    drop(directory);
    drop(tmp);

    let core = (cpu1 - cpu0) / secs;
    let rate = (ok1 - ok0) as f64 / secs;
    let server_rate = (hb1 - hb0) / secs;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## 4. Directory capacity: {INSTANCES} instances heartbeating once a second\n\n\
         {INSTANCES} instances over {SERVICES} services, `ttl_ms` {CAP_TTL_MS}, heartbeated by a \
         tokio client in the bench process over {CAP_CONNS} keep-alive connections (raw HTTP/1.1 `PUT`s, \
         each connection spreading its {} instances evenly over the second). Measured over a {:.0} s \
         window after registration settled: the directory's utime+stime from `/proc/<pid>/stat`, its \
         VmRSS from `/proc/<pid>/status`.\n\n\
         | figure | value | target | verdict |\n|---|---|---|---|\n\
         | directory CPU | {:.3} of one core ({:.1} %) | < 0.5 core | {} |\n\
         | directory resident memory (VmRSS; peak VmHWM) | {:.1} MiB ({:.1} MiB) | < 200 MiB | {} |\n\
         | heartbeat rate achieved (client 200s; directory's own counter) | {:.0}/s ({:.0}/s) | 10,000/s offered | {} |\n\
         | failed heartbeats in the window | {} | 0 | {} |\n\
         | snapshots published / instances expired in the window | {} / {} | 0 / 0 (refreshes change nothing) | {} |\n\
         | live instances at the end | {} | {INSTANCES} | |\n\
         | load client's own CPU (bench process) | {:.2} of one core | — | |",
        INSTANCES / CAP_CONNS,
        secs,
        core,
        core * 100.0,
        if core < 0.5 { "met" } else { "**missed**" },
        rss,
        hwm,
        if rss < 200.0 { "met" } else { "**missed**" },
        rate,
        server_rate,
        if rate >= 0.98 * INSTANCES as f64 { "rate kept" } else { "**rate not kept**" },
        failed1 - failed0,
        if failed1 == failed0 { "met" } else { "**missed**" },
        pub1 - pub0,
        exp1 - exp0,
        if pub1 == pub0 && exp1 == exp0 { "as expected" } else { "**churn**" },
        instances,
        (self1 - self0) / secs,
    );
    let (took, cpu, peak) = registered;
    let curve: Vec<String> = progress.iter().map(|(t, n)| format!("{n} after {t} s")).collect();
    let (cold_secs, cold_live, cold_rate, cold_published, cold_expired, cold_core) = cold;
    let _ = writeln!(
        out,
        "\nThe window above starts from a registry already full. How the registry fills from empty, as after \
         a directory restart (every first heartbeat is a membership change; the directory coalesces the \
         snapshot rebuilds of a burst):\n\n\
         | cold start | figure |\n|---|---|\n\
         | {INSTANCES} watsons' heartbeats (1/s, `ttl_ms` {CAP_TTL_MS}) on a fresh directory, after {cold_secs:.0} s | \
         **{cold_live:.0} live instances**; {cold_rate:.0} heartbeats/s answered; {cold_published:.0} snapshots \
         published; {cold_expired:.0} instances expired; directory CPU {cold_core:.2} core |\n\
         | registering the {INSTANCES} once each, 50 at a time (`ttl_ms` 600000) | **{:.1} s**, {:.1} \
         CPU-seconds: {:.2} ms of CPU per registration on average vs {:.3} ms per refresh; {registration_failed} \
         failed; peak RSS {:.1} MiB; progress {} |\n\n\
         The measured window above registers once with a long TTL, then heartbeats with 3 s, so that it \
         measures refreshes alone.",
        took.as_secs_f64(),
        cpu,
        cpu * 1000.0 / INSTANCES as f64,
        (cpu1 - cpu0) * 1000.0 / (hb1 - hb0).max(1.0),
        peak,
        if curve.is_empty() { "done within 10 s".to_string() } else { curve.join(", ") },
    );
    let naive = at_scale.iter().find(|r| r.method == Method::Naive).map(|r| ms(pct(&r.latencies, 50.0))).unwrap();
    let _ = writeln!(
        out,
        "\nPropagation at full scale: a proxy following this directory ({INSTANCES} instances, {SERVICES} \
         services, the heartbeat load still running); {SCALE_CHANGES} registrations of a new instance, one at a \
         time, timed from the `PUT` to `show servers state` showing the server in service. (Registrations only: \
         this directory is in its 600 s warming period, during which sherlock by design removes nothing.) \
         Reloads as counted by the proxy and by HAProxy (`show proc`; for the naive daemons, the new processes \
         that wrote the pid file).\n\n\
         | method | p50 | max | reloads (own / HAProxy) | HAProxy worker | sherlock's own apply time (mean, from its histogram) | target p99 < 100 ms | naive ÷ this (p50) |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for r in &at_scale {
        let p50 = ms(pct(&r.latencies, 50.0));
        let _ = writeln!(
            out,
            "| {} | {:.1} ms | {:.1} ms | {} | {} | {} | {} | {} |",
            r.method.label(),
            p50,
            ms(pct(&r.latencies, 100.0)),
            r.delta.reloads_cell(),
            r.delta.workers_cell(),
            r.apply_ms.map(|a| format!("{a:.1} ms")).unwrap_or_else(|| "—".into()),
            if ms(pct(&r.latencies, 99.0)) < 100.0 { "met" } else { "**missed**" },
            if r.method == Method::Naive { "—".to_string() } else { ratio(naive, p50) },
        );
    }
    out
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces): state is field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> u64 {
        f.get(n).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("unreadable /proc/{pid}/stat: {stat:?}"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (field(11) + field(12)) as f64 / hz
}

/// A `VmRSS:`-style line of /proc/<pid>/status, in MiB.
fn status_mib(pid: i32, key: &str) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {key}"))
}
