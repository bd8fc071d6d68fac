//! dw's defaults: `~/.config/dstack/dw.yaml`, then `/etc/datawire/dw.yaml`.

use std::path::{Path, PathBuf};

use super::{output, Failure};
use crate::model::DirectoryAddr;
use crate::secret::{self, Secret};

const SYSTEM_CONFIG: &str = "/etc/datawire/dw.yaml";
const FALLBACK_DIRECTORY: &str = "127.0.0.1:7575";

fn user_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("dstack/dw.yaml"))
}

/// `dw.yaml`. Other keys are kept by `dw config set` and ignored here, so an
/// older dw reads a newer one's file.
#[derive(Debug, Default, serde::Deserialize)]
struct DwFile {
    directory: Option<String>,
    token_file: Option<PathBuf>,
}

/// A config file, if it exists.
fn read(path: &Path) -> Result<Option<DwFile>, Failure> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(None) };
    crate::config_file::parse(path, &text).map_err(Failure::error)
}

/// The first of the config files that sets a key.
fn first_set<T>(key: impl Fn(DwFile) -> Option<T>) -> Result<Option<T>, Failure> {
    for path in user_config().into_iter().chain([PathBuf::from(SYSTEM_CONFIG)]) {
        if let Some(value) = read(&path)?.and_then(&key) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// The directory when no `-d` is given.
pub fn default_directory() -> Result<String, Failure> {
    if let Some(d) = std::env::var("DSTACK_DIRECTORY").ok().filter(|d| !d.is_empty()) {
        return Ok(d);
    }
    Ok(first_set(|f| f.directory)?.unwrap_or_else(|| FALLBACK_DIRECTORY.to_string()))
}

/// The token: `--token-file` (`flag`), else `$DSTACK_TOKEN`, else
/// `token_file:` in dw.yaml; None sends no token.
pub fn token(flag: Option<&Path>) -> Result<Option<Secret>, Failure> {
    let fail = |e: secret::SecretError| Failure::error(format!("token: {e}"));
    let env = secret::token_from_env().map_err(fail)?;
    // The files are read only when neither the flag nor the variable decides.
    let file = if flag.is_none() && env.is_none() { first_set(|f| f.token_file)? } else { None };
    secret::resolve_token(flag, env.as_ref(), file.as_deref()).map_err(fail)
}

/// `dw config set KEY VALUE`.
pub fn set(key: &str, value: &str) -> Result<(), Failure> {
    if key != "directory" {
        return Err(Failure::usage(format!("unknown setting {key:?}; settable: directory")));
    }
    let addr: DirectoryAddr = value.parse().map_err(|e| Failure::usage(format!("directory: {e}")))?;
    let path = user_config().ok_or_else(|| Failure::error("neither XDG_CONFIG_HOME nor HOME is set"))?;
    let mut doc: serde_yaml::Mapping = match std::fs::read_to_string(&path) {
        Ok(text) => serde_yaml::from_str(&text).map_err(|e| Failure::error(format!("{}: {e}", path.display())))?,
        Err(_) => serde_yaml::Mapping::new(),
    };
    doc.insert("directory".into(), value.into());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Failure::error(format!("creating {}: {e}", parent.display())))?;
    }
    let text = serde_yaml::to_string(&doc).expect("a mapping serializes");
    std::fs::write(&path, text).map_err(|e| Failure::error(format!("writing {}: {e}", path.display())))?;
    output::line(format_args!("directory = {value} ({addr}) written to {}", path.display()))
}
