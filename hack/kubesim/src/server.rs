//! The API server's HTTPS listener: TLS with optional client certificates (the user), HTTP/1.1 and h2.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::api::{Api, User};
use crate::pki::{Ca, Pair, user_of};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid certificate or key PEM")]
    Pem(#[source] rustls::pki_types::pem::Error),
    #[error("cannot build the TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("cannot build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// A TLS configuration serving `pair` and accepting (not requiring) client certificates of `ca`.
///
/// # Errors
///
/// Unusable PEM.
pub fn tls_config(ca: &Ca, pair: &Pair) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(cert.map_err(ServerError::Pem)?).map_err(ServerError::Tls)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(ServerError::Verifier)?;
    let chain = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(ServerError::Pem)?;
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).map_err(ServerError::Pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ServerError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(ServerError::Tls)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `api` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, api: Arc<Api>) {
    let acceptor = TlsAcceptor::from(tls);
    let http = auto::Builder::new(TokioExecutor::new());
    loop {
        let (tcp, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "api: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, http, api) = (acceptor.clone(), http.clone(), api.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(error) => {
                    tracing::debug!(%error, %peer, "api: TLS handshake failed");
                    return;
                }
            };
            let user = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|c| user_of(c))
                .unwrap_or_else(User::anonymous);
            let service = service_fn(move |req| {
                let (api, user) = (api.clone(), user.clone());
                async move { Ok::<_, std::convert::Infallible>(api.handle(user, req).await) }
            });
            if let Err(error) = http.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%error, %peer, "api: connection ended with an error");
            }
        });
    }
}
