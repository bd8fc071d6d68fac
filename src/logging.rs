//! The daemons' logs: stderr, as text for people or as one JSON object per
//! line for a log shipper, at the level `--log-level` or `RUST_LOG` sets.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event for people; colored on a terminal.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, fields (with
    /// `message`), and the spans the event happened in.
    Json,
}

/// The least severe events logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// The logging flags every daemon takes; clap refuses other values with
/// the list of those accepted.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogFlags {
    /// How log lines are written to stderr: text, or json (one object per line).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The least severe level logged; given, it beats $RUST_LOG [default: $RUST_LOG, else info].
    #[arg(long, value_enum, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,
}

/// The filter in force: `--log-level` if given, else `RUST_LOG` (its full
/// directive syntax, such as `dstack=debug,info`) if it parses, else
/// `info`. The second value says why a set `RUST_LOG` was not used.
pub fn filter(level: Option<LogLevel>, rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    if let Some(level) = level {
        let ignored = rust_log.map(|v| format!("RUST_LOG={v:?} ignored: --log-level {} is given", level.directive()));
        return (EnvFilter::new(level.directive()), ignored);
    }
    match rust_log.filter(|v| !v.trim().is_empty()) {
        None => (EnvFilter::new("info"), None),
        Some(v) => match EnvFilter::try_new(v) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("RUST_LOG={v:?} ignored ({e}); logging at info"))),
        },
    }
}

/// Starts logging to stderr; call once, before the daemon's `run`.
pub fn init(flags: &LogFlags) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, note) = filter(flags.log_level, rust_log.as_deref());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match flags.log_format {
        LogFormat::Text => {
            use std::io::IsTerminal as _;
            builder.with_ansi(std::io::stderr().is_terminal()).init()
        }
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    if let Some(note) = note {
        tracing::warn!("{note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(level: Option<LogLevel>, rust_log: Option<&str>) -> (String, Option<String>) {
        let (f, note) = filter(level, rust_log);
        (f.to_string(), note)
    }

    #[test]
    fn the_flag_beats_rust_log_which_beats_info() {
        assert_eq!(shown(None, None), ("info".to_string(), None));
        assert_eq!(shown(None, Some("dstack=debug,warn")).0, "dstack=debug,warn");
        let (f, note) = shown(Some(LogLevel::Trace), Some("warn"));
        assert_eq!(f, "trace");
        assert!(note.unwrap().contains("--log-level trace is given"));
        assert_eq!(shown(Some(LogLevel::Error), None), ("error".to_string(), None));
    }

    #[test]
    fn a_bad_rust_log_falls_back_to_info_and_says_so() {
        let (f, note) = shown(None, Some("dstack=loud"));
        assert_eq!(f, "info");
        assert!(note.unwrap().contains("RUST_LOG=\"dstack=loud\" ignored"));
        assert_eq!(shown(None, Some("  ")), ("info".to_string(), None));
    }
}
