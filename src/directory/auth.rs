//! Who may do what on the directory's API (README.md, "Security").
//!
//! A request names its caller with `Authorization: Bearer TOKEN`. The
//! directory keeps only SHA-256 digests of tokens, from one of:
//! - an auth file (`--auth-file`), each token with a name and a role,
//!   reloaded on SIGHUP;
//! - a cluster token (`STATE_DIR/token`), which acts as every role;
//! - nothing: auth is off (loopback alone, or `--insecure`).
//!
//! [`Caller::check`] is the one place that decides whether a caller may do
//! an [`Action`]; the API's extractors call it and turn a refusal into a
//! JSON 401 or 403.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use hmac::{Hmac, Mac as _};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::config_file::{self, FileError};
use crate::model::{ClientName, InstanceId, ServiceName};
use crate::secret::{self, Secret, SecretError};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Register and deregister instances of the services it lists.
    Watson,
    /// Read snapshots and report, under the token's name, what it applied.
    Sherlock,
    /// Everything `dw` needs: status, instances, snapshots, reconcile.
    Operator,
    /// Status, instances, metrics, the status page, and snapshots (which
    /// hold what status shows), so that `dw status` and `dw route list` work.
    Read,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Watson => "watson",
            Role::Sherlock => "sherlock",
            Role::Operator => "operator",
            Role::Read => "read",
        })
    }
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// `GET /v1/status`, `/v1/instances`, `/metrics`, `/`.
    Read,
    /// `GET /v1/snapshot`.
    Subscribe,
    /// Report the snapshot applied, as a sherlock (`sherlock=` on a snapshot query).
    Report,
    /// `POST /v1/reconcile`.
    Reconcile,
    /// `PUT` or `DELETE /v1/instances/{id}` of some service; the service
    /// itself is checked with [`Action::Register`] once it is known.
    Write,
    /// Register or deregister an instance of this service.
    Register(&'a ServiceName),
}

impl Action<'_> {
    /// The roles that may do it.
    fn roles(&self) -> &'static [Role] {
        match self {
            Action::Read => &[Role::Operator, Role::Read],
            Action::Subscribe => &[Role::Sherlock, Role::Operator, Role::Read],
            Action::Report => &[Role::Sherlock],
            Action::Reconcile => &[Role::Operator],
            Action::Write | Action::Register(_) => &[Role::Watson],
        }
    }

    fn describe(&self) -> String {
        match self {
            Action::Read => "read the directory's status, instances or metrics".into(),
            Action::Subscribe => "read snapshots".into(),
            Action::Report => "report as a sherlock".into(),
            Action::Reconcile => "trigger a reconcile".into(),
            Action::Write => "register or deregister instances".into(),
            Action::Register(service) => format!("register or deregister instances of service \"{service}\""),
        }
    }
}

/// A glob over service names: `emitter`, `barker*`, `team-?.api`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePattern(String);

impl ServicePattern {
    pub fn matches(&self, service: &ServiceName) -> bool {
        glob(self.0.as_bytes(), service.as_str().as_bytes())
    }
}

impl std::str::FromStr for ServicePattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let chars_ok = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-*?".contains(&b));
        let literal_ok = s.contains(['*', '?']) || s.parse::<ServiceName>().is_ok();
        if !s.is_empty() && s.len() <= 63 && chars_ok && literal_ok {
            Ok(ServicePattern(s.to_string()))
        } else {
            Err(format!(
                "invalid service pattern {s:?}: a service name (`emitter`) or a glob of one with * and ? (`barker*`)"
            ))
        }
    }
}

impl<'de> Deserialize<'de> for ServicePattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_scalar(d, str::parse)
    }
}

/// Deserializes a string through `parse` within the deserializer's own
/// call for the scalar, so that a YAML error points at the value's line
/// and column rather than at the entry that holds it.
fn parse_scalar<'de, D: serde::Deserializer<'de>, T>(
    d: D,
    parse: fn(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    struct Scalar<T>(fn(&str) -> Result<T, String>);
    impl<T> serde::de::Visitor<'_> for Scalar<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            (self.0)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(Scalar(parse))
}

impl fmt::Display for ServicePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*` matches any run of characters, `?` one; the rest match themselves.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it matched up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` swallow one more character and retry.
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The SHA-256 of a token. No `PartialEq`: digests are compared in
/// constant time only, with [`TokenDigest::matches`].
#[derive(Clone, Copy)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub fn of(token: &[u8]) -> TokenDigest {
        TokenDigest(Sha256::digest(token).into())
    }

    fn matches(&self, other: &TokenDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({}..)", secret::hex(&self.0[..4]))
    }
}

impl<'de> Deserialize<'de> for TokenDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_scalar(d, |text| {
            secret::unhex(text)
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .map(TokenDigest)
                .ok_or_else(|| "expected 64 hex digits: the SHA-256 of the token (`sha256sum TOKEN_FILE`)".to_string())
        })
    }
}

/// A token's name: shown in logs and, for a sherlock, in `/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenName(String);

impl<'de> Deserialize<'de> for TokenName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_scalar(d, |name| match name.parse::<InstanceId>() {
            Ok(_) => Ok(TokenName(name.to_string())),
            Err(_) => Err(format!(
                "invalid token name {name:?}: 1 to 128 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
            )),
        })
    }
}

/// One token of the auth file, checked.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    name: String,
    role: Role,
    /// For a watson: the services it may register.
    services: Vec<ServicePattern>,
    /// For a sherlock: the client whose routes it follows.
    client: Option<ClientName>,
    digest: TokenDigest,
}

impl TokenEntry {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn client(&self) -> Option<&ClientName> {
        self.client.as_ref()
    }
}

/// One entry as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: TokenName,
    role: Role,
    #[serde(default)]
    services: Option<Vec<ServicePattern>>,
    #[serde(default)]
    client: Option<ClientName>,
    sha256: TokenDigest,
}

impl TryFrom<RawEntry> for TokenEntry {
    type Error = String;
    fn try_from(raw: RawEntry) -> Result<TokenEntry, String> {
        let name = raw.name.0;
        let services = match (raw.role, raw.services) {
            (Role::Watson, Some(list)) if !list.is_empty() => list,
            (Role::Watson, _) => {
                return Err(format!("token {name:?}: a watson token lists its services, e.g. services: [emitter]"))
            }
            (role, Some(_)) => return Err(format!("token {name:?}: services: is for watson tokens, not {role}")),
            (_, None) => Vec::new(),
        };
        if raw.client.is_some() && raw.role != Role::Sherlock {
            return Err(format!("token {name:?}: client: is for sherlock tokens, not {}", raw.role));
        }
        Ok(TokenEntry { name, role: raw.role, services, client: raw.client, digest: raw.sha256 })
    }
}

/// Reads one entry and refuses a name or digest that an earlier entry
/// has. It checks within the deserializer's call for the entry's mapping,
/// so that an error points at the entry's line and column.
struct EntrySeed<'a>(&'a [TokenEntry]);

impl<'de> serde::de::DeserializeSeed<'de> for EntrySeed<'_> {
    type Value = TokenEntry;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<TokenEntry, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntrySeed<'_> {
    type Value = TokenEntry;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a token: name, role, sha256, and services (watson) or client (sherlock)")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<TokenEntry, A::Error> {
        use serde::de::Error as _;
        let raw = RawEntry::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        let entry = TokenEntry::try_from(raw).map_err(A::Error::custom)?;
        for earlier in self.0 {
            let why = if earlier.name == entry.name {
                "an earlier token has this name; names must be unique".to_string()
            } else if earlier.digest.matches(&entry.digest) {
                format!("the same sha256 as token {:?}; each token must be different", earlier.name)
            } else {
                continue;
            };
            return Err(A::Error::custom(format!("token {:?}: {why}", entry.name)));
        }
        Ok(entry)
    }
}

fn entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<TokenEntry>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<TokenEntry>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of tokens")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<TokenEntry>, A::Error> {
            let mut list = Vec::new();
            while let Some(entry) = seq.next_element_seed(EntrySeed(&list))? {
                list.push(entry);
            }
            Ok(list)
        }
    }
    d.deserialize_seq(Entries)
}

/// The auth file: `tokens:`, a list of entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    #[serde(deserialize_with = "entries")]
    tokens: Vec<TokenEntry>,
}

/// Every token of an auth file, checked: names and digests are unique.
#[derive(Debug, Clone, Default)]
pub struct AuthTable {
    tokens: Vec<Arc<TokenEntry>>,
}

impl<'de> Deserialize<'de> for AuthTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawTable::deserialize(d)?;
        Ok(AuthTable { tokens: raw.tokens.into_iter().map(Arc::new).collect() })
    }
}

impl AuthTable {
    /// Reads and checks an auth file; errors name `file:line:column`.
    pub fn load(path: &Path) -> Result<AuthTable, FileError> {
        config_file::load(path)
    }

    pub fn parse(path: &Path, text: &str) -> Result<AuthTable, FileError> {
        config_file::parse(path, text)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The entry a presented token belongs to. Every entry is compared, in
    /// constant time, whatever matches: how long this takes says nothing
    /// about which digest came close.
    fn find(&self, presented: &Presented) -> Option<Arc<TokenEntry>> {
        let mut found = None;
        for entry in &self.tokens {
            if presented.matches(&entry.digest) {
                found = Some(entry.clone());
            }
        }
        found
    }
}

/// A token as it came in: its digest, and that of the token followed by a
/// newline, so that `sha256sum TOKEN_FILE` of a file that `openssl rand -hex
/// 32 >FILE` wrote is a digest that works.
struct Presented([TokenDigest; 2]);

impl Presented {
    fn new(token: &str) -> Presented {
        Presented([TokenDigest::of(token.as_bytes()), TokenDigest::of(format!("{token}\n").as_bytes())])
    }

    fn matches(&self, digest: &TokenDigest) -> bool {
        // `|`, not `||`: both comparisons run every time.
        self.0[0].matches(digest) | self.0[1].matches(digest)
    }
}

/// Who made a request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Auth is off: anyone may do anything.
    Anyone,
    /// The cluster token, which acts as every role.
    Cluster,
    /// A token of the auth file.
    Token(Arc<TokenEntry>),
    /// A webhook whose signature checked (it may trigger a reconcile only).
    Webhook,
}

/// A 403: the caller is known but may not do this. The message names the
/// token, its role, and the role or service that was missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// A 401: the request did not prove who made it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unauthenticated(pub String);

impl Caller {
    /// The one decision: may this caller do `action`?
    pub fn check(&self, action: Action<'_>) -> Result<(), Denied> {
        let entry = match self {
            Caller::Anyone | Caller::Cluster => return Ok(()),
            Caller::Webhook if matches!(action, Action::Reconcile) => return Ok(()),
            Caller::Webhook => {
                return Err(Denied(format!(
                    "a webhook signature may only trigger a reconcile, not {}",
                    action.describe()
                )))
            }
            Caller::Token(entry) => entry,
        };
        if !action.roles().contains(&entry.role) {
            let roles: Vec<String> = action.roles().iter().map(ToString::to_string).collect();
            return Err(Denied(format!(
                "token {:?} has role {}; to {} a token needs role {}",
                entry.name,
                entry.role,
                action.describe(),
                roles.join(" or ")
            )));
        }
        if let Action::Register(service) = action {
            if !entry.services.iter().any(|p| p.matches(service)) {
                let list: Vec<String> = entry.services.iter().map(ToString::to_string).collect();
                return Err(Denied(format!(
                    "token {:?} may not {}: its services are {}",
                    entry.name,
                    action.describe(),
                    list.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The name a sherlock is listed under in `/v1/status`: a sherlock
    /// token's own name, whatever the query claims (so no one can report
    /// for another sherlock); the claimed name for a cluster token or with
    /// auth off, whose callers are trusted with everything.
    pub fn sherlock_name(&self, claimed: Option<String>) -> Result<Option<String>, Denied> {
        if claimed.is_none() {
            return Ok(None);
        }
        self.check(Action::Report)?;
        Ok(match self {
            Caller::Token(entry) => Some(entry.name.clone()),
            _ => claimed,
        })
    }

    /// The client a sherlock follows: a sherlock token's `client:` when it
    /// names one (a sherlock that claims another is refused, so a stolen
    /// token cannot be used to follow and report for another client's
    /// routes), else the claimed one.
    pub fn sherlock_client(&self, claimed: Option<ClientName>) -> Result<Option<ClientName>, Denied> {
        let Caller::Token(entry) = self else { return Ok(claimed) };
        let (name, Some(own)) = (&entry.name, &entry.client) else { return Ok(claimed) };
        match claimed {
            Some(other) if &other != own => Err(Denied(format!(
                "token {name:?} is for client {own}, not {other}: run this sherlock with --client {own}, \
                 or give it a token for {other}"
            ))),
            _ => Ok(Some(own.clone())),
        }
    }

    /// How logs name the caller (never by its token).
    pub fn label(&self) -> String {
        match self {
            Caller::Anyone => "anyone (auth off)".into(),
            Caller::Cluster => "the cluster token".into(),
            Caller::Token(entry) => format!("token {:?} ({})", entry.name, entry.role),
            Caller::Webhook => "a signed webhook".into(),
        }
    }
}

/// Where the directory's tokens come from.
#[derive(Debug)]
enum Keys {
    Off,
    Cluster(TokenDigest),
    File { path: PathBuf, table: RwLock<Arc<AuthTable>> },
}

/// Why auth could not be set up or reloaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("--auth-file {0}")]
    File(#[from] FileError),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// The directory's keys: its tokens and its webhook secret.
#[derive(Debug)]
pub struct Auth {
    keys: Keys,
    /// `--webhook-secret-file` and its secret, reloaded with the tokens.
    webhook: Option<(PathBuf, RwLock<Secret>)>,
}

impl Auth {
    /// No tokens: every caller is [`Caller::Anyone`].
    pub fn off() -> Auth {
        Auth { keys: Keys::Off, webhook: None }
    }

    /// One token that acts as every role.
    pub fn cluster(token: &Secret) -> Auth {
        Auth { keys: Keys::Cluster(TokenDigest::of(token.expose().as_bytes())), webhook: None }
    }

    /// The tokens of an auth file.
    pub fn from_file(path: &Path) -> Result<Auth, AuthError> {
        let table = AuthTable::load(path)?;
        Ok(Auth::from_table(path, table))
    }

    pub fn from_table(path: &Path, table: AuthTable) -> Auth {
        Auth { keys: Keys::File { path: path.into(), table: RwLock::new(Arc::new(table)) }, webhook: None }
    }

    /// Also accepts `POST /v1/reconcile` signed with the secret in `path`.
    pub fn with_webhook_secret(mut self, path: &Path) -> Result<Auth, AuthError> {
        let secret = secret::read_key_file(path)?;
        self.webhook = Some((path.into(), RwLock::new(secret)));
        Ok(self)
    }

    /// Whether requests need no token.
    pub fn is_off(&self) -> bool {
        matches!(self.keys, Keys::Off)
    }

    /// The caller of a request, from its `Authorization` header.
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Caller, Unauthenticated> {
        if matches!(self.keys, Keys::Off) {
            return Ok(Caller::Anyone);
        }
        let Some(header) = authorization else {
            return Err(Unauthenticated(
                "this directory requires a token: send Authorization: Bearer TOKEN \
                 (clients: --token-file FILE or DSTACK_TOKEN)"
                    .into(),
            ));
        };
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Unauthenticated("malformed Authorization header: expected `Bearer TOKEN`".into()))?;
        let presented = Presented::new(token);
        let invalid = || Unauthenticated("the token is not valid for this directory".into());
        match &self.keys {
            Keys::Off => Ok(Caller::Anyone),
            Keys::Cluster(digest) => presented.0[0].matches(digest).then_some(Caller::Cluster).ok_or_else(invalid),
            Keys::File { table, .. } => {
                let table = table.read().unwrap().clone();
                table.find(&presented).map(Caller::Token).ok_or_else(invalid)
            }
        }
    }

    /// Whether a webhook secret is configured.
    pub fn has_webhook_secret(&self) -> bool {
        self.webhook.is_some()
    }

    /// Checks a GitHub-style `X-Hub-Signature-256: sha256=HEX`, the
    /// HMAC-SHA256 of the raw body under the webhook secret, in constant time.
    pub fn verify_webhook(&self, signature: &[u8], body: &[u8]) -> Result<Caller, Unauthenticated> {
        let Some((_, secret)) = &self.webhook else {
            return Err(Unauthenticated(
                "X-Hub-Signature-256 given, but this directory has no --webhook-secret-file".into(),
            ));
        };
        let mac = std::str::from_utf8(signature)
            .ok()
            .and_then(|s| s.trim().strip_prefix("sha256="))
            .and_then(secret::unhex)
            .ok_or_else(|| Unauthenticated("malformed X-Hub-Signature-256: expected sha256=HEX".into()))?;
        let mut hmac = Hmac::<Sha256>::new_from_slice(secret.read().unwrap().expose().as_bytes())
            .expect("HMAC takes a key of any length");
        hmac.update(body);
        hmac.verify_slice(&mac)
            .map(|()| Caller::Webhook)
            .map_err(|_| Unauthenticated("X-Hub-Signature-256 does not match the body and the webhook secret".into()))
    }

    /// Rereads the auth file and the webhook secret (SIGHUP). On an error
    /// nothing changes: the tables in force stay. Returns what it did, for
    /// the log.
    pub fn reload(&self) -> Result<String, AuthError> {
        let new_table = match &self.keys {
            Keys::File { path, .. } => Some(AuthTable::load(path)?),
            _ => None,
        };
        let new_secret = self.webhook.as_ref().map(|(path, _)| secret::read_key_file(path)).transpose()?;
        let mut done = Vec::new();
        if let (Keys::File { path, table }, Some(new)) = (&self.keys, new_table) {
            done.push(format!("{} tokens from {}", new.len(), path.display()));
            *table.write().unwrap() = Arc::new(new);
        }
        if let (Some((path, secret)), Some(new)) = (&self.webhook, new_secret) {
            done.push(format!("the webhook secret from {}", path.display()));
            *secret.write().unwrap() = new;
        }
        Ok(if done.is_empty() { "nothing to reload (no --auth-file)".into() } else { done.join(", ") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_hex(token: &str) -> String {
        secret::hex(&Sha256::digest(token.as_bytes()))
    }

    fn table() -> AuthTable {
        let yaml = format!(
            "tokens:\n\
             \x20 - name: vm101\n    role: watson\n    services: [emitter, \"barker*\"]\n    sha256: {}\n\
             \x20 - name: main\n    role: sherlock\n    client: monolith\n    sha256: {}\n\
             \x20 - name: ops\n    role: operator\n    sha256: {}\n\
             \x20 - name: grafana\n    role: read\n    sha256: {}\n",
            digest_hex("watson-token"),
            digest_hex("sherlock-token"),
            // Upper case, as some tools print it.
            digest_hex("operator-token").to_uppercase(),
            // As `sha256sum FILE` gives it for a file with a final newline.
            digest_hex("read-token\n"),
        );
        AuthTable::parse(Path::new("auth.yaml"), &yaml).unwrap()
    }

    fn auth() -> Auth {
        Auth::from_table(Path::new("auth.yaml"), table())
    }

    fn caller(token: &str) -> Caller {
        auth().authenticate(Some(format!("Bearer {token}").as_bytes())).unwrap()
    }

    fn svc(name: &str) -> ServiceName {
        name.parse().unwrap()
    }

    #[test]
    fn globs() {
        let p = |s: &str| s.parse::<ServicePattern>().unwrap();
        assert!(p("emitter").matches(&svc("emitter")));
        assert!(!p("emitter").matches(&svc("emitter2")));
        assert!(p("barker*").matches(&svc("barker")));
        assert!(p("barker*").matches(&svc("barker.internal")));
        assert!(!p("barker*").matches(&svc("xbarker")));
        assert!(p("*-api").matches(&svc("team-a-api")));
        assert!(p("a*b*c").matches(&svc("axxbyyc")));
        assert!(!p("a*b*c").matches(&svc("axxbyy")));
        assert!(p("team-?").matches(&svc("team-1")));
        assert!(!p("team-?").matches(&svc("team-12")));
        assert!(p("*").matches(&svc("anything")));
        for bad in ["", "Emitter", "a b", "x/y", "emitter.", "[ab]"] {
            assert!(bad.parse::<ServicePattern>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_role_may_do_its_part_and_nothing_else() {
        use Action::*;
        let (emitter, barker, other) = (svc("emitter"), svc("barker-v2"), svc("transform"));
        let cases: [(&str, &[Action], &[Action]); 4] = [
            (
                "watson-token",
                &[Write, Register(&emitter), Register(&barker)],
                &[Register(&other), Read, Subscribe, Report, Reconcile],
            ),
            ("sherlock-token", &[Subscribe, Report], &[Read, Reconcile, Write, Register(&emitter)]),
            ("operator-token", &[Read, Subscribe, Reconcile], &[Report, Write, Register(&emitter)]),
            ("read-token", &[Read, Subscribe], &[Report, Reconcile, Write, Register(&emitter)]),
        ];
        for (token, may, may_not) in cases {
            let c = caller(token);
            for a in may {
                assert_eq!(c.check(*a), Ok(()), "{token} {a:?}");
            }
            for a in may_not {
                assert!(c.check(*a).is_err(), "{token} may not {a:?}");
            }
        }
        for everyone in [Caller::Anyone, Caller::Cluster] {
            assert!(everyone.check(Register(&other)).is_ok() && everyone.check(Reconcile).is_ok());
        }
        assert!(Caller::Webhook.check(Reconcile).is_ok());
        assert!(Caller::Webhook.check(Read).is_err());
    }

    #[test]
    fn refusals_name_the_missing_role_or_service() {
        let err = caller("watson-token").check(Action::Register(&svc("transform"))).unwrap_err().to_string();
        assert_eq!(
            err,
            "token \"vm101\" may not register or deregister instances of service \"transform\": \
             its services are emitter, barker*"
        );
        let err = caller("watson-token").check(Action::Read).unwrap_err().to_string();
        assert!(err.contains("role watson") && err.contains("needs role operator or read"), "{err}");
        let err = caller("read-token").check(Action::Reconcile).unwrap_err().to_string();
        assert!(err.contains("token \"grafana\" has role read") && err.ends_with("needs role operator"), "{err}");
    }

    #[test]
    fn a_sherlock_is_named_by_its_token_not_by_its_query() {
        let sherlock = caller("sherlock-token");
        assert_eq!(sherlock.sherlock_name(Some("fake".into())), Ok(Some("main".into())));
        assert_eq!(sherlock.sherlock_name(None), Ok(None));
        assert!(caller("operator-token").sherlock_name(Some("x".into())).is_err());
        assert_eq!(Caller::Cluster.sherlock_name(Some("edge-1".into())), Ok(Some("edge-1".into())));
        let Caller::Token(entry) = sherlock else { panic!() };
        assert_eq!(entry.client().map(ClientName::as_str), Some("monolith"));
    }

    #[test]
    fn tokens_are_checked_against_digests() {
        let auth = auth();
        let refused = |header: Option<&str>| auth.authenticate(header.map(str::as_bytes)).unwrap_err().to_string();
        assert!(refused(None).contains("requires a token"));
        assert!(refused(Some("Bearer nope")).contains("not valid"));
        assert!(refused(Some("Basic dXNlcjpwYXNz")).contains("malformed"));
        assert!(refused(Some("Bearer ")).contains("malformed"));
        // A digest of the token with a newline matches the bare token, and
        // hex in either case works.
        assert!(matches!(caller("read-token"), Caller::Token(e) if e.name() == "grafana"));
        assert!(matches!(caller("operator-token"), Caller::Token(e) if e.role() == Role::Operator));
        assert!(matches!(Auth::off().authenticate(None), Ok(Caller::Anyone)));
        let cluster = Auth::cluster(&Secret::new("c1").unwrap());
        assert!(matches!(cluster.authenticate(Some(b"Bearer c1")), Ok(Caller::Cluster)));
        assert!(cluster.authenticate(Some(b"Bearer c2")).is_err());
        assert!(cluster.authenticate(None).is_err());
    }

    #[test]
    fn the_file_is_checked_with_its_line_and_column() {
        let h = digest_hex("x");
        let cases = [
            (format!("tokens:\n  - name: a\n    role: admin\n    sha256: {h}\n"), "a.yaml:3:11: tokens[0].role: unknown variant `admin`"),
            ("tokens:\n  - name: a\n    role: read\n    sha256: abc\n".to_string(), "a.yaml:4:13: tokens[0].sha256: expected 64 hex digits"),
            (format!("tokens:\n  - name: a b\n    role: read\n    sha256: {h}\n"), "a.yaml:2:11: tokens[0].name: invalid token name"),
            (
                format!("tokens:\n  - name: a\n    role: watson\n    services: [Bad]\n    sha256: {h}\n"),
                "a.yaml:4:16: tokens[0].services[0]: invalid service pattern",
            ),
            (format!("tokens:\n  - name: a\n    role: read\n    sha256: {h}\n    colour: red\n"), "a.yaml:5:5: tokens[0]: unknown field `colour`"),
            (format!("tokens:\n  - name: a\n    role: watson\n    sha256: {h}\n"), "a.yaml:2:5: tokens[0]: token \"a\": a watson token lists its services"),
            (format!("tokens:\n  - name: a\n    role: read\n    services: [x]\n    sha256: {h}\n"), "services: is for watson tokens, not read"),
            (format!("tokens:\n  - name: a\n    role: read\n    client: m\n    sha256: {h}\n"), "client: is for sherlock tokens"),
            (
                format!("tokens:\n  - name: a\n    role: read\n    sha256: {h}\n  - name: a\n    role: read\n    sha256: {}\n", digest_hex("y")),
                "a.yaml:5:5: tokens[1]: token \"a\": an earlier token has this name",
            ),
            (
                format!("tokens:\n  - name: a\n    role: read\n    sha256: {h}\n  - name: b\n    role: read\n    sha256: {h}\n"),
                "a.yaml:5:5: tokens[1]: token \"b\": the same sha256 as token \"a\"",
            ),
        ];
        assert!(AuthTable::parse(Path::new("a.yaml"), "tokens: []\n").unwrap().is_empty());
        assert!(AuthTable::parse(Path::new("a.yaml"), "").is_err(), "an empty file is a mistake");
        for (yaml, want) in cases {
            let err = AuthTable::parse(Path::new("a.yaml"), &yaml).unwrap_err().to_string();
            assert!(err.starts_with("a.yaml:"), "{err}");
            assert!(err.contains(want), "want {want:?} in: {err}");
        }
    }

    #[test]
    fn a_reload_swaps_the_table_and_a_bad_one_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("auth.yaml");
        let one =
            |name: &str, token: &str| format!("  - name: {name}\n    role: read\n    sha256: {}\n", digest_hex(token));
        std::fs::write(&path, format!("tokens:\n{}", one("a", "ta"))).unwrap();
        let auth = Auth::from_file(&path).unwrap();
        assert!(auth.authenticate(Some(b"Bearer tb")).is_err());
        std::fs::write(&path, format!("tokens:\n{}{}", one("a", "ta"), one("b", "tb"))).unwrap();
        assert!(auth.reload().unwrap().starts_with("2 tokens from "));
        assert!(auth.authenticate(Some(b"Bearer tb")).is_ok());
        std::fs::write(&path, "tokens:\n  - name: [").unwrap();
        let err = auth.reload().unwrap_err().to_string();
        assert!(err.starts_with(&format!("--auth-file {}:", path.display())), "{err}");
        assert!(auth.authenticate(Some(b"Bearer tb")).is_ok(), "a bad file keeps the old table");
    }

    #[test]
    fn webhook_signatures() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("secret");
        std::fs::write(&path, "It's a Secret to Everybody\n").unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let auth = Auth::off().with_webhook_secret(&path).unwrap();
        // GitHub's documented example: this secret, this body, this signature.
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(matches!(auth.verify_webhook(good.as_bytes(), b"Hello, World!"), Ok(Caller::Webhook)));
        let err = auth.verify_webhook(good.as_bytes(), b"Hello, World?").unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        assert!(auth.verify_webhook(b"sha1=abcd", b"x").unwrap_err().to_string().contains("malformed"));
        assert!(Auth::off()
            .verify_webhook(good.as_bytes(), b"x")
            .unwrap_err()
            .to_string()
            .contains("no --webhook-secret-file"));
    }
}
