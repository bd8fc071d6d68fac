//! Snapshot -> `haproxy.cfg`, and the diff against what runs.
//!
//! This is the only renderer: sherlock applies what it renders, and `dw plan`
//! shows the diff of the same rendering.
//!
//! # Nothing but the template's own lines
//!
//! A snapshot comes from the network (or from a file at start), and HAProxy
//! runs what `haproxy.cfg` says, `program` sections included. So the
//! rendered config is checked three ways before anyone writes it:
//!
//! 1. **Every value is checked against its grammar as it reaches the
//!    renderer** ([`check_site`], and the services in `render`): the commit
//!    is hex, names and ids are the model's, paths and addresses are an
//!    instance URL's, weights are 0..=256. The snapshot was checked when it
//!    was decoded; this holds even for values that reach the renderer some
//!    other way, and states the renderer's own contract.
//! 2. **Every value the template prints is checked where it is printed**
//!    (the environment's formatter, which minijinja calls for every
//!    `{{ ... }}`, filters and filter blocks included): it may hold no
//!    whitespace, control character (newline, CR, NUL), `#`, quote or
//!    backslash. So a value can start no line, no comment and no extra
//!    argument, whatever a user `--template` does with it, and every line
//!    break in the output is one the template's own text wrote: the
//!    rendered config has exactly the lines the template alone produces.
//!    This is the check user templates get; it is structural (it does not
//!    guess at HAProxy's keywords) and costs one scan of each value.
//! 3. **For the built-in template, every output line must have one of the
//!    template's own line shapes** ([`LineShapes`], derived from the
//!    template's source, so it never goes stale): each source line is its
//!    literal text with a hole per `{{ ... }}` (inline `{% if %}` parts
//!    optional), and a hole matches only characters a value may hold. No
//!    rendered line can be outside what the template's lines allow. User
//!    templates get checks 1 and 2 only: their inline control flow may be
//!    anything minijinja accepts, which line shapes cannot follow.
//!
//! # The services map
//!
//! The frontend picks a backend with one map lookup on the first path
//! segment (`use_backend %[path,field(2,/),map_str(<run dir>/services.map)]`),
//! so a request costs the same with 10 services or 1,000. The map is rendered
//! here too ([`render_map`]), from the same snapshot, one
//! `<service> svc_<service>` line per service, and checked line by line
//! ([`check_map`]); sherlock writes it before the config that names it is
//! checked, so HAProxy never parses one without the other.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::model::{is_commit, InstanceId, InstanceUrl, ServiceName, Snapshot, MAX_BACKEND_WEIGHT};

/// The built-in template.
pub const DEFAULT_TEMPLATE: &str = include_str!("../../templates/haproxy.cfg.j2");

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read template {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template {name}: {source:#}")]
    Template {
        name: String,
        #[source]
        source: minijinja::Error,
    },
    #[error("refusing to render haproxy.cfg: {0}")]
    Value(String),
    #[error("refusing to write haproxy.cfg: its line {line} is not one the built-in template makes: {text}")]
    Line { line: usize, text: String },
    #[error(
        "refusing to write {SERVICES_MAP}: its line {line} is not the header or `<service> svc_<service>`: {text}"
    )]
    MapLine { line: usize, text: String },
}

/// The services map's file name, in the run dir beside `haproxy.cfg`.
pub const SERVICES_MAP: &str = "services.map";

/// True for a character a printed value may hold: none that could end a
/// line, start a comment, quote, escape, or split an argument in two.
fn value_char(c: char) -> bool {
    !(c.is_whitespace() || c.is_control() || matches!(c, '#' | '"' | '\'' | '\\'))
}

/// A value quoted for an error message, cut short.
fn excerpt(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

/// The formatter of every `{{ ... }}`: prints the value if every character
/// of it may be printed (see the module's doc), else fails the render.
fn checked_format(out: &mut minijinja::Output, _: &minijinja::State, value: &Value) -> Result<(), minijinja::Error> {
    // Strings, most of what a config prints, are checked without a copy.
    let owned;
    let text = match value.as_str() {
        Some(text) => text,
        None => {
            owned = value.to_string();
            &owned
        }
    };
    if let Some(bad) = text.chars().find(|c| !value_char(*c)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "the value {} holds {bad:?}: a printed value may not hold whitespace, a control character, \
                 '#', a quote or a backslash (write such text in the template itself)",
                excerpt(text)
            ),
        ));
    }
    out.write_str(text).map_err(minijinja::Error::from)
}

/// The characters a socket path may hold: HAProxy reads it unquoted.
fn socket_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | '~' | '+' | '@' | ',' | '=')
}

/// Checks what a sherlock renders into every config: the bind address, and
/// the admin socket and services map paths (from its run dir).
pub fn check_site(site: &Site) -> Result<(), RenderError> {
    if site.bind.parse::<std::net::SocketAddr>().is_err() {
        return Err(RenderError::Value(format!("the bind address {} is not host:port", excerpt(&site.bind))));
    }
    let socket = site.admin_socket.to_str().unwrap_or("");
    if !site.admin_socket.is_absolute() || socket.is_empty() || !socket.chars().all(socket_path_char) {
        return Err(RenderError::Value(format!(
            "the admin socket path {}: HAProxy reads it unquoted, so it must be absolute and hold only \
             A-Z a-z 0-9 / . _ - ~ + @ , = (choose another --run-dir)",
            excerpt(&site.admin_socket.display().to_string())
        )));
    }
    // The map's path is an argument of `map_str(...)`, where a comma would
    // start another argument.
    let map = site.services_map();
    if map.to_str().is_none_or(|m| !m.chars().all(|c| socket_path_char(c) && c != ',')) {
        return Err(RenderError::Value(format!(
            "the services map path {}: HAProxy reads it as a converter's argument, so it must hold only \
             A-Z a-z 0-9 / . _ - ~ + @ = (choose another --run-dir)",
            excerpt(&map.display().to_string())
        )));
    }
    Ok(())
}

/// The services map for `snapshot`: `<service> svc_<service>`, one line per
/// service (the backend names the template gives them), checked with
/// [`check_map`]. It depends on the set of services alone, so it changes
/// only when the config's backends do.
pub fn render_map(snapshot: &Snapshot) -> Result<String, RenderError> {
    let mut map = String::from(MAP_HEADER);
    for name in snapshot.services.keys() {
        map.push_str(&format!("{name} svc_{name}\n"));
    }
    check_map(&map)?;
    Ok(map)
}

/// The services map's first lines.
const MAP_HEADER: &str = "# Rendered by dstack sherlock with haproxy.cfg: first path segment -> backend.\n\
                          # Do not edit: sherlock replaces this file with the config that reads it.\n";

/// Checks that a services map is the renderer's header, then lines of
/// `<service> svc_<service>` with a valid service name, so nothing else
/// reaches HAProxy through the map.
pub fn check_map(map: &str) -> Result<(), RenderError> {
    let Some(lines) = map.strip_prefix(MAP_HEADER) else {
        return Err(RenderError::MapLine { line: 1, text: excerpt(map.lines().next().unwrap_or("")) });
    };
    let skip = MAP_HEADER.lines().count();
    for (n, line) in lines.split_terminator('\n').enumerate().map(|(n, l)| (n + skip, l)) {
        let ok = line.split_once(" svc_").is_some_and(|(key, backend)| {
            key == backend && key.parse::<ServiceName>().is_ok_and(|name| name.as_str() == key)
        });
        if !ok {
            return Err(RenderError::MapLine { line: n + 1, text: excerpt(line) });
        }
    }
    Ok(())
}

/// Checks each service's values against the grammar of the model type it
/// came from: the renderer's contract, whoever built the views.
fn check_services(services: &[ServiceView]) -> Result<(), RenderError> {
    let bad = |what: &str, value: &str| RenderError::Value(format!("{what} {} is not valid", excerpt(value)));
    for s in services {
        if s.name.parse::<ServiceName>().map_or(true, |n| n.as_str() != s.name) {
            return Err(bad("service name", &s.name));
        }
        let path_ok =
            s.path.is_empty() || format!("http://h{}", s.path).parse::<InstanceUrl>().is_ok_and(|u| u.path() == s.path);
        if !path_ok {
            return Err(bad(&format!("{}: the instance path", s.name), &s.path));
        }
        for b in &s.backends {
            if b.name.parse::<InstanceId>().map_or(true, |id| id.as_str() != b.name) {
                return Err(bad(&format!("{}: server name", s.name), &b.name));
            }
            if format!("http://{}", b.address).parse::<InstanceUrl>().map_or(true, |u| u.authority() != b.address) {
                return Err(bad(&format!("{}: server {} address", s.name, b.name), &b.address));
            }
            if b.weight > MAX_BACKEND_WEIGHT {
                return Err(RenderError::Value(format!(
                    "{}: server {} has weight {}; a weight is 0 to 256",
                    s.name, b.name, b.weight
                )));
            }
        }
    }
    Ok(())
}

/// One piece of a line shape.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// The template's own text, matched exactly.
    Text(String),
    /// Where a `{{ ... }}` printed a value: one or more value characters.
    Hole,
}

/// The lines a template can produce: each source line with a hole for
/// every printed value, and both ways of every inline `{% if %}`.
#[derive(Debug, Clone, Default)]
pub struct LineShapes {
    /// Lines with no hole, matched whole.
    fixed: HashSet<String>,
    /// Lines with holes.
    shapes: Vec<Vec<Piece>>,
}

/// One token of a template source line.
enum Token {
    Text(String),
    Hole,
    If,
    EndIf,
}

impl LineShapes {
    /// The shapes of `template`'s lines. Lines holding only tags (`{% for %}`,
    /// a block `{% if %}`, `{% else %}`) or comments render nothing of their
    /// own and are skipped; a line mixing text with any tag but `{% for %}`,
    /// `{% endfor %}` and a balanced inline `{% if %}...{% endif %}` is
    /// refused, since its output could not be predicted.
    pub fn of(template: &str) -> Result<LineShapes, String> {
        let mut out = LineShapes::default();
        for (n, line) in template.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}", n + 1);
            let (tokens, other_tag) = Self::tokens(line).map_err(at)?;
            let has_output = tokens.iter().any(|t| matches!(t, Token::Text(_) | Token::Hole));
            if !has_output {
                if line.trim().is_empty() {
                    out.fixed.insert(String::new());
                }
                continue;
            }
            if let Some(tag) = other_tag {
                return Err(at(format!("the tag {{% {tag} %}} shares a line with text")));
            }
            for pieces in Self::variants(&mut tokens.iter(), false).map_err(at)? {
                match pieces.as_slice() {
                    [] => out.fixed.insert(String::new()),
                    [Piece::Text(text)] => out.fixed.insert(text.clone()),
                    _ => {
                        out.shapes.push(pieces);
                        true
                    }
                };
            }
        }
        Ok(out)
    }

    /// The tokens of one source line, and the first tag it holds that is
    /// not `if`, `endif`, `for` or `endfor`.
    fn tokens(line: &str) -> Result<(Vec<Token>, Option<String>), String> {
        let mut tokens = Vec::new();
        let mut other = None;
        let mut rest = line;
        while let Some(at) = ["{{", "{%", "{#"].iter().filter_map(|open| rest.find(open)).min() {
            if at > 0 {
                tokens.push(Token::Text(rest[..at].to_string()));
            }
            let (open, close) = match &rest[at..at + 2] {
                "{{" => ("{{", "}}"),
                "{%" => ("{%", "%}"),
                _ => ("{#", "#}"),
            };
            let end = rest[at..].find(close).ok_or_else(|| format!("{open} without {close} on the same line"))?;
            let inner = rest[at + 2..at + end].trim_matches(|c: char| c == '-' || c.is_whitespace());
            match open {
                "{{" => tokens.push(Token::Hole),
                "{%" if inner.starts_with("if ") => tokens.push(Token::If),
                "{%" if inner == "endif" => tokens.push(Token::EndIf),
                "{%" if inner.starts_with("for ") || inner == "endfor" => {}
                "{%" => {
                    other.get_or_insert_with(|| inner.to_string());
                }
                _ => {}
            }
            rest = &rest[at + end + 2..];
        }
        if !rest.is_empty() {
            tokens.push(Token::Text(rest.to_string()));
        }
        Ok((tokens, other))
    }

    /// Every way through the tokens up to the matching `{% endif %}` (when
    /// `nested`) or the end of the line.
    fn variants(tokens: &mut std::slice::Iter<Token>, nested: bool) -> Result<Vec<Vec<Piece>>, String> {
        let mut all: Vec<Vec<Piece>> = vec![Vec::new()];
        while let Some(token) = tokens.next() {
            match token {
                Token::Text(text) => all.iter_mut().for_each(|v| push(v, Piece::Text(text.clone()))),
                Token::Hole => all.iter_mut().for_each(|v| push(v, Piece::Hole)),
                Token::If => {
                    let inner = Self::variants(tokens, true)?;
                    let mut next = Vec::new();
                    for v in &all {
                        next.push(v.clone());
                        for i in &inner {
                            let mut joined = v.clone();
                            i.iter().cloned().for_each(|p| push(&mut joined, p));
                            next.push(joined);
                        }
                    }
                    all = next;
                }
                Token::EndIf if nested => return Ok(all),
                Token::EndIf => return Err("{% endif %} without {% if %} on the same line".into()),
            }
        }
        if nested {
            return Err("{% if %} without {% endif %} on the same line".into());
        }
        Ok(all)
    }

    /// Checks that every line of `config` has one of the shapes.
    pub fn check(&self, config: &str) -> Result<(), RenderError> {
        for (n, line) in config.split_terminator('\n').enumerate() {
            if !self.fixed.contains(line) && !self.shapes.iter().any(|s| fits(s, line)) {
                return Err(RenderError::Line { line: n + 1, text: excerpt(line) });
            }
        }
        Ok(())
    }
}

/// Appends a piece, joining neighbours of a kind (two holes side by side
/// match what one does).
fn push(pieces: &mut Vec<Piece>, piece: Piece) {
    match (pieces.last_mut(), piece) {
        (Some(Piece::Text(last)), Piece::Text(text)) => last.push_str(&text),
        (Some(Piece::Hole), Piece::Hole) => {}
        (_, piece) => pieces.push(piece),
    }
}

/// True when `line` has the shape `pieces`.
fn fits(pieces: &[Piece], line: &str) -> bool {
    match pieces.split_first() {
        None => line.is_empty(),
        Some((Piece::Text(text), rest)) => line.strip_prefix(text.as_str()).is_some_and(|l| fits(rest, l)),
        Some((Piece::Hole, rest)) => {
            let run = line.char_indices().find(|(_, c)| !value_char(*c)).map_or(line.len(), |(i, _)| i);
            (1..=run).rev().filter(|i| line.is_char_boundary(*i)).any(|i| fits(rest, &line[i..]))
        }
    }
}

/// Where the rendered config lives and listens; fixed for a sherlock's life.
#[derive(Debug, Clone, Serialize)]
pub struct Site {
    /// `bind` address of the frontend, e.g. `127.0.0.1:8000`.
    pub bind: String,
    /// HAProxy's admin (runtime API) socket.
    pub admin_socket: PathBuf,
}

impl Site {
    /// The services map the frontend reads: in the run dir, beside the
    /// admin socket (and `haproxy.cfg`).
    pub fn services_map(&self) -> PathBuf {
        self.admin_socket.with_file_name(SERVICES_MAP)
    }
}

/// The template's view of one service.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    /// The instance path that replaces `/<name>`; empty for the root.
    pub path: String,
    pub backends: Vec<ServerView>,
}

/// The template's view of one server line.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServerView {
    /// Stable: the instance id, so a reload reproduces the runtime state.
    pub name: String,
    pub address: String,
    pub weight: u32,
}

#[derive(Serialize)]
struct Context<'a> {
    index: u64,
    commit: Option<&'a str>,
    /// What the frontend binds: the listening socket sherlock holds and
    /// passes to HAProxy (ARCHITECTURE.md, "The listening socket").
    bind: String,
    /// The address that socket listens on, e.g. `127.0.0.1:8000`.
    listen: &'a str,
    admin_socket: String,
    /// The services map's path, for the frontend's `map_str(...)`.
    services_map: String,
    services: Vec<ServiceView>,
}

/// The services of a snapshot as the template sees them.
pub fn services(snapshot: &Snapshot) -> Vec<ServiceView> {
    snapshot
        .services
        .iter()
        .map(|(name, svc)| {
            // The directory gives weight 0 to instances whose path differs
            // from the service's, so a weighted backend's path is the path.
            let path = svc
                .backends
                .iter()
                .find(|b| b.weight > 0)
                .or(svc.backends.first())
                .map(|b| b.url.path().to_string())
                .unwrap_or_default();
            let backends = svc
                .backends
                .iter()
                .map(|b| ServerView { name: b.id.to_string(), address: b.url.authority(), weight: b.weight })
                .collect();
            ServiceView { name: name.to_string(), path, backends }
        })
        .collect()
}

/// A compiled template, built in or from `--template`.
pub struct Renderer {
    env: Environment<'static>,
    name: String,
    /// The built-in template's line shapes; None for a user template.
    shapes: Option<LineShapes>,
}

impl Renderer {
    pub fn new(template: Option<&Path>) -> Result<Renderer, RenderError> {
        let (name, source) = match template {
            Some(path) => (
                path.display().to_string(),
                std::fs::read_to_string(path).map_err(|source| RenderError::Read { path: path.into(), source })?,
            ),
            None => ("haproxy.cfg.j2".to_string(), DEFAULT_TEMPLATE.to_string()),
        };
        let shapes = match template {
            Some(_) => None,
            None => Some(LineShapes::of(DEFAULT_TEMPLATE).expect("the built-in template's lines have shapes (tested)")),
        };
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        // A config is no HTML: no escaping, whatever the file's name; the
        // formatter checks every printed value instead.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_formatter(checked_format);
        env.add_template_owned(name.clone(), source)
            .map_err(|source| RenderError::Template { name: name.clone(), source })?;
        Ok(Renderer { env, name, shapes })
    }

    /// Renders `snapshot`, checked as the module's doc says: a value outside
    /// its grammar or a line outside the template's is an error, and nothing
    /// is rendered.
    pub fn render(&self, site: &Site, snapshot: &Snapshot) -> Result<String, RenderError> {
        if let Some(commit) = snapshot.commit.as_deref().filter(|c| !is_commit(c)) {
            return Err(RenderError::Value(format!("commit {}: not 7 to 64 lowercase hex digits", excerpt(commit))));
        }
        check_site(site)?;
        let services = services(snapshot);
        check_services(&services)?;
        let ctx = Context {
            index: snapshot.index,
            commit: snapshot.commit.as_deref(),
            bind: format!("fd@{}", crate::sherlock::haproxy::LISTEN_FD),
            listen: &site.bind,
            admin_socket: site.admin_socket.display().to_string(),
            services_map: site.services_map().display().to_string(),
            services,
        };
        let err = |source| RenderError::Template { name: self.name.clone(), source };
        let config = self.env.get_template(&self.name).map_err(err)?.render(ctx).map_err(err)?;
        if let Some(shapes) = &self.shapes {
            shapes.check(&config)?;
        }
        Ok(config)
    }
}

/// The unified diff of two configs, ignoring the header comment (it carries
/// the snapshot index, which changes even when nothing else does).
pub fn diff(running: &str, candidate: &str) -> Option<String> {
    if strip_header(running) == strip_header(candidate) {
        return None;
    }
    let diff = similar::TextDiff::from_lines(running, candidate);
    Some(diff.unified_diff().context_radius(2).header("running/haproxy.cfg", "candidate/haproxy.cfg").to_string())
}

/// The config without its leading comment lines.
fn strip_header(config: &str) -> &str {
    let mut rest = config;
    while rest.starts_with('#') {
        rest = rest.split_once('\n').map(|(_, r)| r).unwrap_or("");
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, ServiceBackends};

    pub(crate) fn sample_snapshot() -> Snapshot {
        let backend = |id: &str, url: &str, weight| Backend {
            id: id.parse().unwrap(),
            url: url.parse().unwrap(),
            version: "v1".parse().unwrap(),
            weight,
        };
        let mut s = Snapshot { index: 7, ..Snapshot::default() };
        s.services.insert(
            "emitter".parse().unwrap(),
            ServiceBackends {
                backends: vec![
                    backend("emitter-v1-0001", "http://10.0.0.1:9001/emitter", 1),
                    backend("emitter-v1-0002", "http://vm102/emitter", 1),
                ],
            },
        );
        s.services.insert(
            "transform".parse().unwrap(),
            ServiceBackends { backends: vec![backend("transform-v1-0003", "http://10.0.0.3:9100", 1)] },
        );
        s
    }

    fn site() -> Site {
        Site { bind: "127.0.0.1:8000".into(), admin_socket: "/run/dstack/admin.sock".into() }
    }

    /// The built-in template's output is pinned in tests/fixtures; set
    /// DSTACK_BLESS=1 to rewrite the golden file after an intended change.
    #[test]
    fn golden_haproxy_cfg() {
        let rendered = Renderer::new(None).unwrap().render(&site(), &sample_snapshot()).unwrap();
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/haproxy.golden.cfg");
        if std::env::var_os("DSTACK_BLESS").is_some() {
            std::fs::write(&golden, &rendered).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap();
        assert_eq!(rendered, want, "rendering changed; rerun with DSTACK_BLESS=1 if intended");
    }

    #[test]
    fn diff_ignores_the_header_only() {
        let r = Renderer::new(None).unwrap();
        let a = r.render(&site(), &sample_snapshot()).unwrap();
        let mut next = sample_snapshot();
        next.index = 8;
        assert_eq!(diff(&a, &r.render(&site(), &next).unwrap()), None);
        next.services.get_mut(&"emitter".parse().unwrap()).unwrap().backends[0].weight = 3;
        let d = diff(&a, &r.render(&site(), &next).unwrap()).unwrap();
        assert!(d.contains("-    server emitter-v1-0001 10.0.0.1:9001 weight 1"), "{d}");
        assert!(d.contains("+    server emitter-v1-0001 10.0.0.1:9001 weight 3"), "{d}");
    }

    #[test]
    fn the_built_in_template_has_line_shapes() {
        let shapes = LineShapes::of(DEFAULT_TEMPLATE).unwrap();
        assert!(shapes.fixed.contains("    option redispatch 1"));
        assert!(shapes.fixed.contains(""), "blank lines");
        let ok = [
            "# Rendered by dstack sherlock from snapshot 7.",
            "# Rendered by dstack sherlock from snapshot 7 (routes commit abc1234).",
            "    server emitter-v1-0001 10.0.0.1:9001 weight 1 check inter 2s fastinter 500ms fall 2 rise 2 on-marked-down shutdown-sessions",
            "    http-check send meth GET uri /liveness_check",
            "    http-check send meth GET uri /emitter/v2/liveness_check",
            "    use_backend %[path,field(2,/),map_str(/run/dstack/services.map)]",
            "    http-request replace-path ^/a(/.*)?$ /p/q\\1",
        ];
        for line in ok {
            assert!(shapes.check(line).is_ok(), "{line}");
        }
        let bad = [
            "program evil",
            "    command touch /tmp/x",
            "# Rendered by dstack sherlock from snapshot 7 (routes commit abc1234",
            "    server a 10.0.0.1:9001 weight 1",
            "    server a 10.0.0.1:9001 weight 1 check inter 2s fastinter 500ms fall 2 rise 2",
            "    http-check send meth GET uri /a b/liveness_check",
            "    http-check send meth POST uri /liveness_check",
            "    server a 10.0.0.1:9001 weight 1#",
            "    server a\t10.0.0.1:9001 weight 1",
            "    server a \"x\" weight 1",
            "    bind 127.0.0.1:8000 ssl crt /x",
            "backend svc_a\r",
            "global x",
            "    use_backend svc_a if { path /a } || { path_beg /a/ }",
            "    use_backend %[path,field(2,/),map_str(/m map)]",
            "    use_backend %[path,field(2,/),map_str(/m)] if TRUE",
        ];
        for line in bad {
            let err = shapes.check(&format!("global\n{line}\n")).unwrap_err().to_string();
            assert!(err.contains("its line 2 is not one the built-in template makes"), "{line:?}: {err}");
        }
    }

    #[test]
    fn the_services_map_has_one_line_per_service_beside_the_config() {
        let map = render_map(&sample_snapshot()).unwrap();
        assert_eq!(map, format!("{MAP_HEADER}emitter svc_emitter\ntransform svc_transform\n"));
        assert_eq!(render_map(&Snapshot::default()).unwrap(), MAP_HEADER, "no services: the header alone");
        // The config reads the map the site names, in the run dir.
        assert_eq!(site().services_map(), Path::new("/run/dstack/services.map"));
        let config = Renderer::new(None).unwrap().render(&site(), &sample_snapshot()).unwrap();
        assert!(
            config.contains("\n    use_backend %[path,field(2,/),map_str(/run/dstack/services.map)]\n"),
            "{config}"
        );
        assert!(!config.contains("path_beg"), "no rule per service: {config}");
        // Whatever else a map holds is refused, with its line.
        for (bad, line) in [
            (format!("{MAP_HEADER}a svc_b\n"), 3),
            (format!("{MAP_HEADER}a svc_a\nA svc_A\n"), 4),
            (format!("{MAP_HEADER}a svc_a x\n"), 3),
            (format!("{MAP_HEADER}a  svc_a\n"), 3),
            (format!("{MAP_HEADER}\n"), 3),
            (format!("{MAP_HEADER}# a comment\n"), 3),
            ("a svc_a\n".to_string(), 1),
        ] {
            let err = check_map(&bad).unwrap_err().to_string();
            assert!(err.contains(&format!("services.map: its line {line} is not")), "{bad:?}: {err}");
        }
        // Its path is a converter's argument: no comma.
        let bad_site = Site { bind: "127.0.0.1:8000".into(), admin_socket: "/run/a,b/admin.sock".into() };
        let err = Renderer::new(None).unwrap().render(&bad_site, &sample_snapshot()).unwrap_err().to_string();
        assert!(err.contains("the services map path \"/run/a,b/services.map\""), "{err}");
    }

    #[test]
    fn line_shapes_refuse_what_they_cannot_follow() {
        assert!(LineShapes::of("a {% if x %}b").unwrap_err().contains("line 1: {% if %} without {% endif %}"));
        assert!(LineShapes::of("x\na {% endif %}").unwrap_err().contains("line 2: {% endif %} without"));
        assert!(LineShapes::of("a {% set x = 1 %}").unwrap_err().contains("the tag {% set x = 1 %} shares a line"));
        assert!(LineShapes::of("a {{ x").unwrap_err().contains("{{ without }}"));
        let shapes = LineShapes::of("{% for x in y %}\n{# c #}\nk {{ x }}{% if z %} {{ z }}{% endif %};\n").unwrap();
        assert!(shapes.check("k 1;\nk 1 2;\n").is_ok());
        assert!(shapes.check("\n").is_err(), "no blank line in that template");
    }

    #[test]
    fn values_outside_their_grammar_are_refused() {
        let r = Renderer::new(None).unwrap();
        let mut s = sample_snapshot();
        s.commit = Some("abc1234\nprogram evil".into());
        let err = r.render(&site(), &s).unwrap_err().to_string();
        assert!(err.contains("commit \"abc1234\\nprogram evil\": not 7 to 64 lowercase hex digits"), "{err}");
        let mut s = sample_snapshot();
        s.services.values_mut().next().unwrap().backends[0].weight = 300;
        let err = r.render(&site(), &s).unwrap_err().to_string();
        assert!(err.contains("server emitter-v1-0001 has weight 300"), "{err}");
        let bad_site = Site { bind: "127.0.0.1:8000".into(), admin_socket: "/run/my dir/admin.sock".into() };
        let err = r.render(&bad_site, &sample_snapshot()).unwrap_err().to_string();
        assert!(err.contains("the admin socket path \"/run/my dir/admin.sock\": HAProxy reads it unquoted"), "{err}");
        let bad_site = Site { bind: "127.0.0.1:8000 ssl".into(), ..site() };
        assert!(r.render(&bad_site, &sample_snapshot()).is_err());
        let view = |name: &str, path: &str, server: &str, address: &str| ServiceView {
            name: name.into(),
            path: path.into(),
            backends: vec![ServerView { name: server.into(), address: address.into(), weight: 1 }],
        };
        assert!(check_services(&[view("a", "/p", "a-1", "h:80")]).is_ok());
        for (v, want) in [
            (view("a\n", "", "a-1", "h:80"), "service name"),
            (view("//x/a", "", "a-1", "h:80"), "service name"),
            (view("a", "/p q", "a-1", "h:80"), "a: the instance path"),
            (view("a", "p", "a-1", "h:80"), "a: the instance path"),
            (view("a", "", "a#1", "h:80"), "a: server name"),
            (view("a", "", "a-1", "h:80 check"), "a: server a-1 address"),
            (view("a", "", "a-1", "h"), "a: server a-1 address"),
        ] {
            let err = check_services(&[v]).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn a_user_template_cannot_print_a_line_break_or_a_comment() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("user.html");
        let render = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Renderer::new(Some(&path)).unwrap().render(&site(), &sample_snapshot())
        };
        // Its own lines, values in them, and values through filters are fine;
        // no HTML escaping for all the file's name.
        let ok = render("bind {{ bind }}\n{% for s in services %}x {{ s.name | upper }} {{ s.backends | length }}\n{% endfor %}<&>\n");
        assert_eq!(ok.unwrap(), "bind fd@3\nx EMITTER 2\nx TRANSFORM 1\n<&>\n");
        for (text, holds) in [
            ("{{ bind ~ '\\n' }}", "'\\n'"),
            ("{{ bind ~ ' weight 9' }}", "' '"),
            ("{{ bind ~ '#' }}", "'#'"),
            ("{{ '\"' }}", "'\"'"),
            ("{{ '\\0' }}", "'\\0'"),
            ("{{ '\\r' }}", "'\\r'"),
            ("{% filter replace('x', '\\n') %}x{% endfilter %}", "'\\n'"),
            ("{{ services[0] }}", "'\"'"),
        ] {
            let err = render(text).unwrap_err().to_string();
            assert!(err.contains(&format!("holds {holds}: a printed value may not hold whitespace")), "{text}: {err}");
        }
    }

    #[test]
    fn a_broken_user_template_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bad.j2");
        std::fs::write(&path, "{% for %}").unwrap();
        let err = Renderer::new(Some(&path)).err().unwrap().to_string();
        assert!(err.contains("bad.j2"), "{err}");
        std::fs::write(&path, "{{ nonesuch }}").unwrap();
        let err = Renderer::new(Some(&path)).unwrap().render(&site(), &sample_snapshot()).unwrap_err().to_string();
        assert!(err.contains("undefined"), "{err}");
    }
}
