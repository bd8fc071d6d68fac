//! The operator's clone of the routes repo: where `dw` reads the working
//! tree, commits, reverts and pushes.
//!
//! Reads go through libgit2. Commits, reverts and pushes run the `git`
//! command itself, so that they honour the operator's git setup exactly as
//! `git commit` does: hooks (pre-commit, commit-msg, pre-push), signing
//! (`commit.gpgsign`, SSH or GPG), credential helpers, `core.hooksPath`.
//! libgit2 runs none of these, and re-implementing them would drift.

use std::path::{Path, PathBuf};

use git2::{Oid, Repository, StatusOptions};

use super::Failure;
use crate::gitsync;

/// An open clone and the branch it works on.
pub struct Workspace {
    pub repo: Repository,
    /// The working tree's root.
    pub root: PathBuf,
    /// The folder of routes files, relative to the root.
    pub routes_dir: String,
    /// The checked-out branch, which is what the directory follows.
    pub branch: String,
}

fn git(what: &str) -> impl FnOnce(git2::Error) -> Failure + '_ {
    move |e| Failure::error(format!("{what}: {}", e.message()))
}

impl Workspace {
    /// Opens the clone containing `path` (the current directory by default).
    pub fn open(path: Option<&Path>, routes_dir: &str) -> Result<Workspace, Failure> {
        let start = match path {
            Some(p) => p.to_path_buf(),
            None => std::env::current_dir()
                .map_err(|e| Failure::error(format!("cannot read the current directory: {e}")))?,
        };
        let repo = Repository::discover(&start).map_err(|_| {
            Failure::usage(format!(
                "{} is not inside a clone of the routes repo; cd into one or pass --repo PATH",
                start.display()
            ))
        })?;
        let root = repo
            .workdir()
            .ok_or_else(|| Failure::usage("the routes repo is bare; dw needs a clone with a working tree"))?
            .to_path_buf();
        let branch = {
            let head = repo.head().map_err(git("reading HEAD (is the repo empty?)"))?;
            if !head.is_branch() {
                return Err(Failure::usage("HEAD is detached; check out the branch the directory follows"));
            }
            head.shorthand().unwrap_or("main").to_string()
        };
        Ok(Workspace { repo, root, routes_dir: routes_dir.trim_matches('/').to_string(), branch })
    }

    /// The routes files of the working tree, uncommitted changes included.
    pub fn routes_files(&self) -> Result<Vec<(String, String)>, Failure> {
        // The same reader as the directory's, so both refuse the same files.
        let refuse = |errors: Vec<crate::routes::RouteError>| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            Failure::error(format!("cannot read the routes in the working tree:\n{}", lines.join("\n")))
        };
        let raw = crate::routes::read_dir(&self.root, &self.routes_dir).map_err(refuse)?;
        let (texts, errors) = crate::routes::decode(raw);
        if !errors.is_empty() {
            return Err(refuse(errors));
        }
        Ok(texts)
    }

    /// Writes one routes file (path relative to the root).
    pub fn write_file(&self, path: &str, text: &str) -> Result<(), Failure> {
        let full = self.root.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Failure::error(format!("creating {}: {e}", parent.display())))?;
        }
        let tmp = full.with_extension("dw-tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &full))
            .map_err(|e| Failure::error(format!("writing {path}: {e}")))
    }

    /// True when files under the routes dir differ from HEAD.
    pub fn routes_dirty(&self) -> Result<bool, Failure> {
        let mut opts = StatusOptions::new();
        opts.include_untracked(true).recurse_untracked_dirs(true).pathspec(&self.routes_dir);
        let statuses = self.repo.statuses(Some(&mut opts)).map_err(git("reading the working tree's status"))?;
        Ok(!statuses.is_empty())
    }

    pub fn head(&self) -> Result<Oid, Failure> {
        self.repo.head().and_then(|h| h.peel_to_commit()).map(|c| c.id()).map_err(git("reading HEAD"))
    }

    /// Fetches the branch from origin and returns where origin has it.
    pub fn fetch_remote_head(&self) -> Result<Option<Oid>, Failure> {
        let mut remote = self.repo.find_remote("origin").map_err(git("the clone has no remote `origin`"))?;
        let refspec = format!("+refs/heads/{0}:refs/remotes/origin/{0}", self.branch);
        let mut opts = git2::FetchOptions::new();
        opts.remote_callbacks(gitsync::callbacks());
        remote.fetch(&[&refspec], Some(&mut opts), None).map_err(git("fetching origin"))?;
        Ok(self.repo.refname_to_id(&format!("refs/remotes/origin/{}", self.branch)).ok())
    }

    /// Refuses to go on when origin has commits this clone lacks.
    pub fn ensure_not_behind(&self) -> Result<(), Failure> {
        let head = self.head()?;
        if let Some(remote) = self.fetch_remote_head()? {
            if remote != head && !self.repo.graph_descendant_of(head, remote).unwrap_or(false) {
                return Err(Failure::error(format!(
                    "origin/{} has moved to {} past this clone's {}; pull first (git pull --rebase), then plan again",
                    self.branch,
                    short(&remote.to_string()),
                    short(&head.to_string())
                )));
            }
        }
        Ok(())
    }

    /// Runs `git` in the clone; its stdout, or an error carrying what git
    /// (or a hook) printed. An operator with no git identity gets dw's, as
    /// before, rather than git's "please tell me who you are".
    fn run_git(&self, args: &[&str], stdin: Option<&str>) -> Result<String, Failure> {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(&self.root).args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        if self.repo.signature().is_err() {
            for (key, value) in [
                ("GIT_AUTHOR_NAME", "dw"),
                ("GIT_AUTHOR_EMAIL", "dw@dstack.invalid"),
                ("GIT_COMMITTER_NAME", "dw"),
                ("GIT_COMMITTER_EMAIL", "dw@dstack.invalid"),
            ] {
                cmd.env(key, value);
            }
        }
        let what = format!("git {}", args.join(" "));
        let mut child = cmd.spawn().map_err(|e| {
            Failure::error(format!("cannot run {what}: {e}; dw needs git on the PATH to commit and push"))
        })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).map_err(|e| Failure::error(format!("{what}: {e}")))?;
        }
        let out = child.wait_with_output().map_err(|e| Failure::error(format!("{what}: {e}")))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let printed =
            String::from_utf8_lossy(&out.stderr).trim().to_string() + String::from_utf8_lossy(&out.stdout).trim();
        Err(Failure::error(format!("{what} failed ({}):\n{printed}", out.status)))
    }

    /// Commits every change under the routes dir (additions, edits, deletions).
    pub fn commit_routes(&self, message: &str) -> Result<Oid, Failure> {
        let index = self.repo.index().map_err(git("opening the index"))?;
        // The apply commit holds route changes only: refuse to sweep in
        // whatever else the operator had staged.
        let head_tree = self.repo.head().and_then(|h| h.peel_to_tree()).map_err(git("reading HEAD"))?;
        let staged =
            self.repo.diff_tree_to_index(Some(&head_tree), Some(&index), None).map_err(git("reading the index"))?;
        let prefix = format!("{}/", self.routes_dir);
        let others: Vec<String> = staged
            .deltas()
            .filter_map(|d| d.new_file().path().or(d.old_file().path()).map(|p| p.to_string_lossy().into_owned()))
            .filter(|p| !p.starts_with(&prefix))
            .collect();
        if !others.is_empty() {
            return Err(Failure::error(format!(
                "changes outside {prefix} are staged ({}); commit or unstage them first, so the apply commit holds routes only",
                others.join(", ")
            )));
        }
        // `git commit` itself: its hooks and signing apply (see the module doc).
        self.run_git(&["add", "--all", "--", &self.routes_dir], None)?;
        self.run_git(&["commit", "--quiet", "--file=-"], Some(message))?;
        self.head()
    }

    /// The newest commit on HEAD's first-parent line that changed the routes.
    pub fn newest_routes_commit(&self) -> Result<Oid, Failure> {
        let mut walk = self.repo.revwalk().map_err(git("walking history"))?;
        walk.push_head().map_err(git("walking history"))?;
        walk.simplify_first_parent().map_err(git("walking history"))?;
        for oid in walk {
            let oid = oid.map_err(git("walking history"))?;
            let commit = self.repo.find_commit(oid).map_err(git("reading a commit"))?;
            let parent = commit.parent(0).ok().and_then(|p| self.routes_tree_id(&p));
            if self.routes_tree_id(&commit) != parent {
                return Ok(oid);
            }
        }
        Err(Failure::error(format!("no commit on {} changed {}/", self.branch, self.routes_dir)))
    }

    fn routes_tree_id(&self, commit: &git2::Commit) -> Option<Oid> {
        commit.tree().ok()?.get_path(Path::new(&self.routes_dir)).ok().map(|e| e.id())
    }

    /// `git revert COMMIT`: a real revert commit with git's usual message.
    pub fn revert(&self, commit: Oid) -> Result<Oid, Failure> {
        let target =
            self.repo.find_commit(commit).map_err(|_| Failure::usage(format!("no commit {commit} in this clone")))?;
        if target.parent_count() == 0 {
            return Err(Failure::usage(format!(
                "{} is the root commit: there is nothing before it to go back to",
                short(&commit.to_string())
            )));
        }
        // A merged pull request is reverted against its first parent, the
        // branch the directory follows (`git revert -m 1`), as the routes
        // history walk sees it. `git revert` itself writes the usual message,
        // runs the hooks and signs; it refuses to overwrite uncommitted edits.
        let sha = commit.to_string();
        let mut args = vec!["revert", "--no-edit"];
        if target.parent_count() > 1 {
            args.extend(["-m", "1"]);
        }
        args.push(&sha);
        if let Err(failure) = self.run_git(&args, None) {
            let conflicted = self.repo.state() == git2::RepositoryState::Revert;
            if conflicted {
                // Leave the clone as it was, not half reverted.
                let _ = self.run_git(&["revert", "--abort"], None);
                return Err(Failure::error(format!(
                    "reverting {} conflicts with later commits; revert it by hand (git revert {commit})",
                    short(&sha)
                )));
            }
            return Err(Failure::error(format!(
                "reverting {} did not go through; commit or stash uncommitted changes first. {}",
                short(&sha),
                failure.message
            )));
        }
        self.head()
    }

    /// `git push origin BRANCH`: credential helpers and the pre-push hook apply.
    pub fn push(&self) -> Result<(), Failure> {
        let refspec = format!("refs/heads/{0}:refs/heads/{0}", self.branch);
        self.run_git(&["push", "--quiet", "origin", &refspec], None).map(drop).map_err(|f| {
            Failure::error(format!(
                "the push to origin/{} was refused; pull first if origin moved. {}",
                self.branch, f.message
            ))
        })
    }

    /// Resolves a commit name (sha, prefix, HEAD~1...).
    pub fn resolve(&self, name: &str) -> Result<Oid, Failure> {
        self.repo
            .revparse_single(name)
            .and_then(|o| o.peel_to_commit())
            .map(|c| c.id())
            .map_err(|_| Failure::usage(format!("{name:?} names no commit in this clone")))
    }
}

/// The first 10 characters of a sha.
pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(10)]
}
