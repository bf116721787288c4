//! TLS on the client-facing listener: rustls, TLS 1.3 preferred and 1.2 minimum, ALPN h2 and
//! http/1.1, the certificate reloaded when its files change.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
pub use portcullis_operator::webhook::CertificateReloader;
use rustls::pki_types::CertificateDer;

pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The listener's configuration, and the certificate it serves: read again from `cert` and
/// `key` when they change ([`CertificateReloader::watch`]), so a cert-manager renewal needs no
/// restart. The operator's webhook serves its certificate the same way.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<(Arc<rustls::ServerConfig>, Arc<CertificateReloader>)> {
    let certificates = Arc::new(CertificateReloader::load(cert, key).context("the listener's TLS certificate")?);
    let config = portcullis_operator::webhook::tls_config(certificates.clone(), None)?;
    Ok((config, certificates))
}
