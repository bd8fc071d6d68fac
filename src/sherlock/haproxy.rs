//! The local HAProxy that sherlock starts, checks, reloads and stops.
//!
//! HAProxy runs in master-worker mode with a master socket in the run dir.
//! A reload goes through the master CLI; the stats socket exposes its
//! listeners, so the master passes the bound sockets to the new worker and
//! no connection is refused during a reload.
//!
//! Sherlock binds the clients' port itself, keeps that socket for its whole
//! life and hands a copy to every HAProxy it starts, as descriptor 3
//! (`bind fd@3`). While a master or worker dies and a new one starts, the
//! socket stays open, so new connections wait in its queue instead of being
//! refused. HAProxy does not die with sherlock: a sherlock started again on
//! the same run dir finds the running master through the master socket,
//! takes a copy of its listening socket (`pidfd_getfd`), starts its own
//! master on it, and only then lets the old one finish its connections and
//! exit (ARCHITECTURE.md, "The listening socket").

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::backoff::Backoff;

#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("haproxy rejected the candidate config:\n{0}")]
    Invalid(String),
    #[error("haproxy did not become ready within {0:?}: {1}")]
    NotReady(Duration, String),
    #[error("haproxy exited: {0}")]
    Exited(String),
    #[error("reload failed: {0}")]
    Reload(String),
    #[error(
        "cannot listen on {addr}: {source} (another program, or an HAProxy that is not this run dir's, holds the port)"
    )]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How long a starting master has to show a worker.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// The descriptor HAProxy finds the listening socket on (`bind fd@3`).
pub const LISTEN_FD: RawFd = 3;

/// The files of one sherlock's HAProxy, all in its run dir.
#[derive(Debug, Clone)]
pub struct Paths {
    pub run_dir: PathBuf,
    pub config: PathBuf,
    pub candidate: PathBuf,
    pub master_socket: PathBuf,
    pub admin_socket: PathBuf,
}

impl Paths {
    pub fn new(run_dir: &Path) -> Paths {
        Paths {
            run_dir: run_dir.to_path_buf(),
            config: run_dir.join("haproxy.cfg"),
            candidate: run_dir.join("haproxy.cfg.candidate"),
            master_socket: run_dir.join("master.sock"),
            admin_socket: run_dir.join("admin.sock"),
        }
    }
}

/// One HAProxy master process and how to talk to it.
pub struct Haproxy {
    binary: PathBuf,
    pub paths: Paths,
    /// Where clients connect.
    listen: SocketAddr,
    /// The listening socket, held while HAProxy runs or is being restarted;
    /// dropped when a start fails, so clients are refused at once rather than
    /// queued while HAProxy stays down.
    listener: Option<OwnedFd>,
    /// A master left running by an earlier sherlock on this run dir, to be
    /// stopped gracefully once ours serves.
    predecessor: Option<u32>,
    child: Option<Child>,
    /// Notified when HAProxy logs a server going down or up.
    pub server_changed: std::sync::Arc<tokio::sync::Notify>,
    /// Spaces out restarts of a master that keeps dying or failing to start.
    restarts: Backoff,
    /// When the next restart is due, while HAProxy is down.
    restart_at: Option<tokio::time::Instant>,
}

/// What `show proc` on the master CLI says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcState {
    pub master: u32,
    pub reloads: u64,
    pub failed: u64,
    pub workers: Vec<u32>,
}

/// Parses `show proc` (HAProxy 2.6 layout).
pub fn parse_show_proc(text: &str) -> Option<ProcState> {
    let mut state = None;
    let mut section = "";
    for line in text.lines() {
        if let Some(title) = line.strip_prefix("# ") {
            section = title.trim();
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [master, "master", reloads, "[failed:", failed, ..] => {
                state = Some(ProcState {
                    master: master.parse().ok()?,
                    reloads: reloads.parse().ok()?,
                    failed: failed.trim_end_matches(']').parse().ok()?,
                    workers: Vec::new(),
                });
            }
            [pid, "worker", ..] if section == "workers" => {
                if let (Some(s), Ok(pid)) = (state.as_mut(), pid.parse()) {
                    s.workers.push(pid);
                }
            }
            _ => {}
        }
    }
    state
}

impl Haproxy {
    pub fn new(binary: PathBuf, paths: Paths, listen: SocketAddr) -> Haproxy {
        // The first restart comes within 100 ms, so a killed master's port
        // is served again within a second; a master that keeps failing is
        // tried every 10 s at most, for good.
        let restarts = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let server_changed = Default::default();
        Haproxy {
            binary,
            paths,
            listen,
            listener: None,
            predecessor: None,
            child: None,
            server_changed,
            restarts,
            restart_at: None,
        }
    }

    /// `haproxy -c` on a file: Ok, or the errors HAProxy printed.
    pub async fn check(&self, config: &Path) -> Result<(), HaproxyError> {
        let spawn = |source| HaproxyError::Spawn { binary: self.binary.clone(), source };
        // `bind fd@3` needs a socket there even to be checked; an unbound one
        // does, and never takes a client.
        let stand_in = unbound_socket(self.listen).map_err(spawn)?;
        let mut cmd = Command::new(&self.binary);
        // HAProxy returns to its start directory after parsing: give it one
        // it may enter whatever sherlock's own (a root-only checkout, say).
        cmd.arg("-c").arg("-f").arg(config).current_dir(&self.paths.run_dir).stdin(Stdio::null());
        pass_listener(&mut cmd, stand_in.as_raw_fd());
        let out = cmd.output().await.map_err(spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
            // Keep the alerts and warnings; the version banner is noise.
            let problems: Vec<&str> =
                text.lines().filter(|l| !l.starts_with("[NOTICE]") && !l.trim().is_empty()).collect();
            Err(HaproxyError::Invalid(problems.join("\n")))
        }
    }

    /// Starts the master with the config in place and waits for a worker.
    /// On any failure nothing is left running: a master that started but
    /// never became ready is stopped, so a later start begins clean.
    pub async fn start(&mut self) -> Result<(), HaproxyError> {
        self.find_predecessor().await;
        let result = match self.listener_fd() {
            Ok(fd) => self.spawn_and_wait(fd).await,
            Err(e) => Err(e),
        };
        match &result {
            Ok(()) => self.retire_predecessor(),
            Err(_) => {
                self.stop_child().await;
                // Nobody serves the queue: refuse clients until a start works
                // (unless the predecessor still serves it).
                if self.predecessor.is_none() {
                    self.listener = None;
                }
            }
        }
        result
    }

    /// The listening socket: the one held, else a new one.
    fn listener_fd(&mut self) -> Result<RawFd, HaproxyError> {
        if self.listener.is_none() {
            let listener = std::net::TcpListener::bind(self.listen)
                .map_err(|source| HaproxyError::Listen { addr: self.listen, source })?;
            self.listener = Some(OwnedFd::from(listener));
        }
        Ok(self.listener.as_ref().map(|l| l.as_raw_fd()).expect("set above"))
    }

    /// A master that an earlier sherlock on this run dir left running (one
    /// ended by SIGKILL cannot stop it): remember it, and take a copy of its
    /// listening socket, so ours starts on the very socket it serves and no
    /// client is refused during the handover.
    async fn find_predecessor(&mut self) {
        if self.child.is_some() || self.predecessor.is_some() {
            return;
        }
        let Ok(state) = self.show_proc().await else { return };
        // The socket file is ours; the process must be an HAProxy started
        // on it, not a pid reused since.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", state.master)).unwrap_or_default();
        let needle = self.paths.master_socket.as_os_str().as_encoded_bytes();
        if !cmdline.windows(needle.len()).any(|w| w == needle) {
            return;
        }
        tracing::info!(pid = state.master, "an haproxy from an earlier sherlock serves this run dir; taking it over");
        self.predecessor = Some(state.master);
        if self.listener.is_some() {
            return;
        }
        match copy_listener(state.master, self.listen) {
            Ok(fd) => self.listener = Some(fd),
            Err(e) => {
                // Without its socket ours cannot bind the port: stop it
                // first, at the cost of a gap.
                tracing::warn!(pid = state.master, error = %e, "cannot take the running haproxy's listening socket; stopping it first (clients are refused until ours serves)");
                self.retire_predecessor();
                wait_gone(state.master, Duration::from_secs(5)).await;
            }
        }
    }

    /// Asks the predecessor's master to stop: its workers stop accepting,
    /// finish their connections (`hard-stop-after` bounds it) and exit.
    fn retire_predecessor(&mut self) {
        if let Some(pid) = self.predecessor.take() {
            // SAFETY: kill(2) of a pid checked above to be an HAProxy on our
            // run dir's master socket.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) };
            tracing::info!(pid, "the earlier haproxy finishes its connections and exits");
        }
    }

    async fn spawn_and_wait(&mut self, listener: RawFd) -> Result<(), HaproxyError> {
        let _ = std::fs::remove_file(&self.paths.master_socket);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-W")
            .arg("-S")
            .arg(&self.paths.master_socket)
            .arg("-f")
            .arg(&self.paths.config)
            .current_dir(&self.paths.run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // No PR_SET_PDEATHSIG: HAProxy outlives a killed sherlock and keeps
        // serving, and the next sherlock takes it over (`find_predecessor`).
        pass_listener(&mut cmd, listener);
        let mut child = cmd.spawn().map_err(|source| HaproxyError::Spawn { binary: self.binary.clone(), source })?;
        forward_logs(child.stdout.take(), self.server_changed.clone());
        forward_logs(child.stderr.take(), self.server_changed.clone());
        tracing::info!(pid = child.id(), config = %self.paths.config.display(), "haproxy started");
        self.child = Some(child);

        let limit = READY_LIMIT;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(HaproxyError::Exited(status.to_string()));
            }
            match self.show_proc().await {
                Ok(state) if !state.workers.is_empty() => return Ok(()),
                Ok(_) => {}
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(HaproxyError::NotReady(limit, e.to_string()))
                }
                Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HaproxyError::NotReady(limit, "no worker".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn show_proc(&self) -> Result<ProcState, HaproxyError> {
        let text = self.master_command("show proc").await?;
        parse_show_proc(&text).ok_or_else(|| HaproxyError::Reload(format!("unreadable `show proc` answer: {text:?}")))
    }

    /// Reloads seamlessly and confirms, from the master CLI, that a new
    /// worker took over. A failed reload leaves the old worker serving.
    pub async fn reload(&mut self) -> Result<(), HaproxyError> {
        let before = self.show_proc().await?;
        // The master re-executes itself on reload and closes the connection
        // without an answer (HAProxy 2.6), so the answer is read back below.
        let _ = self.master_command("reload").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Ok(after) = self.show_proc().await {
                if after.failed > before.failed {
                    return Err(HaproxyError::Reload(
                        "the master reports a failed reload; the previous worker keeps serving".into(),
                    ));
                }
                if after.reloads > before.reloads && !after.workers.is_empty() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HaproxyError::Reload("no new worker within 10s".into()));
            }
        }
    }

    async fn master_command(&self, command: &str) -> Result<String, HaproxyError> {
        socket_command(&self.paths.master_socket, command).await
    }

    /// A Runtime API command on the admin socket.
    pub async fn runtime_command(&self, command: &str) -> Result<String, HaproxyError> {
        socket_command(&self.paths.admin_socket, command).await
    }

    /// Resolves when a restart is due: the master has exited (then after
    /// a backoff delay), or an earlier restart failed and its delay has
    /// passed. Never resolves while HAProxy runs or after [`Haproxy::stop`].
    /// Returns how the master ended when it has just exited.
    pub async fn restart_due(&mut self) -> Option<String> {
        let mut exited = None;
        if let Some(child) = self.child.as_mut() {
            let status = child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            self.child = None;
            let delay = self.restarts.next_delay();
            tracing::error!(%status, restart_in = ?delay, "haproxy exited unexpectedly");
            self.restart_at = Some(tokio::time::Instant::now() + delay);
            exited = Some(status);
        }
        match self.restart_at {
            // Its exit is reported at once; the restart is due later.
            Some(_) if exited.is_some() => exited,
            Some(at) => {
                tokio::time::sleep_until(at).await;
                None
            }
            None => std::future::pending().await,
        }
    }

    /// Starts HAProxy again on the config in place, which was checked when
    /// it was put there; a failure schedules the next try, further out each
    /// time up to the backoff's cap, for as long as sherlock runs.
    pub async fn restart(&mut self) -> Result<(), HaproxyError> {
        let mut result = self.start().await;
        if let Err(HaproxyError::Exited(_)) = &result {
            // HAProxy's reason went to the log; `-c` puts it in the error.
            if let Err(why) = self.check(&self.paths.config).await {
                result = Err(why);
            }
        }
        match &result {
            Ok(()) => {
                self.restarts.reset();
                self.restart_at = None;
            }
            Err(_) => self.restart_at = Some(tokio::time::Instant::now() + self.restarts.next_delay()),
        }
        result
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the master (and so its workers): SIGTERM, then SIGKILL; and a
    /// predecessor not yet retired.
    pub async fn stop(&mut self) {
        self.restart_at = None;
        if self.child.is_some() {
            self.stop_child().await;
            tracing::info!("haproxy stopped");
        }
        if let Some(pid) = self.predecessor.take() {
            // SAFETY: as in `retire_predecessor`.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        self.listener = None;
    }

    async fn stop_child(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if let Some(pid) = child.id() {
            // SAFETY: signalling our own child by the pid tokio gave us.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
            tracing::warn!("haproxy ignored SIGTERM for 5s; killing it");
            let _ = child.kill().await;
        }
    }
}

/// Makes `listener` the child's descriptor [`LISTEN_FD`], open across exec.
fn pass_listener(cmd: &mut Command, listener: RawFd) {
    // SAFETY: dup2 and fcntl are async-signal-safe, and nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if listener != LISTEN_FD && libc::dup2(listener, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 clears close-on-exec, but not when the numbers match.
            if libc::fcntl(LISTEN_FD, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A TCP socket of `addr`'s family, neither bound nor listening.
fn unbound_socket(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket(2) returns a new descriptor we own, or -1.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A copy of the listening socket that `pid`'s HAProxy holds as
/// [`LISTEN_FD`], if it is a TCP socket listening on `addr`.
fn copy_listener(pid: u32, addr: SocketAddr) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open and pidfd_getfd return new descriptors we own, or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: as above; the copy is close-on-exec by definition.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), LISTEN_FD, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `listening`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let listener = std::net::TcpListener::from(fd);
    let bound = listener.local_addr().ok();
    if rc != 0 || listening == 0 || bound != Some(addr) {
        return Err(std::io::Error::other(format!(
            "its descriptor {LISTEN_FD} is not a socket listening on {addr} (bound to {bound:?})"
        )));
    }
    Ok(OwnedFd::from(listener))
}

/// Waits until `pid` (not our child) has exited, for at most `limit`.
async fn wait_gone(pid: u32, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    // A zombie still answers kill(2); its /proc state says Z.
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
            .unwrap_or(false)
    };
    while alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends one command to an HAProxy CLI socket and reads the whole answer.
pub async fn socket_command(socket: &Path, command: &str) -> Result<String, HaproxyError> {
    let io = |source| HaproxyError::Io { what: "haproxy socket", path: socket.to_path_buf(), source };
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(io)?;
        stream.write_all(format!("{command}\n").as_bytes()).await.map_err(io)?;
        // The master CLI answers only once our side is closed.
        stream.shutdown().await.map_err(io)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.map_err(io)?;
        Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.unwrap_or_else(|_| {
        Err(io(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer to {command:?} within 5s"))))
    })
}

/// True for HAProxy's line on a server's health changing, e.g.
/// `Server svc_barker/barker-v1-0001 is DOWN, reason: Layer4 ...`.
fn is_server_change(line: &str) -> bool {
    line.contains("Server svc_") && (line.contains(" is DOWN") || line.contains(" is UP"))
}

/// Copies HAProxy's own output into sherlock's log, and tells `server_changed`
/// when a server goes down or up.
fn forward_logs<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    pipe: Option<R>,
    server_changed: std::sync::Arc<tokio::sync::Notify>,
) {
    let Some(pipe) = pipe else { return };
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if is_server_change(&line) {
                server_changed.notify_one();
            }
            if line.contains("[ALERT]") {
                tracing::error!(target: "haproxy", "{line}");
            } else if line.contains("[WARNING]") {
                tracing::warn!(target: "haproxy", "{line}");
            } else {
                tracing::info!(target: "haproxy", "{line}");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_proc() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
            3987            master          1 [failed: 0]   0d00h00m03s     2.6.12-1+deb12u4\n\
            # workers\n\
            4079            worker          0               0d00h00m01s     2.6.12-1+deb12u4\n\
            # old workers\n\
            3990            worker          1               0d00h00m43s     2.6.12-1+deb12u4\n\
            # programs\n\n";
        assert_eq!(parse_show_proc(text), Some(ProcState { master: 3987, reloads: 1, failed: 0, workers: vec![4079] }));
        assert_eq!(parse_show_proc("garbage"), None);
    }
}
