//! dw's defaults: `~/.config/dstack/dw.yaml`, then `/etc/datawire/dw.yaml`.

use std::path::PathBuf;

use super::{output, Failure};
use crate::model::DirectoryAddr;

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
}

/// The `directory:` of a config file, if the file exists and sets it.
fn directory_in(path: &std::path::Path) -> Result<Option<String>, Failure> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(None) };
    let file: Option<DwFile> = crate::config_file::parse(path, &text).map_err(Failure::error)?;
    Ok(file.and_then(|f| f.directory))
}

/// The directory when no `-d` is given.
pub fn default_directory() -> Result<String, Failure> {
    if let Some(d) = std::env::var("DSTACK_DIRECTORY").ok().filter(|d| !d.is_empty()) {
        return Ok(d);
    }
    for path in user_config().into_iter().chain([PathBuf::from(SYSTEM_CONFIG)]) {
        if let Some(d) = directory_in(&path)? {
            return Ok(d);
        }
    }
    Ok(FALLBACK_DIRECTORY.to_string())
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
