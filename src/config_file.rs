//! The one reader of the daemons' YAML config files
//! (`/etc/datawire/{directory,watson,sherlock}.yaml` and watson's service
//! files): every error names the file, line and column.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Yaml { path: PathBuf, line: usize, column: usize, message: String },
}

/// Reads and parses one YAML file. Unknown keys are refused by the target
/// types (`deny_unknown_fields`), so a typo is an error, not a default.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.into(), source })?;
    parse(path, &text)
}

/// Parses YAML text read from `path` (named in errors).
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, FileError> {
    serde_yaml::from_str(text).map_err(|e| {
        let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
        // serde_yaml appends " at line L column C"; the prefix says it already.
        let message = e.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message).to_string();
        FileError::Yaml { path: path.into(), line, column, message }
    })
}

/// A duration in a config file: `30s`, `500ms`, `2m`; a bare number is
/// seconds (as on watson's command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

/// Parses `3`, `0.5` (seconds) or `500ms`, `2s`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    if let Ok(secs) = raw.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 && secs < 1e9 {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(raw.trim())
        .map_err(|_| format!("invalid duration {raw:?}: expected seconds (3, 0.5) or a duration (500ms, 2s, 1m)"))
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Number(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        parse_duration(&text).map(Seconds).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        period: Seconds,
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let path = Path::new("/etc/x.yaml");
        let ok: Sample = parse(path, "period: 2\n").unwrap();
        assert_eq!(ok.period.0, Duration::from_secs(2));
        let ok: Sample = parse(path, "period: 250ms\n").unwrap();
        assert_eq!(ok.period.0, Duration::from_millis(250));
        let err = parse::<Sample>(path, "# c\nperiod: 2\ncolour: red\n").unwrap_err().to_string();
        assert!(err.starts_with("/etc/x.yaml:3:1: unknown field `colour`"), "{err}");
        let err = parse::<Sample>(path, "period: soon\n").unwrap_err().to_string();
        assert!(err.starts_with("/etc/x.yaml:1:") && err.contains("invalid duration \"soon\""), "{err}");
        let err = load::<Sample>(Path::new("/nonexistent/dstack.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("cannot read /nonexistent/dstack.yaml"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in ["-1", "soon", "", "NaN", "inf"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
