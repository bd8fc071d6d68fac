//! What this build is: the crate's version and the git commit it was built
//! from (set by `build.rs`), for `--version` and `dstack_build_info`.

/// The crate's version, from Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit built (12 hex digits), `$DSTACK_GIT_COMMIT` when a
/// package build set it, or "unknown" outside a checkout.
pub const COMMIT: &str = env!("DSTACK_GIT_COMMIT");

/// What `--version` prints after the program's name: `0.1.0 (commit 0123456789ab)`.
pub const VERSION_LINE: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("DSTACK_GIT_COMMIT"), ")");
