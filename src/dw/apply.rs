//! `dw apply` and `dw rollback`: commit (or revert), push, reconcile, and
//! wait until the directory serves the commit and every sherlock applied it.

use std::path::Path;
use std::time::{Duration, Instant};

use super::converge::wait_converged;
use super::plan::{self, Plan};
use super::workspace::{short, Workspace};
use super::{output, Context, Failure};

/// The commit message apply writes when none is given.
fn message_for(plan: &Plan) -> String {
    let parts: Vec<String> = plan
        .changes
        .iter()
        .map(|c| match &c.after {
            Some(route) => format!("{} {}", c.service, route.weights),
            None => format!("{} removed", c.service),
        })
        .collect();
    if parts.is_empty() {
        "dw apply: routes files updated".to_string()
    } else {
        format!("dw apply: {}", parts.join("; "))
    }
}

/// Refuses a saved plan that no longer describes what would happen.
fn check_saved(saved: &Plan, now: &Plan) -> Result<(), Failure> {
    let stale = |why: String| Failure::error(format!("the saved plan is stale: {why}; run `dw plan --out FILE` again"));
    if saved.served_commit != now.served_commit {
        return Err(stale(format!(
            "the directory now serves {} (the plan saw {})",
            now.served_commit.as_deref().map(short).unwrap_or("nothing"),
            saved.served_commit.as_deref().map(short).unwrap_or("nothing")
        )));
    }
    if saved.head != now.head {
        return Err(stale(format!("HEAD moved from {} to {}", short(&saved.head), short(&now.head))));
    }
    if saved.routes_digest != now.routes_digest {
        return Err(stale("the routes files changed since".into()));
    }
    Ok(())
}

/// `dw apply [-m MESSAGE] [PLANFILE]`.
pub async fn apply(
    ctx: &Context,
    repo: Option<&Path>,
    routes_dir: &str,
    message: Option<&str>,
    planfile: Option<&Path>,
    timeout: Duration,
) -> Result<(), Failure> {
    let ws = Workspace::open(repo, routes_dir)?;
    let status = ctx.client.status().await.map_err(Failure::error)?;
    if status.routes.is_none() {
        return Err(Failure::error("the directory follows no routes repo (start it with --repo); nothing to apply to"));
    }
    let now = plan::compute(&ws, &status)?;
    if let Some(path) = planfile {
        let text =
            std::fs::read_to_string(path).map_err(|e| Failure::error(format!("reading {}: {e}", path.display())))?;
        let saved: Plan = serde_json::from_str(&text)
            .map_err(|e| Failure::error(format!("{} is not a saved plan: {e}", path.display())))?;
        check_saved(&saved, &now)?;
    }
    let dirty = ws.routes_dirty()?;
    if !now.has_changes() && !dirty {
        output::line(&now.summary)?;
        return output::line("Nothing to apply.");
    }
    ws.ensure_not_behind()?;
    let commit = if dirty {
        let message = message.map(str::to_string).unwrap_or_else(|| message_for(&now));
        let oid = ws.commit_routes(&message)?;
        output::progress(format_args!(
            "Committed {} \"{}\".\n",
            short(&oid.to_string()),
            message.lines().next().unwrap_or("")
        ));
        oid
    } else {
        ws.head()?
    };
    publish(ctx, &ws, &commit.to_string(), timeout).await
}

/// `dw rollback [COMMIT]`.
pub async fn rollback(
    ctx: &Context,
    repo: Option<&Path>,
    routes_dir: &str,
    commit: Option<&str>,
    timeout: Duration,
) -> Result<(), Failure> {
    let ws = Workspace::open(repo, routes_dir)?;
    if ws.routes_dirty()? {
        return Err(Failure::error(format!(
            "{}/ has uncommitted changes; apply or discard them before a rollback",
            ws.routes_dir
        )));
    }
    ws.ensure_not_behind()?;
    let target = match commit {
        Some(name) => ws.resolve(name)?,
        None => ws.newest_routes_commit()?,
    };
    let revert = ws.revert(target)?;
    output::progress(format_args!(
        "Reverted {} \"{}\" as {}.\n",
        short(&target.to_string()),
        crate::gitsync::commit_summary(&ws.repo, target),
        short(&revert.to_string())
    ));
    publish(ctx, &ws, &revert.to_string(), timeout).await
}

/// Pushes, asks the directory to reconcile, and waits for convergence.
async fn publish(ctx: &Context, ws: &Workspace, commit: &str, timeout: Duration) -> Result<(), Failure> {
    ws.push()?;
    output::progress(format_args!("Pushed to origin/{}.\n", ws.branch));
    let started = Instant::now();
    let answer = ctx.client.reconcile().await.map_err(Failure::error)?;
    if let Some(rejected) = answer.rejected.as_ref().filter(|r| r.commit == commit) {
        return Err(Failure::error(format!(
            "the directory rejected {}; the last good commit stays in force:\n{}",
            short(commit),
            rejected.errors.join("\n")
        )));
    }
    wait_converged(ctx, commit, started, timeout).await
}
