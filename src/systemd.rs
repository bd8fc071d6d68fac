//! systemd's service notifications (`sd_notify(3)`): readiness, watchdog
//! pings and a status line, each a datagram to `$NOTIFY_SOCKET`.
//!
//! The packaged units (`packaging/systemd/`) are `Type=notify`: systemd
//! counts a daemon as started only when it says `READY=1`, and with
//! `WatchdogSec=` restarts one whose main loop stops saying `WATCHDOG=1`.
//! Outside systemd (no `$NOTIFY_SOCKET`) every call here does nothing, so
//! the daemons call it unconditionally. A failed send is logged, never
//! fatal: systemd would then time the start out and say so itself.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("$NOTIFY_SOCKET {0:?}: expected an absolute path or an abstract socket name (@name)")]
    BadAddress(OsString),
    #[error("$NOTIFY_SOCKET {addr:?}: {source}")]
    Send { addr: OsString, source: std::io::Error },
}

/// One line of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// Start-up is finished: the daemon serves.
    Ready,
    /// The main loop is alive (see [`Watchdog`]).
    Watchdog,
    /// A line `systemctl status` shows.
    Status(&'a str),
}

impl State<'_> {
    fn line(&self) -> String {
        match self {
            State::Ready => "READY=1".to_string(),
            State::Watchdog => "WATCHDOG=1".to_string(),
            // One line per assignment: a newline would start another.
            State::Status(text) => format!("STATUS={}", text.replace('\n', " ")),
        }
    }
}

/// Where systemd listens: a socket file, or a name in Linux's abstract
/// namespace (`@name` in `$NOTIFY_SOCKET`, which systemd uses in containers).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// Sends notifications to one socket; [`Notifier::from_env`] is systemd's.
#[derive(Debug)]
pub struct Notifier {
    /// What `$NOTIFY_SOCKET` said, for errors.
    addr: OsString,
    target: Target,
}

impl Notifier {
    /// The notifier for `addr`, as `$NOTIFY_SOCKET` spells it.
    pub fn new(addr: &OsStr) -> Result<Notifier, NotifyError> {
        let bytes = addr.as_bytes();
        let target = match bytes.first() {
            Some(b'/') => Target::Path(PathBuf::from(addr)),
            Some(b'@') if bytes.len() > 1 => Target::Abstract(bytes[1..].to_vec()),
            _ => return Err(NotifyError::BadAddress(addr.to_owned())),
        };
        Ok(Notifier { addr: addr.to_owned(), target })
    }

    /// systemd's notifier: None outside a `Type=notify` unit.
    pub fn from_env() -> Option<Result<Notifier, NotifyError>> {
        std::env::var_os("NOTIFY_SOCKET").filter(|a| !a.is_empty()).map(|a| Notifier::new(&a))
    }

    /// Sends `states` as one datagram.
    pub fn send(&self, states: &[State]) -> Result<(), NotifyError> {
        let message: Vec<String> = states.iter().map(State::line).collect();
        let message = message.join("\n");
        let error = |source| NotifyError::Send { addr: self.addr.clone(), source };
        let socket = UnixDatagram::unbound().map_err(error)?;
        match &self.target {
            Target::Path(path) => socket.send_to(message.as_bytes(), path).map_err(error)?,
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(error)?;
                socket.send_to_addr(message.as_bytes(), &addr).map_err(error)?
            }
        };
        Ok(())
    }
}

/// systemd's notifier, read once; None outside systemd or when
/// `$NOTIFY_SOCKET` is unusable (logged once).
fn notifier() -> Option<&'static Notifier> {
    static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
    NOTIFIER
        .get_or_init(|| match Notifier::from_env()? {
            Ok(notifier) => Some(notifier),
            Err(e) => {
                tracing::warn!(error = %e, "cannot notify systemd");
                None
            }
        })
        .as_ref()
}

/// Whether this process runs under a `Type=notify` unit.
pub fn enabled() -> bool {
    notifier().is_some()
}

/// Sends `states` to systemd, if it listens; a failure is logged.
pub fn notify(states: &[State]) {
    if let Some(notifier) = notifier() {
        if let Err(e) = notifier.send(states) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }
}

/// Tells systemd the daemon serves, with a status line saying what.
pub fn ready(status: &str) {
    if enabled() {
        tracing::info!(status, "telling systemd: ready");
        notify(&[State::Ready, State::Status(status)]);
    }
}

/// Updates the line `systemctl status` shows.
pub fn status(status: &str) {
    notify(&[State::Status(status)]);
}

/// Feeds systemd's watchdog.
pub fn watchdog() {
    notify(&[State::Watchdog]);
}

/// Waits until `addr` accepts a TCP connection (an unspecified address is
/// tried on loopback), then says [`ready`]: a daemon whose server runs in
/// another process (sherlock's HAProxy) is ready when its port is served,
/// not when the process started. Gives up after `limit` and says ready all
/// the same, logged, so a probe a firewall drops cannot hold the start.
pub async fn ready_when_accepting(addr: SocketAddr, limit: Duration, status: &str) {
    if !enabled() {
        return;
    }
    let mut probe = addr;
    if probe.ip().is_unspecified() {
        probe.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(probe)).await {
            Ok(Ok(_)) => break,
            _ if tokio::time::Instant::now() >= deadline => {
                tracing::warn!(%probe, ?limit, "the listen port does not accept connections yet; telling systemd ready all the same");
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    ready(status);
}

/// The pace of watchdog pings a main loop owes systemd: half of
/// `$WATCHDOG_USEC`, as `sd_watchdog_enabled(3)` advises, when
/// `$WATCHDOG_PID` is unset or this process.
///
/// A main loop adds one arm, `_ = watchdog.tick() => systemd::watchdog()`:
/// the pings then stop when that loop stops turning, not merely when the
/// process hangs.
#[derive(Debug)]
pub struct Watchdog {
    /// None: no watchdog asked for; `tick` never completes.
    every: Option<tokio::time::Interval>,
}

impl Watchdog {
    /// The watchdog systemd asked for, if any.
    pub fn from_env() -> Watchdog {
        let var = |name| std::env::var(name).ok();
        let period =
            watchdog_period(var("WATCHDOG_USEC").as_deref(), var("WATCHDOG_PID").as_deref(), std::process::id());
        let period = period.filter(|_| enabled());
        Watchdog {
            every: period.map(|period| {
                let mut every = tokio::time::interval(period);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                every
            }),
        }
    }

    /// Completes when the next ping is due; never without a watchdog.
    pub async fn tick(&mut self) {
        match &mut self.every {
            Some(every) => {
                every.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// How often to ping, from `$WATCHDOG_USEC` and `$WATCHDOG_PID`: None when
/// either is unusable or the watchdog is another process's.
fn watchdog_period(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if pid.is_some_and(|pid| pid.trim().parse::<u32>().ok() != Some(own_pid)) {
        return None;
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|u| *u > 0)?;
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifications_reach_a_socket_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::new(path.as_os_str()).unwrap();
        notifier.send(&[State::Ready, State::Status("serving\n127.0.0.1:7575")]).unwrap();
        assert_eq!(receive(&socket), "READY=1\nSTATUS=serving 127.0.0.1:7575");
        notifier.send(&[State::Watchdog]).unwrap();
        assert_eq!(receive(&socket), "WATCHDOG=1");
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("dstack-notify-test-{}-{}", std::process::id(), rand::random::<u64>());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        notifier.send(&[State::Ready]).unwrap();
        assert_eq!(receive(&socket), "READY=1");
    }

    #[test]
    fn a_socket_that_is_gone_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("gone");
        let err = Notifier::new(path.as_os_str()).unwrap().send(&[State::Ready]).unwrap_err().to_string();
        assert!(err.starts_with(&format!("$NOTIFY_SOCKET {:?}: ", path.as_os_str())), "{err}");
    }

    #[test]
    fn addresses_must_be_absolute_or_abstract() {
        for bad in ["", "relative/notify", "@"] {
            let err = Notifier::new(OsStr::new(bad)).unwrap_err().to_string();
            assert!(err.contains("expected an absolute path or an abstract socket name"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_watchdog_pings_at_half_its_timeout_for_this_process_only() {
        assert_eq!(watchdog_period(Some("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_period(Some("30000000"), Some("7"), 7), Some(Duration::from_secs(15)));
        assert_eq!(watchdog_period(Some("30000000"), Some("8"), 7), None, "another process's watchdog");
        assert_eq!(watchdog_period(None, None, 7), None);
        assert_eq!(watchdog_period(Some("0"), None, 7), None);
        assert_eq!(watchdog_period(Some("soon"), None, 7), None);
    }
}
