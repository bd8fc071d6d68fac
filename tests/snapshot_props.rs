//! Property tests of sherlock's decoder and renderer (issue 9): random bytes
//! and random snapshot-shaped JSON, with newlines, `#`, quotes, spaces and
//! unicode in every field, never produce a `haproxy.cfg` line outside the
//! built-in template's grammar.
//!
//! The grammar here is written independently of the renderer's own line
//! check: the template's fixed lines come from the golden file, and each
//! line with values is matched by hand, value by value.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use dstack::model::{ClientName, Snapshot};
use dstack::sherlock::render::{Renderer, Site};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};

const CASES: u32 = 256;

fn site() -> Site {
    Site { bind: "127.0.0.1:8000".into(), admin_socket: "/run/dstack/sherlock/admin.sock".into() }
}

/// Text meant to break a config line, in every way the issue names.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("abc1234\nprogram pwned\n    command /usr/bin/touch /tmp/pwned\n#".to_string()),
        Just("x\r\nglobal".to_string()),
        Just("x # comment".to_string()),
        Just("x\"y".to_string()),
        Just("x'y".to_string()),
        Just("x\\y".to_string()),
        Just("x\0y".to_string()),
        Just("x weight 256 check".to_string()),
        Just("é".to_string()),
        Just("\u{2028}".to_string()),
        Just(String::new()),
        any::<String>(),
        "[a-z0-9#\n\r\" ./:_-]{0,24}",
    ]
}

/// Mostly valid values of a grammar, sometimes hostile ones, sometimes a
/// valid value with hostile text after it.
fn field(valid: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        40 => valid.prop_map(|s| s),
        1 => hostile(),
        1 => (valid, hostile()).prop_map(|(v, h)| format!("{v}{h}")),
    ]
}

const SERVICE: &str = "[a-z][a-z0-9_-]{0,8}(\\.[a-z0-9]{1,4})?";
const VERSION: &str = "[A-Za-z0-9][A-Za-z0-9._-]{0,6}";
const ID: &str = "[A-Za-z0-9][A-Za-z0-9._-]{0,16}";
const URL: &str =
    "http://(h[a-z0-9]{0,5}|10\\.0\\.[0-9]{1,2}\\.[0-9]{1,2})(:[1-9][0-9]{0,3})?(/[A-Za-z0-9._~-]{1,5}){0,2}/?";
const COMMIT: &str = "[0-9a-f]{7,64}";

fn weight() -> impl Strategy<Value = Value> {
    prop_oneof![30 => (0u32..=256).prop_map(Value::from), 1 => any::<i64>().prop_map(Value::from), 1 => Just(json!("1"))]
}

fn backend() -> impl Strategy<Value = Value> {
    (field(ID), field(URL), field(VERSION), weight())
        .prop_map(|(id, url, version, weight)| json!({"id": id, "url": url, "version": version, "weight": weight}))
}

fn services() -> impl Strategy<Value = Value> {
    prop::collection::vec((field(SERVICE), prop::collection::vec(backend(), 0..4)), 0..4).prop_map(|list| {
        Value::Object(list.into_iter().map(|(name, backends)| (name, json!({ "backends": backends }))).collect())
    })
}

fn index() -> impl Strategy<Value = Value> {
    prop_oneof![30 => (1u64..1_000_000).prop_map(Value::from), 1 => any::<u64>().prop_map(Value::from), 1 => Just(json!(-1))]
}

/// A snapshot's JSON, with every field drawn from its grammar or not.
fn snapshot_json() -> impl Strategy<Value = Value> {
    let commit = prop_oneof![1 => Just(Value::Null), 6 => field(COMMIT).prop_map(Value::from)];
    let clients = prop::collection::vec((field(ID), services()), 0..3)
        .prop_map(|list| Value::Object(list.into_iter().collect::<Map<_, _>>()));
    let warnings = prop::collection::vec(field("[ -~]{0,30}"), 0..3);
    (index(), any::<u64>(), commit, any::<bool>(), services(), clients, warnings).prop_map(
        |(index, epoch, commit, warming, services, clients, warnings)| {
            json!({
                "epoch": epoch >> 12, "index": index, "commit": commit, "warming": warming,
                "services": services, "clients": clients, "warnings": warnings,
            })
        },
    )
}

/// The built-in template's grammar, one line at a time.
struct Grammar {
    /// The template's lines that hold no value, from the golden file.
    fixed: Vec<String>,
    site: Site,
}

/// The golden file's lines that carry values: matched by hand below.
const VALUE_LINES: [&str; 9] = [
    "# Rendered by",
    "    # 127.0.0.1:8000: sherlock holds",
    "    http-check send ",
    "    stats socket ",
    "    bind ",
    "    use_backend ",
    "backend svc_",
    "    http-request replace-path ",
    "    server ",
];

fn is_service(s: &str) -> bool {
    let mut c = s.chars();
    s.len() <= 63
        && c.next().is_some_and(|c| c.is_ascii_lowercase())
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        && !s.ends_with('.')
}

fn is_label(s: &str, max: usize) -> bool {
    let mut c = s.chars();
    s.len() <= max
        && c.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && c.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn is_path(s: &str) -> bool {
    s.starts_with('/')
        && s[1..]
            .split('/')
            .all(|seg| !seg.is_empty() && seg.chars().all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c)))
}

fn is_address(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else { return false };
    !host.is_empty()
        && host.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c))
        && port.parse::<u16>().is_ok_and(|p| p > 0)
        && !port.starts_with('0')
}

fn is_number(s: &str, max: u64) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) && s.parse::<u64>().is_ok_and(|n| n <= max)
}

impl Grammar {
    fn new() -> Grammar {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/haproxy.golden.cfg");
        let golden = std::fs::read_to_string(golden).unwrap();
        let fixed =
            golden.lines().filter(|l| !VALUE_LINES.iter().any(|p| l.starts_with(p))).map(str::to_string).collect();
        Grammar { fixed, site: site() }
    }

    fn allows(&self, line: &str) -> bool {
        if self.fixed.iter().any(|f| f == line) {
            return true;
        }
        if let Some(rest) = line.strip_prefix("# Rendered by dstack sherlock from snapshot ") {
            let rest = rest.strip_suffix('.').unwrap_or("#");
            return match rest.split_once(" (routes commit ") {
                None => is_number(rest, u64::MAX),
                Some((index, commit)) => {
                    let commit = commit.strip_suffix(')').unwrap_or("#");
                    is_number(index, u64::MAX)
                        && (7..=64).contains(&commit.len())
                        && commit.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
                }
            };
        }
        if line
            == format!("    stats socket {} mode 600 level admin expose-fd listeners", self.site.admin_socket.display())
            || line == "    bind fd@3"
            || line == format!("    # {}: sherlock holds this socket and hands it to every HAProxy", self.site.bind)
        {
            return true;
        }
        if let Some(name) = line.strip_prefix("backend svc_") {
            return is_service(name);
        }
        if line.starts_with("    use_backend ") {
            // One map lookup, on the map in the run dir, whatever the services.
            return line
                == format!("    use_backend %[path,field(2,/),map_str({})]", self.site.services_map().display());
        }
        if let Some(rest) = line.strip_prefix("    http-request replace-path ^/") {
            if let Some(name) = rest.strip_suffix("/?(.*)$ /\\1") {
                return is_service(name);
            }
            let Some((name, path)) = rest.split_once("(/.*)?$ ") else { return false };
            return is_service(name) && path.strip_suffix("\\1").is_some_and(is_path);
        }
        if let Some(uri) = line.strip_prefix("    http-check send meth GET uri ") {
            // The instance path, or none, then the liveness path.
            return uri.strip_suffix("/liveness_check").is_some_and(|path| path.is_empty() || is_path(path));
        }
        if let Some(rest) = line.strip_prefix("    server ") {
            let checks = "check inter 2s fastinter 500ms fall 2 rise 2 on-marked-down shutdown-sessions";
            let Some(rest) = rest.strip_suffix(checks).and_then(|r| r.strip_suffix(' ')) else { return false };
            let words: Vec<&str> = rest.split(' ').collect();
            return matches!(words.as_slice(), [id, address, "weight", w]
                if is_label(id, 128) && is_address(address) && is_number(w, 256));
        }
        false
    }

    /// Panics with the first line of `config` outside the grammar.
    fn check(&self, config: &str) {
        for (n, line) in config.split('\n').enumerate() {
            // The file ends with a newline: its last piece is empty.
            if line.is_empty() && n + 1 == config.split('\n').count() {
                continue;
            }
            assert!(self.allows(line), "line {} is outside the template's grammar: {line:?}\n{config}", n + 1);
        }
    }
}

/// Decodes `body`; what decodes must render (the renderer refuses nothing
/// the decoder accepts), as every client sees it, with every line in the
/// grammar. The same view with a hostile commit put in after decoding (the
/// renderer on its own) is refused or, if the text happens to be a commit
/// id, in the grammar too. Returns the number of services rendered.
fn decode_and_render(body: &[u8], hostile_commit: &str, grammar: &Grammar, renderer: &Renderer) -> Option<usize> {
    let snapshot = Snapshot::from_json(body).ok()?;
    let mut views = vec![snapshot.clone()];
    views.extend(snapshot.clients.keys().map(|c: &ClientName| snapshot.for_client(Some(c))));
    for view in views {
        let config = renderer.render(&grammar.site, &view).unwrap_or_else(|e| panic!("{e}: {view:?}"));
        grammar.check(&config);
        let forged = Snapshot { commit: Some(hostile_commit.to_string()), ..view };
        if let Ok(config) = renderer.render(&grammar.site, &forged) {
            grammar.check(&config);
        }
    }
    Some(snapshot.services.len())
}

#[test]
fn random_snapshot_shaped_json_never_renders_a_line_outside_the_template() {
    let grammar = Grammar::new();
    let renderer = Renderer::new(None).unwrap();
    let (decoded, with_services) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let mut runner = TestRunner::new(Config { cases: CASES, failure_persistence: None, ..Config::default() });
    runner
        .run(&(snapshot_json(), hostile()), |(json, commit)| {
            let body = serde_json::to_vec(&json).unwrap();
            if let Some(services) = decode_and_render(&body, &commit, &grammar, &renderer) {
                decoded.fetch_add(1, Ordering::Relaxed);
                if services > 0 {
                    with_services.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        })
        .unwrap();
    // Not vacuous: a fair share decodes and renders services.
    let (decoded, with_services) = (decoded.into_inner(), with_services.into_inner());
    eprintln!("{decoded} of {CASES} decoded, {with_services} with services");
    assert!(decoded >= CASES as usize / 10, "only {decoded} of {CASES} decoded");
    assert!(with_services >= CASES as usize / 20, "only {with_services} of {CASES} rendered services");
}

#[test]
fn random_bytes_never_decode_into_a_line_outside_the_template() {
    let grammar = Grammar::new();
    let renderer = Renderer::new(None).unwrap();
    let mut runner = TestRunner::new(Config { cases: CASES, failure_persistence: None, ..Config::default() });
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        // Valid JSON with a few bytes flipped: near misses of the decoder.
        (snapshot_json(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)).prop_map(
            |(json, flips)| {
                let mut body = serde_json::to_vec(&json).unwrap();
                for (at, byte) in flips {
                    let i = at.index(body.len());
                    body[i] = byte;
                }
                body
            }
        ),
    ];
    runner
        .run(&(bytes, hostile()), |(body, commit)| {
            decode_and_render(&body, &commit, &grammar, &renderer);
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_grammar_refuses_the_attacks() {
    // The oracle itself can fail: the injected lines are outside it.
    let grammar = Grammar::new();
    for line in [
        "program pwned",
        "    command /usr/bin/touch /tmp/pwned",
        "#",
        "# Rendered by dstack sherlock from snapshot 1 (routes commit abc1234",
        "    server a 10.0.0.1:80 weight 1 check",
        "    server a 10.0.0.1:80 weight 257",
        "backend svc_a b",
        "    use_backend svc_a if { path /b } || { path_beg /a/ }",
        "    use_backend %[path,field(2,/),map_str(/etc/passwd)]",
        "    http-request replace-path ^/a(/.*)?$ /x y\\1",
    ] {
        assert!(!grammar.allows(line), "{line}");
    }
    let golden =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/haproxy.golden.cfg"));
    let golden = golden.unwrap().replace("/run/dstack/", "/run/dstack/sherlock/");
    grammar.check(&golden);
}

#[test]
fn a_user_template_gets_exactly_its_own_lines() {
    // Whatever the values, a user template's output has the line count its
    // own text makes: one per service and per backend, plus the header.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("user.j2");
    std::fs::write(
        &path,
        "c {{ commit }} {{ index }}\n{% for s in services %}s {{ s.name }} {{ s.path }}\n{% for b in s.backends %}b {{ b.name }} {{ b.address }} {{ b.weight }}\n{% endfor %}{% endfor %}",
    )
    .unwrap();
    let renderer = Renderer::new(Some(&path)).unwrap();
    let mut runner = TestRunner::new(Config { cases: CASES, failure_persistence: None, ..Config::default() });
    runner
        .run(&(snapshot_json(), hostile()), |(json, commit)| {
            let Ok(snapshot) = Snapshot::from_json(&serde_json::to_vec(&json).unwrap()) else { return Ok(()) };
            let backends: usize = snapshot.services.values().map(|s| s.backends.len()).sum();
            let lines = 1 + snapshot.services.len() + backends;
            let config = renderer.render(&site(), &snapshot);
            prop_assert!(config.is_ok(), "a decoded snapshot renders: {:?}", config);
            let forged = Snapshot { commit: Some(commit), ..snapshot };
            for config in [config, renderer.render(&site(), &forged)].into_iter().flatten() {
                prop_assert_eq!(config.lines().count(), lines);
                prop_assert!(!config.contains(['#', '"', '\'', '\r', '\0']), "{}", config);
            }
            Ok(())
        })
        .unwrap();
}
