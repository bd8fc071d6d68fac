//! git2: the directory's mirror of the routes repo, and the reads `dw`
//! makes in an operator's clone (its commits, reverts and pushes run `git`
//! itself; see `dw::workspace`).
//!
//! All of it is blocking (libgit2); async callers use `spawn_blocking`.

use std::path::{Path, PathBuf};

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

    /// Fetches the branch and returns the commit it points at.
    pub fn fetch(&self) -> Result<Oid, GitError> {
        let mut remote = self.repo.find_remote("origin").map_err(ctx("finding remote origin"))?;
        let refspec = format!("+refs/heads/{0}:refs/remotes/origin/{0}", self.branch);
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(callbacks());
        remote.fetch(&[&refspec], Some(&mut opts), None).map_err(|source| {
            GitError::Other(self.url.scrub(&format!(
                "fetching branch {} from {}: {}",
                self.branch,
                self.url,
                source.message()
            )))
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
        assert_eq!(mirror.fetch().unwrap(), first);
        let files = mirror.routes_files(first, "routes").unwrap();
        assert_eq!(files, vec![("routes/barker.yaml".to_string(), Content::Bytes(b"barker: {v1: 100}\n".to_vec()))]);

        let second = commit(&origin, &[("routes/emitter.yml", "emitter: {v1: 100}\n")], "second");
        // Reopening finds the existing mirror and fetches the new commit.
        let mirror = Mirror::open_or_clone(&url, &tmp.path().join("mirror"), "main").unwrap();
        assert_eq!(mirror.fetch().unwrap(), second);
        assert_eq!(mirror.routes_files(second, "routes").unwrap().len(), 2);
        assert_eq!(mirror.summary(second), "second");
        assert!(local_git_dir(url.expose()).is_some());
        assert!(local_git_dir("https://example.com/x.git").is_none());
        assert!(local_git_dir(&format!("file://{url}")).is_none());

        let wrong = Mirror::open_or_clone(&url, &tmp.path().join("mirror2"), "nonesuch").unwrap();
        assert!(wrong.fetch().unwrap_err().to_string().contains("nonesuch"));
    }
}
