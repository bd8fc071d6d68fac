//! `/metrics`, written by the official `prometheus-client` crate: each
//! daemon registers its counters, gauges and histograms in a [`Registry`]
//! once, and every scrape encodes it. README.md lists every metric.
//!
//! A scraper that asks for OpenMetrics (Prometheus does, in its `Accept`)
//! gets it; anything else (curl, a script) gets the classic Prometheus text
//! format 0.0.4. Both write a counter's samples as `name_total`.

use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, text as openmetrics_text};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::build_info;

pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::gauge::Gauge as IntGauge;

/// Upper bounds (seconds) of the latency histograms' buckets: 1 ms to 10 s,
/// which covers a heartbeat (sub-millisecond) and a slow git fetch alike.
const LATENCY_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A histogram of durations, in seconds.
#[derive(Debug, Clone)]
pub struct Seconds(Histogram);

impl Default for Seconds {
    fn default() -> Self {
        Seconds(Histogram::new(LATENCY_BUCKETS))
    }
}

impl Seconds {
    pub fn observe(&self, took: Duration) {
        self.0.observe(took.as_secs_f64());
    }
}

/// A daemon's metrics registry: `dstack_build_info` is in it from the start.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        info.get_or_create(&vec![("version", build_info::VERSION), ("commit", build_info::COMMIT)]).set(1);
        registry.register("dstack_build_info", "The version and git commit running (always 1)", info);
        Metrics { registry }
    }
}

impl Metrics {
    /// A counter; `name` without its `_total` suffix, which the encoders add.
    pub fn counter(&mut self, name: &str, help: &str) -> Counter {
        let counter = Counter::default();
        self.registry.register(name, sentence(help), counter.clone());
        counter
    }

    /// A value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str) -> IntGauge {
        let gauge = IntGauge::default();
        self.registry.register(name, sentence(help), gauge.clone());
        gauge
    }

    /// A latency histogram; `name` without its `_seconds` suffix, which
    /// the unit adds.
    pub fn seconds(&mut self, name: &str, help: &str) -> Seconds {
        let histogram = Seconds::default();
        self.registry.register_with_unit(name, sentence(help), Unit::Seconds, histogram.0.clone());
        histogram
    }

    /// The `/metrics` answer for a request with this `Accept` header:
    /// (content type, body).
    pub fn encode(&self, accept: Option<&str>) -> (&'static str, String) {
        let mut out = String::new();
        // Writing to a String cannot fail.
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            let _ = openmetrics_text::encode(&mut out, &self.registry);
            (OPENMETRICS_CONTENT_TYPE, out)
        } else {
            let _ = prometheus_text::encode(&mut out, &self.registry);
            (prometheus_text::CONTENT_TYPE, out)
        }
    }
}

/// A help text without its final period: the encoders add one.
fn sentence(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

/// The OpenMetrics 1.0 text format's content type.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_histograms_and_build_info_in_both_formats() {
        let mut m = Metrics::default();
        let c = m.counter("dstack_test_things", "Things.");
        let g = m.gauge("dstack_test_level", "Level.");
        let h = m.seconds("dstack_test_wait", "Wait.");
        c.inc_by(3);
        g.set(-2);
        h.observe(Duration::from_millis(2));
        let (kind, text) = m.encode(None);
        assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
        for line in [
            "# TYPE dstack_test_things_total counter",
            "dstack_test_things_total 3",
            "dstack_test_level -2",
            "# TYPE dstack_test_wait_seconds histogram",
            "dstack_test_wait_seconds_bucket{le=\"0.001\"} 0",
            "dstack_test_wait_seconds_bucket{le=\"0.0025\"} 1",
            "dstack_test_wait_seconds_bucket{le=\"+Inf\"} 1",
            "dstack_test_wait_seconds_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        // One period: the encoder adds it to a help text without one.
        assert!(text.lines().any(|l| l == "# HELP dstack_test_things_total Things."), "{text}");
        let build =
            format!("dstack_build_info{{version=\"{}\",commit=\"{}\"}} 1", build_info::VERSION, build_info::COMMIT);
        assert!(text.lines().any(|l| l == build), "{build} missing from:\n{text}");

        let (kind, text) = m.encode(Some("application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1"));
        assert_eq!(kind, OPENMETRICS_CONTENT_TYPE);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.lines().any(|l| l == "# UNIT dstack_test_wait_seconds seconds"), "{text}");
        assert!(text.lines().any(|l| l == "dstack_test_things_total 3"), "{text}");
    }
}
