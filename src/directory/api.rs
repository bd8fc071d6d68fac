//! The directory's HTTP API (`/v1`), separate from `run` so that handlers
//! are tested without a socket.
//!
//! Input arrives through the extractors below, whose every rejection is the
//! same JSON `{"error": ...}` as any other refusal (the body limit's 413
//! included); one middleware counts every 4xx. Handlers hold only logic.
//!
//! Every handler takes an [`Allowed`] (or, for the webhook, a
//! [`ReconcileAllowed`]) first: it authenticates the caller (401) and asks
//! [`Caller::check`], the one place that decides, whether the caller's
//! role allows the endpoint (403).

use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use super::answers::{Answer, Encoding, Published};
use super::auth::{Action, Caller, Denied, Unauthenticated};
use super::limits::{check_address, Network};
use super::{Directory, Full};
use crate::model::{ClientName, Heartbeat, InstanceId, InstanceUrl, SnapshotId};
use crate::protocol::{ErrorBody, InstanceStatus, RoutesStatus, SnapshotQuery, Status, WriteAck, MAX_WAIT};

/// Heartbeats are tiny; anything larger is a mistake or an attack.
const MAX_BODY: usize = 64 * 1024;
/// A git host's push event lists the commits pushed; the webhook's body is
/// read whole to check its signature.
const MAX_WEBHOOK_BODY: usize = 1024 * 1024;
const MIN_TTL_MS: u64 = 100;
/// The longest `POST /v1/reconcile` waits for its fetch before answering
/// 202: git hosts give up on a webhook after about 10 s.
pub const RECONCILE_WAIT: Duration = Duration::from_secs(8);

/// Every way a request can fail. Internal details are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// No valid token (or webhook signature).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token whose role or services do not allow the request.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unavailable(String),
    /// A limit of the directory's is reached (see `limits`).
    #[error("{0}")]
    TooMany(String),
    /// A heartbeat's `ttl_ms` outside what this directory accepts; the
    /// answer carries the largest it accepts, so that watson can adapt.
    #[error("{message}")]
    Ttl { message: String, max_ttl_ms: u64 },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) | ApiError::Ttl { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        };
        let max_ttl_ms = match &self {
            ApiError::Ttl { max_ttl_ms, .. } => Some(*max_ttl_ms),
            _ => None,
        };
        let mut resp = (status, Json(ErrorBody { error: self.to_string(), max_ttl_ms })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: a 401 says which scheme would do.
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> ApiError {
        ApiError::Forbidden(denied.0)
    }
}

impl From<Full> for ApiError {
    fn from(full: Full) -> ApiError {
        ApiError::TooMany(full.0)
    }
}

impl From<Unauthenticated> for ApiError {
    fn from(refused: Unauthenticated) -> ApiError {
        ApiError::Unauthorized(refused.0)
    }
}

/// A JSON body that names itself in errors ("invalid heartbeat body: ...").
pub trait Body: DeserializeOwned {
    const WHAT: &'static str;
}

impl Body for Heartbeat {
    const WHAT: &'static str = "heartbeat";
}

/// A query string that says what it expects in errors.
pub trait Form: DeserializeOwned {
    const EXPECTED: &'static str;
}

impl Form for SnapshotQuery {
    const EXPECTED: &'static str = "epoch=E&index=N&wait=30s";
}

/// Extracts a JSON body of type `T` (any content type: watson's requests
/// are the only writers and a missing header is no reason to refuse).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: Body> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(MAX_BODY),
            _ => ApiError::BadRequest(format!("cannot read the request body: {}", e.body_text())),
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("invalid {} body: {e}", T::WHAT)))
    }
}

/// Extracts a query string of type `T`; unknown keys are refused.
pub struct QueryForm<T>(pub T);

impl<S: Send + Sync, T: Form> FromRequestParts<S> for QueryForm<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(parts.uri.query().unwrap_or(""))
            .map(QueryForm)
            .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}; expected {}", T::EXPECTED)))
    }
}

/// The `{id}` of `/v1/instances/{id}`, checked.
pub struct PathId(pub InstanceId);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(raw) = axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("invalid instance id: {}", e.body_text())))?;
        raw.parse().map(PathId).map_err(|e: crate::model::NameError| ApiError::BadRequest(e.to_string()))
    }
}

/// What an endpoint needs of its caller: one [`Action`], checked by
/// [`Allowed`] before anything else of the request is read.
pub trait Need {
    const ACTION: Action<'static>;
}

/// `/v1/status`, `/v1/instances`, `/metrics`, `/`.
pub struct ReadAccess;
impl Need for ReadAccess {
    const ACTION: Action<'static> = Action::Read;
}

/// `GET /v1/snapshot`.
pub struct SubscribeAccess;
impl Need for SubscribeAccess {
    const ACTION: Action<'static> = Action::Subscribe;
}

/// `PUT` and `DELETE /v1/instances/{id}`; the service is checked once known.
pub struct WriteAccess;
impl Need for WriteAccess {
    const ACTION: Action<'static> = Action::Write;
}

/// The caller, authenticated from `Authorization: Bearer TOKEN` (401
/// otherwise) and allowed `N::ACTION` (403 otherwise).
pub struct Allowed<N>(pub Caller, PhantomData<N>);

fn authenticate(parts: &Parts, directory: &Directory) -> Result<Caller, ApiError> {
    let header = parts.headers.get(header::AUTHORIZATION).map(|h| h.as_bytes());
    Ok(directory.auth.authenticate(header)?)
}

impl<N: Need> FromRequestParts<Arc<Directory>> for Allowed<N> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, directory: &Arc<Directory>) -> Result<Self, ApiError> {
        let caller = authenticate(parts, directory)?;
        caller.check(N::ACTION)?;
        Ok(Allowed(caller, PhantomData))
    }
}

/// `POST /v1/reconcile`'s caller: a webhook whose `X-Hub-Signature-256`
/// checks against the raw body (when a signature is sent and a secret is
/// set), else a token allowed to reconcile.
pub struct ReconcileAllowed(pub Caller);

const SIGNATURE_HEADER: &str = "x-hub-signature-256";

impl FromRequest<Arc<Directory>> for ReconcileAllowed {
    type Rejection = ApiError;

    async fn from_request(req: Request, directory: &Arc<Directory>) -> Result<Self, ApiError> {
        let signature = req.headers().get(SIGNATURE_HEADER).cloned();
        match signature {
            Some(signature) if directory.auth.has_webhook_secret() => {
                let body = Bytes::from_request(req, directory).await.map_err(|e| match e.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(MAX_WEBHOOK_BODY),
                    _ => ApiError::BadRequest(format!("cannot read the request body: {}", e.body_text())),
                })?;
                Ok(ReconcileAllowed(directory.auth.verify_webhook(signature.as_bytes(), &body)?))
            }
            _ => {
                let (parts, _) = req.into_parts();
                let caller = authenticate(&parts, directory).map_err(|e| match e {
                    ApiError::Unauthorized(m) if directory.auth.has_webhook_secret() => {
                        ApiError::Unauthorized(format!("{m}, or sign the body (X-Hub-Signature-256)"))
                    }
                    other => other,
                })?;
                caller.check(Action::Reconcile)?;
                Ok(ReconcileAllowed(caller))
            }
        }
    }
}

/// Counts every refusal in one place, whichever extractor or handler made it.
async fn count_refusals(State(directory): State<Arc<Directory>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    if status.is_client_error() {
        directory.metrics.bad_requests.inc();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            directory.metrics.auth_refusals.inc();
            // Who was refused shows in the caller's own error; here, which
            // endpoint was tried, for an operator watching for intruders.
            tracing::info!(%status, %method, %path, "refused by auth");
        } else {
            tracing::debug!(%status, "refused a request");
        }
    }
    resp
}

/// The router, given the directory it serves.
pub fn app(directory: Arc<Directory>) -> Router {
    Router::new()
        .route("/", get(super::status_page::index))
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{id}", put(put_instance).delete(delete_instance))
        .route("/v1/snapshot", get(get_snapshot))
        .route("/v1/status", get(get_status))
        .route("/v1/reconcile", axum::routing::post(post_reconcile).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::NotFound("no such endpoint; see /v1/status, /v1/snapshot, /v1/instances/{id}".into())
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(directory.clone(), count_refusals))
        .with_state(directory)
}

async fn put_instance(
    State(directory): State<Arc<Directory>>,
    Allowed(caller, _): Allowed<WriteAccess>,
    PathId(id): PathId,
    JsonBody(heartbeat): JsonBody<Heartbeat>,
) -> Result<Json<WriteAck>, ApiError> {
    let started = std::time::Instant::now();
    let answer = register(&directory, caller, id, heartbeat).await;
    directory.metrics.heartbeat.observe(started.elapsed());
    answer
}

/// A heartbeat's checks and its registration.
async fn register(
    directory: &Directory,
    caller: Caller,
    id: InstanceId,
    heartbeat: Heartbeat,
) -> Result<Json<WriteAck>, ApiError> {
    let max_ttl_ms = directory.config.max_ttl.as_millis() as u64;
    let max_ttl_ms = max_ttl_ms.max(MIN_TTL_MS);
    if !(MIN_TTL_MS..=max_ttl_ms).contains(&heartbeat.ttl_ms) {
        return Err(ApiError::Ttl {
            message: format!(
                "ttl_ms {} is out of range: this directory accepts {MIN_TTL_MS}..={max_ttl_ms} (its --max-ttl)",
                heartbeat.ttl_ms
            ),
            max_ttl_ms,
        });
    }
    caller.check(Action::Register(&heartbeat.service))?;
    if !directory.is_refresh(&id, &heartbeat) {
        check_destination(&directory.config.allow_networks, &heartbeat.url).await?;
    }
    // The id may already be held by an instance of another service.
    let mut ack =
        directory.heartbeat_if(id, heartbeat, |held| caller.check(Action::Register(held)).map_err(ApiError::from))?;
    // Every answer says it, so a watson that adapted also learns when a
    // restarted directory accepts more again.
    ack.max_ttl_ms = Some(max_ttl_ms);
    Ok(Json(ack))
}

/// Where a new instance may point (`--allow-network`). An IP address is
/// checked as it is; a DNS name is resolved and every address checked when
/// networks are listed (without a list, names are left to each sherlock's
/// resolver, and only literal addresses of the forbidden kinds are refused).
async fn check_destination(allowed: &[Network], url: &InstanceUrl) -> Result<(), ApiError> {
    let refuse = |why: String| ApiError::BadRequest(format!("instance URL {url}: {why}"));
    let addrs: Vec<IpAddr> = match url.host().parse::<IpAddr>() {
        Ok(addr) => vec![addr],
        Err(_) if allowed.is_empty() => return Ok(()),
        Err(_) => {
            let lookup = tokio::net::lookup_host((url.host(), url.port()));
            match tokio::time::timeout(Duration::from_secs(2), lookup).await {
                Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
                Ok(Err(e)) => return Err(refuse(format!("cannot resolve {}: {e}", url.host()))),
                Err(_) => return Err(refuse(format!("resolving {} took over 2s", url.host()))),
            }
        }
    };
    if addrs.is_empty() {
        return Err(refuse(format!("{} resolves to no address", url.host())));
    }
    addrs.into_iter().try_for_each(|addr| check_address(addr, allowed)).map_err(refuse)
}

async fn delete_instance(
    State(directory): State<Arc<Directory>>,
    Allowed(caller, _): Allowed<WriteAccess>,
    PathId(id): PathId,
) -> Result<Json<WriteAck>, ApiError> {
    Ok(Json(directory.deregister_if(&id, |held| caller.check(Action::Register(held)))?))
}

async fn list_instances(State(directory): State<Arc<Directory>>, _: Allowed<ReadAccess>) -> Json<Vec<InstanceStatus>> {
    Json(directory.instances())
}

async fn get_snapshot(
    State(directory): State<Arc<Directory>>,
    Allowed(caller, _): Allowed<SubscribeAccess>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    QueryForm(query): QueryForm<SnapshotQuery>,
) -> Result<Response, ApiError> {
    let wait = match &query.wait {
        None => Duration::ZERO,
        Some(w) => humantime::parse_duration(w)
            .map_err(|e| ApiError::BadRequest(format!("invalid wait {w:?}: {e}; expected a duration such as 30s")))?
            .min(MAX_WAIT),
    };
    let client = match &query.client {
        None => None,
        Some(c) => Some(c.parse::<ClientName>().map_err(|e| ApiError::BadRequest(format!("invalid client: {e}")))?),
    };
    // The client a sherlock token is for, whatever the query claims: its
    // view is the only one it gets.
    let client = caller.sherlock_client(client)?;
    let encoding = Encoding::accepted(headers.get(header::ACCEPT_ENCODING).map(|h| h.as_bytes()));
    // A sherlock token's own name, whatever the query claims.
    if let Some(name) = caller.sherlock_name(query.sherlock)? {
        let name = name.parse::<InstanceId>().map_err(|_| {
            ApiError::BadRequest(format!("invalid sherlock name {name:?}: 1 to 128 of A-Z a-z 0-9 . _ -"))
        })?;
        let applied = SnapshotId { epoch: query.applied_epoch.unwrap_or(0), index: query.applied.unwrap_or(0) };
        directory.saw_sherlock(name.to_string(), client.clone(), applied, peer);
    }

    let held = SnapshotId { epoch: query.epoch, index: query.index };
    // A slot among the waiting queries, held until this answer is sent.
    let _slot = if wait.is_zero() { None } else { Some(directory.wait_slot()?) };
    let mut rx = directory.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    let current = loop {
        let current = rx.borrow_and_update().clone();
        // Any difference answers at once: a snapshot of another epoch (a
        // restarted directory, or another one) is news whatever its index.
        if current.id() != held || wait.is_zero() {
            break current;
        }
        tokio::select! {
            changed = tokio::time::timeout_at(deadline, rx.changed()) => {
                if !matches!(changed, Ok(Ok(()))) {
                    break rx.borrow().clone();
                }
            }
            _ = directory.shutdown.cancelled() => break current,
        }
    };
    Ok(snapshot_answer(&current, client.as_ref(), encoding).await)
}

/// The answer to a snapshot query: `client`'s view (every client's when
/// None) in `encoding`, encoded once per published snapshot and shared by
/// every query that asks for the same (see [`super::answers`]).
async fn snapshot_answer(published: &Arc<Published>, client: Option<&ClientName>, encoding: Encoding) -> Response {
    let body = published.body(Answer { view: published.view_for(client), encoding }).await;
    let mut resp =
        ([(header::CONTENT_TYPE, "application/json"), (header::VARY, "accept-encoding")], axum::body::Body::from(body))
            .into_response();
    if let Some(coding) = encoding.header() {
        resp.headers_mut().insert(header::CONTENT_ENCODING, header::HeaderValue::from_static(coding));
    }
    resp
}

/// `/v1/status`, read now (the status page's text form prints it too).
pub(super) fn status(directory: &Directory) -> Status {
    // One read under the lock: the snapshot, its routes and the repo state
    // always describe the same commit (dw plan compares against them).
    let (snapshot, desired, routes) = directory.in_force();
    Status {
        name: directory.config.name.clone(),
        address: directory.config.address.as_ref().map(ToString::to_string),
        uptime_s: directory.uptime().as_secs(),
        epoch: snapshot.epoch,
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

/// The webhook: fetch now, answer 200 with the routes state after a fetch
/// that started once the request came; or 202 with the state and its
/// `fetching_since` when a fetch has been under way for a while already (a
/// slow or hung git server; at once, see `reconcile::BUSY_AT_ONCE`) or the
/// fetch takes over [`RECONCILE_WAIT`]. After a 202 another fetch follows
/// the one under way, so a push just made is seen; its outcome shows in
/// `/v1/status`.
async fn post_reconcile(
    State(directory): State<Arc<Directory>>,
    ReconcileAllowed(caller): ReconcileAllowed,
) -> Result<(StatusCode, Json<RoutesStatus>), ApiError> {
    use super::reconcile::Reply;
    tracing::debug!(caller = %caller.label(), "reconcile requested");
    let Some(tx) = directory.reconcile_sender() else {
        return Err(ApiError::Conflict("this directory follows no routes repo (start it with --repo)".into()));
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let unavailable = || ApiError::Unavailable("the reconciler is shutting down".into());
    // The reconciler takes triggers even while it fetches: this send waits
    // for no fetch.
    let queued = tokio::time::timeout(RECONCILE_WAIT, tx.send(Some(reply))).await;
    let accepted = || (StatusCode::ACCEPTED, Json(directory.routes_status()));
    match queued {
        Err(_) => return Ok(accepted()),
        Ok(Err(_)) => return Err(unavailable()),
        Ok(Ok(())) => {}
    }
    match tokio::time::timeout(RECONCILE_WAIT, answer).await {
        Ok(Ok(Reply::Done(status))) => Ok((StatusCode::OK, Json(status))),
        Ok(Ok(Reply::Busy(status))) => Ok((StatusCode::ACCEPTED, Json(status))),
        Ok(Err(_)) => Err(unavailable()),
        // The fetch goes on; a git host's webhook would not wait longer.
        Err(_) => Ok(accepted()),
    }
}

async fn get_status(State(directory): State<Arc<Directory>>, _: Allowed<ReadAccess>) -> Json<Status> {
    Json(status(&directory))
}

async fn metrics(
    State(directory): State<Arc<Directory>>,
    _: Allowed<ReadAccess>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok());
    let (kind, body) = directory.render_metrics(accept);
    ([(header::CONTENT_TYPE, kind)], body)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::directory::auth::Auth;
    use crate::directory::limits::Limits;
    use crate::directory::Config;
    use axum::body::Body;
    use axum::http::Request;
    use std::path::Path;
    use tower::ServiceExt;

    /// An app with its publisher running (ended with the test's runtime).
    fn app_for_test() -> (Router, Arc<Directory>) {
        app_with_auth(crate::directory::auth::Auth::off())
    }

    /// An app with `auth`, its publisher running (other modules' tests use it too).
    pub(crate) fn app_with_auth(auth: crate::directory::auth::Auth) -> (Router, Arc<Directory>) {
        app_with(auth, vec![], Limits::default())
    }

    fn app_with(
        auth: crate::directory::auth::Auth,
        allow_networks: Vec<Network>,
        limits: Limits,
    ) -> (Router, Arc<Directory>) {
        let config = Config {
            allow_networks,
            limits,
            name: "test".into(),
            address: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: std::env::temp_dir(),
            repo: None,
            max_ttl: Duration::from_secs(10),
            auth: crate::directory::AuthMode::Off { insecure: false },
            webhook_secret_file: None,
            tls: None,
        };
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (directory, _) = Directory::new_with_auth(config, auth, shutdown.clone());
        tokio::spawn(crate::directory::publish_loop(directory.clone(), shutdown));
        (app(directory.clone()), directory)
    }

    async fn call(app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, serde_json::Value) {
        call_with(app, method, uri, body, &[]).await
    }

    async fn call_with(
        app: &Router,
        method: &str,
        uri: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut req = req.body(Body::from(body.to_string())).unwrap();
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 1))));
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    const GOOD: &str = r#"{"service":"emitter","version":"v1","url":"http://127.0.0.1:9001/emitter","ttl_ms":3000}"#;

    #[tokio::test]
    async fn a_snapshot_is_gzipped_for_a_client_that_asks_and_plain_otherwise() {
        use std::io::Read as _;
        let (app, directory) = app_for_test();
        let get = async |accept: Option<&str>| {
            let mut req = Request::builder().uri("/v1/snapshot");
            if let Some(a) = accept {
                req = req.header(header::ACCEPT_ENCODING, a);
            }
            let mut req = req.body(Body::empty()).unwrap();
            req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 1))));
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()[header::VARY], "accept-encoding");
            let coding = resp.headers().get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap().to_string());
            (coding, axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap())
        };
        let (coding, plain) = get(None).await;
        assert_eq!(coding, None);
        // Byte for byte the snapshot's JSON, as before the cache.
        assert_eq!(plain, serde_json::to_vec(&*directory.snapshot()).unwrap());
        let (coding, gzipped) = get(Some("gzip, deflate")).await;
        assert_eq!(coding.as_deref(), Some("gzip"));
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&gzipped[..]).read_to_end(&mut decoded).unwrap();
        assert_eq!(decoded, plain);
        assert_eq!(get(Some("gzip;q=0")).await, (None, plain));
        assert_eq!(directory.subscribe().borrow().encoded(), 2, "one JSON and one gzip for all four");
    }

    #[tokio::test]
    async fn heartbeat_then_snapshot() {
        let (app, _) = app_for_test();
        let (status, ack) = call(&app, "PUT", "/v1/instances/e1", GOOD).await;
        assert_eq!(status, StatusCode::OK);
        // The answer names the snapshot that will hold the write.
        assert_eq!(ack["index"], 2, "{ack}");
        let epoch = ack["epoch"].as_u64().unwrap();
        assert!(epoch > 0);
        let (status, snap) = call(&app, "GET", &format!("/v1/snapshot?epoch={epoch}&index=1&wait=5s"), "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!((snap["epoch"].as_u64(), snap["index"].as_u64()), (Some(epoch), Some(2)));
        assert_eq!(snap["services"]["emitter"]["backends"][0]["url"], "http://127.0.0.1:9001/emitter");
        let (_, removed) = call(&app, "DELETE", "/v1/instances/e1", "").await;
        assert_eq!(removed["removed"], true);
        assert_eq!(removed["index"], 3, "{removed}");
        let (_, again) = call(&app, "DELETE", "/v1/instances/e1", "").await;
        assert_eq!(again["removed"], false);
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
    async fn the_heartbeat_answer_and_the_ttl_refusal_carry_the_largest_ttl() {
        let (app, _) = app_for_test();
        let (status, ack) = call(&app, "PUT", "/v1/instances/e1", GOOD).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ack["max_ttl_ms"], 10_000, "{ack}");
        let (status, _) = call(&app, "DELETE", "/v1/instances/e1", "").await;
        assert_eq!(status, StatusCode::OK);
        let long = GOOD.replace("3000", "30000");
        let (status, json) = call(&app, "PUT", "/v1/instances/e1", &long).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json["max_ttl_ms"], 10_000, "{json}");
        assert!(json["error"].as_str().unwrap().contains("accepts 100..=10000 (its --max-ttl)"), "{json}");
        // Any other refusal has no such field.
        let (_, json) = call(&app, "PUT", "/v1/instances/e1", "{").await;
        assert!(json.get("max_ttl_ms").is_none(), "{json}");
    }

    #[tokio::test]
    async fn metrics_count_heartbeats_publishes_and_refusals() {
        let (app, directory) = app_for_test();
        call(&app, "PUT", "/v1/instances/e1", GOOD).await;
        call(&app, "PUT", "/v1/instances/e1", GOOD).await;
        call(&app, "PUT", "/v1/instances/e1", "{").await;
        call(&app, "GET", "/v1/nonesuch", "").await;
        let mut rx = directory.subscribe();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.index >= 2)).await.unwrap().unwrap();
        let req = Request::builder().uri("/metrics").body(Body::empty()).unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let text = String::from_utf8(axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
        for line in [
            "dstack_directory_heartbeats_total 2",
            "dstack_directory_snapshots_published_total 1",
            "dstack_directory_bad_requests_total 2",
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
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON error, not plain text");
        assert!(json["error"].as_str().unwrap().contains("larger than"), "{json}");
    }

    #[tokio::test]
    async fn every_refusal_is_json_and_counted_once() {
        let (app, directory) = app_for_test();
        let cases = [
            ("GET", "/nowhere", StatusCode::NOT_FOUND),
            ("GET", "/v1/snapshot?color=red", StatusCode::BAD_REQUEST),
            ("DELETE", "/v1/instances/..", StatusCode::BAD_REQUEST),
            ("POST", "/v1/reconcile", StatusCode::CONFLICT),
        ];
        for (method, uri, want) in cases {
            let (status, json) = call(&app, method, uri, "").await;
            assert_eq!(status, want, "{method} {uri}");
            assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{method} {uri}: {json}");
        }
        assert_eq!(directory.metrics.bad_requests.get(), cases.len() as u64);
    }

    #[tokio::test]
    async fn a_write_names_the_snapshot_that_holds_it() {
        let (app, directory) = app_for_test();
        // A burst: every answer names an index the directory then reaches,
        // and that snapshot holds the write.
        let mut acks = Vec::new();
        for n in 0..20 {
            let body = GOOD.replace("9001", &(9100 + n).to_string());
            let (_, ack) = call(&app, "PUT", &format!("/v1/instances/e{n}"), &body).await;
            acks.push((n, ack["index"].as_u64().unwrap()));
        }
        for (n, index) in acks {
            let mut rx = directory.subscribe();
            let snap = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.index >= index))
                .await
                .unwrap()
                .unwrap()
                .clone();
            let ids: Vec<String> =
                snap.services.values().flat_map(|s| s.backends.iter().map(|b| b.id.to_string())).collect();
            assert!(ids.contains(&format!("e{n}")), "snapshot {} lacks e{n}", snap.index);
        }
        // A refresh of a published instance is in the snapshot served.
        let (_, ack) = call(&app, "PUT", "/v1/instances/e0", &GOOD.replace("9001", "9100")).await;
        let served = directory.snapshot().index;
        assert_eq!(ack["index"].as_u64(), Some(served));
    }

    #[tokio::test]
    async fn instance_urls_point_only_where_allowed() {
        let body = |url: &str| GOOD.replace("http://127.0.0.1:9001/emitter", url);
        let (app, _) = app_for_test();
        let (status, json) = call(&app, "PUT", "/v1/instances/m", &body("http://169.254.169.254/latest")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            json["error"],
            "instance URL http://169.254.169.254/latest: 169.254.169.254 is link-local (169.254.0.0/16); refused unless --allow-network lists it"
        );
        assert_eq!(call(&app, "PUT", "/v1/instances/n", &body("http://vm101/emitter")).await.0, StatusCode::OK);

        let (app, _) = app_with(Auth::off(), vec!["127.0.0.0/8".parse().unwrap()], Limits::default());
        assert_eq!(call(&app, "PUT", "/v1/instances/a", &body("http://127.0.0.2:80/e")).await.0, StatusCode::OK);
        assert_eq!(call(&app, "PUT", "/v1/instances/b", &body("http://localhost:80/e")).await.0, StatusCode::OK);
        let (status, json) = call(&app, "PUT", "/v1/instances/c", &body("http://10.0.0.1/e")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(json["error"].as_str().unwrap().contains("outside the allowed networks (--allow-network 127.0.0.0/8)"));
        let (status, json) = call(&app, "PUT", "/v1/instances/d", &body("http://no-such-host.invalid/e")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(json["error"].as_str().unwrap().contains("no-such-host.invalid"), "{json}");
    }

    #[tokio::test]
    async fn limits_are_429s_that_name_their_key() {
        let limits = Limits {
            instances: 4,
            instances_per_service: 2,
            services: 2,
            sherlocks: 2,
            waiting_queries: 1,
            ..Limits::default()
        };
        let (app, directory) = app_with(Auth::off(), vec![], limits);
        let put = |id: &'static str, service: &'static str, port: u16| {
            let app = app.clone();
            async move {
                let body = GOOD.replace("emitter", service).replace("9001", &port.to_string());
                call(&app, "PUT", &format!("/v1/instances/{id}"), &body).await
            }
        };
        assert_eq!(put("a1", "a", 1).await.0, StatusCode::OK);
        assert_eq!(put("a2", "a", 2).await.0, StatusCode::OK);
        let (status, json) = put("a3", "a", 3).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(json["error"].as_str().unwrap().contains("limits.instances_per_service"), "{json}");
        assert_eq!(put("a1", "a", 1).await.0, StatusCode::OK, "a refresh is no new instance");
        let (status, ack) = put("b1", "b", 4).await;
        assert_eq!(status, StatusCode::OK);
        let last = ack["index"].as_u64().unwrap();
        let (status, json) = put("c1", "c", 5).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(json["error"].as_str().unwrap().contains("limits.services"), "{json}");
        assert_eq!(put("b2", "b", 6).await.0, StatusCode::OK);
        let (status, json) = put("b3", "b", 7).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(json["error"].as_str().unwrap().contains("limits.instances)"), "{json}");

        // One waiting query at a time; an immediate query needs no place.
        let epoch = directory.epoch();
        let mut rx = directory.subscribe();
        let index = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.index >= last))
            .await
            .unwrap()
            .unwrap()
            .index;
        let waiter = tokio::spawn({
            let app = app.clone();
            async move { call(&app, "GET", &format!("/v1/snapshot?epoch={epoch}&index={index}&wait=2s"), "").await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, json) = call(&app, "GET", &format!("/v1/snapshot?epoch={epoch}&index={index}&wait=2s"), "").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{json}");
        assert!(json["error"].as_str().unwrap().contains("limits.waiting_queries"));
        assert_eq!(call(&app, "GET", "/v1/snapshot", "").await.0, StatusCode::OK);
        assert_eq!(waiter.await.unwrap().0, StatusCode::OK);
        let (status, _) = call(&app, "GET", &format!("/v1/snapshot?epoch={epoch}&index={index}&wait=10ms"), "").await;
        assert_eq!(status, StatusCode::OK, "the place was freed");

        // Sherlocks beyond the limit push out the longest silent.
        for name in ["s1", "s2", "s3"] {
            call(&app, "GET", &format!("/v1/snapshot?sherlock={name}"), "").await;
        }
        let names: Vec<String> = directory.sherlocks().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["s2", "s3"]);
    }

    #[tokio::test]
    async fn blocking_query_wakes_on_change() {
        let (app, directory) = app_for_test();
        let epoch = directory.epoch();
        let waiter = tokio::spawn({
            let app = app.clone();
            async move { call(&app, "GET", &format!("/v1/snapshot?epoch={epoch}&index=1&wait=10s"), "").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        directory.heartbeat("e1".parse().unwrap(), serde_json::from_str(GOOD).unwrap()).unwrap();
        let (_, snap) = tokio::time::timeout(Duration::from_secs(2), waiter).await.unwrap().unwrap();
        assert_eq!(snap["index"], 2);
        // A query from another epoch (a restarted directory's old index)
        // is answered at once, whatever its index.
        let (_, snap) = tokio::time::timeout(
            Duration::from_secs(2),
            call(&app, "GET", &format!("/v1/snapshot?epoch={}&index=2&wait=10s", epoch - 1), ""),
        )
        .await
        .unwrap();
        assert_eq!(snap["epoch"].as_u64(), Some(epoch));
    }

    #[tokio::test]
    async fn a_reconcile_answers_200_after_its_fetch_and_202_while_a_long_one_runs() {
        use crate::directory::reconcile::Reply;
        let repo = crate::directory::config::resolve(
            <crate::directory::config::Args as clap::Parser>::parse_from(["directory", "--repo", "/srv/routes"]),
            None,
        )
        .unwrap()
        .repo;
        let config = Config {
            allow_networks: vec![],
            limits: Limits::default(),
            name: "test".into(),
            address: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: std::env::temp_dir(),
            repo,
            max_ttl: Duration::from_secs(10),
            auth: crate::directory::AuthMode::Off { insecure: false },
            webhook_secret_file: None,
            tls: None,
        };
        let (directory, triggers) = Directory::new(config, tokio_util::sync::CancellationToken::new());
        let app = app(directory.clone());
        // A stand-in reconciler: done once, then busy with a fetch.
        let mut triggers = triggers.unwrap();
        tokio::spawn(async move {
            let mut status = RoutesStatus { commit: Some("abc1234".into()), ..RoutesStatus::default() };
            let reply = triggers.recv().await.flatten().unwrap();
            let _ = reply.send(Reply::Done(status.clone()));
            status.fetching_since = Some("2026-01-01T00:00:00Z".into());
            let reply = triggers.recv().await.flatten().unwrap();
            let _ = reply.send(Reply::Busy(status));
            // A fetch that outlasts the webhook's wait.
            let _held = triggers.recv().await.flatten().unwrap();
            tokio::time::sleep(RECONCILE_WAIT + Duration::from_secs(1)).await;
        });
        let (status, json) = call(&app, "POST", "/v1/reconcile", "").await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(json["commit"], "abc1234");
        assert!(json["fetching_since"].is_null(), "{json}");
        let (status, json) = call(&app, "POST", "/v1/reconcile", "").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        assert_eq!(json["fetching_since"], "2026-01-01T00:00:00Z");
        let started = std::time::Instant::now();
        let (status, json) = call(&app, "POST", "/v1/reconcile", "").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{json}");
        assert!(started.elapsed() >= RECONCILE_WAIT, "it waited for the fetch first");
        // The reconciler is gone (shutdown): 503, not a wait.
        let (status, _) = call(&app, "POST", "/v1/reconcile", "").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }

    mod with_tokens {
        use super::*;
        use crate::directory::auth::{Auth, AuthTable};
        use sha2::Digest as _;

        fn digest(token: &str) -> String {
            crate::secret::hex(&sha2::Sha256::digest(token.as_bytes()))
        }

        fn auth() -> Auth {
            let yaml = format!(
                "tokens:\n\
                 \x20 - {{name: vm101, role: watson, services: [emitter], sha256: {}}}\n\
                 \x20 - {{name: vm201, role: watson, services: [\"barker*\"], sha256: {}}}\n\
                 \x20 - {{name: main, role: sherlock, client: monolith, sha256: {}}}\n\
                 \x20 - {{name: ops, role: operator, sha256: {}}}\n\
                 \x20 - {{name: grafana, role: read, sha256: {}}}\n",
                digest("w-emitter"),
                digest("w-barker"),
                digest("s-main"),
                digest("op"),
                digest("rd"),
            );
            Auth::from_table(Path::new("auth.yaml"), AuthTable::parse(Path::new("auth.yaml"), &yaml).unwrap())
        }

        async fn as_(token: &str, app: &Router, method: &str, uri: &str, body: &str) -> (StatusCode, String) {
            let bearer = format!("Bearer {token}");
            let (status, json) = call_with(app, method, uri, body, &[("authorization", &bearer)]).await;
            (status, json["error"].as_str().unwrap_or_default().to_string())
        }

        const BARKER: &str =
            r#"{"service":"barker","version":"v1","url":"http://127.0.0.1:9002/barker","ttl_ms":3000}"#;

        #[tokio::test]
        async fn every_endpoint_needs_a_token_and_every_refusal_is_json_and_counted() {
            let (app, directory) = app_with_auth(auth());
            let endpoints = [
                ("GET", "/"),
                ("GET", "/v1/status"),
                ("GET", "/v1/instances"),
                ("GET", "/metrics"),
                ("GET", "/v1/snapshot?epoch=0&index=0"),
                ("POST", "/v1/reconcile"),
                ("PUT", "/v1/instances/e1"),
                ("DELETE", "/v1/instances/e1"),
            ];
            for (method, uri) in endpoints {
                let mut req = Request::builder().method(method).uri(uri).body(Body::from(GOOD)).unwrap();
                req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 1))));
                let resp = app.clone().oneshot(req).await.unwrap();
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {uri}");
                assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
                let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                assert!(json["error"].as_str().unwrap().contains("requires a token"), "{json}");
                let (status, error) = as_("not-a-token", &app, method, uri, GOOD).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}");
                assert!(error.contains("not valid") && !error.contains("not-a-token"), "{error}");
            }
            let refused = 2 * endpoints.len() as u64;
            assert_eq!(directory.metrics.bad_requests.get(), refused);
            assert_eq!(directory.metrics.auth_refusals.get(), refused);
            assert_eq!(directory.instance_count(), 0);
        }

        #[tokio::test]
        async fn a_watson_touches_its_own_services_only() {
            let (app, directory) = app_with_auth(auth());
            assert_eq!(as_("w-emitter", &app, "PUT", "/v1/instances/e1", GOOD).await.0, StatusCode::OK);
            let (status, error) = as_("w-emitter", &app, "PUT", "/v1/instances/b1", BARKER).await;
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(
                error,
                "token \"vm101\" may not register or deregister instances of service \"barker\": \
                 its services are emitter"
            );
            assert_eq!(as_("w-barker", &app, "PUT", "/v1/instances/b1", BARKER).await.0, StatusCode::OK);
            // Neither by the id of another service's instance: not a heartbeat
            // that would move it, nor a deregistration.
            let (status, error) = as_("w-emitter", &app, "PUT", "/v1/instances/b1", GOOD).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{error}");
            assert!(error.contains("\"barker\""), "{error}");
            let (status, error) = as_("w-emitter", &app, "DELETE", "/v1/instances/b1", "").await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{error}");
            assert_eq!(directory.instance_count(), 2);
            let instances = directory.instances();
            assert_eq!(instances.iter().find(|i| i.id.as_str() == "b1").unwrap().service.as_str(), "barker");
            // Nor read the directory's state.
            let (status, error) = as_("w-emitter", &app, "GET", "/v1/status", "").await;
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert!(error.contains("has role watson") && error.contains("needs role operator or read"), "{error}");
            let (status, body) = as_("w-emitter", &app, "DELETE", "/v1/instances/e1", "").await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(directory.instance_count(), 1);
        }

        #[tokio::test]
        async fn roles_read_subscribe_and_reconcile() {
            let (app, directory) = app_with_auth(auth());
            let epoch = directory.epoch();
            let snapshot = format!("/v1/snapshot?epoch={epoch}&index=0&sherlock=fake&applied_epoch={epoch}&applied=1");
            // The sherlock is listed under its token's name, not the query's.
            assert_eq!(as_("s-main", &app, "GET", &snapshot, "").await.0, StatusCode::OK);
            let names: Vec<String> = directory.sherlocks().into_iter().map(|s| s.name).collect();
            assert_eq!(names, ["main"]);
            for (token, uri) in [("s-main", "/v1/status"), ("s-main", "/v1/instances"), ("s-main", "/metrics")] {
                let (status, error) = as_(token, &app, "GET", uri, "").await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{token} {uri}: {error}");
            }
            for uri in ["/", "/v1/status", "/v1/instances", "/metrics", "/v1/snapshot"] {
                assert_eq!(as_("rd", &app, "GET", uri, "").await.0, StatusCode::OK, "{uri}");
                assert_eq!(as_("op", &app, "GET", uri, "").await.0, StatusCode::OK, "{uri}");
            }
            // Operators and readers may read snapshots but not report as a sherlock.
            for token in ["op", "rd"] {
                let (status, error) = as_(token, &app, "GET", &snapshot, "").await;
                assert_eq!(status, StatusCode::FORBIDDEN);
                assert!(error.contains("report as a sherlock") && error.contains("needs role sherlock"), "{error}");
            }
            assert_eq!(directory.sherlocks().len(), 1);
            let (status, error) = as_("rd", &app, "POST", "/v1/reconcile", "").await;
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert!(error.ends_with("needs role operator"), "{error}");
            // Past auth: this directory has no repo.
            assert_eq!(as_("op", &app, "POST", "/v1/reconcile", "").await.0, StatusCode::CONFLICT);
            let (status, _) = as_("op", &app, "PUT", "/v1/instances/e1", GOOD).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "an operator registers nothing");
        }

        #[tokio::test]
        async fn a_signed_webhook_may_reconcile() {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("webhook");
            std::fs::write(&path, "hook-secret\n").unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            let (app, _) = app_with_auth(auth().with_webhook_secret(&path).unwrap());
            // A push event can be far larger than a heartbeat.
            let body = format!(r#"{{"ref":"refs/heads/main","pad":"{}"}}"#, "x".repeat(200 * 1024));
            let sign = |body: &str| {
                use hmac::Mac as _;
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hook-secret").unwrap();
                mac.update(body.as_bytes());
                format!("sha256={}", crate::secret::hex(&mac.finalize().into_bytes()))
            };
            let good = sign(&body);
            let hook = |sig: &str| [("x-hub-signature-256", sig.to_string())];
            let call_hook = |sig: String, body: String| {
                let app = app.clone();
                async move {
                    let headers = hook(&sig);
                    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    call_with(&app, "POST", "/v1/reconcile", &body, &h).await
                }
            };
            // Past auth: this directory has no repo.
            assert_eq!(call_hook(good.clone(), body.clone()).await.0, StatusCode::CONFLICT);
            let (status, json) = call_hook(good.clone(), body.replace("main", "evil")).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(json["error"].as_str().unwrap().contains("does not match"), "{json}");
            let (status, json) = call_hook("sha256=zz".into(), body.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(json["error"].as_str().unwrap().contains("malformed"), "{json}");
            let (status, json) = call(&app, "POST", "/v1/reconcile", &body).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(json["error"].as_str().unwrap().contains("or sign the body"), "{json}");
            let huge = "x".repeat(MAX_WEBHOOK_BODY + 1);
            assert_eq!(call_hook(sign(&huge), huge).await.0, StatusCode::PAYLOAD_TOO_LARGE);
        }
    }
}
