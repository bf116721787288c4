//! Who may call the admission webhook.
//!
//! Without client authentication anyone who reaches the port can post an AdmissionReview, and
//! the `userInfo` in it becomes the actor hint of the next ledger entry for that object: a
//! forged attribution. With `--webhook-client-ca` the TLS handshake requires a client
//! certificate that chains to that CA; with `--webhook-client-name` as well, the certificate
//! must name one of those identities as its subject CN or a DNS SAN (a cluster's client CA signs
//! every user's certificate, so the CA alone would let any of them in). The API server presents
//! such a certificate when its AdmissionConfiguration gives the ValidatingAdmissionWebhook
//! plugin a kubeconfig (`--admission-control-config-file`).
//!
//! The CA file is read again when it changes, as the serving certificate is. Handshakes send
//! no CA hints (`certificate_authorities`): they would have to be borrowed from a verifier that
//! can be swapped, and clients with one certificate, the API server's among them, send it
//! without hints.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

use super::{pem_certificates, provider, WebhookError};

/// The client CA and, optionally, the identities accepted from it.
#[derive(Debug, Clone)]
pub struct ClientAuthSettings {
    /// PEM bundle of the CA certificates a caller's certificate must chain to.
    pub ca: PathBuf,
    /// Accepted subject CNs or DNS SANs; empty accepts every certificate from the CA.
    pub names: Vec<String>,
}

/// Verifies callers' certificates against the CA in `ca`, swapped in place when the file changes.
pub struct ClientVerifier {
    ca_path: PathBuf,
    names: Vec<String>,
    current: RwLock<(Arc<dyn ClientCertVerifier>, [u8; 32])>,
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier").field("ca", &self.ca_path).field("names", &self.names).finish_non_exhaustive()
    }
}

fn read_ca(path: &Path) -> Result<(Vec<u8>, [u8; 32]), WebhookError> {
    let pem = std::fs::read(path).map_err(|source| WebhookError::Read { path: path.into(), source })?;
    let fingerprint: [u8; 32] = Sha256::digest(&pem).into();
    Ok((pem, fingerprint))
}

fn verifier(path: &Path, pem: &[u8]) -> Result<Arc<dyn ClientCertVerifier>, WebhookError> {
    let unusable =
        |error: &dyn std::fmt::Display| WebhookError::ClientCa { path: path.into(), reason: error.to_string() };
    let mut roots = rustls::RootCertStore::empty();
    for cert in pem_certificates(path, pem)? {
        roots.add(cert).map_err(|error| unusable(&error))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(|error| unusable(&error))
}

/// Whether `cert` names one of `names` as its subject CN or a DNS SAN (DNS compared without
/// regard to ASCII case). An unparsable certificate names nothing.
pub fn names_one_of(cert: &CertificateDer<'_>, names: &[String]) -> bool {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return false;
    };
    let mut common_names = parsed.subject().iter_common_name().filter_map(|cn| cn.as_str().ok());
    if common_names.any(|cn| names.iter().any(|name| name == cn)) {
        return true;
    }
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(|general| match general {
        GeneralName::DNSName(dns) => names.iter().any(|name| name.eq_ignore_ascii_case(dns)),
        _ => false,
    })
}

impl ClientVerifier {
    pub fn load(settings: &ClientAuthSettings) -> Result<Self, WebhookError> {
        let (pem, fingerprint) = read_ca(&settings.ca)?;
        let inner = verifier(&settings.ca, &pem)?;
        Ok(Self {
            ca_path: settings.ca.clone(),
            names: settings.names.clone(),
            current: RwLock::new((inner, fingerprint)),
        })
    }

    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// Reads the CA file again if it changed. `Ok(true)` when the new CA now decides; on an
    /// error the previous one keeps deciding.
    pub fn reload_if_changed(&self) -> Result<bool, WebhookError> {
        let (pem, fingerprint) = read_ca(&self.ca_path)?;
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == fingerprint {
            return Ok(false);
        }
        let inner = verifier(&self.ca_path, &pem)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (inner, fingerprint);
        Ok(true)
    }

    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner().verify_client_cert(end_entity, intermediates, now)?;
        if self.names.is_empty() || names_one_of(end_entity, &self.names) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}
