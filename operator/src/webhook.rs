//! The validating admission webhook server: HTTPS, `POST /validate`, AdmissionReview v1 in and
//! out, decided by [`crate::admission::review`].
//!
//! ```text
//!   API server ──TLS (rustls, 1.2+)──▶ /validate ─▶ body ≤ 3 MiB, read within 10 s ─▶ admission::review
//!                                                                                   └─ hint ─▶ ActorHints
//!   cert/key files (Secret volume) ──polled every 10 s──▶ CertificateReloader (new handshakes only)
//!   client CA file (optional)      ──polled every 10 s──▶ ClientVerifier: callers must present a
//!                                                         certificate from it (client_auth)
//! ```
//!
//! Whoever reaches the port (without client authentication, anyone) is held to a bounded share:
//! bodies count against [`MAX_BODIES_BYTES`] across every caller as they arrive (503 past it),
//! two reviews are parsed at once, reading only the `spec` of the three kinds into their types,
//! at most 1,024 connections are open, and each is asked to close after about 60 s.
//!
//! Answers and logs never carry object content: logs name the request uid and the decision.
//! The certificate is reloaded when the mounted files change, so a cert-manager renewal needs
//! no restart; files that fail to parse are ignored (the last good pair keeps serving).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::admission;
use crate::audit::ActorHints;
use crate::inputs::Tenancy;

#[path = "webhook/client_auth.rs"]
mod client_auth;
pub use client_auth::{names_one_of, ClientAuthSettings, ClientVerifier};

/// The path the ValidatingWebhookConfiguration calls.
pub const PATH: &str = "/validate";
/// Largest AdmissionReview accepted. The API server sends the old and the new object; ours are
/// small, but the cap leaves room for big annotations and managedFields.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Review bodies held at once, being read or decided, across every caller: past it a review is
/// answered 503 at once. A declared length is counted before anything is read; otherwise each
/// body is counted as it arrives, so a caller that sends slowly holds only what it has sent.
/// The API server's reviews of these objects are a few KiB each.
pub const MAX_BODIES_BYTES: usize = 32 * 1024 * 1024;
/// Reviews decided at once (parsing is CPU work and costs about the body's size again).
const DECIDING: usize = 2;
/// Open connections at once; past it new ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 1024;
/// A connection's life after its handshake: then it is asked to close (HTTP/2 GOAWAY, HTTP/1
/// after the answer in progress) and given twice `read_timeout` to finish what it is answering.
/// The API server opens a new one when it needs one; a caller that opened one and sends
/// nothing holds it no longer than that.
const CONNECTION_AGE: Duration = Duration::from_secs(60);

/// What the webhook holds at once, whoever calls it (see [`MAX_BODIES_BYTES`]).
#[derive(Debug)]
pub struct Capacity {
    /// KiB of review bodies held.
    body_kib: tokio::sync::Semaphore,
    deciding: tokio::sync::Semaphore,
}

impl Capacity {
    pub fn new(bodies_bytes: usize) -> Self {
        Self {
            body_kib: tokio::sync::Semaphore::new(bodies_bytes.div_ceil(1024)),
            deciding: tokio::sync::Semaphore::new(DECIDING),
        }
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Self::new(MAX_BODIES_BYTES)
    }
}

/// Says whether this is the first call in the current window of a given length, so a flood of
/// refusals logs one line per window, not one per refusal.
struct Once(std::sync::atomic::AtomicU64);

static BUSY_LOGGED: Once = Once(std::sync::atomic::AtomicU64::new(0));

impl Once {
    fn first_in(&self, window: Duration) -> bool {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let current = now.as_secs() / window.as_secs().max(1) + 1;
        self.0.swap(current, Ordering::Relaxed) != current
    }
}

/// Why a body was not read.
enum Unread {
    TooLarge,
    Busy,
    Broken,
}

/// The body, each frame counted against `capacity` as it arrives; the permit holds its share
/// until dropped.
async fn read_counted<B>(
    body: B,
    declared: Option<u64>,
    capacity: &Capacity,
) -> Result<(Bytes, Option<tokio::sync::SemaphorePermit<'_>>), Unread>
where
    B: hyper::body::Body,
{
    let mut body = std::pin::pin!(body);
    // A declared length is taken at once (the buffer is sized by it): past the capacity, the
    // review is refused before anything is read or allocated.
    let declared = declared.map_or(0, |n| n.min(MAX_BODY_BYTES as u64) as usize);
    let mut held = match declared.div_ceil(1024) {
        0 => None,
        // Fits in u32: at most MAX_BODY_BYTES.
        kib => Some(capacity.body_kib.try_acquire_many(kib as u32).map_err(|_| Unread::Busy)?),
    };
    let mut buffer = bytes::BytesMut::with_capacity(declared);
    while let Some(frame) = body.frame().await {
        let Ok(mut data) = frame.map_err(|_| Unread::Broken)?.into_data() else { continue };
        let total = buffer.len() + data.remaining();
        if total > MAX_BODY_BYTES {
            return Err(Unread::TooLarge);
        }
        let needed = total.div_ceil(1024).saturating_sub(held.as_ref().map_or(0, |p| p.num_permits()));
        if needed > 0 {
            // Fits in u32: the body is at most MAX_BODY_BYTES.
            let more = capacity.body_kib.try_acquire_many(needed as u32).map_err(|_| Unread::Busy)?;
            match held.as_mut() {
                Some(permit) => permit.merge(more),
                None => held = Some(more),
            }
        }
        buffer.put(&mut data);
    }
    Ok((buffer.freeze(), held))
}

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the certificate files are checked for a change.
    pub reload_every: Duration,
    /// Time to finish the TLS handshake, and (separately) to read the headers and the body.
    pub read_timeout: Duration,
    /// The platform namespaces a KillSwitch is checked against, as `compile` does.
    pub tenancy: Tenancy,
    /// Callers must present a certificate from this CA (mutual TLS); `None` lets anyone who
    /// reaches the port post a review.
    pub client_auth: Option<ClientAuthSettings>,
}

impl WebhookSettings {
    pub fn new(listen: SocketAddr, cert: PathBuf, key: PathBuf, tenancy: Tenancy) -> Self {
        Self {
            listen,
            cert,
            key,
            reload_every: Duration::from_secs(10),
            read_timeout: Duration::from_secs(10),
            tenancy,
            client_auth: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("{path} is not valid PEM")]
    Pem { path: PathBuf },
    #[error("the certificate and key are unusable together: {0}")]
    Mismatch(rustls::Error),
    #[error("the client CA in {path} is unusable: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(rustls::Error),
    #[error("listening on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The serving certificate, swapped in place when its files change.
pub struct CertificateReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, [u8; 32])>,
}

impl std::fmt::Debug for CertificateReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateReloader")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// Both files' bytes (the key zeroized on drop) and a digest of them, to notice changes.
struct PemPair {
    cert: Vec<u8>,
    key: zeroize::Zeroizing<Vec<u8>>,
    fingerprint: [u8; 32],
}

fn read_pair(cert: &Path, key: &Path) -> Result<PemPair, WebhookError> {
    let read = |path: &Path| std::fs::read(path).map_err(|source| WebhookError::Read { path: path.into(), source });
    let cert_pem = read(cert)?;
    let key_pem = zeroize::Zeroizing::new(read(key)?);
    let mut digest = Sha256::new();
    digest.update(&cert_pem);
    digest.update(key_pem.as_slice());
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(&digest.finalize());
    Ok(PemPair { cert: cert_pem, key: key_pem, fingerprint })
}

/// The certificates in the PEM `pem` read from `path`: at least one, or an error naming the file.
fn pem_certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, WebhookError> {
    let certificates: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|_| WebhookError::Pem { path: path.into() })?;
    if certificates.is_empty() {
        return Err(WebhookError::NoCertificate { path: path.into() });
    }
    Ok(certificates)
}

fn certified_key(cert: &Path, cert_pem: &[u8], key: &Path, key_pem: &[u8]) -> Result<CertifiedKey, WebhookError> {
    let chain = pem_certificates(cert, cert_pem)?;
    let private: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|_| WebhookError::Pem { path: key.into() })?
        .ok_or_else(|| WebhookError::NoKey { path: key.into() })?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(WebhookError::Mismatch)
}

impl CertificateReloader {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, WebhookError> {
        let pair = read_pair(cert, key)?;
        let loaded = certified_key(cert, &pair.cert, key, &pair.key)?;
        Ok(Self {
            cert_path: cert.into(),
            key_path: key.into(),
            current: RwLock::new((Arc::new(loaded), pair.fingerprint)),
        })
    }

    /// Loads the files again if they changed. `Ok(true)` when a new pair now serves; on an
    /// error the previous pair keeps serving.
    pub fn reload_if_changed(&self) -> Result<bool, WebhookError> {
        let pair = read_pair(&self.cert_path, &self.key_path)?;
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == pair.fingerprint {
            return Ok(false);
        }
        let loaded = certified_key(&self.cert_path, &pair.cert, &self.key_path, &pair.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(loaded), pair.fingerprint);
        Ok(true)
    }

    /// Checks the files every `every` until the task is dropped.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        poll(every, &self.cert_path, "TLS certificate", || self.reload_if_changed()).await
    }
}

impl ClientVerifier {
    /// Checks the CA file every `every` until the task is dropped.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        poll(every, self.ca_path(), "client CA", || self.reload_if_changed()).await
    }
}

/// Calls `reload` every `every`, logging what it did. Mid-rotation files can briefly disagree
/// (a certificate with the old key); the next check settles it.
async fn poll(every: Duration, path: &Path, what: &str, reload: impl Fn() -> Result<bool, WebhookError>) {
    loop {
        tokio::time::sleep(every).await;
        match reload() {
            Ok(true) => tracing::info!(file = %path.display(), "{what} reloaded"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "{what} not reloaded; the previous one stays in use"),
        }
    }
}

impl ResolvesServerCert for CertificateReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone())
    }
}

/// rustls with TLS 1.3 preferred and 1.2 minimum, ALPN h2 and http/1.1; with `clients`, only
/// callers whose certificate it accepts complete the handshake.
pub fn tls_config(
    certificates: Arc<CertificateReloader>,
    clients: Option<Arc<ClientVerifier>>,
) -> Result<Arc<rustls::ServerConfig>, WebhookError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(WebhookError::Tls)?;
    let builder = match clients {
        Some(clients) => builder.with_client_cert_verifier(clients),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let mut body = message.into();
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// One request. Never panics; every refusal says why in a sentence.
pub async fn handle<B>(
    request: Request<B>,
    (hints, capacity): (&ActorHints, &Capacity),
    tenancy: &Tenancy,
    read_timeout: Duration,
) -> Response<Full<Bytes>>
where
    B: hyper::body::Body + Send,
{
    if request.uri().path() != PATH {
        return plain(StatusCode::NOT_FOUND, format!("not found: the admission webhook is at POST {PATH}"));
    }
    if request.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, format!("{PATH} takes POST with an AdmissionReview"));
    }
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let too_large =
        || plain(StatusCode::PAYLOAD_TOO_LARGE, format!("AdmissionReview larger than {MAX_BODY_BYTES} bytes refused"));
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let (body, _held) =
        match tokio::time::timeout(read_timeout, read_counted(request.into_body(), declared, capacity)).await {
            Ok(Ok(read)) => read,
            Ok(Err(Unread::TooLarge)) => return too_large(),
            Ok(Err(Unread::Busy)) => {
                if BUSY_LOGGED.first_in(Duration::from_secs(10)) {
                    tracing::warn!(held_mib = MAX_BODIES_BYTES >> 20, "admission webhook busy: reviews refused");
                }
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the webhook is holding {} MiB of reviews; retry", MAX_BODIES_BYTES >> 20),
                );
            }
            Ok(Err(Unread::Broken)) => return plain(StatusCode::BAD_REQUEST, "the request body could not be read"),
            Err(_) => {
                return plain(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the request body did not arrive within {}s", read_timeout.as_secs()),
                )
            }
        };
    // The semaphore is never closed.
    let Ok(_deciding) = capacity.deciding.acquire().await else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "the webhook is stopping");
    };
    match admission::review(&body, hints, tenancy) {
        Ok(answer) => {
            // uid (checked to be short and plain) and decision only: no names from the object, no content.
            tracing::info!(uid = %answer.response.uid, allowed = answer.response.allowed, "admission review answered");
            match serde_json::to_vec(&answer) {
                Ok(json) => {
                    let mut response = Response::new(Full::new(Bytes::from(json)));
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
                    response
                }
                Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "the answer could not be encoded"),
            }
        }
        // The reason goes back to the caller (who sent the body); the log says only that it was malformed.
        Err(not_a_review) => {
            tracing::warn!(bytes = body.len(), "admission webhook received something that is not an AdmissionReview");
            plain(StatusCode::BAD_REQUEST, not_a_review.to_string())
        }
    }
}

/// A bound, TLS-ready webhook server.
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    certificates: Arc<CertificateReloader>,
    clients: Option<Arc<ClientVerifier>>,
    settings: WebhookSettings,
}

impl std::fmt::Debug for WebhookServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookServer").field("listener", &self.listener).field("settings", &self.settings).finish()
    }
}

impl WebhookServer {
    /// Loads the certificate and binds, so that a bad certificate or a taken port stops the
    /// operator at start with a clear error.
    pub async fn bind(settings: WebhookSettings) -> Result<Self, WebhookError> {
        let certificates = Arc::new(CertificateReloader::load(&settings.cert, &settings.key)?);
        let clients = settings.client_auth.as_ref().map(ClientVerifier::load).transpose()?.map(Arc::new);
        let acceptor = TlsAcceptor::from(tls_config(certificates.clone(), clients.clone())?);
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| WebhookError::Bind { addr: settings.listen, source })?;
        Ok(Self { listener, acceptor, certificates, clients, settings })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, hints: Arc<ActorHints>) {
        let Self { listener, acceptor, certificates, clients, settings } = self;
        let _reloader = AbortOnDrop(tokio::spawn(certificates.watch(settings.reload_every)));
        let _client_ca_reloader =
            clients.map(|clients| AbortOnDrop(tokio::spawn(clients.watch(settings.reload_every))));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(settings.read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .max_concurrent_streams(64);
        let callers = if settings.client_auth.is_some() { "client certificate required" } else { "any caller" };
        tracing::info!(addr = %settings.listen, path = PATH, callers, "admission webhook listening");
        let tenancy = Arc::new(settings.tenancy.clone());
        let capacity = Arc::new(Capacity::default());
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            // Never closed: the error arm cannot happen.
            let Ok(open) = connections.clone().acquire_owned().await else { return };
            let (stream, peer) = match listener.accept().await {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let builder = builder.clone();
            let (hints, tenancy, capacity) = (hints.clone(), tenancy.clone(), capacity.clone());
            let read_timeout = settings.read_timeout;
            tokio::spawn(async move {
                let _open = open;
                let tls = match tokio::time::timeout(read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    // A refused client certificate is worth seeing: it is the API server's own
                    // when client auth is misconfigured (and reviews then go unanswered).
                    Ok(Err(error)) if refused_client_certificate(&error) => {
                        return tracing::warn!(%peer, %error, "webhook caller refused: its client certificate")
                    }
                    Ok(Err(error)) => return tracing::debug!(%error, "webhook TLS handshake failed"),
                    Err(_) => return tracing::debug!("webhook TLS handshake timed out"),
                };
                let service = service_fn(move |request| {
                    let (hints, tenancy, capacity) = (hints.clone(), tenancy.clone(), capacity.clone());
                    async move { Ok::<_, Infallible>(handle(request, (&hints, &capacity), &tenancy, read_timeout).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(tls), service);
                let mut connection = std::pin::pin!(connection);
                let ended = tokio::select! {
                    ended = connection.as_mut() => Some(ended),
                    () = tokio::time::sleep(CONNECTION_AGE) => {
                        // Reviews in progress may still need to read their body and wait their
                        // turn to be decided: twice the read timeout.
                        connection.as_mut().graceful_shutdown();
                        tokio::time::timeout(2 * read_timeout, connection.as_mut()).await.ok()
                    }
                };
                if let Some(Err(error)) = ended {
                    tracing::debug!(%error, "webhook connection ended with an error");
                }
            });
        }
    }
}

/// Whether a failed handshake failed on the caller's certificate (none, or not accepted).
fn refused_client_certificate(error: &std::io::Error) -> bool {
    matches!(
        error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_))
    )
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
#[path = "webhook/tests.rs"]
mod tests;
