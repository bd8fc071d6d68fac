//! The routes repo served over http:// on loopback (git's own
//! `git http-backend`, run as CGI per request), with two faults: the
//! remote unreachable (the port refuses) and the remote hanging (it
//! accepts and never answers).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Response, StatusCode};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    /// Nothing listens: connections are refused.
    Refuse,
    /// Connections are accepted and held open with no answer, until
    /// [`GitServer::release`].
    Hang,
}

pub struct GitServer {
    pub port: u16,
    mode: watch::Sender<Mode>,
    /// Connections accepted while hanging; dropping them closes them.
    held: Arc<Mutex<Vec<tokio::net::TcpStream>>>,
    task: tokio::task::JoinHandle<()>,
}

impl GitServer {
    /// Serves the bare repos under `root` as `http://127.0.0.1:PORT/<name>.git`.
    pub async fn start(root: PathBuf) -> GitServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, rx) = watch::channel(Mode::Serve);
        let held: Arc<Mutex<Vec<tokio::net::TcpStream>>> = Default::default();
        let app = axum::Router::new().fallback(cgi).with_state(Arc::new(root));
        let task = tokio::spawn(accept_loop(listener, port, rx, held.clone(), app));
        GitServer { port, mode, held, task }
    }

    pub fn url(&self, repo: &str) -> String {
        format!("http://127.0.0.1:{}/{repo}", self.port)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes the connections held while hanging.
    pub fn release(&self) {
        self.held.lock().unwrap().clear();
    }

    pub fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        self.task.abort();
        self.release();
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    port: u16,
    mut mode: watch::Receiver<Mode>,
    held: Arc<Mutex<Vec<tokio::net::TcpStream>>>,
    app: axum::Router,
) {
    let mut listener = Some(listener);
    loop {
        let now = *mode.borrow_and_update();
        if now == Mode::Refuse {
            listener = None;
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        }
        if listener.is_none() {
            // The same port again (SO_REUSEADDR): the directory's URL stays.
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    eprintln!("chaos: the git server cannot bind port {port} again: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let l = listener.as_ref().unwrap();
        tokio::select! {
            accepted = l.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                match *mode.borrow() {
                    Mode::Serve => {
                        let service = hyper_util::service::TowerToHyperService::new(app.clone());
                        tokio::spawn(async move {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                        });
                    }
                    Mode::Hang => held.lock().unwrap().push(stream),
                    Mode::Refuse => drop(stream),
                }
            }
            changed = mode.changed() => if changed.is_err() { return },
        }
    }
}

/// One request through `git http-backend` (CGI).
async fn cgi(State(root): State<Arc<PathBuf>>, req: Request) -> Response<Body> {
    let fail = |why: String| {
        eprintln!("chaos: git http-backend: {why}");
        Response::builder().status(StatusCode::INTERNAL_SERVER_ERROR).body(Body::from(why)).unwrap()
    };
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 64 << 20).await else { return fail("unreadable body".into()) };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env("GIT_PROJECT_ROOT", root.as_os_str())
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (env, name) in [("HTTP_CONTENT_ENCODING", "content-encoding"), ("GIT_PROTOCOL", "git-protocol")] {
        let value = header(name);
        if !value.is_empty() {
            cmd.env(env, value);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("spawning: {e}")),
    };
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = match child.wait_with_output().await {
        Ok(out) => out,
        Err(e) => return fail(format!("waiting: {e}")),
    };
    let _ = writer.await;
    let text = &out.stdout;
    let Some(split) = text
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| text.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2)))
    else {
        return fail(format!("no CGI header: {}", String::from_utf8_lossy(&out.stderr)));
    };
    let mut resp = Response::builder().status(StatusCode::OK);
    for line in String::from_utf8_lossy(&text[..split.0]).lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().and_then(|c| c.parse().ok()).unwrap_or(500);
            resp = resp.status(code);
        } else if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.trim()), HeaderValue::try_from(value)) {
            resp = resp.header(n, v);
        }
    }
    resp.body(Body::from(text[split.1..].to_vec())).unwrap()
}
