//! The operator's clone of the routes repo: where `dw` reads the working
//! tree, commits, reverts and pushes.

use std::path::{Path, PathBuf};

use git2::{Oid, Repository, Signature, StatusOptions};

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

    fn signature(&self) -> Result<Signature<'static>, Failure> {
        self.repo
            .signature()
            .or_else(|_| Signature::now("dw", "dw@dstack.invalid"))
            .map_err(git("making a commit signature"))
    }

    /// Commits every change under the routes dir (additions, edits, deletions).
    pub fn commit_routes(&self, message: &str) -> Result<Oid, Failure> {
        let mut index = self.repo.index().map_err(git("opening the index"))?;
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
        let spec = [format!("{}/*", self.routes_dir)];
        index.add_all(spec.iter(), git2::IndexAddOption::DEFAULT, None).map_err(git("staging the routes"))?;
        index.update_all(spec.iter(), None).map_err(git("staging removed routes"))?;
        index.write().map_err(git("writing the index"))?;
        let tree = self
            .repo
            .find_tree(index.write_tree().map_err(git("writing the tree"))?)
            .map_err(git("reading the tree"))?;
        let parent = self.repo.head().and_then(|h| h.peel_to_commit()).map_err(git("reading HEAD"))?;
        let sig = self.signature()?;
        self.repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &[&parent]).map_err(git("committing"))
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
        // history walk sees it.
        let mainline = if target.parent_count() > 1 { 1 } else { 0 };
        let head = self.repo.head().and_then(|h| h.peel_to_commit()).map_err(git("reading HEAD"))?;
        let mut index = self.repo.revert_commit(&target, &head, mainline, None).map_err(git("reverting"))?;
        if index.has_conflicts() {
            return Err(Failure::error(format!(
                "reverting {} conflicts with later commits; revert it by hand (git revert {commit})",
                short(&commit.to_string())
            )));
        }
        let tree_id = index.write_tree_to(&self.repo).map_err(git("writing the reverted tree"))?;
        let tree = self.repo.find_tree(tree_id).map_err(git("reading the reverted tree"))?;
        // Bring the working tree to the reverted tree before HEAD moves, and
        // safely (as `git revert` does): only the files the revert changes are
        // written, and one of them with uncommitted edits stops it. A forced
        // checkout would throw away the operator's work outside the routes.
        self.repo.checkout_tree(tree.as_object(), Some(git2::build::CheckoutBuilder::new().safe())).map_err(|e| {
            Failure::error(format!(
                "reverting {} would overwrite uncommitted changes ({}); commit or stash them first",
                short(&commit.to_string()),
                e.message()
            ))
        })?;
        let summary = target.summary().ok().flatten().unwrap_or("").to_string();
        let message = if mainline == 1 {
            let first = target.parent_id(0).map_err(git("reading the merge's first parent"))?;
            format!("Revert \"{summary}\"\n\nThis reverts commit {commit}, reversing\nchanges made to {first}.\n")
        } else {
            format!("Revert \"{summary}\"\n\nThis reverts commit {commit}.\n")
        };
        let sig = self.signature()?;
        self.repo.commit(Some("HEAD"), &sig, &sig, &message, &tree, &[&head]).map_err(git("committing the revert"))
    }

    pub fn push(&self) -> Result<(), Failure> {
        gitsync::push(&self.repo, &self.branch).map_err(Failure::error)
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
