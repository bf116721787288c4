//! Upstream providers: HTTP/1.1 over TCP or rustls (TLS 1.3 preferred, 1.2 minimum),
//! TCP_NODELAY, bounded connect time, keep-alive connections in a pool of our own.
//!
//! ```text
//!  request task ──checkout──▶ pool (per thread, no lock) ──▶ Lease { Io, read buffer }
//!       │  writes the head `forward::build` encoded (h1::encode_fields) and the body in one
//!       │  writev, and reads the response head itself ...
//!       ▼
//!  UpstreamBody ── ... and the body as it is polled; ──release──▶ pool (if fully read)
//! ```
//!
//! No connection task is spawned: the request that uses a connection drives it, with our own
//! HTTP/1.1 codec (`h1`). Every chunk already read from the provider is decoded in the same
//! poll that asks for the next frame, so the server writes a burst of SSE events in one
//! write instead of one per event, and no chunk is handed from task to task.

pub mod h1;
mod pool;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, StatusCode, Uri};
use hyper_util::client::legacy::connect::dns::{GaiAddrs, GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::ServerName;

pub use h1::H1Error;
pub use pool::UpstreamBody;
use pool::{Lease, PoolSettings};

use crate::api::ApiRoute;
use crate::fields::RawFields;

/// A provider's response: its status, its header fields as they arrived (indexed in the head,
/// names lowercase, the framing fields still among them), and its body.
#[derive(Debug)]
pub struct ProviderResponse {
    pub status: StatusCode,
    pub fields: RawFields,
    pub body: UpstreamBody,
}

/// How long an unused connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Unused connections kept per provider origin and thread.
const MAX_IDLE_PER_ORIGIN: usize = 256;

/// Trust roots: the Mozilla set, plus a PEM bundle for private CAs (self-hosted models,
/// corporate proxies, tests).
pub fn client_tls_config(extra_ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        for cert in crate::tls::read_certs(path)? {
            roots.add(cert).with_context(|| format!("adding a CA certificate from {}", path.display()))?;
        }
    }
    // No ALPN: the connector offers none for HTTP/1-only, and servers then speak HTTP/1.1.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Scheme and authority: which connections can serve a request. Hashed once when parsed:
/// the pool looks an origin up twice per request, and `Authority` hashes byte by byte.
#[derive(Debug, Clone)]
pub struct Origin {
    https: bool,
    authority: Authority,
    hash: u64,
}

impl Origin {
    fn new(https: bool, authority: Authority) -> Self {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one((https, &authority));
        Self { https, authority, hash }
    }
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.https == other.https && self.authority == other.authority
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Origin {
    fn connect_uri(&self) -> Result<Uri, http::Error> {
        let scheme = if self.https { Scheme::HTTPS } else { Scheme::HTTP };
        Uri::builder().scheme(scheme).authority(self.authority.clone()).path_and_query("/").build()
    }
}

/// A provider's base URL, parsed once when the snapshot opens: the origin to connect to, the
/// `Host` header, and the origin-form path of every API route.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub origin: Origin,
    pub host: HeaderValue,
    base_path: Box<str>,
    paths: [PathAndQuery; ApiRoute::ALL.len()],
}

impl Endpoint {
    /// `base_url` as the operator validated it: `http(s)://host[:port][/path]`, no trailing
    /// slash, query or user info.
    pub fn parse(base_url: &str) -> Option<Self> {
        let (https, rest) = match (base_url.strip_prefix("https://"), base_url.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return None,
        };
        let (authority, base_path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        let authority: Authority = authority.parse().ok()?;
        let default_port = if https { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => HeaderValue::from_str(authority.as_str()).ok()?,
            _ => HeaderValue::from_str(authority.host()).ok()?,
        };
        let paths = ApiRoute::ALL.map(|route| format!("{base_path}{}", route.upstream_suffix()).parse().ok());
        let paths = paths.into_iter().collect::<Option<Vec<PathAndQuery>>>()?.try_into().ok()?;
        Some(Self { origin: Origin::new(https, authority), host, base_path: base_path.into(), paths })
    }

    /// The origin-form request target for `route`, with the client's query (if any).
    pub fn path(&self, route: ApiRoute, query: Option<&str>) -> Option<PathAndQuery> {
        match query {
            None => Some(self.paths[route.index()].clone()),
            Some(query) => format!("{}?{query}", self.paths[route.index()].path()).parse().ok(),
        }
    }

    /// Azure's deployment-scoped target.
    pub fn azure_path(&self, route: ApiRoute, deployment: &str, api_version: &str) -> Option<PathAndQuery> {
        format!("{}/deployments/{deployment}{}?api-version={api_version}", self.base_path, route.upstream_suffix())
            .parse()
            .ok()
    }
}

/// Why an upstream exchange failed. Carries no request or response content.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting: {0}")]
    Connect(crate::body::BoxError),
    /// As many provider connections are open as the descriptor budget holds.
    #[error("as many provider connections are open as allowed")]
    Busy,
    #[error("{0}")]
    Http(#[from] H1Error),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// A request written to a provider, its response still to come.
pub struct Sent(pool::Written);

impl Sent {
    /// The provider's response head; the body is read as it is polled. `head_request`: the
    /// request was a `HEAD` (its response has no body, whatever the fields say).
    pub async fn response(self, head_request: bool) -> Result<ProviderResponse, UpstreamError> {
        Ok(self.0.response(head_request).await?)
    }
}

impl std::fmt::Debug for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sent").finish_non_exhaustive()
    }
}

/// Distinguishes clients in the per-thread pool (tests run several in one process).
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Name resolution for provider hosts: the system's (`getaddrinfo` on the blocking pool, which
/// cannot be cancelled: [`UpstreamClient::connect`] stops waiting for it at the connect timeout).
#[derive(Clone)]
enum Resolver {
    System(GaiResolver),
    /// Never answers: a DNS server that has gone quiet, for tests.
    #[cfg(test)]
    Stalled,
}

type Resolving = std::pin::Pin<Box<dyn std::future::Future<Output = Result<GaiAddrs, std::io::Error>> + Send>>;

impl tower_service::Service<Name> for Resolver {
    type Response = GaiAddrs;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        match self {
            Resolver::System(gai) => Box::pin(gai.call(name)),
            #[cfg(test)]
            Resolver::Stalled => Box::pin(std::future::pending()),
        }
    }
}

/// The upstream client: a TCP connector, TLS for HTTPS origins, and this client's share of the
/// per-thread pool.
#[derive(Clone)]
pub struct UpstreamClient {
    connector: HttpConnector<Resolver>,
    tls: tokio_rustls::TlsConnector,
    /// Bounds name resolution and the TCP connect together (the connect's share is split among
    /// the addresses tried) and, for HTTPS origins, the TLS handshake after them: a resolver or
    /// a provider that says nothing fails the request instead of holding it until the response
    /// timeout.
    connect_timeout: Duration,
    pool: PoolSettings,
    open: Arc<OpenConnections>,
}

/// Provider connections in use at once (a request writing to one or reading its response),
/// and the most allowed. The connection limit budgets one provider connection per client
/// connection; HTTP/2 lets one client connection ask for hundreds at once, so past the cap a
/// request is refused at once instead of failing on `EMFILE` together with the listener, Redis
/// and the Kubernetes client. Idle pooled connections are not counted: each pool is a thread's
/// own, so another thread's idle connections cannot serve a request here.
#[derive(Debug)]
struct OpenConnections {
    open: AtomicUsize,
    max: usize,
}

impl OpenConnections {
    fn take(self: &Arc<Self>) -> Option<ConnSlot> {
        self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1)).ok()?;
        Some(ConnSlot(self.clone()))
    }
}

/// One provider connection counted as in use, until it goes idle or is dropped.
#[derive(Debug)]
pub(super) struct ConnSlot(Arc<OpenConnections>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient").field("pool", &self.pool).finish_non_exhaustive()
    }
}

pub fn build_client(extra_ca: Option<&Path>, connect_timeout: Duration) -> anyhow::Result<UpstreamClient> {
    let mut http = HttpConnector::new_with_resolver(Resolver::System(GaiResolver::new()));
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls_config(extra_ca)?));
    let pool = PoolSettings {
        client: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
        idle_timeout: IDLE_TIMEOUT,
        max_idle: MAX_IDLE_PER_ORIGIN,
    };
    let open = Arc::new(OpenConnections { open: AtomicUsize::new(0), max: usize::MAX });
    Ok(UpstreamClient { connector: http, tls, connect_timeout, pool, open })
}

impl UpstreamClient {
    /// At most `max` provider connections open at once (see [`OpenConnections`]).
    pub fn with_max_open(mut self, max: usize) -> Self {
        self.open = Arc::new(OpenConnections { open: AtomicUsize::new(0), max: max.max(1) });
        self
    }

    /// Provider connections in use now.
    pub fn open_connections(&self) -> usize {
        self.open.open.load(Ordering::Acquire)
    }

    /// Writes a request whose head is already encoded ([`h1::encode_fields`]; it ends with the
    /// `Content-Length` of `body`) to `origin`, on a pooled connection when one is alive. A
    /// request that a pooled connection refused before writing any of it is written again on the
    /// next connection; one already written is never repeated. Once this returns, head and body
    /// are no longer needed: [`Sent::response`] waits for the provider's answer.
    ///
    /// `now` is a clock reading the caller has just taken (it decides whether an idle connection
    /// has outlived the idle timeout).
    ///
    /// `writing` is set while a write to the provider may have put bytes on the wire (and left
    /// unset when none did: at the cap, a failed connect, a write refused before any byte): the
    /// caller learns whether the provider may have the request even when this fails or its
    /// deadline drops it.
    pub async fn write_encoded(
        &self,
        origin: &Origin,
        head: &[u8],
        body: &[u8],
        now: std::time::Instant,
        writing: &AtomicBool,
    ) -> Result<Sent, UpstreamError> {
        // The caller's reading serves the first checkout; a retry comes after awaits.
        let mut now = Some(now);
        let slot = loop {
            // Taken before any connection: at the cap nothing is checked out (or closed). A
            // connection dropped below takes its slot with it.
            let slot = self.open.take().ok_or(UpstreamError::Busy)?;
            let now = now.take().unwrap_or_else(std::time::Instant::now);
            let Some(mut lease) = pool::checkout(&self.pool, origin, now) else { break slot };
            lease.hold(slot);
            let Some(lease) = lease.revalidate().await else { continue };
            writing.store(true, Ordering::Relaxed);
            match lease.write(head, body).await {
                Ok(written) => return Ok(Sent(written)),
                Err(failure) if failure.unsent => writing.store(false, Ordering::Relaxed),
                Err(failure) => return Err(failure.error.into()),
            }
        };
        // Boxed: a TLS handshake's future is large, and every request's future would otherwise
        // make room for it (and be copied with it) although most requests reuse a connection.
        let lease = Box::pin(self.connect(origin, slot)).await?;
        writing.store(true, Ordering::Relaxed);
        lease.write(head, body).await.map(Sent).map_err(|failure| {
            if failure.unsent {
                writing.store(false, Ordering::Relaxed);
            }
            failure.error.into()
        })
    }

    async fn connect(&self, origin: &Origin, slot: ConnSlot) -> Result<Lease, UpstreamError> {
        use tower_service::Service as _;
        let uri = origin.connect_uri().map_err(|e| UpstreamError::Connect(e.into()))?;
        // The connector splits the connect timeout among the addresses it tries; this one also
        // bounds the resolution before them (a quiet DNS server would otherwise hold the request
        // for the resolver's own retries, or until the response timeout).
        let tcp = match tokio::time::timeout(self.connect_timeout, self.connector.clone().call(uri)).await {
            Ok(connected) => connected.map_err(|e| UpstreamError::Connect(e.into()))?.into_inner(),
            Err(_) => {
                return Err(UpstreamError::Connect("resolving the provider's name and connecting timed out".into()))
            }
        };
        let io = if origin.https {
            let host = origin.authority.host().trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(host.to_owned()).map_err(|e| UpstreamError::Connect(e.into()))?;
            let tls = match tokio::time::timeout(self.connect_timeout, self.tls.connect(name, tcp)).await {
                Ok(handshake) => handshake.map_err(|e| UpstreamError::Connect(e.into()))?,
                Err(_) => return Err(UpstreamError::Connect("the TLS handshake timed out".into())),
            };
            h1::Io::Tls(Box::new(tls))
        } else {
            h1::Io::Plain(tcp)
        };
        Ok(Lease::new(io, origin.clone(), self.pool.clone(), slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::AtomicUsize;

    use http::{Method, Request, Response};

    use crate::fields::HeaderFields as _;
    use http_body::Body as _;
    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    impl UpstreamClient {
        /// Sends `request` (origin-form URI, `Host` set): the tests' way in; the gateway itself
        /// encodes its requests in `forward::build` and calls [`Self::write_encoded`].
        pub async fn send(
            &self,
            origin: &Origin,
            request: Request<Full<Bytes>>,
        ) -> Result<Response<UpstreamBody>, UpstreamError> {
            let (parts, mut body) = request.into_parts();
            // A `Full` body is one frame, ready at once.
            let body = match body.frame().await {
                Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
                Some(Err(never)) => match never {},
                None => Bytes::new(),
            };
            let target = parts.uri.path_and_query().map_or("/", |target| target.as_str());
            // Holds the credential: zeroized when dropped, whatever happens below.
            let head = h1::encode_head(&parts.method, target, &parts.headers, body.len())?;
            let head_request = parts.method == Method::HEAD;
            let writing = AtomicBool::new(false);
            let sent = self.write_encoded(origin, &head, &body, std::time::Instant::now(), &writing).await?;
            let provided = sent.response(head_request).await?;
            // The tests read the fields from a map.
            let mut response = Response::new(provided.body);
            *response.status_mut() = provided.status;
            for (name, value) in provided.fields.each() {
                let name = http::HeaderName::from_bytes(name).expect("httparse checked the name");
                let value = HeaderValue::from_bytes(value).expect("httparse checked the value");
                response.headers_mut().append(name, value);
            }
            Ok(response)
        }
    }

    fn request(endpoint: &Endpoint, path: &str) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(Bytes::from_static(b"{}")));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = Uri::try_from(path).expect("path");
        request.headers_mut().insert(http::header::HOST, endpoint.host.clone());
        request
    }

    /// A hyper server that counts connections; `/stream` sends one chunk and then stalls.
    async fn counting_server() -> (Endpoint, Arc<AtomicUsize>) {
        use futures_util::StreamExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let body = if req.uri().path() == "/stream" {
                        let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                            http_body::Frame::data(Bytes::from_static(b"data: 1\n\n")),
                        )]);
                        http_body_util::StreamBody::new(first.chain(futures_util::stream::pending())).boxed_unsync()
                    } else {
                        Full::new(Bytes::from_static(b"hello")).boxed_unsync()
                    };
                    Ok::<_, std::convert::Infallible>(Response::new(body))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        (Endpoint::parse(&format!("http://{addr}")).expect("endpoint"), accepted)
    }

    #[tokio::test]
    async fn a_connection_is_reused_only_after_its_response_was_read_to_the_end() {
        let (endpoint, accepted) = counting_server().await;
        let client = build_client(None, Duration::from_secs(5)).expect("client");
        for _ in 0..3 {
            let response = client.send(&endpoint.origin, request(&endpoint, "/json")).await.expect("response");
            let body = response.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(body, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "keep-alive reuse");

        // A stream abandoned mid-way closes its connection instead of returning it.
        let response = client.send(&endpoint.origin, request(&endpoint, "/stream")).await.expect("response");
        let mut body = response.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "data: 1\n\n");
        drop(body);
        let response = client.send(&endpoint.origin, request(&endpoint, "/json")).await.expect("response");
        assert_eq!(response.into_body().collect().await.expect("body").to_bytes(), "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

    /// Sends one request that must fail as a connect error once [`CONNECT_TIMEOUT`] has passed,
    /// long before the response timeout (the test gives up at 10 s).
    async fn fails_to_connect_in_time(client: &UpstreamClient, endpoint: &Endpoint) -> UpstreamError {
        let started = std::time::Instant::now();
        let outcome =
            tokio::time::timeout(Duration::from_secs(10), client.send(&endpoint.origin, request(endpoint, "/x")))
                .await
                .expect("the connect timeout must apply, not the response timeout");
        let error = outcome.expect_err("nothing to connect to");
        assert!(error.is_connect(), "{error}");
        assert!(started.elapsed() >= CONNECT_TIMEOUT, "{:?}", started.elapsed());
        error
    }

    #[tokio::test]
    async fn a_provider_that_accepts_and_never_answers_the_tls_handshake_fails_within_the_connect_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let endpoint = Endpoint::parse(&format!("https://{addr}")).expect("endpoint");
        let client = build_client(None, CONNECT_TIMEOUT).expect("client");
        let error = fails_to_connect_in_time(&client, &endpoint).await;
        assert!(error.to_string().contains("TLS handshake timed out"), "{error}");
        held.abort();
    }

    #[tokio::test]
    async fn a_resolver_that_never_answers_fails_within_the_connect_timeout() {
        let endpoint = Endpoint::parse("http://provider.invalid:8080").expect("endpoint");
        let mut client = build_client(None, CONNECT_TIMEOUT).expect("client");
        client.connector = HttpConnector::new_with_resolver(Resolver::Stalled);
        let error = fails_to_connect_in_time(&client, &endpoint).await;
        assert!(error.to_string().contains("timed out"), "{error}");
        assert_eq!(client.open_connections(), 0, "the slot is given back");
    }

    /// A provider (or its front end) that answers after the head, without reading a large body:
    /// the client gets its answer, not a failed write, whether the provider waits or closes (and
    /// the write meets its reset); the connection is not used again.
    #[tokio::test]
    async fn a_provider_answering_before_it_read_the_body_is_heard() {
        const ANSWER: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 5\r\n\r\nlarge";
        for closes in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let endpoint =
                Endpoint::parse(&format!("http://{}", listener.local_addr().expect("addr"))).expect("endpoint");
            let accepted = Arc::new(AtomicUsize::new(0));
            let counter = accepted.clone();
            let server = tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let mut seen = Vec::new();
                        let mut buf = [0u8; 4096];
                        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                        let _ = stream.write_all(ANSWER).await;
                        if closes {
                            // Unread bytes in the socket: the close sends a reset.
                            drop(stream);
                        } else {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                    });
                }
            });
            let client = build_client(None, Duration::from_secs(5)).expect("client");
            for (round, size) in [(1, 64 << 20), (2, 2)] {
                let mut sent = request(&endpoint, "/v1/files");
                *sent.body_mut() = Full::new(Bytes::from(vec![b'x'; size]));
                let response = tokio::time::timeout(Duration::from_secs(20), client.send(&endpoint.origin, sent))
                    .await
                    .unwrap_or_else(|_| panic!("closes={closes}, round {round}: the answer must not wait"))
                    .unwrap_or_else(|e| panic!("closes={closes}, round {round}: {e}"));
                assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "closes={closes}");
                let body = response.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(&body[..], b"large");
                // The second request needs a connection of its own: the first is not reused.
                assert_eq!(accepted.load(Ordering::SeqCst), round, "closes={closes}");
            }
            server.abort();
        }
    }

    /// A `100 Continue` the provider sends unasked while the body is still going out is not its
    /// answer: the rest of the body follows, and the final response after it.
    #[tokio::test]
    async fn an_unasked_continue_during_a_large_body_is_not_an_answer() {
        const BODY: usize = 32 << 20;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = Endpoint::parse(&format!("http://{}", listener.local_addr().expect("addr"))).expect("endpoint");
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut continued = false;
            loop {
                let n = stream.read(&mut buf).await.expect("read");
                assert!(n > 0, "the whole request comes");
                seen.extend_from_slice(&buf[..n]);
                let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                if !continued {
                    stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.expect("interim");
                    continued = true;
                }
                if seen.len() - end - 4 == BODY {
                    break;
                }
            }
            stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.expect("answer");
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let client = build_client(None, Duration::from_secs(5)).expect("client");
        let mut sent = request(&endpoint, "/v1/files");
        *sent.body_mut() = Full::new(Bytes::from(vec![b'x'; BODY]));
        let response = tokio::time::timeout(Duration::from_secs(20), client.send(&endpoint.origin, sent))
            .await
            .expect("the body must go out whole")
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(&response.into_body().collect().await.expect("body").to_bytes()[..], b"ok");
        server.abort();
    }

    #[tokio::test]
    async fn an_idle_connection_the_provider_closed_is_replaced() {
        // Answers one request per connection with keep-alive, then closes the socket anyway.
        let (endpoint, accepted) =
            scripted_server(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"[..], Then::Close).await;
        let client = build_client(None, Duration::from_secs(5)).expect("client");
        for round in 1..=3 {
            let response = client.send(&endpoint.origin, request(&endpoint, "/json")).await.expect("response");
            assert_eq!(response.into_body().collect().await.expect("body").to_bytes(), "hello");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    }

    /// Provider connections in use are capped: at the cap a request is refused at once; one
    /// that goes idle or is closed frees its place, and an idle one serves the next request.
    #[tokio::test]
    async fn provider_connections_past_the_cap_are_refused_and_a_closed_one_frees_its_place() {
        let (endpoint, accepted) =
            scripted_server(&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"[..], Then::KeepOpen).await;
        let client = build_client(None, Duration::from_secs(5)).expect("client").with_max_open(1);
        // One response held unread: its connection is in use.
        let held = client.send(&endpoint.origin, request(&endpoint, "/json")).await.expect("response");
        assert_eq!(client.open_connections(), 1);
        let refused = client.send(&endpoint.origin, request(&endpoint, "/json")).await.expect_err("at the cap");
        assert!(matches!(refused, UpstreamError::Busy), "{refused}");
        // Read in full, it goes back to the pool, no longer in use, and serves the next request.
        assert_eq!(held.into_body().collect().await.expect("body").to_bytes(), "hello");
        assert_eq!(client.open_connections(), 0);
        let again = client.send(&endpoint.origin, request(&endpoint, "/json")).await.expect("pooled");
        assert_eq!(client.open_connections(), 1);
        assert_eq!(again.into_body().collect().await.expect("body").to_bytes(), "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(client.open_connections(), 0);
        // A response dropped unread closes its connection: the place is free again.
        let dropped = client.send(&endpoint.origin, request(&endpoint, "/json")).await.expect("pooled");
        drop(dropped);
        assert_eq!(client.open_connections(), 0);
        let fresh = client.send(&endpoint.origin, request(&endpoint, "/json")).await.expect("a new connection");
        assert_eq!(fresh.into_body().collect().await.expect("body").to_bytes(), "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// What a scripted provider does after each response.
    #[derive(Clone, Copy)]
    enum Then {
        KeepOpen,
        Close,
        /// Sends bytes nobody asked for a little later.
        SendJunk,
    }

    /// A provider that answers every request (`{}` bodies) with `reply` verbatim, counting
    /// connections.
    async fn scripted_server(reply: impl Into<Bytes>, then: Then) -> (Endpoint, Arc<AtomicUsize>) {
        let reply: Bytes = reply.into();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let reply = reply.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        while !seen.ends_with(b"\r\n\r\n{}") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                        seen.clear();
                        if stream.write_all(&reply).await.is_err() {
                            return;
                        }
                        match then {
                            Then::KeepOpen => {}
                            Then::Close => return,
                            Then::SendJunk => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                let _ = stream.write_all(b"junk").await;
                            }
                        }
                    }
                });
            }
        });
        (Endpoint::parse(&format!("http://{addr}")).expect("endpoint"), accepted)
    }

    async fn exchange(client: &UpstreamClient, endpoint: &Endpoint) -> Result<(Response<()>, Bytes), String> {
        let response = client.send(&endpoint.origin, request(endpoint, "/x")).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((Response::from_parts(parts, ()), body))
    }

    /// Two exchanges with `reply`; how many connections they took.
    async fn connections_for_two(reply: &'static [u8], then: Then, body: &str) -> usize {
        let (endpoint, accepted) = scripted_server(reply, then).await;
        let client = build_client(None, Duration::from_secs(5)).expect("client");
        for _ in 0..2 {
            let (_, got) = exchange(&client, &endpoint).await.expect("exchange");
            assert_eq!(got, body);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        accepted.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn only_cleanly_framed_responses_leave_their_connection_reusable() {
        let plain: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        // Reply, what the server does next, the body read, connections two exchanges take.
        let cases: [(&'static [u8], Then, &str, usize); 9] = [
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", Then::KeepOpen, "hello", 1),
            (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello", Then::KeepOpen, "hello", 2),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                Then::KeepOpen,
                "hello",
                2,
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloEXTRA", Then::KeepOpen, "hello", 2),
            (b"HTTP/1.1 200 OK\r\n\r\nhello, until close", Then::Close, "hello, until close", 2),
            (b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n", Then::KeepOpen, "", 1),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                Then::KeepOpen,
                "ok",
                1,
            ),
            // An idle connection that received bytes nobody asked for is discarded at checkout.
            (plain, Then::SendJunk, "hello", 2),
            (plain, Then::KeepOpen, "hello", 1),
        ];
        for (reply, then, body, connections) in cases {
            let got = connections_for_two(reply, then, body).await;
            assert_eq!(got, connections, "{:?}", String::from_utf8_lossy(reply));
        }
    }

    #[tokio::test]
    async fn responses_are_built_from_the_head_and_bodiless_ones_end_at_once() {
        let reply = b"HTTP/1.1 404 Not Found\r\nx-request-id: r1\r\nset-cookie: a\r\nset-cookie: b\r\ncontent-length: 2\r\n\r\nno";
        let (endpoint, _) = scripted_server(&reply[..], Then::KeepOpen).await;
        let client = build_client(None, Duration::from_secs(5)).expect("client");
        let (response, body) = exchange(&client, &endpoint).await.expect("exchange");
        assert_eq!(response.status(), 404);
        assert_eq!(response.version(), http::Version::HTTP_11);
        assert_eq!(response.headers()["x-request-id"], "r1");
        assert_eq!(response.headers().get_all("set-cookie").iter().count(), 2);
        assert_eq!(body, "no");

        let (endpoint, _) = scripted_server(&b"HTTP/1.1 204 No Content\r\n\r\n"[..], Then::KeepOpen).await;
        let response = client.send(&endpoint.origin, request(&endpoint, "/x")).await.expect("response");
        assert!(response.body().is_end_stream());
        assert_eq!(response.body().size_hint().exact(), Some(0));
    }

    #[tokio::test]
    async fn truncated_and_malformed_responses_are_errors() {
        let client = build_client(None, Duration::from_secs(5)).expect("client");
        let cases: [(&[u8], &str); 5] = [
            (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello", "connection closed before the response body ended"),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                "connection closed before the response body ended",
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nhello", "invalid content-length"),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected 101 Switching Protocols"),
            (b"HTTP/1.1 200 OK\r\ncontent-le", "connection closed before the response head"),
        ];
        for (reply, expected) in cases {
            let (endpoint, _) = scripted_server(reply, Then::Close).await;
            let error = exchange(&client, &endpoint).await.expect_err("an error");
            assert!(error.contains(expected), "{error}");
        }

        let mut big = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        big.resize(70 * 1024, b'a');
        big.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        let (endpoint, _) = scripted_server(big, Then::KeepOpen).await;
        let error = exchange(&client, &endpoint).await.expect_err("refused");
        assert!(error.contains("response head too large"), "{error}");
    }

    #[tokio::test]
    async fn buffered_chunks_come_out_without_waiting_and_the_end_is_seen_with_the_last() {
        let reply =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n";
        let (endpoint, accepted) = scripted_server(&reply[..], Then::KeepOpen).await;
        let client = build_client(None, Duration::from_secs(5)).expect("client");
        let response = client.send(&endpoint.origin, request(&endpoint, "/x")).await.expect("response");
        let mut body = std::pin::pin!(response.into_body());
        // Wait until the whole reply is buffered behind the first frame.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let first = body.frame().await.expect("frame").expect("data").into_data().expect("data");
        assert_eq!(first, "data: 1\n\n");
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match body.as_mut().poll_frame(&mut cx) {
            std::task::Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.into_data().expect("data"), "data: 2\n\n"),
            other => panic!("not ready at once: {other:?}"),
        }
        assert!(body.is_end_stream(), "the last chunk was buffered with the data");
        exchange(&client, &endpoint).await.expect("exchange");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "released with its last data");
    }

    #[test]
    fn endpoints_are_parsed_once_into_origin_host_and_paths() {
        let e = Endpoint::parse("https://api.openai.com/v1").expect("endpoint");
        assert!(e.origin.https);
        assert_eq!(e.host, "api.openai.com");
        assert_eq!(e.path(ApiRoute::ChatCompletions, None).expect("path"), "/v1/chat/completions");
        assert_eq!(e.path(ApiRoute::Embeddings, Some("a=1")).expect("path"), "/v1/embeddings?a=1");

        let e = Endpoint::parse("http://127.0.0.1:8000").expect("endpoint");
        assert!(!e.origin.https);
        assert_eq!(e.host, "127.0.0.1:8000");
        assert_eq!(e.path(ApiRoute::Messages, None).expect("path"), "/messages");
        assert_eq!(
            e.azure_path(ApiRoute::ChatCompletions, "d1", "2024-06-01").expect("path"),
            "/deployments/d1/chat/completions?api-version=2024-06-01"
        );
        assert_eq!(Endpoint::parse("https://example.com:443/x").expect("endpoint").host, "example.com");
        let a = Endpoint::parse("https://API.example.com/v1").expect("endpoint").origin;
        let b = Endpoint::parse("https://api.example.com/v2").expect("endpoint").origin;
        let http = Endpoint::parse("http://api.example.com/v1").expect("endpoint").origin;
        assert_eq!(a, b, "one pool for one scheme and host");
        assert_ne!(a, http);
        assert!(Endpoint::parse("ftp://example.com").is_none());
        assert!(Endpoint::parse("").is_none());
    }
}
