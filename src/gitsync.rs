//! git2: the directory's mirror of the routes repo, and the reads `dw`
//! makes in an operator's clone (its commits, reverts and pushes run `git`
//! itself; see `dw::workspace`).
//!
//! All of it is blocking (libgit2); async callers run it on a thread of
//! its own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use git2::{Cred, CredentialType, FetchOptions, Oid, RemoteCallbacks, Repository};

use crate::routes::{is_routes_file, read_bounded, RawFile};

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git: {context}: {source}")]
    Git {
        context: String,
        #[source]
        source: git2::Error,
    },
    #[error("git: {0}")]
    Other(String),
}

/// The trailer that lets a commit remove every route (see README.md,
/// "Routes in git"): `Dstack-Allow-Empty: yes` in the commit message.
pub const ALLOW_EMPTY_TRAILER: &str = "Dstack-Allow-Empty";

/// Sets libgit2's process-wide network timeouts (a TCP connect, and each
/// read or write on a connection, ssh included) and makes it fsync every
/// file it writes in a git dir, and the dir (refs, objects, packs), so a
/// power loss cannot leave a ref pointing at objects that never reached
/// the disk.
///
/// Call it once, before any other thread uses git: libgit2 reads these
/// settings without a lock.
pub fn configure_libgit2(connect: Duration, read: Duration) -> Result<(), GitError> {
    let millis = |d: Duration| d.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: called at start, before any thread runs a git operation
    // (the settings are plain globals in libgit2).
    unsafe {
        git2::opts::set_server_connect_timeout_in_milliseconds(millis(connect))
            .map_err(ctx("setting the git connect timeout"))?;
        git2::opts::set_server_timeout_in_milliseconds(millis(read)).map_err(ctx("setting the git read timeout"))?;
        if libgit2_sys::git_libgit2_opts(libgit2_sys::GIT_OPT_ENABLE_FSYNC_GITDIR as libc::c_int, 1 as libc::c_int) < 0
        {
            return Err(GitError::Other("cannot turn on fsync in libgit2".into()));
        }
    }
    Ok(())
}

/// A directory's hold on its mirror: an exclusive `flock` on a file beside
/// it, released by the kernel when the process ends, however it ends. Only
/// its holder may clear the lock files a killed process left.
pub struct MirrorLock {
    _file: std::fs::File,
}

impl MirrorLock {
    /// Takes the lock for the mirror at `mirror`, or says who holds it.
    pub fn acquire(mirror: &Path) -> Result<MirrorLock, GitError> {
        use std::os::unix::io::AsRawFd as _;
        let path = mirror.with_extension("git.owner");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| GitError::Other(format!("opening {}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(GitError::Other(format!(
                "another running directory uses the routes mirror {} (it holds {}): give each directory its own --state-dir",
                mirror.display(),
                path.display()
            )));
        }
        Ok(MirrorLock { _file: file })
    }
}

/// Removes the lock files a killed process can leave in a mirror (a ref's
/// `.lock`, `packed-refs.lock`, `config.lock`, `HEAD.lock`): libgit2 will
/// not update a ref whose lock file exists, so one left by a SIGKILL during
/// a fetch would fail every fetch after. The ref itself is whole either
/// way (the lock file is renamed over it only once written). Call it only
/// while holding the [`MirrorLock`]. Returns what it removed.
pub fn remove_stale_locks(mirror: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => walk(&path, found),
                Ok(_) if path.extension().is_some_and(|e| e == "lock") => found.push(path),
                _ => {}
            }
        }
    }
    let mut found: Vec<PathBuf> = ["packed-refs.lock", "config.lock", "HEAD.lock", "shallow.lock"]
        .iter()
        .map(|name| mirror.join(name))
        .filter(|p| p.exists())
        .collect();
    walk(&mirror.join("refs"), &mut found);
    found.retain(|p| std::fs::remove_file(p).is_ok());
    found
}

/// Where the branch head stands relative to the commit in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// Nothing is in force yet, or the head is the commit in force.
    Same,
    /// The head descends from the commit in force: history moved forward.
    Forward,
    /// The head does not descend from it: the branch was moved back or
    /// rewritten (a force-push).
    Rewind,
}

/// Whether `message` carries `Dstack-Allow-Empty: yes` as a trailer (the
/// key as git compares trailer keys, case-insensitive; the value `yes` or
/// `true`).
pub fn allows_empty(message: &str) -> bool {
    let Ok(trailers) = git2::message_trailers_strs(message) else { return false };
    let found = trailers.iter().any(|(key, value)| {
        key.eq_ignore_ascii_case(ALLOW_EMPTY_TRAILER)
            && (value.trim().eq_ignore_ascii_case("yes") || value.trim().eq_ignore_ascii_case("true"))
    });
    found
}

fn ctx(context: impl Into<String>) -> impl FnOnce(git2::Error) -> GitError {
    let context = context.into();
    move |source| GitError::Git { context, source }
}

/// A routes repo's URL or path. Credentials written into it
/// (`https://user:token@host/routes.git`) are for git alone: `Display` and
/// `Debug` show `https://***@host/routes.git`, so status, logs and errors
/// never carry them; [`RepoUrl::expose`] is called only to hand it to git.
#[derive(Clone, PartialEq, Eq)]
pub struct RepoUrl {
    raw: String,
    /// The userinfo to hide (`user:token`), when the URL has a secret one.
    secret: Option<String>,
}

impl RepoUrl {
    pub fn new(raw: &str) -> RepoUrl {
        RepoUrl { raw: raw.to_string(), secret: secret_userinfo(raw).map(str::to_string) }
    }

    /// The URL with its credentials, for git only.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// `text` with this URL's credentials replaced wherever they appear
    /// (libgit2's messages may quote the URL).
    pub fn scrub(&self, text: &str) -> String {
        match &self.secret {
            Some(secret) => text.replace(secret.as_str(), "***"),
            None => text.to_string(),
        }
    }
}

/// The userinfo of `scheme://userinfo@host...` when it may be a secret: one
/// with a password, or any user of http(s), where tokens go in the user
/// name. `ssh://git@host` and `git@host:path` name no secret.
fn secret_userinfo(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next().unwrap_or("");
    let (userinfo, _) = authority.rsplit_once('@')?;
    let http = scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https");
    (!userinfo.is_empty() && (userinfo.contains(':') || http)).then_some(userinfo)
}

impl std::fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.scrub(&self.raw))
    }
}

impl std::fmt::Debug for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoUrl({self})")
    }
}

/// Credentials as git itself would find them: the ssh agent for ssh URLs,
/// the configured credential helper for https, then libgit2's default.
/// Each kind is tried once, so a wrong key fails instead of looping.
pub fn callbacks<'a>() -> RemoteCallbacks<'a> {
    let mut tried = CredentialType::empty();
    let mut cb = RemoteCallbacks::new();
    cb.credentials(move |url, username, allowed| {
        let config = git2::Config::open_default()?;
        if allowed.contains(CredentialType::SSH_KEY) && !tried.contains(CredentialType::SSH_KEY) {
            tried |= CredentialType::SSH_KEY;
            return Cred::ssh_key_from_agent(username.unwrap_or("git"));
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) && !tried.contains(CredentialType::USER_PASS_PLAINTEXT)
        {
            tried |= CredentialType::USER_PASS_PLAINTEXT;
            return Cred::credential_helper(&config, url, username);
        }
        if allowed.contains(CredentialType::DEFAULT) && !tried.contains(CredentialType::DEFAULT) {
            tried |= CredentialType::DEFAULT;
            return Cred::default();
        }
        Err(git2::Error::from_str("no credentials accepted (tried the ssh agent and the credential helper)"))
    });
    cb
}

/// A bare mirror of the routes repo in the directory's state dir.
///
/// Besides the remote's branch it keeps `refs/dstack/in-force/BRANCH`, the
/// commit the directory last accepted, so that a restarted directory
/// serves it before any fetch, and never a head it had rejected.
pub struct Mirror {
    repo: Repository,
    branch: String,
    /// Named (without credentials) in errors.
    url: RepoUrl,
}

impl Mirror {
    /// Opens the mirror at `path`, or clones `url` there. A mirror of some
    /// other URL is replaced.
    pub fn open_or_clone(url: &RepoUrl, path: &Path, branch: &str) -> Result<Mirror, GitError> {
        if let Ok(repo) = Repository::open_bare(path) {
            let same =
                repo.find_remote("origin").ok().map(|r| r.url().is_ok_and(|u| u == url.expose())).unwrap_or(false);
            if same {
                return Ok(Mirror { repo, branch: branch.to_string(), url: url.clone() });
            }
            std::fs::remove_dir_all(path)
                .map_err(|e| GitError::Other(format!("removing stale mirror {}: {e}", path.display())))?;
        }
        let repo = Repository::init_bare(path).map_err(ctx(format!("creating a mirror in {}", path.display())))?;
        repo.remote("origin", url.expose()).map_err(ctx(format!("adding remote {url}")))?;
        Ok(Mirror { repo, branch: branch.to_string(), url: url.clone() })
    }

    /// Opens an existing mirror of `url` at `path`, without fetching or
    /// cloning; None if there is none (or it mirrors another URL).
    pub fn open(url: &RepoUrl, path: &Path, branch: &str) -> Option<Mirror> {
        let repo = Repository::open_bare(path).ok()?;
        let same = repo.find_remote("origin").ok()?.url().is_ok_and(|u| u == url.expose());
        same.then(|| Mirror { repo, branch: branch.to_string(), url: url.clone() })
    }

    /// Fetches the branch and returns the commit it points at, giving up at
    /// `deadline` or once `cancel` is set. libgit2's read timeout (see
    /// [`configure_libgit2`]) ends a connection that says nothing; this
    /// ends one that keeps trickling, each time it calls back.
    pub fn fetch(&self, deadline: Instant, cancel: &AtomicBool) -> Result<Oid, GitError> {
        let mut remote = self.repo.find_remote("origin").map_err(ctx("finding remote origin"))?;
        let refspec = format!("+refs/heads/{0}:refs/remotes/origin/{0}", self.branch);
        let go_on = || Instant::now() < deadline && !cancel.load(Ordering::Relaxed);
        let mut cb = callbacks();
        cb.transfer_progress(|_| go_on());
        cb.sideband_progress(|_| go_on());
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(cb);
        remote.fetch(&[&refspec], Some(&mut opts), None).map_err(|source| {
            let why = if Instant::now() >= deadline {
                "no complete answer before the fetch deadline (--fetch-timeout)".to_string()
            } else if source.code() == git2::ErrorCode::Timeout {
                format!("{} (the server stopped answering)", source.message())
            } else {
                source.message().to_string()
            };
            GitError::Other(self.url.scrub(&format!("fetching branch {} from {}: {why}", self.branch, self.url)))
        })?;
        let reference = format!("refs/remotes/origin/{}", self.branch);
        let oid =
            self.repo.refname_to_id(&reference).map_err(ctx(format!("the remote has no branch {:?}", self.branch)))?;
        Ok(oid)
    }

    /// The routes files of a commit: every `*.yaml`/`*.yml` blob directly in
    /// `routes_dir`. A commit without that folder has no routes.
    pub fn routes_files(&self, commit: Oid, routes_dir: &str) -> Result<Vec<RawFile>, GitError> {
        routes_files(&self.repo, commit, routes_dir)
    }

    /// The subject line of a commit, for status output.
    pub fn summary(&self, commit: Oid) -> String {
        commit_summary(&self.repo, commit)
    }

    /// The full message of a commit ("" if unreadable), for its trailers.
    pub fn message(&self, commit: Oid) -> String {
        self.repo.find_commit(commit).ok().and_then(|c| c.message().ok().map(str::to_string)).unwrap_or_default()
    }

    /// Where `head` stands relative to `in_force`. A commit in force that
    /// the mirror cannot find counts as a rewind, with git's reason: when
    /// in doubt, history is not taken to move forward.
    pub fn relation(&self, head: Oid, in_force: Option<Oid>) -> Result<Relation, GitError> {
        match in_force {
            None => Ok(Relation::Same),
            Some(old) if old == head => Ok(Relation::Same),
            Some(old) => {
                let forward = self
                    .repo
                    .graph_descendant_of(head, old)
                    .map_err(ctx(format!("checking that {head} descends from the commit in force {old}")))?;
                Ok(if forward { Relation::Forward } else { Relation::Rewind })
            }
        }
    }

    fn in_force_ref(&self) -> String {
        format!("refs/dstack/in-force/{}", self.branch)
    }

    /// The commit last accepted on this branch, as [`Mirror::set_in_force`]
    /// recorded it.
    pub fn in_force(&self) -> Option<Oid> {
        self.repo.refname_to_id(&self.in_force_ref()).ok()
    }

    /// Records `commit` as the one in force. libgit2 writes the ref to a
    /// lock file, fsyncs it (see [`configure_libgit2`]) and renames it into
    /// place: a crash leaves the old value or the new one.
    pub fn set_in_force(&self, commit: Oid) -> Result<(), GitError> {
        self.repo
            .reference(&self.in_force_ref(), commit, true, "dstack: accepted")
            .map_err(ctx(format!("recording {commit} as the commit in force")))?;
        Ok(())
    }
    /// How many commits `commit`'s history holds (`git rev-list --count`).
    pub fn commit_count(&self, commit: Oid) -> Result<u64, GitError> {
        commit_count(&self.repo, commit)
    }
}

/// How many commits `commit`'s history holds, itself included (`git
/// rev-list --count COMMIT`). A descendant always holds more than its
/// ancestor, and every mirror counts the same commit alike: several
/// directories order their commits by it (README.md, "Several directories").
pub fn commit_count(repo: &Repository, commit: Oid) -> Result<u64, GitError> {
    let mut walk = repo.revwalk().map_err(ctx("walking the history"))?;
    walk.push(commit).map_err(ctx("walking the history"))?;
    let mut count = 0;
    for oid in walk {
        oid.map_err(ctx("walking the history"))?;
        count += 1;
    }
    Ok(count)
}

/// The subject line of a commit ("" if unreadable).
pub fn commit_summary(repo: &Repository, commit: Oid) -> String {
    repo.find_commit(commit).ok().and_then(|c| c.summary().ok().flatten().map(str::to_string)).unwrap_or_default()
}

/// The routes files of `commit` in `repo`.
pub fn routes_files(repo: &Repository, commit: Oid, routes_dir: &str) -> Result<Vec<RawFile>, GitError> {
    let commit = repo.find_commit(commit).map_err(ctx("reading the commit"))?;
    let tree = commit.tree().map_err(ctx("reading the commit's tree"))?;
    let dir = routes_dir.trim_matches('/');
    let subtree = match tree.get_path(Path::new(dir)) {
        Ok(entry) => entry.to_object(repo).map_err(ctx(format!("reading {dir}/")))?.peel_to_tree().ok(),
        Err(_) => None,
    };
    let Some(subtree) = subtree else { return Ok(Vec::new()) };
    let odb = repo.odb().map_err(ctx("opening the object database"))?;
    let mut files = Vec::new();
    for entry in subtree.iter() {
        let Ok(name) = entry.name() else { continue };
        if !is_routes_file(name) || entry.kind() != Some(git2::ObjectType::Blob) {
            continue;
        }
        // The size from the object header: an oversized blob is never loaded.
        let (size, _) = odb.read_header(entry.id()).map_err(ctx(format!("reading {dir}/{name}")))?;
        let content = read_bounded(size as u64, || {
            let blob = entry.to_object(repo).and_then(|o| o.peel_to_blob())?;
            // Bytes, not text: `routes::read_files` refuses a file that is not UTF-8.
            Ok(blob.content().to_vec())
        })
        .map_err(ctx(format!("reading {dir}/{name}")))?;
        files.push((format!("{dir}/{name}"), content));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// Where a repo given as a plain local path keeps the refs that a commit or
/// push changes, for the file-system watch. None for a URL (`file://`
/// included: a URL says "treat this as a remote", so it is polled).
pub fn local_git_dir(url: &str) -> Option<PathBuf> {
    if url.contains("://") {
        return None;
    }
    let path = PathBuf::from(url);
    let repo = Repository::open(&path).ok()?;
    Some(repo.path().to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::Content;

    /// Makes a commit of `files` on `branch` in a non-bare repo.
    fn commit(repo: &Repository, files: &[(&str, &str)], message: &str) -> Oid {
        let root = repo.workdir().unwrap();
        for (path, text) in files {
            let full = root.join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, text).unwrap();
        }
        let mut index = repo.index().unwrap();
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("test", "test@example.com").unwrap();
        let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents).unwrap()
    }

    #[test]
    fn credentials_in_a_repo_url_never_show() {
        let url = RepoUrl::new("https://alice:s3cret@git.example.com/ops/routes.git");
        assert_eq!(url.to_string(), "https://***@git.example.com/ops/routes.git");
        assert_eq!(format!("{url:?}"), "RepoUrl(https://***@git.example.com/ops/routes.git)");
        assert_eq!(url.expose(), "https://alice:s3cret@git.example.com/ops/routes.git");
        assert_eq!(url.scrub("cannot reach alice:s3cret@git.example.com"), "cannot reach ***@git.example.com");
        // A token as the user name of an https URL is a secret too.
        assert_eq!(RepoUrl::new("https://ghp_abc@github.com/o/r").to_string(), "https://***@github.com/o/r");
        // An ssh user is no secret; paths have no credentials.
        for plain in ["ssh://git@host/r.git", "git@host:r.git", "/srv/routes", "file:///srv/routes"] {
            assert_eq!(RepoUrl::new(plain).to_string(), plain);
        }
        assert_eq!(RepoUrl::new("ssh://git:pw@host/r").to_string(), "ssh://***@host/r");
    }

    #[test]
    fn mirror_fetches_and_reads_routes() {
        let tmp = tempfile::tempdir().unwrap();
        let origin =
            Repository::init_opts(tmp.path().join("origin"), git2::RepositoryInitOptions::new().initial_head("main"))
                .unwrap();
        let first = commit(&origin, &[("routes/barker.yaml", "barker: {v1: 100}\n"), ("README.md", "x")], "first");
        let url = RepoUrl::new(tmp.path().join("origin").to_str().unwrap());
        let mirror = Mirror::open_or_clone(&url, &tmp.path().join("mirror"), "main").unwrap();
        assert_eq!(mirror.fetch(far(), &AtomicBool::new(false)).unwrap(), first);
        let files = mirror.routes_files(first, "routes").unwrap();
        assert_eq!(files, vec![("routes/barker.yaml".to_string(), Content::Bytes(b"barker: {v1: 100}\n".to_vec()))]);

        let second = commit(&origin, &[("routes/emitter.yml", "emitter: {v1: 100}\n")], "second");
        // Reopening finds the existing mirror and fetches the new commit.
        let mirror = Mirror::open_or_clone(&url, &tmp.path().join("mirror"), "main").unwrap();
        assert_eq!(mirror.fetch(far(), &AtomicBool::new(false)).unwrap(), second);
        assert_eq!(mirror.routes_files(second, "routes").unwrap().len(), 2);
        assert_eq!(mirror.summary(second), "second");
        assert!(local_git_dir(url.expose()).is_some());
        assert!(local_git_dir("https://example.com/x.git").is_none());
        assert!(local_git_dir(&format!("file://{url}")).is_none());

        let wrong = Mirror::open_or_clone(&url, &tmp.path().join("mirror2"), "nonesuch").unwrap();
        assert!(wrong.fetch(far(), &AtomicBool::new(false)).unwrap_err().to_string().contains("nonesuch"));
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn the_commit_in_force_survives_a_reopen_and_history_is_compared_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let origin =
            Repository::init_opts(tmp.path().join("origin"), git2::RepositoryInitOptions::new().initial_head("main"))
                .unwrap();
        let first = commit(&origin, &[("routes/a.yaml", "a: {v1: 100}\n")], "first");
        let second = commit(&origin, &[("routes/a.yaml", "a: {v2: 100}\n")], "second\n\nDstack-Allow-Empty: yes\n");
        let url = RepoUrl::new(tmp.path().join("origin").to_str().unwrap());
        let path = tmp.path().join("mirror");
        assert!(Mirror::open(&url, &path, "main").is_none(), "no mirror yet");
        let mirror = Mirror::open_or_clone(&url, &path, "main").unwrap();
        assert_eq!(mirror.fetch(far(), &AtomicBool::new(false)).unwrap(), second);
        assert_eq!(mirror.in_force(), None);
        mirror.set_in_force(second).unwrap();
        assert!(allows_empty(&mirror.message(second)));

        let mirror = Mirror::open(&url, &path, "main").unwrap();
        assert_eq!(mirror.in_force(), Some(second));
        assert!(Mirror::open(&url, &path, "other").unwrap().in_force().is_none(), "one commit in force per branch");
        assert!(Mirror::open(&RepoUrl::new("/elsewhere"), &path, "main").is_none(), "a mirror of another URL");
        assert_eq!(mirror.relation(second, None).unwrap(), Relation::Same);
        assert_eq!(mirror.relation(second, Some(second)).unwrap(), Relation::Same);
        assert_eq!(mirror.relation(second, Some(first)).unwrap(), Relation::Forward);
        assert_eq!(mirror.relation(first, Some(second)).unwrap(), Relation::Rewind);
        assert!(mirror.relation(first, Some(Oid::from_bytes(&[7; 20]).unwrap())).is_err(), "an unknown commit");
    }

    #[test]
    fn one_directory_holds_a_mirror_and_clears_what_a_killed_one_left() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("routes.git");
        let held = MirrorLock::acquire(&path).unwrap();
        let err = MirrorLock::acquire(&path).err().expect("held").to_string();
        assert!(err.contains("another running directory uses the routes mirror"), "{err}");
        drop(held);
        let _held = MirrorLock::acquire(&path).unwrap();

        let origin =
            Repository::init_opts(tmp.path().join("origin"), git2::RepositoryInitOptions::new().initial_head("main"))
                .unwrap();
        let first = commit(&origin, &[("routes/a.yaml", "a: {v1: 100}\n")], "first");
        let url = RepoUrl::new(tmp.path().join("origin").to_str().unwrap());
        let mirror = Mirror::open_or_clone(&url, &path, "main").unwrap();
        mirror.fetch(far(), &AtomicBool::new(false)).unwrap();
        // What a SIGKILL during the next ref update leaves.
        let stale = path.join("refs/remotes/origin/main.lock");
        std::fs::write(&stale, "partial").unwrap();
        std::fs::write(path.join("packed-refs.lock"), "").unwrap();
        let second = commit(&origin, &[("routes/a.yaml", "a: {v2: 100}\n")], "second");
        assert!(mirror.fetch(far(), &AtomicBool::new(false)).is_err(), "libgit2 will not take a held ref");
        let mut removed = remove_stale_locks(&path);
        removed.sort();
        assert_eq!(removed, vec![path.join("packed-refs.lock"), stale]);
        assert_eq!(mirror.fetch(far(), &AtomicBool::new(false)).unwrap(), second);
        assert_ne!(first, second);
    }

    #[test]
    fn a_cancelled_fetch_gives_up() {
        let tmp = tempfile::tempdir().unwrap();
        let origin =
            Repository::init_opts(tmp.path().join("origin"), git2::RepositoryInitOptions::new().initial_head("main"))
                .unwrap();
        commit(&origin, &[("routes/a.yaml", "a: {v1: 100}\n")], "first");
        let url = RepoUrl::new(tmp.path().join("origin").to_str().unwrap());
        let mirror = Mirror::open_or_clone(&url, &tmp.path().join("mirror"), "main").unwrap();
        // Past its deadline: the first progress callback stops it.
        let err = mirror.fetch(Instant::now(), &AtomicBool::new(false)).unwrap_err().to_string();
        assert!(err.contains("no complete answer before the fetch deadline (--fetch-timeout)"), "{err}");
        assert!(mirror.fetch(far(), &AtomicBool::new(true)).is_err());
        assert!(mirror.fetch(far(), &AtomicBool::new(false)).is_ok());
    }

    #[test]
    fn the_allow_empty_trailer() {
        assert!(allows_empty("retire all\n\nDstack-Allow-Empty: yes\n"));
        assert!(allows_empty("retire all\n\nWhy it is safe.\n\nSigned-off-by: a <a@b>\ndstack-allow-empty: True\n"));
        assert!(!allows_empty("retire all\n"));
        assert!(!allows_empty("retire all\n\nDstack-Allow-Empty: no\n"));
        assert!(!allows_empty("Dstack-Allow-Empty: yes"), "a subject line is no trailer");
        assert!(!allows_empty("retire all\n\nDstack-Allow-Empty: yes\n\nmore text after it\n"));
    }
}
