//! The harness of the end-to-end tests: real binaries, real HAProxy, real
//! HTTP services on loopback ports the OS picks, each test in its own temp
//! dir. Every process started here is ended when its handle drops.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;

/// A port that was free a moment ago. HAProxy binds ports itself, so the
/// test cannot hand it a bound socket; the kernel does not reuse a just
/// released ephemeral port soon, which keeps parallel tests apart.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn bin(name: &str) -> PathBuf {
    match name {
        "directory" => env!("CARGO_BIN_EXE_directory").into(),
        "watson" => env!("CARGO_BIN_EXE_watson").into(),
        "sherlock" => env!("CARGO_BIN_EXE_sherlock").into(),
        "dw" => env!("CARGO_BIN_EXE_dw").into(),
        other => panic!("no binary {other}"),
    }
}

/// A running binary; SIGTERM then SIGKILL when dropped.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Proc {
        Self::start_with_env(dir, name, args, &[])
    }

    pub fn start_with_env(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let log = dir.join(format!("{name}-{}.log", SEQ.fetch_add(1, Ordering::Relaxed)));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin(name))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,dstack=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { name: name.into(), child: Some(child), log }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `signal` (SIGTERM, SIGINT) and waits for the exit.
    pub fn stop_with(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} ignored signal {signal} for 10s; log:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log holds `needle`; the log's text.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let what = format!("{:?} in {}'s log", needle, self.name);
        eventually(timeout, &what, async || Some(self.log_text()).filter(|t| t.contains(needle))).await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` until it returns Some or `timeout` passes.
pub async fn eventually<T>(timeout: Duration, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small real HTTP service instance, served from the test process.
/// It answers `<name> <path?query>` and counts requests by name. A request
/// whose path ends in `/hold` is answered only after [`Instance::release`],
/// so a test can keep a connection open through it.
pub struct Instance {
    pub name: String,
    pub port: u16,
    pub healthy: Arc<AtomicBool>,
    /// Every path (with query) it has been asked for.
    pub seen: Arc<Mutex<Vec<String>>>,
    /// Set once: held requests are answered from then on.
    released: Arc<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct InstanceState {
    name: String,
    healthy: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    released: Arc<tokio::sync::watch::Sender<bool>>,
}

async fn answer(State(s): State<InstanceState>, req: Request) -> (StatusCode, String) {
    let uri = req.uri().to_string();
    if req.uri().path().ends_with("/liveness_check") {
        return if s.healthy.load(Ordering::SeqCst) {
            (StatusCode::OK, "alive".into())
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "sick".into())
        };
    }
    s.seen.lock().unwrap().push(uri.clone());
    if req.uri().path().ends_with("/hold") {
        let _ = s.released.subscribe().wait_for(|released| *released).await;
    }
    (StatusCode::OK, format!("{} {}", s.name, uri))
}

impl Instance {
    /// Starts on a free port.
    pub async fn start(name: &str) -> Instance {
        Self::start_on(name, 0).await
    }

    /// Starts on a given port (to bring a killed instance back where it was).
    pub async fn start_on(name: &str, port: u16) -> Instance {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = InstanceState {
            name: name.into(),
            healthy: Arc::new(AtomicBool::new(true)),
            seen: Arc::new(Mutex::new(Vec::new())),
            released: Arc::new(tokio::sync::watch::Sender::new(false)),
        };
        let app = axum::Router::new().fallback(answer).with_state(state.clone());
        // The connections live in a JoinSet owned by this task, so aborting
        // it closes every open connection too: a real kill, not a drain.
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Instance {
            name: name.into(),
            port,
            healthy: state.healthy,
            seen: state.seen,
            released: state.released,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Answers every held (`.../hold`) request, now and from now on.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// Kills it: the listener closes, so new connections are refused.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// HAProxy outlives a sherlock killed by SIGKILL (ARCHITECTURE.md, "The
/// listening socket"): whatever HAProxy still runs on this cluster's temp
/// dir when it is dropped is ended with it.
impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.sherlock.take());
        for pid in haproxy_pids(self.dir.path()) {
            // SAFETY: kill(2) of an HAProxy started on this test's temp dir.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// With `DSTACK_TEST_SECURE=1` the end-to-end tests run as on a real
/// network: every `Cluster` serves TLS with an auth file and gives each
/// program its own token and the CA, and the tests that start programs by
/// hand take theirs from the `Cluster` (`watson_flags`, `dw_in`,
/// `client_config`, ...). `make test` runs the process tests again so.
pub fn secure() -> bool {
    std::env::var("DSTACK_TEST_SECURE").is_ok_and(|v| v == "1")
}

/// A secure cluster's certificates and tokens. The benchmarks use it too.
pub struct Security {
    pub pki: Pki,
    pub auth_file: PathBuf,
    /// The operator's token file (dw, the test's own requests).
    pub operator_token: PathBuf,
    /// The token every watson of the cluster uses (role watson, any service).
    pub watson_token: PathBuf,
}

impl Security {
    /// A private CA and a server certificate, an auth file, and the
    /// operator's and the watsons' tokens, all in `dir`.
    pub fn new(dir: &Path) -> Security {
        let pki = Pki::new(dir, "cluster");
        let auth_file = dir.join("auth.yaml");
        std::fs::write(&auth_file, "tokens:\n").unwrap();
        let security = Security {
            pki,
            auth_file,
            operator_token: dir.join("operator.token"),
            watson_token: dir.join("watson.token"),
        };
        security.add_token(&security.operator_token, &format!("op-{}", free_port()), "name: ops\n    role: operator");
        security.add_token(
            &security.watson_token,
            &format!("w-{}", free_port()),
            "name: watsons\n    role: watson\n    services: [\"*\"]",
        );
        security
    }

    /// Writes a token file (0600) and its entry in the auth file; a running
    /// directory reads it on SIGHUP.
    pub fn add_token(&self, file: &Path, secret: &str, entry: &str) {
        use sha2::Digest as _;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(file, secret).unwrap();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let digest: String = sha2::Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        let mut text = std::fs::read_to_string(&self.auth_file).unwrap();
        text.push_str(&format!("  - {entry}\n    sha256: {digest}\n"));
        std::fs::write(&self.auth_file, text).unwrap();
    }

    /// The directory's flags: its certificate and key, and the auth file.
    pub fn directory_args(&self) -> Vec<String> {
        let mut args = self.pki.server_args();
        args.extend(["--auth-file".into(), path_arg(&self.auth_file)]);
        args
    }

    /// `--token-file TOKEN --ca-file CA`: a client's flags.
    pub fn client_args(&self, token: &Path) -> Vec<String> {
        vec!["--token-file".into(), path_arg(token), "--ca-file".into(), path_arg(&self.pki.ca)]
    }

    /// The same as the keys of a client's config file (watson.yaml,
    /// sherlock.yaml, dw.yaml), one a line.
    pub fn client_config(&self, token: &Path) -> String {
        format!("token_file: {}\nca_file: {}\n", token.display(), self.pki.ca.display())
    }

    /// An HTTP client that trusts the CA and sends `token` with every request.
    pub fn http(&self, token: &Path) -> reqwest::ClientBuilder {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&self.pki.ca).unwrap()).unwrap();
        let secret = std::fs::read_to_string(token).unwrap();
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", secret.trim()).parse().unwrap());
        reqwest::Client::builder().add_root_certificate(ca).default_headers(headers)
    }
}

/// A directory and a sherlock (with its HAProxy) on free ports in a temp
/// dir; secure as [`secure`] says.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// Set in secure mode (see [`secure`]).
    pub security: Option<Security>,
    pub directory_port: u16,
    pub directory: Proc,
    pub sherlock_port: u16,
    pub sherlock: Option<Proc>,
    pub http: reqwest::Client,
    /// The directory's arguments, to restart it as it was.
    directory_args: Vec<String>,
    /// Each sherlock's admin port, by its listen port.
    admin_ports: Mutex<HashMap<u16, u16>>,
}

impl Cluster {
    /// Starts a directory (max ttl 3s) and a sherlock following it.
    pub async fn start() -> Cluster {
        Self::start_with(&[]).await
    }

    pub async fn start_with(directory_args: &[&str]) -> Cluster {
        let mut cluster = Self::directory_alone(directory_args).await;
        let (port, sherlock) = cluster.start_sherlock(&[]).await;
        cluster.sherlock_port = port;
        cluster.sherlock = Some(sherlock);
        cluster
    }

    /// A directory (max ttl 3s) and no sherlock (`sherlock_port` is 0), for
    /// tests that stop at the directory: `dw`'s git, a lone directory.
    pub async fn directory_alone(directory_args: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new().prefix("dstack-test").tempdir().unwrap();
        let directory_port = free_port();
        let listen = format!("127.0.0.1:{directory_port}");
        // In the test's temp dir: the default is a system dir for root.
        let state_dir = dir.path().join("directory-state").to_str().unwrap().to_string();
        let security = secure().then(|| Security::new(dir.path()));
        let mut args: Vec<String> =
            ["--listen", &listen, "--max-ttl", "3s", "--state-dir", &state_dir].iter().map(|a| a.to_string()).collect();
        if let Some(s) = &security {
            args.extend(s.directory_args());
        }
        args.extend(directory_args.iter().map(|a| a.to_string()));
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let directory = Proc::start(dir.path(), "directory", &arg_refs);
        let directory_args = args;
        // A new connection per request, as curl makes: after a reload, a
        // pooled connection may still reach the old worker for one request.
        let builder = match &security {
            Some(s) => s.http(&s.operator_token),
            None => reqwest::Client::builder(),
        };
        let http = builder.timeout(Duration::from_secs(10)).pool_max_idle_per_host(0).build().unwrap();
        let cluster = Cluster {
            dir,
            security,
            directory_port,
            directory,
            sherlock_port: 0,
            sherlock: None,
            http,
            directory_args,
            admin_ports: Mutex::new(HashMap::new()),
        };
        cluster.wait_for_directory().await;
        cluster
    }

    pub fn directory_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.directory_port)
    }

    /// `https` in secure mode, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.security.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The flags a client of this cluster's directory needs: its token and
    /// the CA, in secure mode; none otherwise.
    pub fn client_flags(&self, token: &Path) -> Vec<String> {
        self.security.as_ref().map(|s| s.client_args(token)).unwrap_or_default()
    }

    /// A watson's flags (the cluster's watson token and the CA); none when plain.
    pub fn watson_flags(&self) -> Vec<String> {
        self.security.as_ref().map(|s| s.client_args(&s.watson_token)).unwrap_or_default()
    }

    /// An operator's flags, for `dw` (the operator token and the CA); none when plain.
    pub fn operator_flags(&self) -> Vec<String> {
        self.security.as_ref().map(|s| s.client_args(&s.operator_token)).unwrap_or_default()
    }

    /// The lines a client's config file needs for `token` (`token_file:`,
    /// `ca_file:`) in secure mode; empty otherwise.
    pub fn client_config(&self, token: &Path) -> String {
        self.security.as_ref().map(|s| s.client_config(token)).unwrap_or_default()
    }

    /// The watsons' token file (which exists only in secure mode).
    pub fn watson_token(&self) -> PathBuf {
        self.security.as_ref().map(|s| s.watson_token.clone()).unwrap_or_default()
    }

    /// The operator's token file (which exists only in secure mode).
    pub fn operator_token(&self) -> PathBuf {
        self.security.as_ref().map(|s| s.operator_token.clone()).unwrap_or_default()
    }

    /// An HTTP client that talks to the directory with `token` (and the CA)
    /// in secure mode; a plain one otherwise.
    pub fn http_as(&self, token: &Path) -> reqwest::Client {
        let builder = match &self.security {
            Some(s) => s.http(token),
            None => reqwest::Client::builder(),
        };
        builder.timeout(Duration::from_secs(10)).build().unwrap()
    }

    /// A sherlock's token file, named `name` in the auth file (so `name` is
    /// the sherlock's name in status). In secure mode it is made once, and
    /// the running directory told with SIGHUP and waited for; a restarted
    /// sherlock of the same name reuses it.
    pub async fn sherlock_token(&self, name: &str) -> PathBuf {
        let token = self.dir.path().join(format!("{name}.token"));
        let Some(s) = &self.security else { return token };
        if token.exists() {
            return token;
        }
        s.add_token(&token, &format!("s-{name}-{}", free_port()), &format!("name: {name}\n    role: sherlock"));
        // A killed directory reads the file when it starts again.
        if self.directory.child.is_some() {
            self.directory.signal(libc::SIGHUP);
            let url = format!("{}/v1/snapshot", self.directory_url());
            let secret = std::fs::read_to_string(&token).unwrap();
            let http = self.http.clone();
            eventually(Duration::from_secs(10), "the directory to take the sherlock's token", async || {
                let resp = http.get(&url).bearer_auth(&secret).send().await.ok()?;
                resp.status().is_success().then_some(())
            })
            .await;
        }
        token
    }

    /// The name of the sherlock started on `port` (its name in status).
    pub fn sherlock_name(port: u16) -> String {
        format!("test-{port}")
    }

    /// Another directory on a free port with this cluster's certificate and
    /// auth file; its URL. It reads the auth file at start only: start it
    /// after the sherlocks that will follow it (their tokens must be in it).
    pub fn another_directory(&self, name: &str) -> (String, Proc) {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let state = self.dir.path().join(format!("{name}-state")).to_str().unwrap().to_string();
        let mut args: Vec<String> =
            ["--listen", &listen, "--max-ttl", "3s", "--state-dir", &state].iter().map(|a| a.to_string()).collect();
        if let Some(s) = &self.security {
            args.extend(s.directory_args());
        }
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::start(self.dir.path(), "directory", &arg_refs);
        (format!("{}://{listen}", self.scheme()), proc)
    }

    pub async fn wait_for_directory(&self) {
        let url = format!("{}/v1/status", self.directory_url());
        let http = self.http.clone();
        eventually(Duration::from_secs(10), "the directory to answer", async || {
            http.get(&url).send().await.ok().filter(|r| r.status().is_success())
        })
        .await;
    }

    /// Restarts the directory with the same arguments (and so the same port).
    pub async fn restart_directory(&mut self) {
        self.directory.stop();
        let args: Vec<&str> = self.directory_args.iter().map(String::as_str).collect();
        self.directory = Proc::start(self.dir.path(), "directory", &args);
        self.wait_for_directory().await;
    }

    /// The admin (`/metrics`, `/status`) port of the sherlock listening on `port`.
    pub fn admin_port(&self, port: u16) -> u16 {
        self.admin_ports.lock().unwrap()[&port]
    }

    /// The run dir (haproxy.cfg, `master.sock`, `admin.sock`) of the sherlock
    /// listening on `port`.
    pub fn run_dir(&self, port: u16) -> PathBuf {
        self.dir.path().join(format!("sherlock-{port}"))
    }

    /// `GET /status` on the admin endpoint of the sherlock listening on `port`.
    pub async fn sherlock_status(&self, port: u16) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}/status", self.admin_port(port));
        self.http.get(url).send().await.unwrap().json().await.unwrap()
    }

    /// One value from `/metrics` of the sherlock listening on `port`.
    pub async fn sherlock_metric(&self, port: u16, name: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin_port(port));
        metric(&self.http.get(url).send().await.unwrap().text().await.unwrap(), name)
    }

    /// One value from the directory's `/metrics`.
    pub async fn directory_metric(&self, name: &str) -> u64 {
        let url = format!("{}/metrics", self.directory_url());
        metric(&self.http.get(url).send().await.unwrap().text().await.unwrap(), name)
    }

    /// Starts another sherlock on a free port with its own run dir.
    pub async fn start_sherlock(&self, extra: &[&str]) -> (u16, Proc) {
        self.start_sherlock_at(free_port(), extra).await
    }

    /// Starts a sherlock on `port`, with the run dir that port always gets
    /// (so a restarted sherlock finds its saved snapshot).
    pub async fn start_sherlock_at(&self, port: u16, extra: &[&str]) -> (u16, Proc) {
        let run_dir = self.dir.path().join(format!("sherlock-{port}"));
        let listen = format!("127.0.0.1:{port}");
        let admin_port = free_port();
        self.admin_ports.lock().unwrap().insert(port, admin_port);
        let admin = format!("127.0.0.1:{admin_port}");
        let directory = self.directory_url();
        let run = run_dir.to_str().unwrap().to_string();
        let name = Self::sherlock_name(port);
        let mut args =
            vec!["-d", &directory, "--listen", &listen, "--run-dir", &run, "--name", &name, "--admin", &admin];
        args.extend_from_slice(extra);
        // Its own token, named as it.
        let token = self.sherlock_token(&name).await;
        let flags = self.client_flags(&token);
        args.extend(flags.iter().map(String::as_str));
        let proc = Proc::start(self.dir.path(), "sherlock", &args);
        // Ready when HAProxy answers on the port (404 for no service).
        let url = format!("http://127.0.0.1:{port}/");
        let http = self.http.clone();
        eventually(Duration::from_secs(15), "sherlock's haproxy to listen", async || http.get(&url).send().await.ok())
            .await;
        (port, proc)
    }

    /// Starts a watson for `instance` of `service` with a 1 s period.
    pub fn watson(&self, service: &str, url: &str, extra: &[&str]) -> Proc {
        let directory = self.directory_url();
        let mut args = vec!["-d", directory.as_str(), service, url, "1"];
        args.extend_from_slice(extra);
        let flags = self.watson_flags();
        args.extend(flags.iter().map(String::as_str));
        Proc::start(self.dir.path(), "watson", &args)
    }

    pub async fn status(&self) -> serde_json::Value {
        self.http.get(format!("{}/v1/status", self.directory_url())).send().await.unwrap().json().await.unwrap()
    }

    /// Waits until the directory lists `n` instances of `service` and every
    /// sherlock has applied the snapshot that shows them.
    pub async fn wait_for_instances(&self, service: &str, n: usize) {
        let what = format!("{n} instances of {service}, applied by every sherlock");
        eventually(Duration::from_secs(15), &what, async || {
            let status = self.status().await;
            let count = status["instances"].as_array()?.iter().filter(|i| i["service"] == service).count();
            (count == n && all_applied(&status)).then_some(())
        })
        .await;
    }

    /// Starts one instance of `service` per version, named `<version>-<n>`,
    /// each with a watson announcing its version.
    pub async fn fleet(&self, service: &str, versions: &[&str]) -> (Vec<Instance>, Vec<Proc>) {
        let mut instances = Vec::new();
        let mut watsons = Vec::new();
        for (n, version) in versions.iter().enumerate() {
            let instance = Instance::start(&format!("{version}-{n}")).await;
            watsons.push(self.watson(service, &instance.url(&format!("/{service}")), &["--version", version]));
            instances.push(instance);
        }
        (instances, watsons)
    }

    /// `POST /v1/reconcile`, asserting a 200; the JSON answer.
    pub async fn reconcile(&self) -> serde_json::Value {
        let resp = self.http.post(format!("{}/v1/reconcile", self.directory_url())).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// Waits until the directory serves `commit` and every sherlock applied it.
    pub async fn wait_for_commit(&self, commit: git2::Oid) {
        let want = commit.to_string();
        eventually(Duration::from_secs(15), &format!("commit {want} applied"), async || {
            let status = self.status().await;
            (status["commit"] == want.as_str() && all_applied(&status)).then_some(())
        })
        .await;
    }

    /// Waits until the directory's warming period is over, so removals apply.
    pub async fn wait_until_warm(&self) {
        eventually(Duration::from_secs(10), "the directory to end warming", async || {
            (self.status().await["warming"] == false).then_some(())
        })
        .await;
    }

    /// GET through sherlock's HAProxy; (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        get_via(&self.http, self.sherlock_port, path).await
    }

    /// `n` sequential requests through sherlock; counts answers by first word.
    pub async fn tally(&self, path: &str, n: usize) -> (HashMap<String, usize>, usize) {
        self.tally_via(self.sherlock_port, path, n).await
    }

    /// `n` sequential requests through the sherlock listening on `port`;
    /// counts answers by first word, and errors.
    pub async fn tally_via(&self, port: u16, path: &str, n: usize) -> (HashMap<String, usize>, usize) {
        let mut counts = HashMap::new();
        let mut errors = 0;
        for _ in 0..n {
            match get_via(&self.http, port, path).await {
                Ok((200, body)) => *counts.entry(body.split(' ').next().unwrap_or("").to_string()).or_default() += 1,
                _ => errors += 1,
            }
        }
        (counts, errors)
    }

    /// Runs dw against this directory; (exit code, stdout, stderr).
    pub fn dw(&self, args: &[&str]) -> (i32, String, String) {
        self.dw_at(None, args)
    }

    /// Runs dw in `cwd` (a routes clone) against this directory, as its operator.
    pub fn dw_in(&self, cwd: &Path, args: &[&str]) -> (i32, String, String) {
        self.dw_at(Some(cwd), args)
    }

    fn dw_at(&self, cwd: Option<&Path>, args: &[&str]) -> (i32, String, String) {
        let directory = self.directory_url();
        let mut all = vec!["-d", directory.as_str()];
        let flags = self.operator_flags();
        all.extend(flags.iter().map(String::as_str));
        all.extend_from_slice(args);
        run_dw(&all, cwd)
    }
}

/// True when `/v1/status` lists at least one sherlock and every one listed
/// has applied the snapshot served (its epoch too, once the directory
/// reports one). No sherlock at all is not convergence: it is a sherlock
/// that has not asked yet.
pub fn all_applied(status: &serde_json::Value) -> bool {
    let Some(index) = status["index"].as_u64() else { return false };
    let Some(sherlocks) = status["sherlocks"].as_array() else { return false };
    let epoch = status.get("epoch");
    !sherlocks.is_empty()
        && sherlocks
            .iter()
            .all(|s| s["applied"].as_u64() == Some(index) && epoch.is_none_or(|e| s.get("applied_epoch") == Some(e)))
}

pub async fn get_via(http: &reqwest::Client, port: u16, path: &str) -> Result<(u16, String), String> {
    let resp = http.get(format!("http://127.0.0.1:{port}{path}")).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await.map_err(|e| e.to_string())?))
}

pub fn run_dw(args: &[&str], cwd: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(bin("dw"));
    cmd.args(args).env("NO_COLOR", "1");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of an unlabelled metric in Prometheus text; panics if absent.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}")) as u64
}

/// One command on an HAProxy CLI socket (`master.sock`, `admin.sock`); the
/// whole answer. Blocking, but HAProxy answers in microseconds.
pub fn socket_command(socket: &Path, command: &str) -> String {
    try_socket_command(socket, command).unwrap_or_else(|e| panic!("{command:?} on {}: {e}", socket.display()))
}

pub fn try_socket_command(socket: &Path, command: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    // The master CLI answers only once our side is closed.
    s.shutdown(std::net::Shutdown::Write)?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

pub use dstack::sherlock::haproxy::ProcState;

/// `show proc` on the master socket in `run_dir`, read here rather than
/// through sherlock, so a test checks HAProxy's own account. Retries while
/// the master re-executes itself (a reload), when its socket refuses.
pub async fn show_proc(run_dir: &Path) -> ProcState {
    let socket = run_dir.join("master.sock");
    eventually(Duration::from_secs(10), "haproxy's master to answer `show proc`", async || {
        parse_show_proc(&try_socket_command(&socket, "show proc").ok()?)
    })
    .await
}

/// HAProxy's `show proc`, read as sherlock reads it.
pub use dstack::sherlock::haproxy::parse_show_proc;

/// The server names `show servers state BACKEND` lists on `admin.sock`.
pub fn haproxy_servers(run_dir: &Path, backend: &str) -> Vec<String> {
    let text = socket_command(&run_dir.join("admin.sock"), &format!("show servers state {backend}"));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

/// Pids of the HAProxy processes whose command line names `run_dir`.
pub fn haproxy_pids(run_dir: &Path) -> Vec<i32> {
    let needle = run_dir.to_str().unwrap();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
        let argv0 = cmdline.split('\0').next().unwrap_or("");
        // Zombies have an empty cmdline and hold no port.
        if argv0.ends_with("haproxy") && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A routes repo for tests: a bare "remote" (what the directory pulls) and
/// a working clone that commits and pushes to it, both made with git2.
pub struct RoutesRepo {
    pub remote: PathBuf,
    pub work: PathBuf,
    pub repo: git2::Repository,
}

impl RoutesRepo {
    pub fn new(dir: &Path) -> RoutesRepo {
        let remote = dir.join("routes-remote.git");
        let mut opts = git2::RepositoryInitOptions::new();
        opts.bare(true).initial_head("main");
        git2::Repository::init_opts(&remote, &opts).unwrap();
        let work = dir.join("routes-work");
        let repo = git2::Repository::init_opts(&work, git2::RepositoryInitOptions::new().initial_head("main")).unwrap();
        repo.remote("origin", remote.to_str().unwrap()).unwrap();
        let mut config = repo.config().unwrap();
        config.set_str("user.name", "dstack test").unwrap();
        config.set_str("user.email", "test@dstack.invalid").unwrap();
        RoutesRepo { remote, work, repo }
    }

    /// The URL the directory is given.
    pub fn url(&self) -> String {
        self.remote.to_str().unwrap().to_string()
    }

    /// Writes files, commits them all, and returns the commit (no push).
    pub fn commit_local(&self, files: &[(&str, &str)], message: &str) -> git2::Oid {
        for (path, text) in files {
            let full = self.work.join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, text).unwrap();
        }
        let mut index = self.repo.index().unwrap();
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).unwrap();
        index.write().unwrap();
        let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = self.repo.signature().unwrap();
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        self.repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents).unwrap()
    }

    /// Commits and pushes to the remote.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> git2::Oid {
        let oid = self.commit_local(files, message);
        self.push();
        oid
    }

    pub fn push(&self) {
        self.push_to("main");
    }

    /// Pushes the local `main` to the remote's `branch`.
    pub fn push_to(&self, branch: &str) {
        let mut remote = self.repo.find_remote("origin").unwrap();
        remote.push(&[format!("refs/heads/main:refs/heads/{branch}")], None).unwrap();
    }

    /// `git revert COMMIT`, committed and pushed.
    pub fn revert(&self, commit: git2::Oid) -> git2::Oid {
        let target = self.repo.find_commit(commit).unwrap();
        self.repo.revert(&target, None).unwrap();
        let mut index = self.repo.index().unwrap();
        let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = self.repo.signature().unwrap();
        let head = self.repo.head().unwrap().peel_to_commit().unwrap();
        let message = format!("Revert \"{}\"\n\nThis reverts commit {commit}.\n", target.summary().unwrap().unwrap());
        let oid = self.repo.commit(Some("HEAD"), &sig, &sig, &message, &tree, &[&head]).unwrap();
        self.repo.cleanup_state().unwrap();
        self.push();
        oid
    }
}

/// Counts answers by the instance-name prefix before `-` (`v1-a` -> `v1`).
pub fn by_version(counts: &HashMap<String, usize>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for (name, n) in counts {
        *out.entry(name.split('-').next().unwrap_or("").to_string()).or_default() += n;
    }
    out
}

/// A private CA and its certificates, made with rcgen at run time and
/// written as PEM files (keys mode 0600): a server certificate for
/// 127.0.0.1 and localhost, and a client certificate.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// Writes `NAME-ca.pem`, `NAME-server.pem`, `NAME-server.key`,
    /// `NAME-client.pem` and `NAME-client.key` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            KeyUsagePurpose,
        };
        let write = |file: &str, text: &str, mode: u32| {
            use std::os::unix::fs::PermissionsExt as _;
            let path = dir.join(format!("{name}-{file}"));
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
        };
        let (server_pem, server_key) =
            leaf(vec!["127.0.0.1".into(), "localhost".into()], ExtendedKeyUsagePurpose::ServerAuth, "directory");
        let (client_pem, client_key) = leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth, "vm101");
        Pki {
            ca: write("ca.pem", &ca_cert.pem(), 0o644),
            server_cert: write("server.pem", &server_pem, 0o644),
            server_key: write("server.key", &server_key, 0o600),
            client_cert: write("client.pem", &client_pem, 0o644),
            client_key: write("client.key", &client_key, 0o600),
        }
    }

    /// A client trusting this CA alone, with the client certificate when
    /// `identity`; a new connection per request, so each is a handshake.
    pub fn http(&self, identity: bool) -> reqwest::Client {
        let files = dstack::tls::ClientTlsFiles {
            ca_file: Some(self.ca.clone()),
            client_cert: identity.then(|| self.client_cert.clone()),
            client_key: identity.then(|| self.client_key.clone()),
        };
        dstack::tls::ClientTls::for_directory(&files)
            .unwrap()
            .reqwest()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    }

    /// `--tls-cert PEM --tls-key PEM`, for the directory.
    pub fn server_args(&self) -> Vec<String> {
        vec!["--tls-cert".into(), path_arg(&self.server_cert), "--tls-key".into(), path_arg(&self.server_key)]
    }

    /// `--ca-file PEM`, and the client certificate when `identity`.
    pub fn client_args(&self, identity: bool) -> Vec<String> {
        let mut args = vec!["--ca-file".into(), path_arg(&self.ca)];
        if identity {
            args.extend(["--client-cert".into(), path_arg(&self.client_cert)]);
            args.extend(["--client-key".into(), path_arg(&self.client_key)]);
        }
        args
    }
}

pub fn path_arg(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// A liveness check endpoint over TLS: answers `200 alive` to any request
/// and counts them.
pub struct TlsInstance {
    pub port: u16,
    pub served: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsInstance {
    pub async fn start(pki: &Pki) -> TlsInstance {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let files =
            dstack::tls::ServerTlsFiles { cert: pki.server_cert.clone(), key: pki.server_key.clone(), client_ca: None };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(dstack::tls::server_config(&files).unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (acceptor, count) = (acceptor.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else { return };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let answer = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nalive";
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        TlsInstance { port, served, task }
    }
}

impl Drop for TlsInstance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a spawned task's panic said (the benchmarks report a failed
/// section or fault by it and go on).
pub fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A plain directory alone on a free port, its state dir in `dir`, started
/// with `extra`; its base URL and process, once it answers.
pub async fn lone_directory(dir: &Path, extra: &[&str]) -> (String, Proc) {
    let listen = format!("127.0.0.1:{}", free_port());
    // In the test's temp dir: the default is a system dir for root.
    let state = dir.join(format!("state-{}", listen.rsplit(':').next().unwrap()));
    let mut args = vec!["--listen", listen.as_str(), "--state-dir", state.to_str().unwrap()];
    args.extend_from_slice(extra);
    let proc = Proc::start(dir, "directory", &args);
    let url = format!("http://{listen}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    eventually(Duration::from_secs(10), "the directory to answer", async || {
        http.get(format!("{url}/v1/status")).send().await.ok().filter(|r| r.status().is_success())
    })
    .await;
    (url, proc)
}
