//! A test PKI made at run time: one CA and one server certificate for `localhost` and
//! `127.0.0.1`, written as PEM files into a temporary directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;

/// A CA plus a server certificate signed by it.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
    /// PEM of the CA certificate.
    pub ca_pem: String,
    /// PEM of the server certificate (leaf only).
    pub server_cert_pem: String,
    /// PEM (PKCS#8) of the server private key.
    pub server_key_pem: String,
}

impl TestPki {
    /// Makes a fresh CA and server certificate.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_ca_name("Portcullis E2E Test CA")
    }

    /// Makes a fresh CA with the given common name and a server certificate signed by it.
    pub fn with_ca_name(ca_name: &str) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ca_name);
        dn.push(DnType::OrganizationName, "Portcullis tests");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut leaf = CertificateParams::new(vec!["localhost".to_string()])?;
        leaf.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "localhost");
        leaf.distinguished_name = dn;
        leaf.use_authority_key_identifier_extension = true;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate()?;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

        let pki = Self {
            dir: tempfile::Builder::new().prefix("portcullis-pki-").tempdir()?,
            ca_pem: ca_cert.pem(),
            server_cert_pem: leaf_cert.pem(),
            server_key_pem: leaf_key.serialize_pem(),
        };
        std::fs::write(pki.ca_path(), &pki.ca_pem)?;
        std::fs::write(pki.server_cert_path(), &pki.server_cert_pem)?;
        std::fs::write(pki.server_key_path(), &pki.server_key_pem)?;
        Ok(pki)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn server_key_path(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    /// A root store trusting only this CA.
    pub fn root_store(&self) -> anyhow::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        Ok(roots)
    }

    /// A rustls server config presenting the server certificate, offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let certs: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut self.server_cert_pem.as_bytes()).collect::<Result<_, _>>()?;
        let key: PrivateKeyDer<'static> =
            rustls_pemfile::private_key(&mut self.server_key_pem.as_bytes())?.context("no private key in PEM")?;
        let mut config = rustls::ServerConfig::builder_with_provider(crate::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A rustls client config trusting only this CA, offering `alpn`, limited to `versions`.
    pub fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> anyhow::Result<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(versions)?
            .with_root_certificates(self.root_store()?)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }
}
