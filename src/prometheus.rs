//! The Prometheus text exposition format (version 0.0.4), written once for
//! the directory's and sherlock's `/metrics`.

use std::fmt::Write as _;

/// The content type of a `/metrics` answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A `/metrics` page being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    /// A monotonic counter.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, "counter", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.header(name, "gauge", help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A histogram: `buckets` pairs each upper bound with its cumulative
    /// count; `sum` is in the unit of the bounds.
    pub fn histogram(&mut self, name: &str, help: &str, buckets: &[(f64, u64)], count: u64, sum: f64) {
        self.header(name, "histogram", help);
        for (bound, n) in buckets {
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(self.out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.out, "{name}_sum {sum}");
        let _ = writeln!(self.out, "{name}_count {count}");
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_text_format() {
        let mut e = Exposition::default();
        e.counter("x_total", "Xs.", 3);
        e.gauge("y", "Y.", 1.5);
        e.histogram("z_seconds", "Z.", &[(0.1, 1), (1.0, 2)], 3, 2.5);
        assert_eq!(
            e.finish(),
            "# HELP x_total Xs.\n# TYPE x_total counter\nx_total 3\n\
             # HELP y Y.\n# TYPE y gauge\ny 1.5\n\
             # HELP z_seconds Z.\n# TYPE z_seconds histogram\n\
             z_seconds_bucket{le=\"0.1\"} 1\nz_seconds_bucket{le=\"1\"} 2\nz_seconds_bucket{le=\"+Inf\"} 3\n\
             z_seconds_sum 2.5\nz_seconds_count 3\n"
        );
    }
}
