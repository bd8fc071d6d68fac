//! Secrets kept in files: client tokens (`--token-file`, `DSTACK_TOKEN`,
//! `token_file:`), the directory's cluster token and its webhook secret.
//!
//! A secret never reaches a log line or an error message: [`Secret`] has no
//! `Display`, its `Debug` is redacted, and every error names the file or
//! variable, never the value.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// The variable clients read a token from when no `--token-file` is given.
pub const TOKEN_ENV: &str = "DSTACK_TOKEN";

/// A token or key, checked to be printable ASCII without spaces (so it
/// fits an HTTP header as is).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The value, for the one place that sends or hashes it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A value from the environment or a test, checked.
    pub fn new(value: &str) -> Option<Secret> {
        let value = value.trim();
        (!value.is_empty() && value.len() <= 4096 && value.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| Secret(value.to_string()))
    }

    /// `bytes` random bytes from the OS's generator, as lower-case hex.
    pub fn random(bytes: usize) -> Secret {
        let mut raw = vec![0u8; bytes];
        rand::fill(&mut raw[..]);
        Secret(hex(&raw))
    }
}

/// Why a secret could not be used. No variant carries the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:04o}: a secret file must not be readable by group or others; run `chmod 600 {path}`"
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error("{0} is empty")]
    Empty(String),
    #[error("{0}: expected one token of printable ASCII without spaces (e.g. from `openssl rand -hex 32`)")]
    Malformed(String),
}

/// Reads a secret file: refused when group or others may read it, or when
/// it holds anything but one token (a trailing newline is fine).
pub fn read_file(path: &Path) -> Result<Secret, SecretError> {
    let text = read_private(path)?;
    Secret::new(&text).ok_or_else(|| SecretError::Malformed(path.display().to_string()))
}

/// A file's text, refused when group or others may read it.
fn read_private(path: &Path) -> Result<String, SecretError> {
    let read = |source| SecretError::Read { path: path.into(), source };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o7777;
    if mode & 0o044 != 0 {
        return Err(SecretError::Mode { path: path.into(), mode });
    }
    std::fs::read_to_string(path).map_err(read)
}

/// Reads a key file (the webhook secret): the same mode rule as
/// [`read_file`], but any text is a key (GitHub's secrets may hold
/// spaces); only a final newline is dropped.
pub fn read_key_file(path: &Path) -> Result<Secret, SecretError> {
    let text = read_private(path)?;
    let key = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if key.is_empty() {
        return Err(SecretError::Empty(path.display().to_string()));
    }
    Ok(Secret(key.to_string()))
}

/// Reads the secret at `path`, or makes a random one there (mode 0600)
/// when there is none; true when it was made now.
pub fn read_or_create(path: &Path) -> Result<(Secret, bool), SecretError> {
    let create = |source| SecretError::Create { path: path.into(), source };
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut file) => {
            let secret = Secret::random(32);
            file.write_all(format!("{}\n", secret.expose()).as_bytes()).map_err(create)?;
            file.sync_all().map_err(create)?;
            Ok((secret, true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_file(path).map(|s| (s, false)),
        Err(e) => Err(create(e)),
    }
}

/// A client's token, from the first of: the `--token-file` flag, the
/// `DSTACK_TOKEN` variable (`env`, unset when empty), the config file's
/// `token_file:`. None: send no token.
pub fn resolve_token(
    flag: Option<&Path>,
    env: Option<&Secret>,
    file_setting: Option<&Path>,
) -> Result<Option<Secret>, SecretError> {
    if let Some(path) = flag {
        return read_file(path).map(Some);
    }
    if let Some(token) = env {
        return Ok(Some(token.clone()));
    }
    file_setting.map(read_file).transpose()
}

/// `DSTACK_TOKEN`, unchecked yet: what [`resolve_token`] takes as `env`.
/// An empty variable counts as unset; a malformed one is an error that
/// names the variable, never its value.
pub fn token_from_env() -> Result<Option<Secret>, SecretError> {
    match std::env::var(TOKEN_ENV) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Secret::new(&v).map(Some).ok_or_else(|| SecretError::Malformed(TOKEN_ENV.to_string())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(SecretError::Malformed(TOKEN_ENV.to_string())),
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string (either case), if it is one.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_flag_beats_the_environment_which_beats_the_config_file() {
        let tmp = tempfile::tempdir().unwrap();
        let flag = write(tmp.path(), "flag", "from-flag\n", 0o600);
        let file = write(tmp.path(), "file", "from-file", 0o400);
        let env = Secret::new("from-env").unwrap();
        let got = |f: Option<&Path>, e: Option<&Secret>, c: Option<&Path>| {
            resolve_token(f, e, c).unwrap().map(|s| s.expose().to_string())
        };
        assert_eq!(got(Some(&flag), Some(&env), Some(&file)).as_deref(), Some("from-flag"));
        assert_eq!(got(None, Some(&env), Some(&file)).as_deref(), Some("from-env"));
        assert_eq!(got(None, None, Some(&file)).as_deref(), Some("from-file"));
        assert_eq!(got(None, None, None), None);
    }

    #[test]
    fn a_readable_or_malformed_file_is_refused_without_showing_it() {
        let tmp = tempfile::tempdir().unwrap();
        let open = write(tmp.path(), "open", "s3cret-value", 0o644);
        let err = read_file(&open).unwrap_err().to_string();
        assert!(err.contains(&format!("{} has mode 0644", open.display())), "{err}");
        assert!(err.contains("chmod 600") && !err.contains("s3cret"), "{err}");
        let group = write(tmp.path(), "group", "s3cret-value", 0o640);
        assert!(read_file(&group).unwrap_err().to_string().contains("mode 0640"));
        let spaced = write(tmp.path(), "spaced", "s3cret value\n", 0o600);
        let err = read_file(&spaced).unwrap_err().to_string();
        assert!(err.contains("expected one token") && !err.contains("s3cret"), "{err}");
        let empty = write(tmp.path(), "empty", "\n", 0o600);
        assert!(read_file(&empty).is_err());
        let missing = read_file(&tmp.path().join("nope")).unwrap_err().to_string();
        assert!(missing.starts_with("cannot read ") && missing.contains("nope"), "{missing}");
        assert_eq!(format!("{:?}", Secret::new("s3cret").unwrap()), "Secret(<redacted>)");
    }

    #[test]
    fn a_cluster_token_is_made_once_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("token");
        let (first, created) = read_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(first.expose().len(), 64);
        assert!(unhex(first.expose()).is_some());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, created) = read_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again, first);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(unhex("00AB10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("+1"), None, "from_str_radix's sign is not a hex digit");
    }
}
