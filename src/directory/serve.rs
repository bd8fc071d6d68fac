//! The directory's HTTP server: plain HTTP, or TLS when it has a
//! certificate, with a bound on open connections, a bound on the time a
//! client may take to send a request header (slowloris), and a deadline on
//! shutdown that no stuck client can stretch.
//!
//! Beyond `limits.max_connections` a new connection is accepted, answered
//! `503 {"error": ...}` with `Retry-After: 1`, and closed, rather than left
//! waiting in the kernel's backlog: a waiting client cannot tell a full
//! directory from a dead one and hangs until its own timeout, while a 503
//! makes watson back off and sherlock fail over to its next directory at
//! once. Answering takes a task, so at most [`REFUSING_AT_ONCE`] refusals
//! are answered at a time; past that a connection is closed unanswered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::Directory;
use crate::tls::ServerTls;

/// How long shutdown waits for open connections to finish their request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Refusals (503) being answered at once; more are closed unanswered.
const REFUSING_AT_ONCE: usize = 64;
/// A refusal's whole exchange, TLS handshake included.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);
/// File descriptors kept for everything but connections (the routes
/// mirror, the file watch, logs).
const FD_RESERVE: u64 = 256;
/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;
/// How often the refusals are logged while they go on.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown`, then lets open requests
/// finish for at most [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    directory: Arc<Directory>,
    tls: Option<Arc<ServerTls>>,
    shutdown: CancellationToken,
) {
    let limits = &directory.config.limits;
    let max = usable_connections(limits.max_connections);
    let header_read_timeout = limits.header_read_timeout.0;
    let slots = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let refusal = refusal_app(max);
    let mut refusals_unlogged = 0u64;
    let mut refusals_logged_at: Option<Instant> = None;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or memory: pause rather than spin.
                tracing::error!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            peer,
            tls: tls.as_ref().map(|t| t.current()),
            header_read_timeout,
            shutdown: shutdown.clone(),
            directory: directory.clone(),
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let app = app.clone();
                tasks.spawn(async move {
                    let _open = OpenConnection::count(&conn.directory, slot);
                    conn.serve(stream, app, true).await;
                });
            }
            Err(_) => {
                directory.metrics.connections_refused.inc();
                refusals_unlogged += 1;
                if refusals_logged_at.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_EVERY) {
                    tracing::warn!(
                        refused = refusals_unlogged,
                        max_connections = max,
                        "connection limit reached: new connections get 503 until some close (limits.max_connections)"
                    );
                    refusals_unlogged = 0;
                    refusals_logged_at = Some(Instant::now());
                }
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    let refusal = refusal.clone();
                    tasks.spawn(async move {
                        let _permit = permit;
                        let _ = tokio::time::timeout(REFUSAL_DEADLINE, conn.serve(stream, refusal, false)).await;
                    });
                }
            }
        }
    }
    // New connections are refused by the kernel from here on.
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(open = tasks.len(), grace = ?SHUTDOWN_GRACE, "shutdown: closing the connections still open");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Counts an open connection for `/metrics` while it holds its slot.
struct OpenConnection {
    directory: Arc<Directory>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl OpenConnection {
    fn count(directory: &Arc<Directory>, slot: tokio::sync::OwnedSemaphorePermit) -> OpenConnection {
        directory.metrics.connections_open.inc();
        OpenConnection { directory: directory.clone(), _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.directory.metrics.connections_open.dec();
    }
}

/// One accepted connection and what serving it needs.
struct Conn {
    peer: SocketAddr,
    /// The TLS config in force when it was accepted; None: plain HTTP.
    tls: Option<Arc<rustls::ServerConfig>>,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
    directory: Arc<Directory>,
}

impl Conn {
    /// Serves `app` over TLS or plain HTTP; `keep_alive` false answers one
    /// request and closes.
    async fn serve(self, stream: TcpStream, app: Router, keep_alive: bool) {
        let Some(config) = self.tls.clone() else {
            return self.http(stream, app, keep_alive).await;
        };
        // The handshake gets the header's deadline: a client that connects
        // and sends nothing holds a slot no longer than a slow header does.
        let mut first = [0u8; 1];
        match tokio::time::timeout(self.header_read_timeout, stream.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            Ok(_) => return,
            Err(_) => {
                tracing::debug!(peer = %self.peer, "closed: nothing sent within the header read timeout");
                return;
            }
        }
        if first[0] != TLS_HANDSHAKE {
            // Plain HTTP on a TLS port: answer in plain HTTP, so the client
            // reads why instead of a reset connection.
            return self.http(stream, wrong_protocol_app(), false).await;
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let stream = match tokio::time::timeout(self.header_read_timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.directory.metrics.tls_handshake_failures.inc();
                tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.directory.metrics.tls_handshake_failures.inc();
                tracing::debug!(peer = %self.peer, "TLS handshake not done within the header read timeout");
                return;
            }
        };
        self.http(stream, app, keep_alive).await
    }

    /// HTTP/1.1 on `io`, with the header read timeout; ends gracefully
    /// (the request in progress is answered) at shutdown.
    async fn http<I>(&self, io: I, app: Router, keep_alive: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        // hyper runs the header timer from the moment it waits for a
        // request, so it also closes a kept-alive connection left idle.
        builder.timer(TokioTimer::new()).header_read_timeout(self.header_read_timeout).keep_alive(keep_alive);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = self.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %peer, error = %e, "connection closed");
        }
    }
}

/// What a connection beyond the limit is told.
fn refusal_app(max: usize) -> Router {
    let message =
        format!("the directory has {max} connections open, its limit (limits.max_connections); retry in a moment");
    Router::new().fallback(move || {
        let body = axum::Json(serde_json::json!({ "error": message }));
        async move { (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], body).into_response() }
    })
}

/// What a plain HTTP request to the TLS port is told.
fn wrong_protocol_app() -> Router {
    Router::new().fallback(|| async {
        let error = "this directory serves HTTPS only: use https:// in its address (with --ca-file for a private CA)";
        (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({ "error": error })))
    })
}

/// Raises the open-file limit toward what `wanted` connections need (up
/// to the hard limit, as Go's runtime does), and returns how many
/// connections fit under it.
fn usable_connections(wanted: usize) -> usize {
    let needed = wanted as u64 + FD_RESERVE;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return wanted;
    }
    if limit.rlim_cur < needed {
        let raised = libc::rlimit { rlim_cur: needed.min(limit.rlim_max), rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we own; lowering nothing.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = raised.rlim_cur;
        }
    }
    if limit.rlim_cur >= needed {
        return wanted;
    }
    let fit = (limit.rlim_cur.saturating_sub(FD_RESERVE) as usize).max(1);
    tracing::warn!(
        max_connections = wanted,
        nofile = limit.rlim_cur,
        serving_at_most = fit,
        "the open-file limit (ulimit -n) is too low for limits.max_connections; raise it (systemd: LimitNOFILE=)"
    );
    fit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_bounds_the_connections() {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes into the struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
        assert_eq!(usable_connections(10), 10, "a small limit always fits");
        if limit.rlim_max != libc::RLIM_INFINITY {
            let too_many = limit.rlim_max as usize + 1000;
            let fit = usable_connections(too_many);
            assert!(fit < too_many && fit as u64 + FD_RESERVE <= limit.rlim_max.max(FD_RESERVE + 1), "{fit}");
        }
    }
}
