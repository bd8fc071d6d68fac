//! The directory's HTTP API (`/v1`), separate from `run` so that handlers
//! are tested without a socket.
//!
//! Bodies and queries are parsed by hand rather than with axum's extractors
//! so that every refusal is a JSON `{"error": ...}` with a 4xx status.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::reconcile::RoutesStatus;
use super::Directory;
use crate::model::{Heartbeat, InstanceId, InstanceUrl, ServiceName, Snapshot, Version};
use crate::routes::RouteSet;

/// Heartbeats are tiny; anything larger is a mistake or an attack.
const MAX_BODY: usize = 64 * 1024;
/// The longest a blocking query may wait.
const MAX_WAIT: Duration = Duration::from_secs(300);
const MIN_TTL_MS: u64 = 100;

/// Every way a request can fail. Internal details are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}

/// One instance as `/v1/instances` and `/v1/status` list it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: InstanceId,
    pub service: ServiceName,
    pub version: Version,
    pub url: InstanceUrl,
    pub ttl_ms: u64,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms: u64,
}

/// One sherlock as `/v1/status` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SherlockStatus {
    pub name: String,
    /// The snapshot index it has applied to its HAProxy.
    pub applied: u64,
    pub peer: String,
    pub last_seen_ms: u64,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub address: Option<String>,
    pub uptime_s: u64,
    pub index: u64,
    pub commit: Option<String>,
    pub warming: bool,
    pub warnings: Vec<String>,
    pub instances: Vec<InstanceStatus>,
    pub sherlocks: Vec<SherlockStatus>,
    /// The routes repo: commit in force, rejected commit, fetch error.
    pub routes: Option<RoutesStatus>,
    /// The desired weights in force.
    #[serde(default)]
    pub desired: RouteSet,
}

/// The router, given the directory it serves.
pub fn app(directory: Arc<Directory>) -> Router {
    Router::new()
        .route("/", get(index_page))
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{id}", put(put_instance).delete(delete_instance))
        .route("/v1/snapshot", get(get_snapshot))
        .route("/v1/status", get(get_status))
        .route("/v1/reconcile", axum::routing::post(post_reconcile))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::NotFound("no such endpoint; see /v1/status, /v1/snapshot, /v1/instances/{id}".into())
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(directory)
}

fn parse_id(raw: &str) -> Result<InstanceId, ApiError> {
    raw.parse().map_err(|e: crate::model::NameError| ApiError::BadRequest(e.to_string()))
}

fn bad(directory: &Directory, err: ApiError) -> ApiError {
    directory.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(error = %err, "refused a request");
    err
}

async fn put_instance(
    State(directory): State<Arc<Directory>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id).map_err(|e| bad(&directory, e))?;
    let heartbeat: Heartbeat = serde_json::from_slice(&body)
        .map_err(|e| bad(&directory, ApiError::BadRequest(format!("invalid heartbeat body: {e}"))))?;
    let max_ttl_ms = directory.config.max_ttl.as_millis() as u64;
    if !(MIN_TTL_MS..=max_ttl_ms.max(MIN_TTL_MS)).contains(&heartbeat.ttl_ms) {
        return Err(bad(
            &directory,
            ApiError::BadRequest(format!(
                "ttl_ms {} is out of range: this directory accepts {MIN_TTL_MS}..={max_ttl_ms} (its --max-ttl)",
                heartbeat.ttl_ms
            )),
        ));
    }
    directory.heartbeat(id, heartbeat);
    Ok(Json(serde_json::json!({ "index": directory.snapshot().index })))
}

async fn delete_instance(
    State(directory): State<Arc<Directory>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id).map_err(|e| bad(&directory, e))?;
    let removed = directory.deregister(&id);
    Ok(Json(serde_json::json!({ "removed": removed, "index": directory.snapshot().index })))
}

async fn list_instances(State(directory): State<Arc<Directory>>) -> Json<Vec<InstanceStatus>> {
    Json(directory.instances())
}

/// The query of a blocking snapshot request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotQuery {
    /// Return once the snapshot's index is above this.
    #[serde(default)]
    index: u64,
    /// How long to wait for that, e.g. `30s`.
    wait: Option<String>,
    /// The asking sherlock's name and the index it has applied, so that
    /// `dw apply` can wait for convergence.
    sherlock: Option<String>,
    applied: Option<u64>,
}

async fn get_snapshot(
    State(directory): State<Arc<Directory>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
) -> Result<Json<Arc<Snapshot>>, ApiError> {
    let query: SnapshotQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| bad(&directory, ApiError::BadRequest(format!("invalid query: {e}; expected index=N&wait=30s"))))?;
    let wait = match &query.wait {
        None => Duration::ZERO,
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| {
                bad(
                    &directory,
                    ApiError::BadRequest(format!("invalid wait {w:?}: {e}; expected a duration such as 30s")),
                )
            })?
            .min(MAX_WAIT),
    };
    if let Some(name) = query.sherlock {
        let name = name.parse::<InstanceId>().map_err(|_| {
            bad(
                &directory,
                ApiError::BadRequest(format!("invalid sherlock name {name:?}: 1 to 128 of A-Z a-z 0-9 . _ -")),
            )
        })?;
        directory.saw_sherlock(name.to_string(), query.applied.unwrap_or(0), peer);
    }

    let mut rx = directory.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let current = rx.borrow_and_update().clone();
        // A query for an index this directory has not reached means it has
        // restarted since (indexes begin again at 1): answer at once.
        if current.index != query.index || wait.is_zero() {
            return Ok(Json(current));
        }
        tokio::select! {
            changed = tokio::time::timeout_at(deadline, rx.changed()) => {
                if !matches!(changed, Ok(Ok(()))) {
                    return Ok(Json(rx.borrow().clone()));
                }
            }
            _ = directory.shutdown.cancelled() => return Ok(Json(current)),
        }
    }
}

fn status(directory: &Directory) -> Status {
    // One read under the lock: the snapshot, its routes and the repo state
    // always describe the same commit (dw plan compares against them).
    let (snapshot, desired, routes) = directory.in_force();
    Status {
        name: directory.config.name.clone(),
        address: directory.config.address.clone(),
        uptime_s: directory.started_at.elapsed().unwrap_or_default().as_secs(),
        index: snapshot.index,
        commit: snapshot.commit.clone(),
        warming: snapshot.warming,
        warnings: snapshot.warnings.clone(),
        instances: directory.instances(),
        sherlocks: directory.sherlocks(),
        routes: directory.config.repo.as_ref().map(|_| routes),
        desired,
    }
}

/// The webhook: fetch now, answer with the commit in force afterwards.
async fn post_reconcile(State(directory): State<Arc<Directory>>) -> Result<Json<RoutesStatus>, ApiError> {
    let Some(tx) = directory.reconcile_sender() else {
        return Err(ApiError::Conflict("this directory follows no routes repo (start it with --repo)".into()));
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let unavailable = || ApiError::Unavailable("the reconciler is shutting down".into());
    tx.send(Some(reply)).await.map_err(|_| unavailable())?;
    match tokio::time::timeout(Duration::from_secs(60), answer).await {
        Ok(Ok(status)) => Ok(Json(status)),
        Ok(Err(_)) => Err(unavailable()),
        Err(_) => Err(ApiError::Unavailable("the reconcile took over 60s; see /v1/status".into())),
    }
}

async fn get_status(State(directory): State<Arc<Directory>>) -> Json<Status> {
    Json(status(&directory))
}

async fn index_page(State(directory): State<Arc<Directory>>) -> impl IntoResponse {
    let s = status(&directory);
    let mut page = format!("dstack directory {} (snapshot {}, up {}s)\n\n", s.name, s.index, s.uptime_s);
    for i in &s.instances {
        let _ = writeln!(page, "{:<20} {:<10} {:<40} {}ms ago", i.service, i.version, i.url, i.last_heartbeat_ms);
    }
    for w in &s.warnings {
        let _ = writeln!(page, "warning: {w}");
    }
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], page)
}

async fn metrics(State(directory): State<Arc<Directory>>) -> impl IntoResponse {
    let m = &directory.metrics;
    let snapshot = directory.snapshot();
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n");
    };
    let counters: [(&str, &str, &AtomicU64); 7] = [
        ("dstack_directory_heartbeats_total", "Heartbeats accepted.", &m.heartbeats),
        ("dstack_directory_deregistrations_total", "Instances deregistered by their watson.", &m.deregistrations),
        ("dstack_directory_expiries_total", "Instances expired for lack of heartbeats.", &m.expiries),
        ("dstack_directory_snapshots_published_total", "Snapshots published.", &m.snapshots_published),
        ("dstack_directory_bad_requests_total", "Requests refused with a 4xx.", &m.bad_requests),
        ("dstack_directory_reconciles_total", "Reconciles of the routes repo.", &m.reconciles),
        ("dstack_directory_rejected_commits_total", "Routes commits rejected by validation.", &m.rejected_commits),
    ];
    for (name, help, value) in counters {
        counter(name, help, value.load(Ordering::Relaxed));
    }
    let _ = write!(
        out,
        "# HELP dstack_directory_snapshot_index Index of the snapshot served.\n# TYPE dstack_directory_snapshot_index gauge\ndstack_directory_snapshot_index {}\n\
         # HELP dstack_directory_instances Live instances.\n# TYPE dstack_directory_instances gauge\ndstack_directory_instances {}\n",
        snapshot.index,
        directory.instance_count()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Config;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn app_for_test() -> (Router, Arc<Directory>) {
        let config = Config {
            name: "test".into(),
            address: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: std::env::temp_dir(),
            repo: None,
            max_ttl: Duration::from_secs(10),
        };
        let (directory, _) = Directory::new(config, tokio_util::sync::CancellationToken::new());
        (app(directory.clone()), directory)
    }

    async fn call(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri).body(Body::from(body.to_string())).unwrap();
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 1))));
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    const GOOD: &str = r#"{"service":"emitter","version":"v1","url":"http://127.0.0.1:9001/emitter","ttl_ms":3000}"#;

    #[tokio::test]
    async fn heartbeat_then_snapshot() {
        let (app, _) = app_for_test();
        let (status, _) = call(&app, "PUT", "/v1/instances/e1", GOOD).await;
        assert_eq!(status, StatusCode::OK);
        let (status, snap) = call(&app, "GET", "/v1/snapshot?index=0", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(snap["index"], 2);
        assert_eq!(snap["services"]["emitter"]["backends"][0]["url"], "http://127.0.0.1:9001/emitter");
        let (_, removed) = call(&app, "DELETE", "/v1/instances/e1", "").await;
        assert_eq!(removed["removed"], true);
    }

    #[tokio::test]
    async fn bad_input_is_a_json_400() {
        let (app, _) = app_for_test();
        let cases = [
            (
                "PUT",
                "/v1/instances/e1",
                r#"{"service":"Bad Name","version":"v1","url":"http://h","ttl_ms":3000}"#,
                "invalid service name",
            ),
            (
                "PUT",
                "/v1/instances/e1",
                r#"{"service":"e","version":"v 1","url":"http://h","ttl_ms":3000}"#,
                "invalid version",
            ),
            (
                "PUT",
                "/v1/instances/e1",
                r#"{"service":"e","version":"v1","url":"http://h/a b","ttl_ms":3000}"#,
                "invalid instance URL",
            ),
            (
                "PUT",
                "/v1/instances/e1",
                r#"{"service":"e","version":"v1","url":"http://h","ttl_ms":99999}"#,
                "out of range",
            ),
            (
                "PUT",
                "/v1/instances/e1",
                r#"{"service":"e","version":"v1","url":"http://h","ttl_ms":3000,"x":1}"#,
                "unknown field",
            ),
            ("PUT", "/v1/instances/e1", "{not json", "invalid heartbeat body"),
            ("PUT", "/v1/instances/a%3Bb", GOOD, "invalid instance id"),
            ("GET", "/v1/snapshot?index=x", "", "invalid query"),
            ("GET", "/v1/snapshot?wait=soon", "", "invalid wait"),
        ];
        for (method, uri, body, want) in cases {
            let (status, json) = call(&app, method, uri, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {body}");
            let msg = json["error"].as_str().unwrap_or_default();
            assert!(msg.contains(want), "{uri} {body}: {msg}");
        }
    }

    #[tokio::test]
    async fn metrics_count_heartbeats_publishes_and_refusals() {
        let (app, _) = app_for_test();
        call(&app, "PUT", "/v1/instances/e1", GOOD).await;
        call(&app, "PUT", "/v1/instances/e1", GOOD).await;
        call(&app, "PUT", "/v1/instances/e1", "{").await;
        let req = Request::builder().uri("/metrics").body(Body::empty()).unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let text = String::from_utf8(axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
        for line in [
            "dstack_directory_heartbeats_total 2",
            "dstack_directory_snapshots_published_total 1",
            "dstack_directory_bad_requests_total 1",
            "dstack_directory_expiries_total 0",
            "dstack_directory_reconciles_total 0",
            "dstack_directory_instances 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }

    #[tokio::test]
    async fn oversized_body_is_refused() {
        let (app, _) = app_for_test();
        let huge = format!(r#"{{"service":"{}"}}"#, "a".repeat(MAX_BODY * 2));
        let req = Request::builder().method("PUT").uri("/v1/instances/e1").body(Body::from(huge)).unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn blocking_query_wakes_on_change() {
        let (app, directory) = app_for_test();
        let waiter = tokio::spawn({
            let app = app.clone();
            async move { call(&app, "GET", "/v1/snapshot?index=1&wait=10s", "").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        directory.heartbeat("e1".parse().unwrap(), serde_json::from_str(GOOD).unwrap());
        let (_, snap) = tokio::time::timeout(Duration::from_secs(2), waiter).await.unwrap().unwrap();
        assert_eq!(snap["index"], 2);
    }
}
