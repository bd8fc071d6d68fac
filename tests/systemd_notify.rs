//! The daemons under a `Type=notify` unit (README "Install"): each says
//! `READY=1` only once it really serves, with a status line, and feeds the
//! watchdog from its main loop. The test plays systemd: a datagram socket
//! of its own is each daemon's `$NOTIFY_SOCKET`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tokio::net::UnixDatagram;

/// What systemd would pass: the socket, and a watchdog of 400 ms (a ping
/// every 200 ms).
fn systemd_env(socket: &Path) -> Vec<(&'static str, String)> {
    vec![("NOTIFY_SOCKET", socket.to_str().unwrap().to_string()), ("WATCHDOG_USEC", "400000".to_string())]
}

/// A `$NOTIFY_SOCKET` in `dir`.
fn notify_socket(dir: &Path, name: &str) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join(format!("{name}.notify"));
    (UnixDatagram::bind(&path).unwrap(), path)
}

/// Reads datagrams until one holds the line `line` (or starts with it, for
/// a `STATUS=`), and returns that datagram.
async fn wait_for_line(socket: &UnixDatagram, line: &str, proc: &Proc) -> String {
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Ok(got) => got.unwrap(),
            Err(_) => panic!("no {line:?} from {} within 30 s; its log:\n{}", proc.name, proc.log_text()),
        };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.lines().any(|l| l == line || (line.ends_with('=') && l.starts_with(line))) {
            return message;
        }
    }
}

fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect(addr(port)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_is_ready_once_it_listens_with_its_routes_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let repo = RoutesRepo::new(dir.path());
    let commit = repo.commit(&[("routes/hello.yaml", "hello:\n  v1: 100\n")], "hello");
    let (socket, path) = notify_socket(dir.path(), "directory");
    let port = free_port();
    let (listen, state) = (format!("127.0.0.1:{port}"), dir.path().join("state"));
    let args = ["--listen", &listen, "--state-dir", state.to_str().unwrap(), "--repo", &repo.url()];
    let env = systemd_env(&path);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let directory = Proc::start_with_env(dir.path(), "directory", &args, &env);

    let ready = wait_for_line(&socket, "READY=1", &directory).await;
    assert!(
        ready.contains(&format!("STATUS=serving on {listen}; routes commit {commit}")),
        "READY before the routes were loaded: {ready:?}"
    );
    assert!(accepts(port), "READY while the port refuses connections");
    wait_for_line(&socket, "WATCHDOG=1", &directory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sherlock_is_ready_once_its_haproxy_serves_the_listen_port() {
    let cluster = Cluster::directory_alone(&[]).await;
    let (socket, path) = notify_socket(cluster.dir.path(), "sherlock");
    let port = free_port();
    let (listen, run_dir) = (format!("127.0.0.1:{port}"), cluster.dir.path().join("sherlock-run"));
    let name = Cluster::sherlock_name(port);
    let token = cluster.sherlock_token(&name).await;
    let directory = cluster.directory_url();
    let mut args: Vec<String> = ["-d", &directory, "--listen", &listen, "--name", &name, "--admin", "off", "--run-dir"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.push(run_dir.to_str().unwrap().to_string());
    args.extend(cluster.client_flags(&token));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = systemd_env(&path);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sherlock = Proc::start_with_env(cluster.dir.path(), "sherlock", &args, &env);

    let ready = wait_for_line(&socket, "READY=1", &sherlock).await;
    assert!(accepts(port), "READY while HAProxy does not serve {listen} yet");
    assert!(ready.contains(&format!("STATUS=HAProxy serving on {listen}")), "{ready:?}");
    wait_for_line(&socket, "WATCHDOG=1", &sherlock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watson_is_ready_after_its_first_check() {
    let cluster = Cluster::directory_alone(&[]).await;
    let instance = Instance::start("vm101").await;
    let (socket, path) = notify_socket(cluster.dir.path(), "watson");
    let directory = cluster.directory_url();
    let url = instance.url("");
    let mut args: Vec<String> = ["-d", &directory, "emitter", &url, "1"].iter().map(|a| a.to_string()).collect();
    args.extend(cluster.watson_flags());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = systemd_env(&path);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let watson = Proc::start_with_env(cluster.dir.path(), "watson", &args, &env);

    let ready = wait_for_line(&socket, "READY=1", &watson).await;
    assert!(ready.contains("STATUS=first checks done: 1 of 1 instances alive"), "{ready:?}");
    wait_for_line(&socket, "WATCHDOG=1", &watson).await;
}
