//! TLS termination: the rustls server configuration and certificate selection
//! by SNI.
//!
//! Only TLS 1.3 and 1.2 are offered (RFC 8996 deprecates 1.0 and 1.1); ALPN
//! offers `h2` then `http/1.1` (RFC 7301). [`SniResolver`] picks a certificate
//! by exact name, then by wildcard (`*.example.com` covers exactly one label,
//! RFC 6125 §6.4.3), then the default. Its certificate map sits behind an
//! `ArcSwap`, so [`SniResolver::reload`] replaces every certificate without
//! touching running listeners; handshakes in progress keep the map they
//! started with.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate file could not be read or holds no PEM certificate.
    #[error("cannot read certificates from {path}: {source}")]
    Certificates {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("no certificate found in {path}")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file could not be read or holds no PEM private key.
    #[error("cannot read a private key from {path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// The key is of an unsupported type, or does not match the certificate.
    #[error("key {key_path} does not fit certificate {cert_path}: {source}")]
    Mismatch {
        /// The certificate file.
        cert_path: PathBuf,
        /// The key file.
        key_path: PathBuf,
        /// What rustls reported.
        source: rustls::Error,
    },
    /// A certificate name is neither a DNS name nor `*.` followed by one.
    #[error("invalid certificate name `{name}` for {cert_path}")]
    InvalidName {
        /// The name as configured.
        name: String,
        /// The certificate file it was given for.
        cert_path: PathBuf,
    },
    /// The rustls configuration was refused.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// One certificate to serve, as configured.
#[derive(Debug, Clone)]
pub struct CertSource {
    /// Host names this certificate is served for: exact names or
    /// `*.example.com` wildcards. Matching ignores ASCII case.
    pub names: Vec<String>,
    /// PEM file with the certificate chain, leaf first.
    pub cert_path: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
    /// Serve this certificate when the client sends no SNI or no name matches.
    pub default: bool,
}

/// One certificate given as PEM text, for [`CertMap::from_pem`].
#[derive(Debug, Clone, Copy)]
pub struct PemCert<'a> {
    /// Host names, as in [`CertSource::names`].
    pub names: &'a [&'a str],
    /// The certificate chain, leaf first.
    pub cert_pem: &'a [u8],
    /// The private key.
    pub key_pem: &'a [u8],
    /// Serve it when nothing else matches.
    pub default: bool,
}

/// The certificates in force: an immutable map built once per (re)load.
#[derive(Default)]
pub struct CertMap {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain: `*.example.com` is stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl fmt::Debug for CertMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut exact: Vec<_> = self.exact.keys().collect();
        exact.sort();
        let mut wildcard: Vec<_> = self.wildcard.keys().collect();
        wildcard.sort();
        f.debug_struct("CertMap")
            .field("exact", &exact)
            .field("wildcard", &wildcard)
            .field("default", &self.default.is_some())
            .finish()
    }
}

impl CertMap {
    /// Loads every source from disk; the first failure names its file.
    pub fn load(sources: &[CertSource]) -> Result<Self, TlsError> {
        let mut map = CertMap::default();
        for source in sources {
            let key = Arc::new(load_certified_key(&source.cert_path, &source.key_path)?);
            map.insert(source, key)?;
        }
        Ok(map)
    }

    /// Builds a map from PEM text already in memory; `label` names the
    /// source in errors.
    pub fn from_pem(entries: &[PemCert<'_>], label: &str) -> Result<Self, TlsError> {
        let mut map = CertMap::default();
        for entry in entries {
            let path = PathBuf::from(label);
            let chain = CertificateDer::pem_slice_iter(entry.cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| TlsError::Certificates {
                    path: path.clone(),
                    source,
                })?;
            let key =
                PrivateKeyDer::from_pem_slice(entry.key_pem).map_err(|source| TlsError::Key {
                    path: path.clone(),
                    source,
                })?;
            let certified = Arc::new(certified_key(chain, &key, &path, &path)?);
            let source = CertSource {
                names: entry.names.iter().map(|n| (*n).to_owned()).collect(),
                cert_path: path.clone(),
                key_path: path,
                default: entry.default,
            };
            map.insert(&source, certified)?;
        }
        Ok(map)
    }

    fn insert(&mut self, source: &CertSource, key: Arc<CertifiedKey>) -> Result<(), TlsError> {
        for name in &source.names {
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            let (table, host) = match lower.strip_prefix("*.") {
                Some(parent) => (&mut self.wildcard, parent.to_owned()),
                None => (&mut self.exact, lower),
            };
            if rustls_pki_types::DnsName::try_from(host.as_str()).is_err() || host.contains('*') {
                return Err(TlsError::InvalidName {
                    name: name.clone(),
                    cert_path: source.cert_path.clone(),
                });
            }
            table.insert(host, Arc::clone(&key));
        }
        if source.default || self.default.is_none() && source.names.is_empty() {
            self.default = Some(key);
        }
        Ok(())
    }

    /// The certificate for `sni`: exact match, then a wildcard one label up,
    /// then the default. `None` means the handshake fails.
    pub fn select(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        if let Some(name) = sni {
            // rustls hands SNI over lower-cased and without a trailing dot.
            if let Some(key) = self.exact.get(name) {
                return Some(key);
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(key) = self.wildcard.get(parent) {
                    return Some(key);
                }
            }
        }
        self.default.as_ref()
    }
}

fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificates {
            path: cert_path.to_owned(),
            source,
        })?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| TlsError::Key {
        path: key_path.to_owned(),
        source,
    })?;
    certified_key(chain, &key, cert_path, key_path)
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let mismatch = |source| TlsError::Mismatch {
        cert_path: cert_path.to_owned(),
        key_path: key_path.to_owned(),
        source,
    };
    let signer = rustls::crypto::ring::sign::any_supported_type(key).map_err(mismatch)?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(mismatch)?;
    Ok(certified)
}

/// Chooses the server certificate by SNI from a reloadable [`CertMap`].
#[derive(Debug)]
pub struct SniResolver {
    map: ArcSwap<CertMap>,
}

impl SniResolver {
    /// A resolver serving `map`.
    pub fn new(map: CertMap) -> Self {
        Self {
            map: ArcSwap::from_pointee(map),
        }
    }

    /// Replaces the certificates; new handshakes use `map` at once.
    pub fn reload(&self, map: CertMap) {
        self.map.store(Arc::new(map));
        tracing::info!("TLS certificates reloaded");
    }

    /// The certificates currently in force.
    pub fn current(&self) -> Arc<CertMap> {
        self.map.load_full()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let map = self.map.load();
        let chosen = map.select(hello.server_name()).cloned();
        if chosen.is_none() {
            tracing::debug!(sni = ?hello.server_name(), "no certificate for this name");
        }
        chosen
    }
}

/// Installs rustls' ring provider as the process default, once. Safe to call
/// from anywhere; a provider installed earlier is left in place.
pub fn install_default_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // An Err means another provider is already the default: keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The server configuration: TLS 1.3 and 1.2, ALPN `h2` and `http/1.1`,
/// certificates from `resolver`.
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    install_default_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Cert {
        cert: String,
        key: String,
    }

    fn self_signed(name: &str) -> Cert {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        Cert {
            cert: ck.cert.pem(),
            key: ck.signing_key.serialize_pem(),
        }
    }

    fn pem<'a>(names: &'a [&'a str], cert: &'a Cert, default: bool) -> PemCert<'a> {
        PemCert {
            names,
            cert_pem: cert.cert.as_bytes(),
            key_pem: cert.key.as_bytes(),
            default,
        }
    }

    fn leaf_der(key: &CertifiedKey) -> &[u8] {
        key.cert[0].as_ref()
    }

    #[test]
    fn selection_table() {
        let a = self_signed("a.example.com");
        let w = self_signed("*.example.com");
        let d = self_signed("default.test");
        let map = CertMap::from_pem(
            &[
                pem(&["a.example.com"], &a, false),
                pem(&["*.Example.com"], &w, false),
                pem(&["default.test"], &d, true),
            ],
            "memory",
        )
        .unwrap();
        let der = |s: Option<&str>| map.select(s).map(|k| leaf_der(k).to_vec());
        let a_der = der(Some("a.example.com"));
        let w_der = der(Some("b.example.com"));
        let d_der = der(None);
        assert_ne!(a_der, w_der);
        assert_ne!(w_der, d_der);
        // (sni, expected)
        let cases = [
            (Some("a.example.com"), &a_der),
            (Some("b.example.com"), &w_der),
            // A wildcard covers one label only.
            (Some("x.b.example.com"), &d_der),
            (Some("example.com"), &d_der),
            (Some("other.org"), &d_der),
            (Some("default.test"), &d_der),
            (None, &d_der),
        ];
        for (sni, want) in cases {
            assert_eq!(&der(sni), want, "{sni:?}");
        }
    }

    #[test]
    fn no_default_means_no_certificate() {
        let a = self_signed("a.test");
        let map = CertMap::from_pem(&[pem(&["a.test"], &a, false)], "memory").unwrap();
        assert!(map.select(Some("a.test")).is_some());
        assert!(map.select(Some("b.test")).is_none());
        assert!(map.select(None).is_none());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = self_signed("a.test");
        let b = self_signed("b.test");
        let cert = dir.path().join("a.crt");
        let key = dir.path().join("a.key");
        let other_key = dir.path().join("b.key");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&cert, &a.cert).unwrap();
        std::fs::write(&key, &a.key).unwrap();
        std::fs::write(&other_key, &b.key).unwrap();
        std::fs::write(&garbage, "not pem").unwrap();
        let source = |cert: &Path, key: &Path, names: &[&str]| CertSource {
            names: names.iter().map(|s| s.to_string()).collect(),
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            default: false,
        };

        assert!(CertMap::load(&[source(&cert, &key, &["a.test"])]).is_ok());

        let missing = dir.path().join("missing.crt");
        let err = CertMap::load(&[source(&missing, &key, &["a.test"])]).unwrap_err();
        assert!(err.to_string().contains("missing.crt"), "{err}");

        let err = CertMap::load(&[source(&garbage, &key, &["a.test"])]).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        let err = CertMap::load(&[source(&cert, &garbage, &["a.test"])]).unwrap_err();
        assert!(matches!(err, TlsError::Key { .. }), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        let err = CertMap::load(&[source(&cert, &other_key, &["a.test"])]).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("b.key"), "{err}");

        let err = CertMap::load(&[source(&cert, &key, &["bad name"])]).unwrap_err();
        assert!(matches!(err, TlsError::InvalidName { .. }), "{err}");
        let err = CertMap::load(&[source(&cert, &key, &["a.*.test"])]).unwrap_err();
        assert!(matches!(err, TlsError::InvalidName { .. }), "{err}");
    }

    #[test]
    fn reload_swaps_the_map() {
        let a = self_signed("a.test");
        let b = self_signed("a.test");
        let resolver =
            SniResolver::new(CertMap::from_pem(&[pem(&["a.test"], &a, true)], "m").unwrap());
        let before = leaf_der(resolver.current().select(Some("a.test")).unwrap()).to_vec();
        resolver.reload(CertMap::from_pem(&[pem(&["a.test"], &b, true)], "m").unwrap());
        let after = leaf_der(resolver.current().select(Some("a.test")).unwrap()).to_vec();
        assert_ne!(before, after);
    }

    #[test]
    fn config_offers_h2_and_http11() {
        let config = server_config(Arc::new(SniResolver::new(CertMap::default()))).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
