//! What an operator's tools read: `/metrics` in a valid exposition format
//! with `dstack_build_info` and histograms, JSON logs, and `--version`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// One metric family as the exposition declared it.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    /// (sample name, labels, value), in order.
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `{a="x",b="y"}` (the braces removed): the labels, or why not.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").ok_or(format!("label without =\"value\": {rest}"))?;
        if !valid_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(labels)
}

/// Checks `text` against the Prometheus text format 0.0.4 or, when
/// `openmetrics`, OpenMetrics 1.0: every line a HELP, TYPE, UNIT or a
/// sample of the family declared last, with the suffixes its type allows,
/// histograms cumulative with `+Inf` equal to `_count`, and `# EOF` last
/// in OpenMetrics. Returns the families by name.
fn check_exposition(text: &str, openmetrics: bool) -> Result<BTreeMap<String, Family>, String> {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut saw_eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if saw_eof {
            return Err(at("a line after # EOF".into()));
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("EOF"), None, None) if openmetrics => saw_eof = true,
                (Some("HELP"), Some(name), Some(help)) if valid_name(name) => {
                    if help.ends_with("..") {
                        return Err(at("a help text ending in two periods".into()));
                    }
                }
                (Some("UNIT"), Some(name), Some(unit)) if openmetrics => {
                    if !name.ends_with(&format!("_{unit}")) {
                        return Err(at(format!("unit {unit} is not the name's suffix")));
                    }
                }
                (Some("TYPE"), Some(name), Some(kind)) if valid_name(name) => {
                    let kinds: &[&str] = if openmetrics {
                        &["counter", "gauge", "histogram", "summary", "info", "stateset", "gaugehistogram", "unknown"]
                    } else {
                        &["counter", "gauge", "histogram", "summary", "untyped"]
                    };
                    if !kinds.contains(&kind) {
                        return Err(at(format!("unknown type {kind}")));
                    }
                    if families
                        .insert(name.to_string(), Family { kind: kind.to_string(), ..Family::default() })
                        .is_some()
                    {
                        return Err(at(format!("{name} declared twice")));
                    }
                    current = Some(name.to_string());
                }
                _ => return Err(at("not a HELP, TYPE, UNIT or EOF line".into())),
            }
            continue;
        }
        if line.is_empty() {
            return Err(at("an empty line".into()));
        }
        // A sample: name[{labels}] value
        let (series, value) = line.rsplit_once(' ').ok_or(at("no value".into()))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at(format!("value {v:?} is not a number")))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').ok_or(at("labels not closed".into()))?;
                (name, parse_labels(inner).map_err(at)?)
            }
            None => (series, BTreeMap::new()),
        };
        let family_name = current.clone().ok_or(at("a sample before any TYPE".into()))?;
        let family = families.get_mut(&family_name).unwrap();
        let suffixes: &[&str] = match (family.kind.as_str(), openmetrics) {
            ("counter", true) => &["_total", "_created"],
            ("histogram", _) => &["_bucket", "_sum", "_count", "_created"],
            ("info", true) => &["_info"],
            _ => &[""],
        };
        if !suffixes.iter().any(|s| name == format!("{family_name}{s}")) {
            return Err(at(format!("{name} is not a sample of {} {family_name}", family.kind)));
        }
        family.samples.push((name.to_string(), labels, value));
    }
    if openmetrics && !saw_eof {
        return Err("no # EOF at the end".into());
    }
    for (name, family) in &families {
        if family.kind != "histogram" {
            continue;
        }
        let buckets: Vec<(f64, f64)> = family
            .samples
            .iter()
            .filter(|(n, ..)| n.ends_with("_bucket"))
            .map(|(_, labels, v)| {
                let le = labels.get("le").ok_or(format!("{name}: a bucket without le"))?;
                let le =
                    if le == "+Inf" { f64::INFINITY } else { le.parse().map_err(|_| format!("{name}: le {le}"))? };
                Ok((le, *v))
            })
            .collect::<Result<_, String>>()?;
        if !buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1) {
            return Err(format!("{name}: buckets not increasing and cumulative: {buckets:?}"));
        }
        let count = family.samples.iter().find(|(n, ..)| n.ends_with("_count")).map(|s| s.2);
        if buckets.last().map(|b| (b.0, Some(b.1))) != Some((f64::INFINITY, count)) {
            return Err(format!("{name}: the +Inf bucket is not the count {count:?}"));
        }
    }
    Ok(families)
}

/// A histogram's `_count`.
fn observations(families: &BTreeMap<String, Family>, name: &str) -> f64 {
    let family = families.get(name).unwrap_or_else(|| panic!("no {name}"));
    assert_eq!(family.kind, "histogram", "{name}");
    family.samples.iter().find(|(n, ..)| n.ends_with("_count")).unwrap().2
}

/// `/metrics` at `url` as asked with `accept`: (content type, body).
async fn scrape(http: &reqwest::Client, url: &str, accept: &str) -> (String, String) {
    let resp = http.get(url).header("accept", accept).send().await.unwrap();
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
    (kind, resp.text().await.unwrap())
}

#[tokio::test]
async fn every_daemon_s_metrics_parse_with_build_info_histograms_and_a_readme_entry() {
    let cluster = Cluster::start().await;
    let instance = Instance::start("a").await;
    let watson_port = free_port();
    let watson_listen = format!("127.0.0.1:{watson_port}");
    let _watson = cluster.watson("alpha", &instance.url("/alpha"), &["--metrics", &watson_listen]);
    // Applied by the sherlock and reported back: every histogram has a sample.
    cluster.wait_for_instances("alpha", 1).await;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let sherlock = format!("http://127.0.0.1:{}/metrics", cluster.admin_port(cluster.sherlock_port));
    let directory = format!("{}/metrics", cluster.directory_url());
    let watson = format!("http://{watson_listen}/metrics");
    let want_build = BTreeMap::from([
        ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("commit".to_string(), env!("DSTACK_GIT_COMMIT").to_string()),
    ]);
    for (url, histograms) in [
        (&directory, &["dstack_directory_heartbeat_seconds", "dstack_directory_snapshot_propagation_seconds"][..]),
        (&sherlock, &["dstack_sherlock_apply_seconds"][..]),
        (&watson, &["dstack_watson_check_seconds", "dstack_watson_heartbeat_seconds"][..]),
    ] {
        // Prometheus asks for OpenMetrics first; curl asks for anything.
        let prometheus_accept = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3";
        for (accept, openmetrics, kind) in [
            ("*/*", false, "text/plain; version=0.0.4; charset=utf-8"),
            (prometheus_accept, true, "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        ] {
            let (got_kind, text) = scrape(&cluster.http, url, accept).await;
            assert_eq!(got_kind, kind, "{url}");
            let families =
                check_exposition(&text, openmetrics).unwrap_or_else(|e| panic!("{url} ({kind}): {e}\n{text}"));
            let build = &families.get("dstack_build_info").unwrap_or_else(|| panic!("{url}: no build_info"));
            assert_eq!(build.kind, "gauge");
            assert_eq!(build.samples, vec![("dstack_build_info".to_string(), want_build.clone(), 1.0)], "{url}");
            for histogram in histograms {
                assert!(observations(&families, histogram) >= 1.0, "{url}: {histogram} has no sample:\n{text}");
            }
            for (name, family) in &families {
                assert!(name.starts_with("dstack_"), "{name}");
                let counted = family.kind != "counter" || openmetrics || name.ends_with("_total");
                assert!(counted, "counter {name} without _total");
                let base = if openmetrics && family.kind == "counter" { format!("{name}_total") } else { name.clone() };
                assert!(readme.contains(&format!("`{base}`")), "{base} is not documented in README.md");
            }
        }
    }
}

/// The non-empty lines of a daemon's log, each parsed as a JSON object.
fn json_lines(proc: &Proc) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let log = proc.log_text();
    log.lines()
        .filter(|l| !l.is_empty())
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(serde_json::Value::Object(o)) => o,
            _ => panic!("{}: not a JSON object: {l:?}\nlog:\n{log}", proc.name),
        })
        .collect()
}

#[tokio::test]
async fn log_format_json_writes_one_object_per_line_with_level_message_target_and_fields() {
    let json = ["--log-format", "json"];
    let cluster = Cluster::directory_alone(&json).await;
    let (_port, sherlock) = cluster.start_sherlock(&json).await;
    let instance = Instance::start("a").await;
    let watson = cluster.watson("alpha", &instance.url("/alpha"), &json);
    // Registered, published, applied: each daemon has logged by then.
    eventually(Duration::from_secs(15), "the instance applied", async || {
        let status = cluster.status().await;
        (status["instances"].as_array()?.len() == 1 && all_applied(&status)).then_some(())
    })
    .await;
    sherlock.wait_for_log("\"message\":\"haproxy.cfg changes", Duration::from_secs(15)).await;
    for proc in [&cluster.directory, &sherlock, &watson] {
        let lines = json_lines(proc);
        assert!(!lines.is_empty(), "{} logged nothing", proc.name);
        for line in &lines {
            let level = line["level"].as_str().unwrap_or_default();
            assert!(["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level), "{}: {line:?}", proc.name);
            assert!(line["fields"]["message"].is_string(), "{}: {line:?}", proc.name);
            assert!(line["target"].as_str().is_some_and(|t| !t.is_empty()), "{}: {line:?}", proc.name);
        }
    }
    // Structured fields stay fields, typed: the directory's publish carries its index.
    let published = json_lines(&cluster.directory)
        .into_iter()
        .find(|l| l["fields"]["message"] == "snapshot published")
        .expect("a publish logged");
    assert!(published["fields"]["index"].as_u64().is_some_and(|i| i >= 1), "{published:?}");
}

#[tokio::test]
async fn log_level_beats_rust_log_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let state = dir.path().join("state");
    // The harness sets RUST_LOG=info,dstack=debug; the flag must win.
    let args =
        ["--listen", &listen, "--state-dir", state.to_str().unwrap(), "--log-format", "json", "--log-level", "warn"];
    let directory = Proc::start(dir.path(), "directory", &args);
    let http = reqwest::Client::new();
    let url = format!("http://{listen}/v1/status");
    eventually(Duration::from_secs(10), "the directory to answer", async || http.get(&url).send().await.ok()).await;
    let lines = json_lines(&directory);
    assert!(
        lines.iter().any(|l| l["fields"]["message"].as_str().is_some_and(|m| m.contains("--log-level warn is given"))),
        "{lines:?}"
    );
    for line in &lines {
        assert!(["WARN", "ERROR"].contains(&line["level"].as_str().unwrap()), "{line:?}");
    }
}

#[test]
fn bad_log_flags_are_refused_with_the_values_accepted() {
    for bin in ["directory", "watson", "sherlock"] {
        for (flag, value, accepted) in
            [("--log-format", "yaml", "text, json"), ("--log-level", "loud", "off, error, warn, info, debug, trace")]
        {
            let out = std::process::Command::new(common::bin(bin)).args([flag, value]).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{bin} {flag} {value}: {err}");
            assert!(err.contains(&format!("invalid value '{value}' for '{flag}")), "{bin}: {err}");
            assert!(err.contains(accepted), "{bin}: {err}");
        }
    }
}

#[test]
fn version_prints_the_version_and_the_commit_built() {
    let commit = env!("DSTACK_GIT_COMMIT");
    let hex12 = commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit());
    assert!(hex12 || commit == "unknown" || std::env::var_os("DSTACK_GIT_COMMIT").is_some(), "{commit}");
    // In a checkout, unless a package build named its own, it is HEAD's.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let (Some(head), None) = (head, std::env::var_os("DSTACK_GIT_COMMIT")) {
        assert_eq!(commit, head);
    }
    let want = |bin: &str| format!("{bin} {} (commit {commit})\n", env!("CARGO_PKG_VERSION"));
    let cases: [(&str, &[&str]); 7] = [
        ("directory", &["--version"]),
        ("sherlock", &["--version"]),
        ("dw", &["--version"]),
        ("dw", &["-V"]),
        ("watson", &["--version"]),
        ("watson", &["-V"]),
        // A flag after it: --version has no value, so it is watson's own.
        ("watson", &["--version", "-d", "x"]),
    ];
    for (bin, args) in cases {
        let out = std::process::Command::new(common::bin(bin)).args(args).output().unwrap();
        assert!(out.status.success(), "{bin} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), want(bin), "{bin} {args:?}");
    }
}
