//! Snapshot -> `haproxy.cfg`, and the diff against what runs.
//!
//! This is the only renderer: sherlock applies what it renders, and `dw plan`
//! shows the diff of the same rendering.

use std::path::{Path, PathBuf};

use minijinja::Environment;
use serde::Serialize;

use crate::model::Snapshot;

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
}

/// Where the rendered config lives and listens; fixed for a sherlock's life.
#[derive(Debug, Clone, Serialize)]
pub struct Site {
    /// `bind` address of the frontend, e.g. `127.0.0.1:8000`.
    pub bind: String,
    /// HAProxy's admin (runtime API) socket.
    pub admin_socket: PathBuf,
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
    bind: &'a str,
    admin_socket: String,
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
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.add_template_owned(name.clone(), source)
            .map_err(|source| RenderError::Template { name: name.clone(), source })?;
        Ok(Renderer { env, name })
    }

    pub fn render(&self, site: &Site, snapshot: &Snapshot) -> Result<String, RenderError> {
        let ctx = Context {
            index: snapshot.index,
            commit: snapshot.commit.as_deref(),
            bind: &site.bind,
            admin_socket: site.admin_socket.display().to_string(),
            services: services(snapshot),
        };
        let err = |source| RenderError::Template { name: self.name.clone(), source };
        self.env.get_template(&self.name).map_err(err)?.render(ctx).map_err(err)
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
