//! The request pipeline. Each phase is one module and returns `Result<_, GatewayError>`:
//!
//! ```text
//!  classify ─▶ lockout ─▶ authenticate ─▶ kill switch ─▶ read body ─▶ route ─▶ limit ─▶ forward ─▶ meter
//!   (api)      (limits)   (authenticate)  (kill_switch)    (api)      (route)  (limit)  (forward)  (meter, usage)
//! ```
//!
//! The snapshot is loaded once at the start and held to the end of the response, streams
//! included. Errors become responses in exactly one place, `GatewayError::into_response`.

pub mod authenticate;
pub mod body_budget;
pub mod forward;
pub mod kill_switch;
pub mod limit;
pub mod meter;
pub mod models;
pub mod rewrite;
pub mod route;
pub mod usage;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::BodyExt;
use portcullis_crds::v1alpha1::ProviderKind;
use smallvec::SmallVec;

use crate::api::{self, ApiFlavor, ApiRoute, RequestHead, REQUEST_ID_HEADER};
use crate::body::GatewayBody;
use crate::error::GatewayError;
use crate::fields::{HeaderFields, ResponseFields};
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::snapshot::{ModelRoute, SnapshotHandle};
use crate::upstream::{self, UpstreamClient};
use body_budget::{BodyBudget, BodyShare};
use meter::{AccessRecord, BudgetGuard, MeteredBody, ProviderBody, StreamGuard, UsageReader};
use usage::{JsonTail, SseScanner};

/// Past the limit, up to this much more is read and thrown away so the client, still sending,
/// can read the 413 instead of seeing its connection reset (nginx's "lingering close").
const DISCARD_AFTER_LIMIT: usize = 64 * 1024 * 1024;

/// Reads a request body of at most `limit` bytes, holding its share of `budget` as it arrives. A
/// longer one is drained (bounded by `DISCARD_AFTER_LIMIT`) and refused; one whose declared
/// length does not fit the budget now is refused unread, and any that outgrows it while arriving
/// is refused then. Nothing is held for bytes not received: a client declaring a large body and
/// sending nothing holds none of the budget while the body timeout runs.
async fn read_bounded<B>(body: B, limit: usize, budget: &BodyBudget) -> Result<(Bytes, BodyShare<'_>), GatewayError>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let too_large = GatewayError::RequestTooLarge { limit };
    let mut share = budget.empty();
    if let Some(declared) = body.size_hint().exact() {
        if declared > (limit + DISCARD_AFTER_LIMIT) as u64 {
            return Err(too_large);
        }
        // A declared body over the limit is drained, not held: it is not weighed.
        if declared <= limit as u64 && !budget.fits(declared as usize) {
            return Err(GatewayError::Overloaded);
        }
    }
    let mut body = std::pin::pin!(body);
    // A body that arrives in one frame (most do) is kept as it came, without a copy.
    let mut single: Option<Bytes> = None;
    let mut collected = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| GatewayError::InvalidRequest("The request body could not be read.".to_owned()))?;
        let Ok(data) = frame.into_data() else { continue };
        seen = seen.saturating_add(data.len());
        if seen > limit + DISCARD_AFTER_LIMIT {
            break;
        }
        if seen <= limit {
            // The share grows with what is held.
            if !share.grow(seen - share.bytes()) {
                return Err(GatewayError::Overloaded);
            }
            match single.take() {
                None if collected.is_empty() => single = Some(data),
                earlier => {
                    if let Some(earlier) = earlier {
                        collected.extend_from_slice(&earlier);
                    }
                    collected.extend_from_slice(&data);
                }
            }
        }
    }
    if seen > limit {
        return Err(too_large);
    }
    Ok((single.unwrap_or_else(|| collected.freeze()), share))
}

/// Limits and timeouts applied to every request.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub max_request_body_bytes: usize,
    /// Request bodies held at once, across every connection and stream.
    pub body_budget: Arc<BodyBudget>,
    pub request_body_timeout: Duration,
    pub upstream_response_timeout: Duration,
    pub upstream_idle_timeout: Duration,
}

#[derive(Debug)]
pub struct Gateway {
    snapshot: Arc<SnapshotHandle>,
    metrics: Arc<Metrics>,
    client: UpstreamClient,
    limiter: Arc<Limiter>,
    settings: PipelineSettings,
}

type Failure = (ApiFlavor, GatewayError);

/// A client request as the pipeline takes it: the request line, the header fields as the server
/// holds them (hyper's `HeaderMap` for HTTP/2, the raw head for HTTP/1.1), and the body.
pub struct ClientRequest<H, B> {
    pub method: Method,
    pub uri: Uri,
    pub headers: H,
    pub body: B,
}

/// The request line only: header values can be credentials.
impl<H, B> std::fmt::Debug for ClientRequest<H, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRequest")
            .field("method", &self.method)
            .field("path", &self.uri.path())
            .finish_non_exhaustive()
    }
}

impl<B> From<Request<B>> for ClientRequest<HeaderMap, B> {
    fn from(request: Request<B>) -> Self {
        let (parts, body) = request.into_parts();
        ClientRequest { method: parts.method, uri: parts.uri, headers: parts.headers, body }
    }
}

/// What [`Gateway::handle`] answers: the response and, for a forwarded one, beside its (then
/// empty) header map, the provider's fields to pass on and, when the key has per-minute limits,
/// its `x-ratelimit-*` headers (see [`forward::PassedFields`], [`limit::RateHeaders`]; a 429
/// carries its own in the map). The HTTP/1.1 server writes them straight into the response head.
#[derive(Debug)]
pub struct Reply {
    pub response: Response<GatewayBody>,
    pub passed: Option<forward::PassedFields>,
    pub rate: Option<limit::RateHeaders>,
}

impl Reply {
    /// A response made by the gateway, all in its header map (errors, the model list, refusals).
    pub fn plain(response: Response<GatewayBody>) -> Self {
        Reply { response, passed: None, rate: None }
    }

    /// The response with everything in its header map, for a server that does not encode the
    /// fields beside it itself (HTTP/2): the passed fields first, then rate limits replacing
    /// any of the provider's; the map grown once, to hold them all. Values that change from one
    /// response to the next are marked to be sent never indexed ([`never_index_varying`]).
    pub fn into_response(self) -> Response<GatewayBody> {
        let mut response = self.response;
        let headers = response.headers_mut();
        let passed = self.passed.as_ref().map_or(0, forward::PassedFields::max_len);
        headers.reserve(passed + self.rate.map_or(0, |rate| rate.count()));
        if let Some(passed) = self.passed {
            passed.append_to(headers);
        }
        if let Some(rate) = self.rate {
            rate.insert_into(headers);
        }
        never_index_varying(headers);
        response
    }
}

/// Marks the values of fields that change with every response (request ids, timings, what is
/// left of a rate limit and when it resets: [`forward::varies_per_response`]) sensitive, which
/// HPACK (HTTP/2's header compression) sends as literals never indexed. Entering a value no
/// later response repeats in the connection's dynamic table only churns it: each one evicts
/// entries later responses could reuse, and h2's encoder first compares it with every earlier
/// value of the same name still there (with the insertions, 7 % of the HTTP/2 server's CPU at
/// c=32 in the bench, `bench/PROFILE.md`). nginx indexes no response field at all. Fields whose
/// value repeats (`content-type`, the limits themselves) stay indexable.
fn never_index_varying(headers: &mut HeaderMap) {
    for (name, value) in headers.iter_mut() {
        if forward::varies_per_response(name.as_str().as_bytes()) {
            value.set_sensitive(true);
        }
    }
}

/// A provider's answer (or the mock's), before metering.
struct Provided {
    status: http::StatusCode,
    fields: ResponseFields,
    body: ProviderBody,
}

/// Where a request stands once it left the gateway.
enum Dispatched {
    /// The mock provider answered at once.
    Answered(Provided),
    /// Written to a provider, its answer to come.
    Written(upstream::Sent),
}

/// One step of an exchange with a provider, as the client will hear of it: a timeout, or a
/// failure (logged without content: the error carries none).
fn upstream_outcome<T>(
    chosen: &ModelRoute,
    outcome: Result<Result<T, upstream::UpstreamError>, tokio::time::error::Elapsed>,
) -> Result<T, GatewayError> {
    match outcome {
        Err(_) => Err(GatewayError::UpstreamTimeout),
        // Not the provider's doing, and possibly a flood: counted (`gateway_overloaded`), not logged.
        Ok(Err(upstream::UpstreamError::Busy)) => Err(GatewayError::UpstreamBusy),
        Ok(Err(e)) => {
            tracing::warn!(provider = %chosen.upstream.label, error = %e, connect = e.is_connect(), "upstream request failed");
            Err(GatewayError::UpstreamUnavailable)
        }
        Ok(Ok(value)) => Ok(value),
    }
}

impl Gateway {
    pub fn new(
        snapshot: Arc<SnapshotHandle>,
        metrics: Arc<Metrics>,
        client: UpstreamClient,
        limiter: Arc<Limiter>,
        settings: PipelineSettings,
    ) -> Self {
        Self { snapshot, metrics, client, limiter, settings }
    }

    /// Serves one request. Never fails: every error is a response in the route's format.
    pub async fn handle<H, B>(&self, request: ClientRequest<H, B>, peer: Option<SocketAddr>) -> Reply
    where
        H: HeaderFields + Send + Sync,
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        let request_id = api::request_id(&request.headers);
        let mut record = AccessRecord::new(self.metrics.clone(), started, request_id);
        match self.serve(request, peer, &mut record).await {
            Ok(reply) => reply,
            // Errors come before the record is handed to a response body: it holds the id.
            Err((flavor, error)) => {
                let response = error.clone().into_response(flavor, &record.request_id);
                record.status = response.status().as_u16();
                record.finish(error.shape().code);
                Reply::plain(response)
            }
        }
    }

    async fn serve<H, B>(
        &self,
        request: ClientRequest<H, B>,
        peer: Option<SocketAddr>,
        record: &mut AccessRecord,
    ) -> Result<Reply, Failure>
    where
        H: HeaderFields + Send + Sync,
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let ClientRequest { method, uri, headers, body } = request;
        let route = ApiRoute::classify(&method, uri.path())?;
        record.route = Some(route);
        let flavor = route.flavor();
        let fail = |error: GatewayError| (flavor, error);
        // Snapshots applied from here on: a kill switch engaged while the request waits (for its
        // body, for the provider) reaches it.
        let mut changes = self.snapshot.subscribe();
        let snapshot = self.snapshot.load().ok_or(fail(GatewayError::NotReady))?;
        // One wall-clock reading for the key's expiry, the kill switches, routing and the
        // limiter's windows.
        let (now, now_ms) = wall_clock(&self.limiter);

        // A locked-out address is refused before its key is even looked up.
        let client = self.limiter.client_address(peer.map(|p| p.ip()), &headers);
        if let Some(retry_after_ms) = client.and_then(|ip| self.limiter.locked_locally(ip)) {
            return Err(fail(GatewayError::LockedOut { retry_after_ms }));
        }
        let grant = match authenticate::authenticate(&snapshot, &headers, now) {
            Ok(grant) => grant,
            Err(GatewayError::InvalidApiKey) => {
                if let Some(ip) = client {
                    // Boxed: a rare path whose future (a shared-store round trip) would otherwise
                    // make every request's future larger.
                    Box::pin(self.limiter.auth_failed(ip)).await;
                }
                return Err(fail(GatewayError::InvalidApiKey));
            }
            Err(other) => return Err(fail(other)),
        };
        record.key = Some(grant.policy.clone());
        kill_switch::check_caller(&snapshot, &grant.policy, now).map_err(fail)?;

        if route == ApiRoute::Models {
            let mut response = models::list(&snapshot, &grant.policy, &headers);
            response.headers_mut().insert(REQUEST_ID_HEADER, record.request_id.clone());
            record.status = 200;
            record.hand_off().finish("ok");
            return Ok(Reply::plain(response));
        }

        // The body and its share of the budget are held until the request is written.
        let (body, mut share, waited) = self.read_body(body).await.map_err(fail)?;
        // A body that took its time to arrive is checked and admitted at the time it is
        // complete: a kill switch set meanwhile applies.
        let (now, now_ms) = if waited {
            record.admitted_at = Instant::now();
            wall_clock(&self.limiter)
        } else {
            (now, now_ms)
        };
        let head = RequestHead::parse(&body).map_err(fail)?;
        let model = head.model().map_err(fail)?;
        record.streaming = head.streaming();
        kill_switch::check_model(&snapshot, &grant.policy, model, now).map_err(fail)?;

        let chosen = route::choose(&snapshot, &grant.policy, route, model, now).map_err(fail)?;
        record.chosen = Some(chosen.clone());
        // A snapshot applied since the request began (while its body came, most often): a kill
        // switch it engaged over this request applies now, before anything is spent or sent.
        if changes.has_changed().unwrap_or(false) {
            let current = self.snapshot.load();
            let stop =
                current.and_then(|current| kill_switch::stream_must_stop(&current, &grant.policy, chosen, model, now));
            if let Some(stop) = stop {
                return Err(fail(stop));
            }
        }

        // A body rewritten for the provider is a second copy, held beside the client's until the
        // request is written: it takes its share now, as much as the rewrite can come to, so
        // that a refusal comes before anything is spent.
        let body_changes = forward::body_changes(route, &head, chosen);
        if body_changes.is_some() && !share.grow(body.len() + rewrite::MAX_GROWTH) {
            return Err(fail(GatewayError::Overloaded));
        }
        let (input_estimate, reserve) =
            limit::estimate_tokens(body.len(), &head, self.limiter.settings().default_output_tokens);
        let ticket = match limit::admit_in_process(&self.limiter, grant, reserve, now_ms) {
            Some(decided) => decided,
            // Boxed: the shared store's future would otherwise make every request's larger.
            None => Box::pin(limit::admit_shared(&self.limiter, grant, reserve, client, now_ms)).await,
        }
        .map_err(fail)?;
        record.input_estimate = input_estimate;
        let budget = ticket
            .as_ref()
            .and_then(|t| t.granted.budget_remaining)
            .map(|allowance| BudgetGuard { allowance, input_estimate });
        let guard = head.streaming().then(|| {
            StreamGuard::new(
                self.snapshot.clone(),
                changes.clone(),
                grant.policy.clone(),
                chosen.clone(),
                model.to_owned(),
            )
        });
        if let Some(ticket) = ticket {
            record.ticket = Some((self.limiter.clone(), ticket));
        }

        let outbound =
            forward::build(route, (&uri, &headers), (&body, body_changes), model, chosen, &record.request_id)
                .map_err(fail)?;
        let strip_usage_chunk = outbound.strip_usage_chunk;
        // The response deadline counts from the latest clock reading unless something since
        // may have taken time: the shared limiter's round trip, or rewriting the body (a slow
        // body re-read it already).
        let fresh = self.limiter.is_shared() || outbound.rewrote();
        let sent_at = if fresh { Instant::now() } else { record.admitted_at };
        let deadline = tokio::time::Instant::from_std(sent_at) + self.settings.upstream_response_timeout;
        let writing = std::sync::atomic::AtomicBool::new(false);
        let sent = self.send(route, model, chosen, (outbound, &body), (sent_at, deadline), &writing).await;
        // Whether the provider may have the request, even when sending failed or timed out.
        record.sent = writing.load(std::sync::atomic::Ordering::Relaxed) || matches!(sent, Ok(Dispatched::Answered(_)));
        let sent = sent.map_err(fail)?;
        // Written: the provider may think for minutes, and the body is not needed for that (the
        // model name is kept, inline, for the kill switch watch).
        let watched_model: SmallVec<[u8; 64]> = SmallVec::from_slice(model.as_bytes());
        drop((body, share));
        let provided = match sent {
            Dispatched::Answered(provided) => provided,
            Dispatched::Written(written) => {
                let stop = switched_off(&self.snapshot, &mut changes, &grant.policy, chosen, &watched_model);
                tokio::select! {
                    biased;
                    provided = self.response(chosen, written, deadline) => provided.map_err(fail)?,
                    stop = stop => return Err(fail(stop)),
                }
            }
        };

        Ok(self.metered(provided, strip_usage_chunk, budget, guard, record))
    }

    /// The whole body, its share of the body budget, and whether reading it had to wait.
    async fn read_body<B>(&self, body: B) -> Result<(Bytes, BodyShare<'_>, bool), GatewayError>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let limit = self.settings.max_request_body_bytes;
        let mut reading = std::pin::pin!(read_bounded(body, limit, &self.settings.body_budget));
        // Most bodies are in memory already: the timer (a clock read, a timer entry) is armed
        // only when the first poll has to wait.
        let first = std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx))).await;
        if let Poll::Ready(result) = first {
            return result.map(|(body, share)| (body, share, false));
        }
        match tokio::time::timeout(self.settings.request_body_timeout, reading).await {
            Err(_) => Err(GatewayError::RequestTimeout),
            Ok(result) => result.map(|(body, share)| (body, share, true)),
        }
    }

    /// Writes the request to the provider (or has the mock answer it). Nothing of the request
    /// is needed after this returns.
    async fn send(
        &self,
        route: ApiRoute,
        model: &str,
        chosen: &ModelRoute,
        (outbound, client_body): (forward::Outbound, &Bytes),
        (now, deadline): (Instant, tokio::time::Instant),
        writing: &std::sync::atomic::AtomicBool,
    ) -> Result<Dispatched, GatewayError> {
        if chosen.upstream.kind == ProviderKind::Mock {
            let upstream_model = chosen.upstream_model.as_deref().unwrap_or(model);
            let (parts, body) = crate::mock::respond(route, outbound.body(client_body), upstream_model).into_parts();
            return Ok(Dispatched::Answered(Provided {
                status: parts.status,
                fields: ResponseFields::Map(parts.headers),
                body: ProviderBody::Right(body),
            }));
        }
        let endpoint = chosen.upstream.endpoint.as_ref().ok_or(GatewayError::UpstreamUnavailable)?;
        // Pinned where it is made: the timeout wraps a pointer to it instead of moving (copying)
        // the whole future twice. `now` also serves the idle pool's expiry check.
        let writing = std::pin::pin!(self.client.write_encoded(
            &endpoint.origin,
            &outbound.head,
            outbound.body(client_body),
            now,
            writing
        ));
        let written = upstream_outcome(chosen, tokio::time::timeout_at(deadline, writing).await)?;
        Ok(Dispatched::Written(written))
    }

    /// The provider's response head to a written request, by `deadline`.
    async fn response(
        &self,
        chosen: &ModelRoute,
        written: upstream::Sent,
        deadline: tokio::time::Instant,
    ) -> Result<Provided, GatewayError> {
        let waiting = std::pin::pin!(written.response(false));
        let response = upstream_outcome(chosen, tokio::time::timeout_at(deadline, waiting).await)?;
        Ok(Provided {
            status: response.status,
            fields: ResponseFields::Raw(response.fields),
            body: ProviderBody::Left(response.body),
        })
    }

    fn metered(
        &self,
        provided: Provided,
        strip_usage_chunk: bool,
        budget: Option<BudgetGuard>,
        guard: Option<StreamGuard>,
        record: &mut AccessRecord,
    ) -> Reply {
        let Provided { status, fields, body } = provided;
        let is_sse = fields
            .first("content-type")
            .and_then(|v| v.get(..17))
            .is_some_and(|v| v.eq_ignore_ascii_case(b"text/event-stream"));
        // The server frames the body itself (`Content-Length` is never passed on): dropping an
        // event changes the length.
        let reader = if is_sse {
            UsageReader::Sse(SseScanner::new(strip_usage_chunk))
        } else {
            UsageReader::Json(JsonTail::default())
        };
        let flavor = record.flavor();
        let rate = record.ticket.as_ref().and_then(|(_, ticket)| limit::RateHeaders::for_ticket(ticket, flavor));
        // Only a stream can be cut cleanly; a JSON body is settled after the fact instead.
        let budget = budget.filter(|_| is_sse);
        let guard = guard.filter(|_| is_sse);
        record.status = status.as_u16();
        record.provider_answered = true;
        let outcome = if status.is_success() { "ok" } else { "upstream_error" };
        let passed = forward::PassedFields::new(fields, record.request_id.clone());
        let handed_off = record.hand_off();
        let body =
            MeteredBody::new(body, reader, handed_off, outcome, self.settings.upstream_idle_timeout, budget, guard);
        let mut response = Response::new(http_body_util::BodyExt::boxed_unsync(body));
        *response.status_mut() = status;
        Reply { response, passed: Some(passed), rate }
    }
}

/// Ready with the kill switch that stops a request waiting on its provider, once a snapshot
/// engaging one over it is applied; never ready otherwise. Dropping the wait then drops the
/// provider connection.
async fn switched_off(
    handle: &SnapshotHandle,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    key: &portcullis_crds::snapshot::ApiKeyEntry,
    route: &crate::snapshot::ModelRoute,
    model: &[u8],
) -> GatewayError {
    loop {
        if changes.changed().await.is_err() {
            // The handle is gone: no snapshot will come.
            return std::future::pending().await;
        }
        // Read as text only now: the model was a `str` when copied.
        let model = std::str::from_utf8(model).unwrap_or_default();
        let current = handle.load();
        if let Some(stop) =
            current.and_then(|s| kill_switch::stream_must_stop(&s, key, route, model, chrono::Utc::now()))
        {
            return stop;
        }
    }
}

/// The time from the limiter's clock, as the limiter and as the policy checks read it.
fn wall_clock(limiter: &crate::limits::Limiter) -> (chrono::DateTime<chrono::Utc>, u64) {
    let now_ms = limiter.now_ms();
    let now =
        i64::try_from(now_ms).ok().and_then(chrono::DateTime::from_timestamp_millis).unwrap_or_else(chrono::Utc::now);
    (now, now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::StreamBody;

    fn frames(
        parts: &[&'static [u8]],
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>>> {
        let frames: Vec<_> = parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p)))).collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn bodies_are_read_whole_and_one_frame_is_not_copied() {
        let budget = BodyBudget::new(1024);
        let one = Bytes::from_static(b"{\"model\":\"m\"}");
        let (read, _) = read_bounded(http_body_util::Full::new(one.clone()), 64, &budget).await.expect("read");
        assert_eq!(read.as_ptr(), one.as_ptr());

        let (read, _) = read_bounded(frames(&[b"{\"mo", b"del\":", b"\"m\"}"]), 64, &budget).await.expect("read");
        assert_eq!(read, "{\"model\":\"m\"}");

        let refused = read_bounded(frames(&[b"0123456789", b"0123456789"]), 15, &budget).await;
        assert_eq!(refused.err(), Some(GatewayError::RequestTooLarge { limit: 15 }));
        assert_eq!(budget.held(), 0, "refused and read bodies gave their shares back");
    }

    /// Bodies hold their share of the budget while kept; one that does not fit is refused, before
    /// it is read when its length is declared, and as soon as it outgrows the budget otherwise.
    #[tokio::test]
    async fn bodies_share_one_budget() {
        let budget = BodyBudget::new(30);
        let (first, held) = read_bounded(http_body_util::Full::new(Bytes::from_static(b"0123456789")), 64, &budget)
            .await
            .expect("read");
        assert_eq!((first.len(), held.bytes(), budget.held()), (10, 10, 10));

        // Declared: 25 does not fit beside 10, and nothing of it is read.
        let polled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let declared = {
            let polled = polled.clone();
            let frame = futures_util::stream::once(async move {
                polled.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; 25])))
            });
            StreamBody::new(frame)
        };
        // A body that declares its length: the same frame behind an exact size hint.
        struct Sized<B>(B, u64);
        impl<B: http_body::Body + Unpin> http_body::Body for Sized<B> {
            type Data = B::Data;
            type Error = B::Error;
            fn poll_frame(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
                std::pin::Pin::new(&mut self.0).poll_frame(cx)
            }
            fn size_hint(&self) -> http_body::SizeHint {
                http_body::SizeHint::with_exact(self.1)
            }
        }
        let refused = read_bounded(Sized(Box::pin(declared), 25), 64, &budget).await;
        assert_eq!(refused.err(), Some(GatewayError::Overloaded));
        assert!(!polled.load(std::sync::atomic::Ordering::SeqCst), "refused unread");
        assert_eq!(budget.held(), 10);

        // Undeclared: refused when the second chunk outgrows the budget; the first is given back.
        let refused = read_bounded(frames(&[b"0123456789", b"0123456789", b"0123456789"]), 64, &budget).await;
        assert_eq!(refused.err(), Some(GatewayError::Overloaded));
        assert_eq!(budget.held(), 10);

        // Declared but not arrived: nothing is held for it, and the bodies of others still fit.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let silent = Sized(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)), 20);
        let mut silent = Box::pin(read_bounded(silent, 64, &budget));
        assert!(futures_util::poll!(silent.as_mut()).is_pending());
        assert_eq!(budget.held(), 10, "a silent declared body holds nothing");
        let (other, other_held) =
            read_bounded(frames(&[b"0123456789", b"0123456789"]), 64, &budget).await.expect("fits");
        assert_eq!((other.len(), budget.held()), (20, 30));
        // When it does arrive, it is weighed as it comes: no room now.
        tx.send(Ok(Frame::data(Bytes::from(vec![b'y'; 20])))).await.expect("send");
        assert_eq!(silent.await.err(), Some(GatewayError::Overloaded));
        assert_eq!(budget.held(), 30);
        drop(other_held);

        // Once the first body is dropped, a body of the whole budget fits.
        drop(held);
        let (whole, _held) =
            read_bounded(frames(&[b"0123456789", b"0123456789", b"0123456789"]), 64, &budget).await.expect("fits now");
        assert_eq!((whole.len(), budget.held()), (30, 30));
    }

    /// What HTTP/2 sends: everything in the map, and the values that change with every
    /// response (request ids, a provider's timing, what is left of a limit and when it resets)
    /// marked never to be indexed; the values that repeat stay indexable.
    #[test]
    fn http2_gets_every_field_and_indexes_only_those_that_repeat() {
        let provider = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: up-1\r\n\
            OpenAI-Processing-Ms: 12\r\nOpenAI-Version: 2020-10-01\r\nCF-Ray: 8f1e2d3c4b5a6978-AMS\r\n\
            X-RateLimit-Remaining-Requests: 7\r\nContent-Length: 5\r\n\r\n";
        let fields = ResponseFields::Raw(crate::fields::tests::response_fields(provider));
        let reply = Reply {
            response: Response::new(crate::body::full(Bytes::new())),
            passed: Some(forward::PassedFields::new(fields, http::HeaderValue::from_static("req_ours"))),
            rate: Some(limit::RateHeaders::requests(50, 49, 1500)),
        };
        let response = reply.into_response();
        let mut seen: Vec<(String, String, bool)> = response
            .headers()
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_str().expect("ascii").to_owned(), value.is_sensitive()))
            .collect();
        seen.sort();
        let expected = [
            ("cf-ray", "8f1e2d3c4b5a6978-AMS", true),
            ("content-type", "application/json", false),
            ("openai-processing-ms", "12", true),
            ("openai-version", "2020-10-01", false),
            ("x-ratelimit-limit-requests", "50", false),
            // Ours replaces the provider's.
            ("x-ratelimit-remaining-requests", "49", true),
            ("x-ratelimit-reset-requests", "1.500s", true),
            ("x-request-id", "req_ours", true),
            ("x-upstream-request-id", "up-1", true),
        ]
        .map(|(name, value, never)| (name.to_owned(), value.to_owned(), never));
        assert_eq!(seen, expected);

        // A response the gateway made itself (an error) goes the same way.
        let mut made = Response::new(crate::body::full(Bytes::new()));
        made.headers_mut().insert(REQUEST_ID_HEADER, http::HeaderValue::from_static("req_made"));
        let made = Reply::plain(made).into_response();
        assert!(made.headers()[REQUEST_ID_HEADER].is_sensitive());
    }
}
