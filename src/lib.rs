//! dstack: service discovery and traffic routing for microservices.
//!
//! - [`directory`] merges live instances (heartbeats) into numbered snapshots;
//! - [`watson`] checks local instances and heartbeats them to the directory;
//! - [`sherlock`] follows the snapshot and drives a local HAProxy;
//! - [`dw`] is the operator's CLI.
//!
//! The binaries in `src/bin/` only parse arguments, resolve settings with
//! the daemon's `config` module, and call its `run`.
//!
//! Layers, each using only those above it (ARCHITECTURE.md draws them):
//!
//! 1. [`model`]: names, versions, URLs, the heartbeat and the snapshot;
//!    shared helpers with no domain ([`fnv`], [`backoff`], [`metrics`],
//!    [`logging`], [`build_info`], [`config_file`], [`secret`],
//!    [`private_dir`], [`tls`]).
//! 2. [`routes`]: the desired state, read and validated from YAML, and the
//!    weight arithmetic; [`gitsync`] reads it from git.
//! 3. [`protocol`]: the `/v1` wire types both sides speak.
//! 4. [`client`]: the directory's client.
//! 5. The daemons and the CLI: [`directory`], [`watson`], [`sherlock`], [`dw`].

pub mod backoff;
pub mod build_info;
pub mod client;
pub mod config_file;
pub mod directory;
pub mod dw;
pub mod fnv;
pub mod gitsync;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod private_dir;
pub mod protocol;
pub mod routes;
pub mod secret;
pub mod sherlock;
pub mod systemd;
pub mod tls;
pub mod watson;

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT or SIGTERM: both shut down gracefully.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        trigger.cancel();
    });
    token
}

/// This host's name, for defaults such as sherlock's client name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // on success when the name fits.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(0);
    let name = if ok { String::from_utf8_lossy(&buf[..end]).to_string() } else { String::new() };
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}
