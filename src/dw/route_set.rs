//! `dw route set` and `dw route add`: edit the working tree's routes files.
//! Nothing is committed: review with `dw plan`, then `dw apply`.

use std::path::Path;

use super::workspace::Workspace;
use super::{assign, edit};
use super::{output, Context, Failure};
use crate::model::{ClientName, ServiceName, Version};
use crate::routes::Weights;

/// Writes `weights` for `service` (and `client`) into the file defining it,
/// or a new `routes/<service>.yaml`. The file is untouched on any error.
fn write_weights(
    ws: &Workspace,
    service: &ServiceName,
    client: Option<&ClientName>,
    weights: &std::collections::BTreeMap<Version, u32>,
) -> Result<String, Failure> {
    let files = ws.routes_files()?;
    let (path, text) = match edit::file_defining(&files, service) {
        Some((path, text)) => (path.clone(), text.clone()),
        None => (format!("{}/{service}.yaml", ws.routes_dir), String::new()),
    };
    let edited = edit::set_weights(&path, &text, service, client, weights).map_err(Failure::error)?;
    ws.write_file(&path, &edited)?;
    Ok(path)
}

fn describe(weights: &std::collections::BTreeMap<Version, u32>) -> String {
    weights.iter().map(|(v, w)| format!("{v}={w}")).collect::<Vec<_>>().join(" ")
}

/// `dw route set SERVICE VERSION=WEIGHT... [--client NAME]`.
pub fn set(
    _ctx: &Context,
    repo: Option<&Path>,
    routes_dir: &str,
    service: &str,
    weights: &[String],
    client: Option<&str>,
) -> Result<(), Failure> {
    let service: ServiceName = service.parse().map_err(Failure::error)?;
    let client: Option<ClientName> =
        client.map(str::parse).transpose().map_err(|e| Failure::error(format!("--client: {e}")))?;
    let weights = assign::parse_assignments(weights).map_err(Failure::error)?;
    let ws = Workspace::open(repo, routes_dir)?;
    let path = write_weights(&ws, &service, client.as_ref(), &weights)?;
    let whose = client.map(|c| format!(" for client {c}")).unwrap_or_default();
    output::line(format_args!(
        "{path}: {service}{whose} set to {}. Review with `dw plan`, then `dw apply`.",
        describe(&weights)
    ))
}

/// `dw route add SOURCE TARGET PERCENT`, the original dstack form.
pub async fn add(
    ctx: &Context,
    repo: Option<&Path>,
    routes_dir: &str,
    source: &str,
    target: &str,
    percent: &str,
) -> Result<(), Failure> {
    let (service, version, client, percent) =
        assign::parse_route_add(source, target, percent).map_err(Failure::error)?;
    let ws = Workspace::open(repo, routes_dir)?;
    let routes = super::plan::working_routes(&ws.routes_files()?)?;
    let current = routes.weights_for(&service, client.as_ref()).map(Weights::as_map);
    // With no route yet, the versions live now take the rest.
    let live: Vec<Version> = if current.is_none() {
        let mut versions: Vec<Version> = match ctx.client.instances().await {
            Ok(list) => list.into_iter().filter(|i| i.service == service).map(|i| i.version).collect(),
            Err(e) => {
                return Err(Failure::error(format!(
                    "{service} has no route yet, and the live versions are unknown: {e}"
                )))
            }
        };
        versions.sort();
        versions.dedup();
        versions
    } else {
        Vec::new()
    };
    let weights = assign::add_share(current, &live, &version, percent).map_err(Failure::error)?;
    let path = write_weights(&ws, &service, client.as_ref(), &weights)?;
    let whose = client.map(|c| format!(" for client {c}")).unwrap_or_default();
    output::line(format_args!(
        "{path}: {service}{whose} set to {}. Review with `dw plan`, then `dw apply`.",
        describe(&weights)
    ))
}
