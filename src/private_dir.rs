//! Directories only this user may change: sherlock's run dir (its
//! `haproxy.cfg`, HAProxy's sockets, the saved snapshot it serves at start)
//! and the directory's state dir (its routes mirror).
//!
//! Whoever can write such a directory can plant the file a daemon reads at
//! start or replace a socket, so each is created with mode 0700 and refused
//! when another user owns it or others may write it.

use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

/// Why a directory was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    #[error("{flag} {path}: cannot create it: {source}")]
    Create {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {path}: not a directory")]
    NotADir { flag: &'static str, path: PathBuf },
    #[error(
        "{flag} {path}: owned by uid {owner} (mode {mode:04o}), not by this user (uid {me}); \
         use a directory of your own, or chown it to uid {me}"
    )]
    Owner { flag: &'static str, path: PathBuf, owner: u32, mode: u32, me: u32 },
    #[error(
        "{flag} {path}: owned by uid {owner} with mode {mode:04o}, so {who} may write it; \
         run `chmod go-w {path}` or use another directory"
    )]
    Writable { flag: &'static str, path: PathBuf, owner: u32, mode: u32, who: &'static str },
}

/// Creates `path` (and any missing parents) with mode 0700, or checks the
/// directory already there: it must be this user's and writable by no one
/// else. `flag` names the setting in errors (`--run-dir`).
pub fn ensure(path: &Path, flag: &'static str) -> Result<(), PrivateDirError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(|source| PrivateDirError::Create {
        flag,
        path: path.into(),
        source,
    })?;
    // Following a symlink: what matters is the directory written to.
    let meta = std::fs::metadata(path).map_err(|source| PrivateDirError::Create { flag, path: path.into(), source })?;
    if !meta.is_dir() {
        return Err(PrivateDirError::NotADir { flag, path: path.into() });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    check(path, flag, meta.uid(), meta.mode() & 0o7777, me)
}

/// The rule, apart from the file system: owned by `me`, and neither group
/// nor others may write.
fn check(path: &Path, flag: &'static str, owner: u32, mode: u32, me: u32) -> Result<(), PrivateDirError> {
    if owner != me {
        return Err(PrivateDirError::Owner { flag, path: path.into(), owner, mode, me });
    }
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "its group",
        (false, true) => "every user",
        (true, true) => "its group and every user",
    };
    Err(PrivateDirError::Writable { flag, path: path.into(), owner, mode, who })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_rule() {
        let p = Path::new("/srv/run");
        assert!(check(p, "--run-dir", 1000, 0o700, 1000).is_ok());
        assert!(check(p, "--run-dir", 1000, 0o755, 1000).is_ok(), "others may read, not write");
        let err = check(p, "--run-dir", 1001, 0o700, 1000).unwrap_err().to_string();
        assert_eq!(
            err,
            "--run-dir /srv/run: owned by uid 1001 (mode 0700), not by this user (uid 1000); \
             use a directory of your own, or chown it to uid 1000"
        );
        let err = check(p, "--state-dir", 0, 0o1777, 0).unwrap_err().to_string();
        assert_eq!(
            err,
            "--state-dir /srv/run: owned by uid 0 with mode 1777, so its group and every user may write it; \
             run `chmod go-w /srv/run` or use another directory"
        );
        assert!(check(p, "f", 0, 0o770, 0).unwrap_err().to_string().contains("so its group may write it"));
        assert!(check(p, "f", 0, 0o702, 0).unwrap_err().to_string().contains("so every user may write it"));
    }

    #[test]
    fn a_new_directory_is_made_0700_and_a_shared_one_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure(&dir, "--run-dir").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700, "missing parents too");
        ensure(&dir, "--run-dir").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure(&dir, "--run-dir").unwrap_err().to_string();
        assert!(err.contains("with mode 0777, so its group and every user may write it"), "{err}");
        let file = tmp.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(ensure(&file, "--run-dir").is_err());
        // Only root can give a directory away to test the owner rule for real.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = tmp.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let err = ensure(&theirs, "--state-dir").unwrap_err().to_string();
            assert!(err.contains("owned by uid 65534 (mode 0755), not by this user (uid 0)"), "{err}");
        }
    }
}
