//! A client of the directory's `/v1` API, shared by watson, sherlock and dw.

use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::model::{
    ClientName, DirectoryAddr, Heartbeat, InstanceId, Snapshot, SnapshotError, SnapshotId, MAX_SNAPSHOT_BYTES,
};
use crate::protocol::{ErrorBody, InstanceStatus, RoutesStatus, SnapshotQuery, Status, WriteAck};
use crate::secret::Secret;
use crate::tls::ClientTls;

/// An HTTP error with its causes (`error sending request: ...: invalid
/// peer certificate: UnknownIssuer`) and, for the TLS mistakes people make,
/// what to do about it.
pub fn explain(error: &(dyn std::error::Error + 'static)) -> String {
    let text = chain(error);
    let hint = tls_hint(&text);
    text + hint
}

/// An error and its causes, each said once.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let more = e.to_string();
        // hyper and reqwest repeat a cause in their own words at times.
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = e.source();
    }
    text
}

/// What to do about a TLS mistake that `text` (an error chain) names.
fn tls_hint(text: &str) -> &'static str {
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        " (the certificate is not signed by a CA this client trusts: give --ca-file with the CA's certificate)"
    } else if text.contains("NotValidForName") {
        " (the certificate does not name this host: use a name or address listed in its subject alternative names)"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        " (the directory asks for a client certificate: give --client-cert and --client-key)"
    } else if text.contains("BadCertificate") || text.contains("UnknownCA") || text.contains("unknown ca") {
        " (the directory refused this client's certificate: is it signed by the directory's --client-ca?)"
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        " (the server does not speak TLS: is it a plain http:// address?)"
    } else {
        ""
    }
}

/// A TLS 1.3 server that refuses a client's certificate (none, or one it
/// does not trust) says so in an alert sent after the client's side of the
/// handshake is done, so the alert may arrive as the request is sent, or
/// the connection may only close: then the error names no certificate
/// (`explain` gave no hint), and this hint says what to check.
fn closed_after_handshake(addr: &DirectoryAddr, client_cert: bool, source: &reqwest::Error) -> &'static str {
    closed_hint(addr.base().starts_with("https://"), client_cert, &chain(source))
}

fn closed_hint(https: bool, client_cert: bool, text: &str) -> &'static str {
    let closed = ["connection was not ready", "connection closed before message completed", "reset by peer"];
    if !https || !tls_hint(text).is_empty() || !closed.iter().any(|c| text.contains(c)) {
        ""
    } else if client_cert {
        " (the directory closed the connection after the TLS handshake: it may have refused this client's certificate: is it signed by the directory's --client-ca?)"
    } else {
        " (the directory closed the connection after the TLS handshake: if it asks for a client certificate, give --client-cert and --client-key)"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The message carries the whole cause (reqwest's own says only "error
    /// sending request"), so a certificate problem reads as one.
    #[error("directory {addr} is unreachable: {}{hint}", explain(source))]
    Unreachable {
        addr: DirectoryAddr,
        #[source]
        source: reqwest::Error,
        /// What the client knows beyond the error (see [`closed_after_handshake`]).
        hint: &'static str,
    },
    #[error("directory {addr} refused the request ({status}): {message}")]
    Refused {
        addr: DirectoryAddr,
        status: u16,
        message: String,
        /// A heartbeat refused for its TTL: the largest the directory accepts.
        max_ttl_ms: Option<u64>,
    },
    #[error("directory {addr} sent a reply that could not be read: {source}")]
    Decode {
        addr: DirectoryAddr,
        #[source]
        source: reqwest::Error,
    },
    /// A snapshot too large or failing its checks: what sherlock would
    /// otherwise write into haproxy.cfg.
    #[error("directory {addr} sent a snapshot that was refused: {source}")]
    BadSnapshot {
        addr: DirectoryAddr,
        #[source]
        source: SnapshotError,
    },
    /// A snapshot body in an encoding the client did not ask for, or a
    /// gzip stream that does not decode.
    #[error("directory {addr} sent a snapshot body that could not be decoded: {message}")]
    BadEncoding { addr: DirectoryAddr, message: String },
}

impl ClientError {
    /// A refusal (4xx) will not go away by retrying the same request.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if (400..500).contains(status))
    }

    /// The largest TTL the directory accepts, when it refused a heartbeat's.
    pub fn max_ttl(&self) -> Option<Duration> {
        match self {
            ClientError::Refused { max_ttl_ms: Some(ms), .. } => Some(Duration::from_millis(*ms)),
            _ => None,
        }
    }
}

/// Reads a body of at most `limit` bytes, chunk by chunk: a larger one is
/// refused (`Err(None)`) at its first chunk over the limit, or at once when
/// its declared length is over, and never buffered whole.
async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, Option<reqwest::Error>> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Decodes a body sent with `Content-Encoding: coding` into at most `limit`
/// bytes: a gzip stream that inflates past it (a bomb from a hostile or
/// broken directory) is refused (`Ok(None)`) once `limit + 1` bytes are out,
/// never inflated whole.
fn decode_capped(coding: Option<&str>, body: Vec<u8>, limit: usize) -> Result<Option<Vec<u8>>, String> {
    use std::io::Read as _;
    match coding.map(str::trim) {
        None | Some("") => Ok((body.len() <= limit).then_some(body)),
        Some(c) if c.eq_ignore_ascii_case("identity") => Ok((body.len() <= limit).then_some(body)),
        Some(c) if c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip") => {
            let mut plain = Vec::with_capacity(body.len().saturating_mul(8).min(limit));
            flate2::read::GzDecoder::new(&body[..])
                .take(limit as u64 + 1)
                .read_to_end(&mut plain)
                .map_err(|e| format!("invalid gzip: {e}"))?;
            Ok((plain.len() <= limit).then_some(plain))
        }
        Some(other) => Err(format!("Content-Encoding {other:?}; a client asks for gzip or plain JSON only")),
    }
}

/// The flags every client of the directory takes (watson, sherlock, dw):
/// its token and its TLS files. Each client's config file has the same
/// keys (`token_file:`, `ca_file:`, `client_cert:`, `client_key:`), and its
/// config module resolves flag before file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientFlags {
    /// A file holding the directory's token (not readable by group or
    /// others); else $DSTACK_TOKEN, else the config file's `token_file:`.
    #[arg(long, global = true)]
    pub token_file: Option<std::path::PathBuf>,
    /// Trust this CA (PEM) for https:// directories instead of the
    /// system's roots (watson's https:// check URLs trust it besides them).
    #[arg(long, global = true, value_name = "PEM")]
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for a directory that asks for one.
    #[arg(long, global = true, value_name = "PEM")]
    pub client_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM, mode 0600).
    #[arg(long, global = true, value_name = "PEM")]
    pub client_key: Option<std::path::PathBuf>,
}

impl ClientFlags {
    /// The TLS files the flags name.
    pub fn tls_files(&self) -> crate::tls::ClientTlsFiles {
        crate::tls::ClientTlsFiles {
            ca_file: self.ca_file.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        }
    }
}

/// A sherlock as its snapshot queries report it: its name, the client
/// whose routes it follows, and the snapshot it has applied.
#[derive(Debug, Clone, Copy)]
pub struct Reporter<'a> {
    pub name: &'a str,
    pub client: &'a ClientName,
    pub applied: SnapshotId,
}

/// One directory, with its HTTP connection pool.
#[derive(Debug, Clone)]
pub struct DirectoryClient {
    /// Named in every error, so a log line says which directory failed.
    pub addr: DirectoryAddr,
    http: reqwest::Client,
    /// `Bearer TOKEN`, sent with every request; marked sensitive, so that
    /// no `Debug` shows it.
    authorization: Option<reqwest::header::HeaderValue>,
    /// Whether a client certificate is offered, for the hints of errors.
    client_cert: bool,
}

impl DirectoryClient {
    /// `timeout` bounds plain requests; blocking queries get their wait on
    /// top. An `https://` address trusts the system's roots.
    pub fn new(addr: DirectoryAddr, timeout: Duration) -> DirectoryClient {
        Self::with_tls(addr, timeout, &ClientTls::system())
    }

    /// As [`DirectoryClient::new`], with the TLS settings of `--ca-file`,
    /// `--client-cert` and `--client-key` for an `https://` address.
    pub fn with_tls(addr: DirectoryAddr, timeout: Duration, tls: &ClientTls) -> DirectoryClient {
        let http = tls
            .reqwest()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .user_agent(concat!("dstack/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a reqwest client with a checked TLS config and no proxy settings always builds");
        DirectoryClient { addr, http, authorization: None, client_cert: tls.has_client_cert() }
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    pub fn with_token(mut self, token: Option<&Secret>) -> DirectoryClient {
        self.authorization = token.map(|t| {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", t.expose()))
                .expect("a checked token is printable ASCII");
            value.set_sensitive(true);
            value
        });
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.addr.base(), path)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let resp = self.respond(req).await?;
        resp.json().await.map_err(|source| ClientError::Decode { addr: self.addr.clone(), source })
    }

    /// Sends the request with the token; a successful response, or the
    /// refusal it carries.
    async fn respond(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let req = match &self.authorization {
            Some(value) => req.header(reqwest::header::AUTHORIZATION, value.clone()),
            None => req,
        };
        let resp = req.send().await.map_err(|source| ClientError::Unreachable {
            addr: self.addr.clone(),
            hint: closed_after_handshake(&self.addr, self.client_cert, &source),
            source,
        })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let (message, max_ttl_ms) = match serde_json::from_str::<ErrorBody>(&body) {
                Ok(refusal) => (refusal.error, refusal.max_ttl_ms),
                Err(_) => (body, None),
            };
            return Err(ClientError::Refused { addr: self.addr.clone(), status: status.as_u16(), message, max_ttl_ms });
        }
        Ok(resp)
    }

    /// Registers or refreshes an instance; the answer names the first
    /// snapshot that holds it.
    pub async fn heartbeat(&self, id: &InstanceId, heartbeat: &Heartbeat) -> Result<WriteAck, ClientError> {
        self.send(self.http.put(self.url(&format!("/v1/instances/{id}"))).json(heartbeat)).await
    }

    pub async fn deregister(&self, id: &InstanceId) -> Result<WriteAck, ClientError> {
        self.send(self.http.delete(self.url(&format!("/v1/instances/{id}")))).await
    }

    /// A blocking query: returns when the directory's snapshot differs from
    /// `held` or `wait` has passed. `me` names the asking sherlock and the
    /// snapshot it has applied.
    ///
    /// The body is read up to [`MAX_SNAPSHOT_BYTES`] and decoded with every
    /// check of [`Snapshot::from_json`]; a refusal is
    /// [`ClientError::BadSnapshot`].
    pub async fn snapshot(
        &self,
        held: SnapshotId,
        wait: Duration,
        me: Option<Reporter<'_>>,
    ) -> Result<Snapshot, ClientError> {
        let query = SnapshotQuery {
            epoch: held.epoch,
            index: held.index,
            wait: Some(format!("{}ms", wait.as_millis())),
            sherlock: me.map(|m| m.name.to_string()),
            client: me.map(|m| m.client.to_string()),
            applied_epoch: me.map(|m| m.applied.epoch),
            applied: me.map(|m| m.applied.index),
        };
        // gzip: a tenth of the bytes; the directory compresses once per
        // snapshot, not per subscriber. A directory that ignores it sends JSON.
        let req = self
            .http
            .get(self.url("/v1/snapshot"))
            .query(&query)
            .header(reqwest::header::ACCEPT_ENCODING, "gzip")
            .timeout(wait + Duration::from_secs(10));
        let resp = self.respond(req).await?;
        let coding = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .map(|v| v.to_str().map(str::to_string).unwrap_or_else(|_| format!("{v:?}")));
        let bad = |source| ClientError::BadSnapshot { addr: self.addr.clone(), source };
        let too_large = || bad(SnapshotError::TooLarge { limit: MAX_SNAPSHOT_BYTES });
        let body = match read_capped(resp, MAX_SNAPSHOT_BYTES).await {
            Ok(body) => body,
            Err(Some(source)) => return Err(ClientError::Decode { addr: self.addr.clone(), source }),
            Err(None) => return Err(too_large()),
        };
        // The limit holds on the decoded bytes too.
        let body = match decode_capped(coding.as_deref(), body, MAX_SNAPSHOT_BYTES) {
            Ok(Some(body)) => body,
            Ok(None) => return Err(too_large()),
            Err(message) => return Err(ClientError::BadEncoding { addr: self.addr.clone(), message }),
        };
        Snapshot::from_json(&body).map_err(bad)
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.send(self.http.get(self.url("/v1/status"))).await
    }

    /// `POST /v1/reconcile`: fetch the routes repo now.
    pub async fn reconcile(&self) -> Result<RoutesStatus, ClientError> {
        self.send(self.http.post(self.url("/v1/reconcile")).timeout(Duration::from_secs(70))).await
    }

    pub async fn instances(&self) -> Result<Vec<InstanceStatus>, ClientError> {
        self.send(self.http.get(self.url("/v1/instances"))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_closed_after_the_handshake_gets_a_certificate_hint() {
        let closed = "error sending request: client error (Canceled): connection was not ready";
        assert!(closed_hint(true, false, closed).contains("give --client-cert and --client-key"));
        assert!(closed_hint(true, true, closed).contains("refused this client's certificate"));
        assert_eq!(closed_hint(false, false, closed), "", "plain http:// has no certificate to blame");
        let named = "error sending request: received fatal alert: CertificateRequired";
        assert_eq!(closed_hint(true, false, named), "", "explain's own hint says it already");
        assert_eq!(closed_hint(true, false, "tcp connect error: Connection refused"), "");
    }
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A one-connection HTTP server that answers `head` and then writes
    /// `chunk` as a chunked body, `count` times (or until the client hangs up).
    async fn serve(
        head: &'static str,
        chunk: Vec<u8>,
        count: usize,
    ) -> (DirectoryAddr, tokio::task::JoinHandle<usize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap()).parse().unwrap();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut sent = 0;
            for _ in 0..count {
                let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                if stream.write_all(&framed).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
            let _ = stream.write_all(b"0\r\n\r\n").await;
            sent
        });
        (addr, task)
    }

    const CHUNKED: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";

    #[tokio::test]
    async fn a_streamed_body_is_cut_off_at_the_limit() {
        let (addr, server) = serve(CHUNKED, vec![b' '; 64 * 1024], usize::MAX).await;
        let client = reqwest::Client::new();
        let resp = client.get(format!("{addr}/v1/snapshot")).send().await.unwrap();
        assert!(matches!(read_capped(resp, 1 << 20).await, Err(None)));
        // The server saw the client hang up soon after the limit, not an endless read.
        let sent = tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
        assert!(sent < 64 << 20, "{sent} bytes sent");
        let (addr, _server) = serve(CHUNKED, br#"{"index":1,"services":{}}"#.to_vec(), 1).await;
        let resp = client.get(format!("{addr}/v1/snapshot")).send().await.unwrap();
        assert_eq!(read_capped(resp, 1 << 20).await.unwrap(), br#"{"index":1,"services":{}}"#);
    }

    #[tokio::test]
    async fn a_snapshot_over_the_limit_or_failing_its_checks_is_refused() {
        // A declared length over the limit is refused before any of the body is read.
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\n\r\n";
        let (addr, _server) = serve(head, Vec::new(), 0).await;
        let client = DirectoryClient::new(addr, Duration::from_secs(5));
        let err = client.snapshot(SnapshotId::default(), Duration::ZERO, None).await.unwrap_err().to_string();
        assert!(err.contains("sent a snapshot that was refused: the snapshot is larger than 67108864 bytes"), "{err}");
        let bad = br#"{"index":1,"commit":"abc1234\nprogram x","services":{}}"#.to_vec();
        let (addr, _server) = serve(CHUNKED, bad, 1).await;
        let client = DirectoryClient::new(addr, Duration::from_secs(5));
        let err = client.snapshot(SnapshotId::default(), Duration::ZERO, None).await.unwrap_err().to_string();
        assert!(err.contains("refused: not a valid snapshot: commit \"abc1234\\nprogram x\""), "{err}");
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_gzip_body_is_decoded_within_the_limit() {
        let json = br#"{"index":1,"services":{}}"#.to_vec();
        assert_eq!(decode_capped(Some("gzip"), gzip(&json), 1 << 10).unwrap(), Some(json.clone()));
        assert_eq!(decode_capped(None, json.clone(), 1 << 10).unwrap(), Some(json.clone()));
        assert_eq!(decode_capped(None, json.clone(), 4).unwrap(), None);
        // A bomb: 64 MiB of zeros in 64 KiB, refused at the limit, not inflated whole.
        let bomb = gzip(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        assert_eq!(decode_capped(Some("gzip"), bomb, 1 << 20).unwrap(), None);
        let err = decode_capped(Some("gzip"), b"not gzip".to_vec(), 1 << 10).unwrap_err();
        assert!(err.contains("invalid gzip"), "{err}");
        let err = decode_capped(Some("br"), json, 1 << 10).unwrap_err();
        assert!(err.contains(r#"Content-Encoding "br"; a client asks for gzip or plain JSON only"#), "{err}");
    }

    #[tokio::test]
    async fn a_gzip_bomb_from_a_directory_is_refused() {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n";
        // Well under the limit on the wire, far over it once inflated.
        let bomb = gzip(&vec![b' '; MAX_SNAPSHOT_BYTES + 1]);
        let (addr, _server) = serve(head, bomb, 1).await;
        let client = DirectoryClient::new(addr, Duration::from_secs(5));
        let err = client.snapshot(SnapshotId::default(), Duration::ZERO, None).await.unwrap_err().to_string();
        assert!(err.contains("sent a snapshot that was refused: the snapshot is larger than 67108864 bytes"), "{err}");
    }

    #[test]
    fn the_token_never_shows_in_debug() {
        let token = Secret::new("s3cret-token").unwrap();
        let client =
            DirectoryClient::new("127.0.0.1:1".parse().unwrap(), Duration::from_secs(1)).with_token(Some(&token));
        let shown = format!("{client:?}");
        assert!(shown.contains("127.0.0.1:1") && !shown.contains("s3cret"), "{shown}");
    }
}
