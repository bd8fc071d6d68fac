//! Records the git commit the binaries are built from, for `--version` and
//! the `dstack_build_info` metric (src/build_info.rs).
//!
//! `DSTACK_GIT_COMMIT` wins (a package build from a tarball has no `.git`);
//! else `git rev-parse --short=12 HEAD` in a checkout; else "unknown".

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=DSTACK_GIT_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = match std::env::var("DSTACK_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit.trim().to_string(),
        _ => from_git().unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=DSTACK_GIT_COMMIT={commit}");
}

/// The checkout's commit, and rerun-if-changed lines for the files that
/// move when it changes: HEAD (a checkout, a branch switch) and the branch's
/// ref (a commit), loose or packed.
fn from_git() -> Option<String> {
    // Only this crate's own checkout: a source tarball unpacked inside
    // another repository must not take that repository's commit.
    let top = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    if top.canonicalize().ok()? != manifest.canonicalize().ok()? {
        return None;
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // A worktree keeps HEAD in its own git dir, refs in the common one.
    let git_dir = PathBuf::from(git(&["rev-parse", "--absolute-git-dir"])?);
    let common = git(&["rev-parse", "--git-common-dir"]).map(|d| absolute(&d)).unwrap_or_else(|| git_dir.clone());
    let mut watched = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(common.join(branch));
    }
    // A path that does not exist would make cargo rerun this on every build.
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Some(commit)
}

/// `git --git-common-dir` answers relative to the crate's directory.
fn absolute(dir: &str) -> PathBuf {
    let dir = Path::new(dir);
    if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join(dir)
    }
}

/// One line of git's output, or None outside a checkout or without git.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(std::env::var_os("CARGO_MANIFEST_DIR")?).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}
