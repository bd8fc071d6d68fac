//! watson: checks the liveness of the instances on this host and heartbeats
//! the healthy ones to every configured directory.
//!
//! Each service has one check loop; each (service, directory) pair has its
//! own heartbeat task fed by a `watch` channel, so a directory that is down
//! or slow never delays checks or heartbeats to the others.

pub mod config;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::http::{header, HeaderMap};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::DirectoryClient;
use crate::metrics::{self, Counter, IntGauge, Seconds};
use crate::model::{Heartbeat, InstanceId};
pub use config::{Config, ServiceConfig};

/// What watson counts and times for `/metrics` (`--metrics`); README.md
/// ("Metrics and logs") lists them.
#[derive(Debug)]
pub struct Metrics {
    checks: Counter,
    check_failures: Counter,
    check: Seconds,
    /// Instances registered now (healthy after rise/fall).
    healthy: IntGauge,
    heartbeats: Counter,
    heartbeat_failures: Counter,
    heartbeat: Seconds,
    registry: metrics::Metrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = metrics::Metrics::default();
        Metrics {
            checks: r.counter("dstack_watson_checks", "Liveness checks made."),
            check_failures: r
                .counter("dstack_watson_check_failures", "Liveness checks failed (not 2xx, or no answer)."),
            check: r.seconds("dstack_watson_check", "Time a liveness check took, failed ones included."),
            healthy: r.gauge("dstack_watson_instances_healthy", "Instances passing their checks, so heartbeaten."),
            heartbeats: r.counter("dstack_watson_heartbeats", "Heartbeats a directory accepted."),
            heartbeat_failures: r.counter(
                "dstack_watson_heartbeat_failures",
                "Heartbeats and deregistrations that failed or were refused.",
            ),
            heartbeat: r.seconds("dstack_watson_heartbeat", "Time a directory took to answer a heartbeat."),
            registry: r,
        }
    }
}

/// The rise/fall state machine of one instance. Pure, so it is unit-tested.
#[derive(Debug, Clone)]
pub struct Health {
    rise: u32,
    fall: u32,
    /// Whether the instance is registered now.
    healthy: bool,
    /// Whether it has ever passed: the very first pass registers it at once,
    /// so a fresh instance is not held back `rise` periods.
    ever_passed: bool,
    /// Checks in a row that disagree with `healthy`.
    streak: u32,
}

impl Health {
    pub fn new(rise: u32, fall: u32) -> Health {
        Health { rise, fall, healthy: false, ever_passed: false, streak: 0 }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check; returns the new state when it changed.
    pub fn observe(&mut self, passed: bool) -> Option<bool> {
        if passed == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if passed {
            if self.ever_passed {
                self.rise
            } else {
                1
            }
        } else {
            self.fall
        };
        if passed {
            self.ever_passed = true;
        }
        if self.streak >= needed {
            self.healthy = passed;
            self.streak = 0;
            Some(passed)
        } else {
            None
        }
    }
}

/// Runs every configured service until `shutdown`, then deregisters them all.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let http = config.check_tls.reqwest().build()?;
    let metrics = Arc::new(Metrics::default());
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = config.metrics {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding --metrics {addr}"))?;
        tracing::info!(%addr, "metrics endpoint listening (/metrics)");
        let m = metrics.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move |headers: HeaderMap| async move {
                let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
                let (kind, body) = m.registry.encode(accept);
                ([(header::CONTENT_TYPE, kind)], body)
            }),
        );
        let stop = shutdown.clone();
        tasks.spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await.ok();
        });
    }
    // Each check loop says how its first check went; systemd hears READY
    // once all have.
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let total = config.services.len();
    let (mut unchecked, mut alive) = (total, 0);
    for service in config.services {
        let id = InstanceId::derive(&service.name, &service.version, &service.url);
        tracing::info!(instance = %id, service = %service.name, url = %service.url, version = %service.version, "watching");
        let (state_tx, state_rx) = watch::channel(false);
        for addr in &config.directories {
            // Each request must end well within one period, or heartbeats
            // to this directory fall behind the TTL.
            let client = DirectoryClient::with_tls(
                addr.clone(),
                service.period.clamp(Duration::from_millis(200), Duration::from_secs(5)),
                &config.tls,
            )
            .with_token(config.token.as_ref());
            let m = metrics.clone();
            tasks.spawn(heartbeat_loop(client, id.clone(), service.clone(), state_rx.clone(), m, shutdown.clone()));
        }
        tasks.spawn(check_loop(
            http.clone(),
            id,
            service,
            state_tx,
            metrics.clone(),
            first_tx.clone(),
            shutdown.clone(),
        ));
    }
    drop(first_tx);
    let mut watchdog = crate::systemd::Watchdog::from_env();
    loop {
        tokio::select! {
            joined = tasks.join_next() => if joined.is_none() { break },
            Some(passed) = first_rx.recv(), if unchecked > 0 => {
                unchecked -= 1;
                alive += usize::from(passed);
                if unchecked == 0 {
                    crate::systemd::ready(&format!("first checks done: {alive} of {total} instances alive"));
                }
            }
            _ = watchdog.tick() => crate::systemd::watchdog(),
        }
    }
    Ok(())
}

/// Checks one instance every period and publishes its health.
async fn check_loop(
    http: reqwest::Client,
    id: InstanceId,
    service: ServiceConfig,
    state: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    first_check: tokio::sync::mpsc::UnboundedSender<bool>,
    shutdown: CancellationToken,
) {
    let mut first_check = Some(first_check);
    let mut health = Health::new(service.rise, service.fall);
    let mut last_failure: Option<String> = None;
    let mut every = tokio::time::interval(service.period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let started = Instant::now();
        let outcome = match http.get(&service.check_url).timeout(service.timeout).send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!("status {}", resp.status())),
            // The causes too: a certificate problem must say so.
            Err(e) => Err(crate::client::explain(&e)),
        };
        metrics.check.observe(started.elapsed());
        metrics.checks.inc();
        if outcome.is_err() {
            metrics.check_failures.inc();
        }
        match &outcome {
            // A new reason is logged where it shows by default: an instance
            // that never passes (an untrusted certificate, say) is never
            // deregistered, so nothing else would say why it is missing.
            Err(why) if last_failure.as_ref() != Some(why) => {
                tracing::warn!(instance = %id, check = %service.check_url, %why, "liveness check failed");
                last_failure = Some(why.clone());
            }
            Err(why) => tracing::debug!(instance = %id, check = %service.check_url, %why, "liveness check failed"),
            Ok(()) => last_failure = None,
        }
        if let Some(now_healthy) = health.observe(outcome.is_ok()) {
            match &outcome {
                Ok(()) => tracing::info!(instance = %id, "instance is alive; registering"),
                Err(why) => {
                    tracing::warn!(instance = %id, %why, fall = service.fall, "instance failed its liveness checks; deregistering")
                }
            }
            if now_healthy {
                metrics.healthy.inc();
            } else {
                metrics.healthy.dec();
            }
            state.send_replace(now_healthy);
        }
        if let Some(first) = first_check.take() {
            let _ = first.send(outcome.is_ok());
        }
    }
}

/// How often one heartbeat task sends, and the TTL it asks for: watson's
/// own (its period, and three of them), or, for a directory whose
/// `--max-ttl` is shorter, that TTL and a third of it. Checks keep their
/// own period either way. Pure, so it is unit-tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    pub period: Duration,
    pub ttl: Duration,
}

/// The shortest TTL a directory can make watson use.
const MIN_MAX_TTL: Duration = Duration::from_millis(100);

impl Pace {
    /// The pace the service asks for.
    pub fn wanted(service: &ServiceConfig) -> Pace {
        Pace { period: service.period, ttl: service.ttl() }
    }

    /// `wanted`, or the fastest pace inside `max_ttl`: still three
    /// heartbeats per TTL, so one lost heartbeat does not expire it. The
    /// directory's word is bounded below: a `max_ttl_ms` of 0 (a bug, or a
    /// hostile directory) must not make watson heartbeat in a busy loop.
    pub fn within(wanted: Pace, max_ttl: Duration) -> Pace {
        let max_ttl = max_ttl.max(MIN_MAX_TTL);
        if wanted.ttl <= max_ttl {
            wanted
        } else {
            Pace { period: max_ttl / 3, ttl: max_ttl }
        }
    }
}

/// Heartbeats one instance to one directory while it is healthy, and
/// deregisters it when it turns unhealthy or watson stops.
///
/// The directory says the largest TTL it accepts (in every answer, and in
/// the refusal of a TTL over it): this task heartbeats at the pace that
/// fits that directory, so one watson serves directories with different
/// `--max-ttl`s, each at its own pace.
async fn heartbeat_loop(
    client: DirectoryClient,
    id: InstanceId,
    service: ServiceConfig,
    mut state: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let wanted = Pace::wanted(&service);
    let mut pace = wanted;
    let mut heartbeat = Heartbeat {
        service: service.name.clone(),
        version: service.version.clone(),
        url: service.url.clone(),
        ttl_ms: pace.ttl.as_millis() as u64,
    };
    let mut backoff = Backoff::new(Duration::from_millis(200), pace.period);
    // What the directory was last told: None until the first success.
    let mut told: Option<bool> = None;
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
            changed = state.changed() => if changed.is_err() { break },
        }
        let healthy = *state.borrow_and_update();
        let result = if healthy {
            let started = Instant::now();
            let result = client.heartbeat(&id, &heartbeat).await;
            metrics.heartbeat.observe(started.elapsed());
            if result.is_ok() {
                metrics.heartbeats.inc();
            }
            result.map(|ack| ack.max_ttl_ms.map(Duration::from_millis))
        } else if told != Some(false) {
            client.deregister(&id).await.map(|_| None)
        } else {
            next = tokio::time::Instant::now() + pace.period;
            continue;
        };
        // The largest TTL this directory accepts, if it said; an older
        // directory does not, and its refusal is logged as any other.
        let max_ttl = match &result {
            Ok(max_ttl) => *max_ttl,
            Err(e) => e.max_ttl(),
        };
        let adapted = max_ttl.map(|max| Pace::within(wanted, max)).filter(|p| *p != pace);
        if let Some(new) = adapted {
            log_pace(&id, &client, &service, wanted, new);
            pace = new;
            heartbeat.ttl_ms = pace.ttl.as_millis() as u64;
            backoff = Backoff::new(Duration::from_millis(200), pace.period);
        }
        match result {
            Ok(_) => {
                if told != Some(healthy) {
                    tracing::info!(instance = %id, directory = %client.addr, registered = healthy, "directory told");
                }
                told = Some(healthy);
                backoff.reset();
                next = tokio::time::Instant::now() + pace.period;
            }
            // Refused for its TTL: heartbeat again at once at the new pace.
            Err(_) if adapted.is_some() => {
                told = None;
                next = tokio::time::Instant::now();
            }
            Err(e) => {
                metrics.heartbeat_failures.inc();
                let delay = if e.is_refusal() { pace.period } else { backoff.next_delay() };
                tracing::warn!(instance = %id, error = %e, retry_in = ?delay, "heartbeat failed");
                told = None;
                next = tokio::time::Instant::now() + delay;
            }
        }
    }
    if told != Some(false) {
        match client.deregister(&id).await {
            Ok(_) => tracing::info!(instance = %id, directory = %client.addr, "deregistered at shutdown"),
            Err(e) => {
                tracing::warn!(instance = %id, error = %e, "could not deregister at shutdown; the directory will expire it")
            }
        }
    }
}

/// Says once, when it changes, at which pace one directory is heartbeaten
/// and why: a shorter pace is a WARN (the operator may want to raise the
/// directory's `--max-ttl` or lower watson's period), going back an INFO.
fn log_pace(id: &InstanceId, client: &DirectoryClient, service: &ServiceConfig, wanted: Pace, new: Pace) {
    let show = |d: Duration| humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string();
    if new == wanted {
        tracing::info!(
            instance = %id,
            directory = %client.addr,
            heartbeat_every = %show(new.period),
            ttl = %show(new.ttl),
            "the directory accepts this instance's own TTL again; heartbeating at its own period"
        );
    } else {
        tracing::warn!(
            instance = %id,
            directory = %client.addr,
            max_ttl = %show(new.ttl),
            heartbeat_every = %show(new.period),
            ttl = %show(new.ttl),
            wanted_every = %show(wanted.period),
            wanted_ttl = %show(wanted.ttl),
            check_every = %show(service.period),
            "the directory accepts TTLs up to its --max-ttl only, shorter than 3 x this instance's period: \
             heartbeating to it more often to stay inside it; checks keep their period"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Health, Pace};
    use std::time::Duration;

    #[test]
    fn a_shorter_max_ttl_shortens_the_heartbeat_pace_only() {
        let s = |n| Duration::from_secs(n);
        let wanted = Pace { period: s(30), ttl: s(90) };
        assert_eq!(Pace::within(wanted, s(90)), wanted);
        assert_eq!(Pace::within(wanted, s(3600)), wanted, "a longer max changes nothing");
        assert_eq!(Pace::within(wanted, s(10)), Pace { period: s(10) / 3, ttl: s(10) });
        assert_eq!(Pace::within(wanted, Duration::from_millis(100)).ttl, Duration::from_millis(100));
        let zero = Pace::within(wanted, Duration::ZERO);
        assert_eq!((zero.ttl, zero.period), (super::MIN_MAX_TTL, super::MIN_MAX_TTL / 3), "no busy loop on a max of 0");
    }

    #[test]
    fn first_pass_registers_at_once_then_rise_and_fall_apply() {
        let mut h = Health::new(2, 2);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), Some(true));
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None, "a single failure between passes resets the streak");
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(false));
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(true));
        assert!(h.healthy());
    }

    #[test]
    fn fall_of_one_is_immediate() {
        let mut h = Health::new(1, 1);
        assert_eq!(h.observe(true), Some(true));
        assert_eq!(h.observe(false), Some(false));
        assert_eq!(h.observe(true), Some(true));
    }
}
