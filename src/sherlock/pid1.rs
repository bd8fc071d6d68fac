//! Sherlock as a container's entry point (PID 1).
//!
//! PID 1 has two duties no other process has: the kernel hands it every
//! orphan, whose exit it must reap or the zombie stays for good (HAProxy's
//! workers are orphaned when their master dies), and signals without a
//! handler do not reach it. So, as tini and `docker run --init` do, a
//! sherlock that finds itself PID 1 forks first: the parent stays PID 1,
//! reaps every child and forwards signals, and exits with sherlock's
//! status; the child runs sherlock as usual (ARCHITECTURE.md, "sherlock as
//! PID 1").

/// The signals PID 1 passes on to sherlock.
const FORWARDED: [libc::c_int; 6] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

/// Call before any thread starts (before the tokio runtime). Returns at
/// once unless this process is PID 1; then it returns only in the forked
/// child, which goes on to run sherlock, while PID 1 reaps and forwards
/// until sherlock exits, and exits with its status.
pub fn fork_if_pid1() {
    if std::process::id() != 1 {
        return;
    }
    // SAFETY: single-threaded here (the caller's contract), so fork is safe
    // and the signal mask is the whole process's. Every call is a plain
    // libc call on stack values.
    unsafe {
        let mut wanted: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut wanted);
        for sig in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut wanted, *sig);
        }
        // Blocked before the fork, so no signal is lost in between; a
        // blocked signal is queued even when its default is to be ignored.
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &wanted, &mut before);
        let child = libc::fork();
        if child <= 0 {
            libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
            if child < 0 {
                eprintln!(
                    "sherlock: running as PID 1 but cannot fork its reaper ({}); orphaned processes will not be reaped",
                    std::io::Error::last_os_error()
                );
            }
            return;
        }
        std::process::exit(reap_and_forward(child, &wanted));
    }
}

/// PID 1's loop: reaps every child that exits, forwards signals to
/// `sherlock`, and returns sherlock's exit code once it has exited.
///
/// # Safety
/// `wanted` must be blocked in the calling (only) thread.
unsafe fn reap_and_forward(sherlock: libc::pid_t, wanted: &libc::sigset_t) -> i32 {
    loop {
        let sig = libc::sigwaitinfo(wanted, std::ptr::null_mut());
        if sig < 0 {
            continue; // EINTR
        }
        if sig != libc::SIGCHLD {
            libc::kill(sherlock, sig);
            continue;
        }
        // One SIGCHLD may stand for several exits: reap all there are.
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, libc::WNOHANG);
            if pid <= 0 {
                break;
            }
            if pid == sherlock {
                return if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
            }
        }
    }
}
