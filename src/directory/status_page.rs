//! The status page at `/`: one HTML page for people, the plain text it
//! replaced for `curl`, and the JSON the page long-polls for.
//!
//! Which of the three a request gets: `?format=html|text|json` if given,
//! else by `Accept` (a browser asks for `text/html`, a script for
//! `application/json`; anything else, curl's `*/*` included, gets text).
//!
//! The page is plain HTML, CSS and JavaScript built into the binary: no
//! framework, no build step. Its script builds every element with
//! `textContent` (names and URLs come from the network), and a strict
//! Content-Security-Policy allows only this page's own script and style.
//!
//! Who may see it: a caller with the `read` right, as for `/v1/status`.
//! Besides `Authorization: Bearer TOKEN`, the page accepts the token as the
//! password of HTTP Basic authentication (any user name), because that is
//! the one way a browser sends a credential with no help: it asks for it
//! once, and sends it with the page's own requests. So nothing is served
//! to a caller without a token, the token never sits in a URL (history,
//! logs, `Referer`) nor where the page's script could read it, and a
//! request another site makes the browser send with it can only read
//! (Basic is accepted here alone, on `GET /`), and cannot read the answer
//! (no CORS). See README.md, "Status page".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::api::{status, ApiError, Form, QueryForm};
use super::auth::Action;
use super::Directory;
use crate::model::{ServiceName, Snapshot, SnapshotId, Version};
use crate::protocol::{InstanceStatus, RoutesStatus, SherlockStatus, Status};
use crate::routes::weights::realized_shares;
use crate::routes::RouteSet;

const HTML: &str = include_str!("status_page/index.html");
const CSS: &str = include_str!("status_page/style.css");
const SCRIPT: &str = include_str!("status_page/app.js");

/// The most instances the page lists per version: past that a row says how
/// many more (`dw route list` lists them all). A page of thousands of rows,
/// redrawn every two seconds, would be of no use to anyone.
pub const MAX_LISTED: usize = 50;
/// The longest a page query may wait for a change; the page asks for 2 s,
/// so heartbeat ages and sherlocks' progress stay fresh.
const MAX_PAGE_WAIT: Duration = Duration::from_secs(30);
/// The realm a browser shows when it asks for the token.
const REALM: &str = "Basic realm=\"dstack directory (user: any, password: a read token)\", charset=\"UTF-8\"";

/// The query of `GET /`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    format: Option<String>,
    /// With `format=json`: the snapshot the page shows, and how long to
    /// wait for another (a long poll, as `/v1/snapshot`'s).
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    index: u64,
    wait: Option<String>,
}

impl Form for PageQuery {
    const EXPECTED: &'static str = "format=html|text|json, and with json epoch=E&index=N&wait=2s";
}

/// What `GET /` answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Html,
    Text,
    Json,
}

fn negotiate(query: Option<&str>, accept: Option<&str>) -> Result<Format, ApiError> {
    match query {
        Some("html") => return Ok(Format::Html),
        Some("text") => return Ok(Format::Text),
        Some("json") => return Ok(Format::Json),
        Some(other) => {
            return Err(ApiError::BadRequest(format!("invalid format {other:?}: expected html, text or json")));
        }
        None => {}
    }
    let accept = accept.unwrap_or("").to_ascii_lowercase();
    // Media types in the order given; q-values are not weighed: a browser
    // lists text/html first, curl sends */*.
    let first = accept.split(',').map(|t| t.split(';').next().unwrap_or("").trim()).find(|t| !t.is_empty());
    Ok(match first {
        Some("text/html") | Some("application/xhtml+xml") => Format::Html,
        Some("application/json") => Format::Json,
        _ => Format::Text,
    })
}

/// The caller of `GET /`, allowed to read: a `Bearer` token, or the same
/// token as a Basic password (see the module's doc for why).
pub struct PageReader;

impl FromRequestParts<Arc<Directory>> for PageReader {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, directory: &Arc<Directory>) -> Result<Self, Response> {
        let given = parts.headers.get(header::AUTHORIZATION).map(|h| h.as_bytes());
        let bearer = given.map(|h| match basic_password(h) {
            Some(token) => format!("Bearer {token}").into_bytes(),
            None => h.to_vec(),
        });
        let caller = directory.auth.authenticate(bearer.as_deref()).map_err(|e| {
            let message = format!("{}; in a browser, give the token as the password (any user name)", e.0);
            let mut resp = ApiError::Unauthorized(message).into_response();
            // A second challenge, after Bearer: a browser asks for Basic.
            resp.headers_mut().append(header::WWW_AUTHENTICATE, HeaderValue::from_static(REALM));
            resp
        })?;
        caller.check(Action::Read).map_err(|e| ApiError::from(e).into_response())?;
        Ok(PageReader)
    }
}

/// The password of `Basic base64(user:password)`, if that is what `header` is.
fn basic_password(header: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_user, password) = decoded.split_once(':')?;
    Some(password.to_string())
}

/// `GET /`.
pub async fn index(
    State(directory): State<Arc<Directory>>,
    _: PageReader,
    headers: HeaderMap,
    QueryForm(query): QueryForm<PageQuery>,
) -> Result<Response, ApiError> {
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    let format = negotiate(query.format.as_deref(), accept)?;
    let mut resp = match format {
        Format::Html => {
            let (page, csp) = &*PAGE;
            let mut resp = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page.as_str()).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
            h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            resp
        }
        Format::Text => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text(&status(&directory))).into_response()
        }
        Format::Json => Json(wait_for_page(&directory, &query).await?).into_response(),
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::VARY, HeaderValue::from_static("Accept, Authorization"));
    Ok(resp)
}

/// The page and its Content-Security-Policy: the script and style are
/// inline (one request, nothing else to route) and allowed by their
/// SHA-256, so no other script can run in the page.
static PAGE: LazyLock<(String, HeaderValue)> = LazyLock::new(|| {
    let hash = |text: &str| base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text.as_bytes()));
    let page = HTML.replacen("/*STYLE*/", CSS, 1).replacen("/*SCRIPT*/", SCRIPT, 1);
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; img-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(SCRIPT),
        hash(CSS)
    );
    (page, HeaderValue::from_str(&csp).expect("a CSP header is ASCII"))
});

/// The plain-text page, as `/` served it before the HTML one.
pub fn text(s: &Status) -> String {
    let mut page = format!("dstack directory {} (snapshot {}, up {}s)\n\n", s.name, s.index, s.uptime_s);
    for i in &s.instances {
        let _ = writeln!(page, "{:<20} {:<10} {:<40} {}ms ago", i.service, i.version, i.url, i.last_heartbeat_ms);
    }
    for w in &s.warnings {
        let _ = writeln!(page, "warning: {w}");
    }
    page
}

/// The page's data once the snapshot served is not the one the page holds,
/// or once its wait ends: a long poll, holding a place among the waiting
/// queries (`limits.waiting_queries`) as a blocking snapshot query does.
async fn wait_for_page(directory: &Directory, query: &PageQuery) -> Result<Page, ApiError> {
    let wait = match &query.wait {
        None => Duration::ZERO,
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| ApiError::BadRequest(format!("invalid wait {w:?}: {e}; expected a duration such as 2s")))?
            .min(MAX_PAGE_WAIT),
    };
    if !wait.is_zero() {
        let _slot = directory.wait_slot()?;
        let held = SnapshotId { epoch: query.epoch, index: query.index };
        let mut rx = directory.subscribe();
        let changed = rx.wait_for(|s| s.id() != held);
        tokio::select! {
            _ = tokio::time::timeout(wait, changed) => {}
            _ = directory.shutdown.cancelled() => {}
        }
    }
    Ok(page(directory))
}

/// Everything the page shows, computed here so that the script only lays
/// it out.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub name: String,
    pub address: Option<String>,
    pub uptime_s: u64,
    pub epoch: u64,
    pub index: u64,
    /// The routes commit of the snapshot served.
    pub commit: Option<String>,
    pub warming: bool,
    /// The routes repo's state; None when the directory follows none.
    pub routes: Option<RoutesStatus>,
    pub services: Vec<ServicePage>,
    pub sherlocks: Vec<SherlockPage>,
    /// The snapshot's warnings, and what else an operator should know:
    /// warming, a stale routes repo, a failing fetch, a rejected commit.
    pub warnings: Vec<String>,
    pub instances: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServicePage {
    pub name: ServiceName,
    /// Whether the routes give it weights (else it splits equally).
    pub routed: bool,
    /// The clients with their own split (`clients:` in its route).
    pub clients: Vec<String>,
    pub versions: Vec<VersionPage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionPage {
    pub version: Version,
    /// The weight the routes give it; None when the service has no route.
    pub desired: Option<u32>,
    /// Percent of the service's traffic it gets now: its servers' share of
    /// the HAProxy weights in the snapshot served.
    pub share: f64,
    /// Its live instances, at most [`MAX_LISTED`].
    pub instances: Vec<InstancePage>,
    /// How many more are live than are listed.
    pub unlisted: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstancePage {
    pub id: String,
    pub url: String,
    /// Heartbeating on time: its last heartbeat is at most two of watson's
    /// periods (ttl / 3 each) old, as `dw route list` says.
    pub healthy: bool,
    pub last_heartbeat_ms: u64,
    pub ttl_ms: u64,
    /// Percent of the service's traffic this instance gets now.
    pub share: f64,
    /// Whether the snapshot served holds it yet.
    pub published: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SherlockPage {
    pub name: String,
    pub client: Option<String>,
    pub applied_epoch: u64,
    pub applied: u64,
    /// Snapshots it is behind the one served; None when what it applied
    /// is from another run of the directory (another epoch).
    pub lag: Option<u64>,
    pub last_seen_ms: u64,
    pub peer: String,
}

/// The page's data, read from the directory now.
fn page(directory: &Directory) -> Page {
    // One read under the lock: the snapshot, its routes and the repo state
    // describe the same commit.
    let (snapshot, desired, routes) = directory.in_force();
    let routes = directory.config.repo.as_ref().map(|_| routes);
    build(
        directory.config.name.clone(),
        directory.config.address.as_ref().map(ToString::to_string),
        directory.uptime().as_secs(),
        directory.config.max_ttl,
        &snapshot,
        &desired,
        routes,
        directory.instances(),
        directory.sherlocks(),
    )
}

/// The pure half of [`page`].
#[allow(clippy::too_many_arguments)]
fn build(
    name: String,
    address: Option<String>,
    uptime_s: u64,
    max_ttl: Duration,
    snapshot: &Snapshot,
    desired: &RouteSet,
    routes: Option<RoutesStatus>,
    instances: Vec<InstanceStatus>,
    sherlocks: Vec<SherlockStatus>,
) -> Page {
    let mut warnings = Vec::new();
    if snapshot.warming {
        warnings.push(format!(
            "warming: this directory started {uptime_s}s ago; for its first {} (--max-ttl) its registry may \
             still be filling, so sherlocks add backends from it but remove none",
            humantime::format_duration(max_ttl)
        ));
    }
    if let Some(r) = &routes {
        if let Some(stale) = &r.stale {
            warnings.push(format!("routes stale: {stale}"));
        }
        if let Some(error) = &r.error {
            warnings.push(format!("routes fetch failing: {error}"));
        }
        if let Some(rejected) = &r.rejected {
            warnings.push(format!(
                "commit {} rejected ({}): the commit in force stays; see above",
                short(&rejected.commit),
                serde_json::to_value(rejected.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ));
        }
    }
    warnings.extend(snapshot.warnings.iter().cloned());

    let mut names: BTreeSet<&ServiceName> = desired.routes.keys().collect();
    names.extend(instances.iter().map(|i| &i.service));
    names.extend(snapshot.services.keys());
    let services = names
        .into_iter()
        .map(|service| {
            let route = desired.routes.get(service);
            let backends = snapshot.services.get(service).map(|s| s.backends.as_slice()).unwrap_or_default();
            let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
            let versions_of: Vec<&Version> = backends.iter().map(|b| &b.version).collect();
            let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
            let shares = realized_shares(&versions_of, &weights);
            let mut by_version: BTreeMap<&Version, Vec<&InstanceStatus>> = BTreeMap::new();
            if let Some(route) = route {
                for (version, _) in route.weights.iter() {
                    by_version.entry(version).or_default();
                }
            }
            for i in instances.iter().filter(|i| &i.service == service) {
                by_version.entry(&i.version).or_default().push(i);
            }
            let versions = by_version
                .into_iter()
                .map(|(version, mut live)| {
                    live.sort_by(|a, b| a.url.to_string().cmp(&b.url.to_string()).then(a.id.cmp(&b.id)));
                    let unlisted = live.len().saturating_sub(MAX_LISTED);
                    let instances = live
                        .into_iter()
                        .take(MAX_LISTED)
                        .map(|i| {
                            let backend = backends.iter().find(|b| b.id == i.id);
                            let weight = backend.map_or(0, |b| u64::from(b.weight));
                            InstancePage {
                                id: i.id.to_string(),
                                url: i.url.to_string(),
                                healthy: i.last_heartbeat_ms <= i.ttl_ms * 2 / 3,
                                last_heartbeat_ms: i.last_heartbeat_ms,
                                ttl_ms: i.ttl_ms,
                                share: if total == 0 { 0.0 } else { 100.0 * weight as f64 / total as f64 },
                                published: backend.is_some(),
                            }
                        })
                        .collect();
                    VersionPage {
                        version: version.clone(),
                        desired: route.map(|r| r.weights.get(version)),
                        share: shares.get(version).copied().unwrap_or(0.0),
                        instances,
                        unlisted,
                    }
                })
                .collect();
            ServicePage {
                name: service.clone(),
                routed: route.is_some(),
                clients: route.map(|r| r.clients.keys().map(ToString::to_string).collect()).unwrap_or_default(),
                versions,
            }
        })
        .collect();

    let served = snapshot.id();
    let sherlocks = sherlocks
        .into_iter()
        .map(|s| SherlockPage {
            lag: (s.applied_epoch == served.epoch).then(|| served.index.saturating_sub(s.applied)),
            name: s.name,
            client: s.client,
            applied_epoch: s.applied_epoch,
            applied: s.applied,
            last_seen_ms: s.last_seen_ms,
            peer: s.peer,
        })
        .collect();

    Page {
        name,
        address,
        uptime_s,
        epoch: snapshot.epoch,
        index: snapshot.index,
        commit: snapshot.commit.clone(),
        warming: snapshot.warming,
        routes,
        services,
        sherlocks,
        warnings,
        instances: instances.len(),
    }
}

/// A commit id as people read it.
fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, ServiceBackends};
    use crate::protocol::{RejectKind, Rejected};

    #[test]
    fn a_browser_gets_html_curl_gets_text_and_format_wins() {
        let chrome = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8";
        assert_eq!(negotiate(None, Some(chrome)).unwrap(), Format::Html);
        assert_eq!(negotiate(None, Some("*/*")).unwrap(), Format::Text);
        assert_eq!(negotiate(None, None).unwrap(), Format::Text);
        assert_eq!(negotiate(None, Some("application/json")).unwrap(), Format::Json);
        assert_eq!(negotiate(Some("text"), Some(chrome)).unwrap(), Format::Text);
        assert_eq!(negotiate(Some("json"), Some("*/*")).unwrap(), Format::Json);
        assert_eq!(negotiate(Some("html"), None).unwrap(), Format::Html);
        let e = negotiate(Some("xml"), None).unwrap_err().to_string();
        assert_eq!(e, "invalid format \"xml\": expected html, text or json");
    }

    #[test]
    fn a_basic_password_is_the_token() {
        // base64("any:s3cret:with:colons")
        let header = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("any:s3cret:with:colons"));
        assert_eq!(basic_password(header.as_bytes()).as_deref(), Some("s3cret:with:colons"));
        assert_eq!(basic_password(b"basic OnRvaw==").as_deref(), Some("tok"));
        assert_eq!(basic_password(b"Bearer tok"), None);
        assert_eq!(basic_password(b"Basic !!!"), None);
        assert_eq!(basic_password(b"Basic bm9jb2xvbg=="), None, "no colon");
    }

    #[test]
    fn the_page_allows_only_its_own_script_and_style() {
        let (page, csp) = &*PAGE;
        let csp = csp.to_str().unwrap();
        assert!(csp.starts_with("default-src 'none'; script-src 'sha256-"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(page.contains(SCRIPT) && page.contains(CSS));
        assert!(!page.contains("/*SCRIPT*/") && !page.contains("/*STYLE*/"));
        // The script never parses data as HTML.
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
            assert!(!SCRIPT.contains(sink), "app.js uses {sink}");
        }
    }

    fn instance(id: &str, service: &str, version: &str, port: u16, age_ms: u64) -> InstanceStatus {
        InstanceStatus {
            id: id.parse().unwrap(),
            service: service.parse().unwrap(),
            version: version.parse().unwrap(),
            url: format!("http://127.0.0.1:{port}/{service}").parse().unwrap(),
            ttl_ms: 3000,
            last_heartbeat_ms: age_ms,
        }
    }

    fn backend(id: &str, version: &str, port: u16, weight: u32) -> Backend {
        Backend {
            id: id.parse().unwrap(),
            url: format!("http://127.0.0.1:{port}/barker").parse().unwrap(),
            version: version.parse().unwrap(),
            weight,
        }
    }

    #[test]
    fn services_versions_shares_health_and_lag() {
        let desired: RouteSet = serde_yaml::from_str(
            "routes:\n  barker:\n    weights: {v1: 90, v2: 10}\n    clients: {monolith: {v1: 100}}\n",
        )
        .unwrap();
        let mut snapshot = Snapshot {
            epoch: 7,
            index: 12,
            commit: Some("0123456789abcdef".into()),
            warnings: vec!["barker: version v3 ...".into()],
            ..Snapshot::default()
        };
        // v1's two servers at 9 each and v2's one at 2: 90% / 10%.
        snapshot.services.insert(
            "barker".parse().unwrap(),
            ServiceBackends {
                backends: vec![backend("a", "v1", 1, 9), backend("b", "v1", 2, 9), backend("c", "v2", 3, 2)],
            },
        );
        let instances = vec![
            instance("a", "barker", "v1", 1, 100),
            instance("b", "barker", "v1", 2, 2500),
            instance("c", "barker", "v2", 3, 10),
            instance("d", "barker", "v2", 4, 10),
            instance("e", "emitter", "v9", 5, 10),
        ];
        let sherlock = |name: &str, epoch, applied| SherlockStatus {
            name: name.into(),
            client: None,
            applied_epoch: epoch,
            applied,
            peer: "127.0.0.1:1".into(),
            last_seen_ms: 5,
        };
        let routes = RoutesStatus {
            stale: Some("not fetched since start: ...".into()),
            rejected: Some(Rejected {
                commit: "fedcba9876543210".into(),
                summary: "bad".into(),
                kind: RejectKind::Rewind,
                errors: vec!["history moved back".into()],
                at: "now".into(),
            }),
            ..RoutesStatus::default()
        };
        let page = build(
            "services".into(),
            None,
            1,
            Duration::from_secs(3),
            &Snapshot { warming: true, ..snapshot },
            &desired,
            Some(routes),
            instances,
            vec![sherlock("s1", 7, 12), sherlock("s2", 7, 10), sherlock("s3", 6, 40)],
        );
        assert_eq!(page.services.len(), 2);
        let barker = &page.services[0];
        assert_eq!(
            (barker.name.as_str(), barker.routed, barker.clients.clone()),
            ("barker", true, vec!["monolith".into()])
        );
        let v: Vec<(&str, Option<u32>, f64, usize)> =
            barker.versions.iter().map(|v| (v.version.as_str(), v.desired, v.share, v.instances.len())).collect();
        assert_eq!(v, [("v1", Some(90), 90.0, 2), ("v2", Some(10), 10.0, 2)]);
        let v1 = &barker.versions[0].instances;
        assert_eq!((v1[0].healthy, v1[0].share, v1[0].published), (true, 45.0, true));
        assert!(!v1[1].healthy, "2.5 s since a heartbeat of a 1 s watson is late");
        let d = &barker.versions[1].instances[1];
        assert_eq!((d.id.as_str(), d.share, d.published), ("d", 0.0, false));
        let emitter = &page.services[1];
        assert_eq!((emitter.routed, emitter.versions[0].desired, emitter.versions[0].share), (false, None, 0.0));
        let lags: Vec<Option<u64>> = page.sherlocks.iter().map(|s| s.lag).collect();
        assert_eq!(lags, [Some(0), Some(2), None]);
        assert!(page.warnings[0].starts_with("warming: this directory started 1s ago; for its first 3s"));
        assert_eq!(page.warnings[1], "routes stale: not fetched since start: ...");
        assert_eq!(page.warnings[2], "commit fedcba987654 rejected (rewind): the commit in force stays; see above");
        assert_eq!(page.warnings[3], "barker: version v3 ...");
        assert_eq!(page.instances, 5);
    }

    #[test]
    fn a_version_lists_at_most_max_listed_instances() {
        let instances: Vec<InstanceStatus> =
            (0..MAX_LISTED + 3).map(|n| instance(&format!("i{n}"), "emitter", "v1", 1000 + n as u16, 0)).collect();
        let page = build(
            "d".into(),
            None,
            0,
            Duration::from_secs(3),
            &Snapshot::default(),
            &RouteSet::default(),
            None,
            instances,
            vec![],
        );
        let v = &page.services[0].versions[0];
        assert_eq!((v.instances.len(), v.unlisted), (MAX_LISTED, 3));
    }

    /// The router over a directory with `auth`, its publisher running.
    fn app_with(auth: crate::directory::auth::Auth) -> (axum::Router, Arc<Directory>) {
        crate::directory::api::tests::app_with_auth(auth)
    }

    async fn get(app: &axum::Router, uri: &str, headers: &[(&str, &str)]) -> (u16, HeaderMap, String) {
        use tower::ServiceExt as _;
        let mut req = axum::http::Request::builder().uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut req = req.body(axum::body::Body::empty()).unwrap();
        req.extensions_mut().insert(axum::extract::ConnectInfo(std::net::SocketAddr::from(([127, 0, 0, 1], 1))));
        let resp = app.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status.as_u16(), parts.headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    const BROWSER: (&str, &str) = ("accept", "text/html,application/xhtml+xml,*/*;q=0.8");

    #[tokio::test]
    async fn curl_gets_the_text_a_browser_the_page_and_the_page_its_json() {
        let (app, directory) = app_with(crate::directory::auth::Auth::off());
        let (status, headers, body) = get(&app, "/", &[("accept", "*/*")]).await;
        assert_eq!(status, 200);
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert!(body.starts_with("dstack directory test (snapshot "), "{body}");
        let (status, headers, body) = get(&app, "/", &[BROWSER]).await;
        assert_eq!(status, 200);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap().starts_with("default-src 'none'"));
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert!(body.starts_with("<!doctype html>") && body.contains(SCRIPT), "{body}");
        let (_, headers, _) = get(&app, "/?format=text", &[BROWSER]).await;
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        let (status, _, body) = get(&app, "/?format=xml", &[]).await;
        assert_eq!(status, 400);
        assert!(body.contains("expected html, text or json"), "{body}");
        let (status, _, body) = get(&app, "/?colour=red", &[]).await;
        assert_eq!(status, 400);
        assert!(body.contains("format=html|text|json"), "{body}");

        // The long poll: held until the snapshot moves on.
        let (_, _, body) = get(&app, "/?format=json", &[]).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let (epoch, index) = (json["epoch"].as_u64().unwrap(), json["index"].as_u64().unwrap());
        let uri = format!("/?format=json&epoch={epoch}&index={index}&wait=20s");
        let waiter = tokio::spawn({
            let app = app.clone();
            async move { get(&app, &uri, &[]).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "nothing changed yet");
        let heartbeat = r#"{"service":"emitter","version":"v1","url":"http://127.0.0.1:9001/emitter","ttl_ms":3000}"#;
        directory.heartbeat("e1".parse().unwrap(), serde_json::from_str(heartbeat).unwrap()).unwrap();
        let (status, _, body) = tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        assert_eq!(status, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["index"].as_u64(), Some(index + 1), "{json}");
        assert_eq!(json["services"][0]["versions"][0]["instances"][0]["url"], "http://127.0.0.1:9001/emitter");
    }

    #[tokio::test]
    async fn with_tokens_a_browser_gives_a_read_token_as_its_basic_password() {
        use crate::directory::auth::{Auth, AuthTable};
        let digest = |t: &str| crate::secret::hex(&sha2::Sha256::digest(t.as_bytes()));
        let yaml = format!(
            "tokens:\n  - {{name: grafana, role: read, sha256: {}}}\n  - {{name: vm101, role: watson, services: [e], sha256: {}}}\n",
            digest("rd"),
            digest("w")
        );
        let path = std::path::Path::new("auth.yaml");
        let (app, _) = app_with(Auth::from_table(path, AuthTable::parse(path, &yaml).unwrap()));
        let basic =
            |user_password: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_password));

        let (status, headers, body) = get(&app, "/", &[BROWSER]).await;
        assert_eq!(status, 401);
        let challenges: Vec<&str> =
            headers.get_all(header::WWW_AUTHENTICATE).iter().map(|h| h.to_str().unwrap()).collect();
        assert_eq!(challenges, ["Bearer", REALM]);
        assert!(body.contains("give the token as the password"), "{body}");
        assert!(!body.contains("<html"), "nothing of the page without a token");

        let (status, _, body) = get(&app, "/", &[BROWSER, ("authorization", &basic("anyone:rd"))]).await;
        assert_eq!(status, 200);
        assert!(body.starts_with("<!doctype html>"));
        let (status, _, _) = get(&app, "/?format=json", &[("authorization", &basic(":rd"))]).await;
        assert_eq!(status, 200);
        assert_eq!(get(&app, "/", &[("authorization", "Bearer rd")]).await.0, 200);
        let (status, _, body) = get(&app, "/", &[BROWSER, ("authorization", &basic("x:w"))]).await;
        assert_eq!(status, 403, "a watson's token may not read");
        assert!(body.contains("needs role operator or read"), "{body}");
        assert_eq!(get(&app, "/", &[BROWSER, ("authorization", &basic("rd:wrong"))]).await.0, 401);
        // Basic is for the page alone: the API still wants Bearer.
        let (status, _, _) = get(&app, "/v1/status", &[("authorization", &basic("x:rd"))]).await;
        assert_eq!(status, 401);
    }
}
