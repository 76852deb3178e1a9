//! Serving certificates: load and check a PEM pair, serve it, and pick up new files without a restart.
//!
//! Kubernetes updates a mounted Secret by swapping a symlink, which file-change notifications miss;
//! [`CertStore::watch`] therefore polls the files and swaps the pair in when their bytes change. A pair
//! that does not load (half-written, mismatched) is reported and the last good one kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate pair could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {flag} file {path}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the --tls-cert file {path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("the --tls-cert file {path} is not a valid PEM certificate chain")]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the --tls-key file {path} holds no valid PEM private key")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the --tls-key file {path} holds a key of a type that cannot be used")]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the --tls-key file {key} does not belong to the certificate in the --tls-cert file {cert}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS server configuration")]
    Config(#[source] rustls::Error),
}

/// Where the serving certificate chain and its private key live.
#[derive(Clone, Debug)]
pub struct PairPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a reload found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files hold the pair already served.
    Unchanged,
    /// A new pair was loaded and is now served.
    Updated,
}

/// The pair being served, swapped in place when the files change.
#[derive(Debug)]
pub struct CertStore {
    paths: PairPaths,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// Digest of the file contents last read, whether they loaded or not.
    loaded_from: Mutex<Vec<u8>>,
}

impl CertStore {
    /// Loads and checks the pair at `paths`.
    ///
    /// # Errors
    ///
    /// The files cannot be read, do not hold PEM data, or the key does not match the certificate.
    pub fn load(paths: PairPaths) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (key, digest) = load_pair(&paths, &provider)?;
        Ok(Arc::new(Self {
            paths,
            provider,
            current: RwLock::new(Arc::new(key)),
            loaded_from: Mutex::new(digest),
        }))
    }

    /// Re-reads the files and serves the pair they hold if it changed.
    ///
    /// # Errors
    ///
    /// The new files do not load; the previous pair stays in service.
    pub fn reload(&self) -> Result<Reload, TlsError> {
        let digest = files_digest(&self.paths)?;
        let mut loaded_from = self.loaded_from.lock().unwrap_or_else(PoisonError::into_inner);
        if *loaded_from == digest {
            return Ok(Reload::Unchanged);
        }
        // Whatever the outcome, these bytes have been judged: a broken pair is reported once, not at
        // every poll, and is tried again as soon as either file changes.
        *loaded_from = digest;
        let (key, _) = load_pair(&self.paths, &self.provider)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        Ok(Reload::Updated)
    }

    /// Polls the files every `interval` until `stop` resolves, calling `observe` with each reload that
    /// did something (a new pair, or a failure).
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        stop: impl Future<Output = ()>,
        observe: impl Fn(&Result<Reload, TlsError>),
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = &mut stop => return,
            }
            let result = self.reload();
            match &result {
                Ok(Reload::Unchanged) => continue,
                Ok(Reload::Updated) => {
                    tracing::info!(cert = %self.paths.cert.display(), "loaded a new serving certificate")
                }
                Err(error) => tracing::warn!(
                    error = %crate::report::chain(error),
                    "could not load the changed certificate files; still serving the previous pair"
                ),
            }
            observe(&result);
        }
    }

    /// A rustls server configuration that serves this store's current pair and offers h2 and
    /// HTTP/1.1 by ALPN.
    ///
    /// # Errors
    ///
    /// The crypto provider supports no safe protocol version (never with the ring provider).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

fn digest_of(cert: &[u8], key: &[u8]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(cert.len() as u64).to_be_bytes());
    ctx.update(cert);
    ctx.update(key);
    ctx.finish().as_ref().to_vec()
}

fn files_digest(paths: &PairPaths) -> Result<Vec<u8>, TlsError> {
    Ok(digest_of(
        &read("--tls-cert", &paths.cert)?,
        &read("--tls-key", &paths.key)?,
    ))
}

fn load_pair(paths: &PairPaths, provider: &CryptoProvider) -> Result<(CertifiedKey, Vec<u8>), TlsError> {
    let cert_pem = read("--tls-cert", &paths.cert)?;
    let key_pem = read("--tls-key", &paths.key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadCertificate {
            path: paths.cert.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: paths.cert.clone(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::BadKey {
        path: paths.key.clone(),
        source,
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|source| TlsError::UnsupportedKey {
            path: paths.key.clone(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|source| TlsError::Mismatch {
        cert: paths.cert.clone(),
        key: paths.key.clone(),
        source,
    })?;
    Ok((certified, digest_of(&cert_pem, &key_pem)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{Bundle, generate};

    fn write(dir: &Path, bundle: &Bundle) -> PairPaths {
        std::fs::write(dir.join("tls.crt"), &bundle.cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), &bundle.key_pem).unwrap();
        PairPaths {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        }
    }

    #[test]
    fn a_missing_file_names_the_flag_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = CertStore::load(PairPaths {
            cert: dir.path().join("nope.crt"),
            key: dir.path().join("k"),
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--tls-cert") && msg.contains("nope.crt"), "{msg}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = generate(&["localhost".into()]).unwrap();
        let b = generate(&["localhost".into()]).unwrap();
        let paths = write(dir.path(), &a);
        std::fs::write(&paths.key, &b.key_pem).unwrap();
        let err = CertStore::load(paths).unwrap_err();
        assert!(matches!(err, TlsError::Mismatch { .. }), "{err:?}");
    }

    #[test]
    fn reload_swaps_a_new_pair_and_keeps_the_old_one_on_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let first = generate(&["localhost".into()]).unwrap();
        let paths = write(dir.path(), &first);
        let store = CertStore::load(paths.clone()).unwrap();
        let serial = |s: &CertStore| s.current.read().unwrap().cert[0].clone();
        let before = serial(&store);
        assert_eq!(store.reload().unwrap(), Reload::Unchanged);

        std::fs::write(&paths.key, b"not a key").unwrap();
        assert!(store.reload().is_err());
        assert_eq!(serial(&store), before, "a bad read keeps the last good pair");
        assert_eq!(
            store.reload().unwrap(),
            Reload::Unchanged,
            "the same broken files are reported once"
        );

        let second = generate(&["localhost".into()]).unwrap();
        write(dir.path(), &second);
        assert_eq!(store.reload().unwrap(), Reload::Updated);
        assert_ne!(serial(&store), before);
    }

    #[cfg(unix)]
    #[test]
    fn reload_follows_a_symlink_swap_like_a_secret_mount() {
        // Layout of a mounted Secret: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let v1 = root.join("..2026_01_01");
        std::fs::create_dir(&v1).unwrap();
        write(&v1, &generate(&["localhost".into()]).unwrap());
        std::os::unix::fs::symlink("..2026_01_01", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/tls.crt", root.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", root.join("tls.key")).unwrap();
        let store = CertStore::load(PairPaths {
            cert: root.join("tls.crt"),
            key: root.join("tls.key"),
        })
        .unwrap();
        let before = store.current.read().unwrap().cert[0].clone();

        let v2 = root.join("..2026_02_01");
        std::fs::create_dir(&v2).unwrap();
        write(&v2, &generate(&["localhost".into()]).unwrap());
        std::os::unix::fs::symlink("..2026_02_01", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(&v1).unwrap();

        assert_eq!(store.reload().unwrap(), Reload::Updated);
        assert_ne!(store.current.read().unwrap().cert[0], before);
    }
}
