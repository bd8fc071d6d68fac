//! TLS for the control plane, with rustls and its `ring` provider (no
//! OpenSSL, no cmake): the directory's server config (`--tls-cert`,
//! `--tls-key`, `--client-ca`) and the clients' (`--ca-file`,
//! `--client-cert`, `--client-key`).
//!
//! Every file is read and checked here once, at start (or on SIGHUP), and
//! every error names the flag and the file, so a bad PEM never shows up as
//! a handshake failure later.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS setting could not be used. Each names the flag (or config
/// key) and the file; none carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: cannot read: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {path}: {why}")]
    Pem { flag: &'static str, path: PathBuf, why: String },
    #[error(
        "{flag} {path} has mode {mode:04o}: a private key must not be readable by group or others; run `chmod 600 {path}`"
    )]
    Mode { flag: &'static str, path: PathBuf, mode: u32 },
    #[error("{0}")]
    Mismatch(String),
    #[error("{what}: {source}")]
    Rustls {
        what: String,
        #[source]
        source: rustls::Error,
    },
}

/// The one crypto provider: ring builds with a C compiler alone.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (a chain: the leaf first), at least one.
pub fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { flag, path: path.into(), source })?;
    let pem = |why: String| TlsError::Pem { flag, path: path.into(), why };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(pem("no certificate in it: expected PEM blocks `-----BEGIN CERTIFICATE-----`".into()));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1), refused when
/// group or others may read it (as token files are).
pub fn read_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use std::os::unix::fs::PermissionsExt as _;
    let read = |source| TlsError::Read { flag, path: path.into(), source };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o7777;
    if mode & 0o044 != 0 {
        return Err(TlsError::Mode { flag, path: path.into(), mode });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        flag,
        path: path.into(),
        why: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no private key in it: expected a PEM block `-----BEGIN PRIVATE KEY-----` (or RSA or EC)".into()
            }
            e => format!("not a PEM file: {e}"),
        },
    })
}

/// The certificates of a CA file as trust roots.
fn read_roots(flag: &'static str, path: &Path, roots: &mut RootCertStore) -> Result<(), TlsError> {
    for cert in read_certs(flag, path)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            flag,
            path: path.into(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(())
}

/// The directory's TLS files, as resolved from its flags and config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The certificate chain (PEM, the leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// When set, every client must show a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// Builds the directory's server config from its files.
pub fn server_config(files: &ServerTlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = read_certs("--tls-cert", &files.cert)?;
    let key = read_key("--tls-key", &files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { what: "TLS protocol versions".into(), source })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            read_roots("--client-ca", path, &mut roots)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Pem {
                    flag: "--client-ca",
                    path: path.clone(),
                    why: format!("cannot verify clients with it: {e}"),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|source| {
        TlsError::Mismatch(format!(
            "--tls-cert {} and --tls-key {} do not go together: {source}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    // The directory speaks HTTP/1.1 only; say so to clients that offer h2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The directory's server config, replaced in place on SIGHUP (certificate
/// rotation) while each connection keeps the config it started with.
pub struct ServerTls {
    files: ServerTlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    pub fn load(files: ServerTlsFiles) -> Result<ServerTls, TlsError> {
        let config = server_config(&files)?;
        Ok(ServerTls { files, current: RwLock::new(Arc::new(config)) })
    }

    /// The config for a new connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap().clone()
    }

    /// Rereads the files; on an error the config in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self.current.write().unwrap() = Arc::new(config);
        Ok(())
    }

    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }
}

/// The files, not rustls's whole config.
impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("files", &self.files).finish()
    }
}

/// A client's TLS files, as resolved from its flags and config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// Trust this CA (PEM) for the directory instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) and its key, for a directory that asks for one.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// Merges flags and config-file keys, one key at a time (a flag beats
    /// the file), and checks that a certificate comes with its key.
    pub fn resolve(flags: ClientTlsFiles, file: ClientTlsFiles) -> Result<ClientTlsFiles, TlsError> {
        let merged = ClientTlsFiles {
            ca_file: flags.ca_file.or(file.ca_file),
            client_cert: flags.client_cert.or(file.client_cert),
            client_key: flags.client_key.or(file.client_key),
        };
        match (&merged.client_cert, &merged.client_key) {
            (Some(_), None) => {
                Err(TlsError::Mismatch("--client-cert needs --client-key (client_key:), the certificate's key".into()))
            }
            (None, Some(_)) => Err(TlsError::Mismatch(
                "--client-key needs --client-cert (client_cert:), the certificate it goes with".into(),
            )),
            _ => Ok(merged),
        }
    }
}

/// A client's TLS settings, ready for reqwest: cheap to clone.
#[derive(Clone)]
pub struct ClientTls(Arc<ClientConfig>);

/// A summary: rustls's own would list every trusted root.
impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("client_certificate", &self.0.client_auth_cert_resolver.has_certs()).finish()
    }
}

/// The system's trust roots (`/etc/ssl/certs` and the like), read once.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            for e in &found.errors {
                tracing::debug!(error = %e, "reading the system's trust roots");
            }
            if added == 0 {
                tracing::warn!(ignored, "no trust roots found on this system; https:// needs --ca-file");
            }
            Arc::new(roots)
        })
        .clone()
}

impl ClientTls {
    /// The system's roots and no client certificate: what a client with no
    /// TLS flags uses (for https:// only; http:// never touches it).
    pub fn system() -> ClientTls {
        static SYSTEM: OnceLock<ClientTls> = OnceLock::new();
        SYSTEM
            .get_or_init(|| {
                let config = Self::builder(system_roots()).with_no_client_auth();
                ClientTls(Arc::new(config))
            })
            .clone()
    }

    /// For the directory: `--ca-file` replaces the system's roots (as
    /// curl's `--cacert` does), so no public CA can vouch for a private
    /// directory; a client certificate when one is given.
    pub fn for_directory(files: &ClientTlsFiles) -> Result<ClientTls, TlsError> {
        if files == &ClientTlsFiles::default() {
            return Ok(Self::system());
        }
        let roots = match &files.ca_file {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                read_roots("--ca-file", path, &mut roots)?;
                Arc::new(roots)
            }
            None => system_roots(),
        };
        let builder = Self::builder(roots);
        let config = match (&files.client_cert, &files.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs("--client-cert", cert)?;
                let key_der = read_key("--client-key", key)?;
                builder.with_client_auth_cert(chain, key_der).map_err(|source| {
                    TlsError::Mismatch(format!(
                        "--client-cert {} and --client-key {} do not go together: {source}",
                        cert.display(),
                        key.display()
                    ))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(ClientTls(Arc::new(config)))
    }

    /// For watson's liveness checks: the system's roots plus `--ca-file`,
    /// since instances may carry public or private certificates.
    pub fn for_checks(ca_file: Option<&Path>) -> Result<ClientTls, TlsError> {
        let Some(path) = ca_file else { return Ok(Self::system()) };
        let mut roots = (*system_roots()).clone();
        read_roots("--ca-file", path, &mut roots)?;
        Ok(ClientTls(Arc::new(Self::builder(Arc::new(roots)).with_no_client_auth())))
    }

    fn builder(roots: Arc<RootCertStore>) -> rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert> {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
    }

    /// Whether a client certificate is offered to servers that ask.
    pub fn has_client_cert(&self) -> bool {
        self.0.client_auth_cert_resolver.has_certs()
    }

    /// A reqwest client builder that uses these settings for https://.
    pub fn reqwest(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder().use_preconfigured_tls((*self.0).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> ClientTlsFiles {
        ClientTlsFiles {
            ca_file: ca.map(Into::into),
            client_cert: cert.map(Into::into),
            client_key: key.map(Into::into),
        }
    }

    #[test]
    fn a_flag_beats_the_file_and_a_certificate_needs_its_key() {
        let merged = ClientTlsFiles::resolve(
            files(Some("/flag-ca.pem"), None, None),
            files(Some("/file-ca.pem"), Some("/c.pem"), Some("/c.key")),
        )
        .unwrap();
        assert_eq!(merged, files(Some("/flag-ca.pem"), Some("/c.pem"), Some("/c.key")));
        let err = ClientTlsFiles::resolve(files(None, Some("/c.pem"), None), ClientTlsFiles::default()).unwrap_err();
        assert!(err.to_string().contains("--client-cert needs --client-key"), "{err}");
        let err = ClientTlsFiles::resolve(ClientTlsFiles::default(), files(None, None, Some("/c.key"))).unwrap_err();
        assert!(err.to_string().contains("--client-key needs --client-cert"), "{err}");
    }

    #[test]
    fn bad_files_name_the_flag_and_the_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = tmp.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let empty = write("empty.pem", "not pem\n", 0o644);
        let err = ClientTls::for_directory(&ClientTlsFiles { ca_file: Some(empty.clone()), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--ca-file ") && err.contains("empty.pem: no certificate in it"), "{err}");
        let missing = tmp.path().join("missing.pem");
        let err = ClientTls::for_checks(Some(&missing)).unwrap_err().to_string();
        assert!(err.starts_with("--ca-file ") && err.contains("missing.pem: cannot read"), "{err}");
        let open_key = write("open.key", "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n", 0o644);
        let err = read_key("--tls-key", &open_key).unwrap_err().to_string();
        assert!(err.contains("has mode 0644") && err.contains("chmod 600"), "{err}");
        let no_key = write("nokey.key", "hello\n", 0o600);
        let err = read_key("--client-key", &no_key).unwrap_err().to_string();
        assert!(err.starts_with("--client-key ") && err.contains("no private key in it"), "{err}");
        let err = server_config(&ServerTlsFiles { cert: empty, key: no_key, client_ca: None }).unwrap_err().to_string();
        assert!(err.starts_with("--tls-cert "), "{err}");
    }

    #[test]
    fn no_files_is_the_system_config() {
        let a = ClientTls::for_directory(&ClientTlsFiles::default()).unwrap();
        assert!(Arc::ptr_eq(&a.0, &ClientTls::system().0));
    }
}
