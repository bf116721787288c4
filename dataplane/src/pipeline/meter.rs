//! Phase 5: metering. Every request ends in exactly one `AccessRecord::finish` — when the
//! response body ends, fails, or is dropped because the client went away — which writes the one
//! metadata log line and the metrics. Content is looked at only to find usage, never kept.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use portcullis_crds::snapshot::ApiKeyEntry;

use crate::api::{ApiFlavor, ApiRoute};
use crate::body::{BoxError, GatewayBody};
use crate::error::GatewayError;
use crate::limits::{Limiter, Ticket};
use crate::metrics::Metrics;
use crate::pipeline::usage::{JsonTail, SseScanner, Usage};
use crate::snapshot::ModelRoute;
use crate::snapshot::SnapshotHandle;
use crate::upstream::UpstreamBody;

/// What is known about one request, filled in phase by phase.
#[derive(Debug)]
pub struct AccessRecord {
    /// `None` in the inert record a hand-off leaves behind (nothing finishes it).
    metrics: Option<Arc<Metrics>>,
    started: Instant,
    pub request_id: HeaderValue,
    pub route: Option<ApiRoute>,
    pub key: Option<Arc<ApiKeyEntry>>,
    pub chosen: Option<ModelRoute>,
    pub streaming: bool,
    pub status: u16,
    first_byte: Option<Duration>,
    usage: Usage,
    /// The limiter reservation to settle, and the input size it assumed.
    pub ticket: Option<(Arc<Limiter>, Ticket)>,
    /// When the admission's time (`Admission::at_ms`, the limiter's clock) was read, on the
    /// monotonic clock: the settlement's time is derived from it and the request's end.
    pub admitted_at: Instant,
    pub input_estimate: u64,
    /// Output tokens seen so far when usage was never reported (a stream cut short).
    observed_output: u64,
    /// The request was handed to the provider's connection (it may have done the work).
    pub sent: bool,
    /// The provider answered (the status is its own).
    pub provider_answered: bool,
}

impl AccessRecord {
    /// The error and header conventions of the request's route (OpenAI's before it is known).
    pub fn flavor(&self) -> ApiFlavor {
        self.route.map_or(ApiFlavor::OpenAi, ApiRoute::flavor)
    }

    pub fn new(metrics: Arc<Metrics>, started: Instant, request_id: HeaderValue) -> Self {
        Self::with(Some(metrics), started, request_id)
    }

    fn with(metrics: Option<Arc<Metrics>>, started: Instant, request_id: HeaderValue) -> Self {
        Self {
            metrics,
            started,
            request_id,
            route: None,
            key: None,
            chosen: None,
            streaming: false,
            status: 0,
            first_byte: None,
            usage: Usage::default(),
            ticket: None,
            admitted_at: started,
            input_estimate: 0,
            observed_output: 0,
            sent: false,
            provider_answered: false,
        }
    }

    /// Replaces the token reservation with real usage: in place for the in-process store, in a
    /// task for the shared one (the request never waits on Redis).
    fn settle(&mut self, ended: Option<Instant>) {
        let Some((limiter, ticket)) = self.ticket.take() else { return };
        let actual = match (self.usage.input, self.usage.output) {
            // Nothing reported, nothing seen. Refused by the provider (an error answer without
            // usage) or by the gateway before the request was sent: nothing a provider bills,
            // so the reservation is given back. Anything else keeps it (the reservation is the
            // work's upper bound): a success, or a timeout, failure or client gone after the
            // request was written, the provider perhaps still at work.
            (None, None) if self.observed_output == 0 => {
                let refused = self.status >= 400 && (self.provider_answered || !self.sent);
                if !refused {
                    return;
                }
                0
            }
            // A stream that ended early may carry a provider's count from its start (Anthropic's
            // `message_start` says one output token): the events seen count too.
            (input, output) => input
                .unwrap_or(self.input_estimate)
                .saturating_add(output.map_or(self.observed_output, |o| o.max(self.observed_output))),
        };
        // The request's end on the limiter's clock, without reading it again when the caller
        // has just read the monotonic one. A wall-clock step during the request is not seen:
        // the settlement lands where the admission's time plus the elapsed time says.
        let now_ms = || match ended {
            Some(ended) => {
                let since = ended.saturating_duration_since(self.admitted_at).as_millis();
                ticket.admission.at_ms.saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
            }
            None => limiter.now_ms(),
        };
        if limiter.settle_now_at(&ticket, actual, now_ms) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { limiter.settle(&ticket, actual).await });
        }
    }

    fn mark_first_byte(&mut self, now: Instant) {
        if self.first_byte.is_none() {
            self.first_byte = Some(now.saturating_duration_since(self.started));
        }
    }

    /// Takes the record out to hand it to a response body, leaving an inert one in its place
    /// (same start, no request id, no metrics; nothing finishes it).
    pub fn hand_off(&mut self) -> AccessRecord {
        let inert = AccessRecord::with(None, self.started, HeaderValue::from_static("-"));
        std::mem::replace(self, inert)
    }

    /// Writes the log line and the metrics. `outcome` is `ok`, `upstream_error`, or a code.
    pub fn finish(self, outcome: &str) {
        self.finish_at(outcome, None);
    }

    /// [`Self::finish`], with the time the request ended when the caller has just read the
    /// clock (one read fewer per request).
    pub fn finish_at(mut self, outcome: &str, ended: Option<Instant>) {
        self.end(outcome, ended);
    }

    fn end(&mut self, outcome: &str, ended: Option<Instant>) {
        self.settle(ended);
        let Some(metrics) = self.metrics.take() else { return };
        let elapsed = ended.unwrap_or_else(Instant::now).saturating_duration_since(self.started);
        let route = self.route.map_or("unknown", ApiRoute::label);
        let ok = outcome == "ok";
        match self.route {
            Some(api) if ok => metrics.count_ok(api),
            _ => metrics.requests.with_label_values(&[route, outcome]).inc(),
        }
        let provider = self.chosen.as_ref().map(|c| c.upstream.label.as_str());
        let model = self.chosen.as_ref().map(|c| &*c.declared);
        if let (Some(chosen), Some(api)) = (&self.chosen, self.route) {
            let op = api.operation_name();
            let (provider, model) = (chosen.upstream.label.as_str(), &*chosen.declared);
            let series = chosen.metrics[api.index()].get_or_init(|| metrics.route_metrics(op, provider, model));
            if ok {
                series.duration_ok.observe(elapsed.as_secs_f64());
            } else {
                metrics
                    .request_duration
                    .with_label_values(&[op, provider, model, outcome])
                    .observe(elapsed.as_secs_f64());
            }
            if let Some(ttfb) = self.first_byte {
                series.time_to_first_token.observe(ttfb.as_secs_f64());
            }
            if let Some(tokens) = self.usage.input {
                series.input_tokens.observe(tokens as f64);
            }
            if let Some(tokens) = self.usage.output {
                series.output_tokens.observe(tokens as f64);
            }
        }
        if !tracing::enabled!(target: "portcullis::access", tracing::Level::INFO) {
            return;
        }
        let key = self.key.as_ref().map(|k| k.key.to_string());
        tracing::info!(
            target: "portcullis::access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            route,
            key = key.as_deref().unwrap_or("-"),
            provider = provider.unwrap_or("-"),
            model = model.unwrap_or("-"),
            status = self.status,
            outcome,
            stream = self.streaming,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            ttfb_ms = self.first_byte.map(|d| d.as_secs_f64() * 1000.0),
            input_tokens = self.usage.input,
            output_tokens = self.usage.output,
            "request"
        );
    }
}

/// The status recorded for a request whose client went away before its answer (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

impl Drop for AccessRecord {
    /// A record dropped unfinished: the request's future went away with its client (a closed
    /// connection, a reset stream) while the gateway waited, most often on the provider. It is
    /// finished as `client_closed`: one log line, the metrics and the settlement, as for every
    /// other request.
    fn drop(&mut self) {
        if self.metrics.is_some() {
            if self.status == 0 {
                self.status = CLIENT_CLOSED;
            }
            self.end("client_closed", None);
        }
    }
}

/// How a response body is read for usage.
#[derive(Debug)]
pub enum UsageReader {
    Json(JsonTail),
    Sse(SseScanner),
}

impl UsageReader {
    /// Takes the next chunk; `last` when the body ends with it.
    fn push(&mut self, data: Bytes, last: bool) -> Option<Bytes> {
        match self {
            UsageReader::Json(tail) => {
                if last {
                    tail.push_last(&data);
                } else {
                    tail.push(data.clone());
                }
                Some(data)
            }
            UsageReader::Sse(scanner) => scanner.push(data),
        }
    }

    fn finish(&mut self) -> (Option<Bytes>, Usage) {
        match self {
            UsageReader::Json(tail) => (None, tail.usage().unwrap_or_default()),
            UsageReader::Sse(scanner) => {
                let rest = scanner.finish();
                (rest, scanner.usage)
            }
        }
    }

    fn usage_so_far(&self) -> Usage {
        match self {
            UsageReader::Json(tail) => tail.usage().unwrap_or_default(),
            UsageReader::Sse(scanner) => scanner.usage,
        }
    }

    /// Output tokens seen so far: reported usage, or one per SSE event when none was reported.
    fn output_so_far(&self) -> u64 {
        match self {
            UsageReader::Json(_) => 0,
            UsageReader::Sse(scanner) => scanner.usage.output.unwrap_or(0).max(scanner.events),
        }
    }

    /// [`Self::output_so_far`] for a stream that ended without its final event (an error event,
    /// or the provider closing mid-way): what it reported may be its start's count (Anthropic's
    /// `message_start` says one output token), so the events delivered count too. Zero for a
    /// finished stream, whose reported usage is its total, and for JSON.
    fn output_if_cut(&self) -> u64 {
        match self {
            UsageReader::Sse(scanner) if !scanner.finished => self.output_so_far(),
            _ => 0,
        }
    }

    /// Whether the body's length changes in passing.
    fn rewrites(&self) -> bool {
        matches!(self, UsageReader::Sse(_))
    }
}

/// A response body that meters as it streams and finishes its `AccessRecord` exactly once.
/// A stream may use at most `allowance` tokens (what was left of its budget when admitted).
#[derive(Debug, Clone, Copy)]
pub struct BudgetGuard {
    pub allowance: u64,
    pub input_estimate: u64,
}

/// Ends an open stream when a new snapshot engages a kill switch over its scope.
///
/// While frames flow, a change is noticed by an atomic version check (`probe`); the watch
/// stream, which registers a wake-up, is polled only after a change or before the body waits.
pub struct StreamGuard {
    changes: tokio_stream::wrappers::WatchStream<u64>,
    probe: tokio::sync::watch::Receiver<u64>,
    /// The watch stream holds this task's waker: a change will wake the body.
    armed: bool,
    handle: Arc<SnapshotHandle>,
    key: Arc<portcullis_crds::snapshot::ApiKeyEntry>,
    /// The route serving the stream: its provider and the model name it was sent.
    route: crate::snapshot::ModelRoute,
    model: String,
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGuard")
            .field("key", &self.key.key)
            .field("provider", &self.route.upstream.id)
            .finish_non_exhaustive()
    }
}

impl StreamGuard {
    /// `probe` was subscribed when the request began: a snapshot applied since then is checked
    /// at the first poll.
    pub fn new(
        handle: Arc<SnapshotHandle>,
        probe: tokio::sync::watch::Receiver<u64>,
        key: Arc<portcullis_crds::snapshot::ApiKeyEntry>,
        route: crate::snapshot::ModelRoute,
        model: String,
    ) -> Self {
        let changes = tokio_stream::wrappers::WatchStream::from_changes(probe.clone());
        Self { changes, probe, armed: false, handle, key, route, model }
    }

    /// Checks for snapshot changes; on one, re-checks the stream's scope. `waiting` means the
    /// body is about to return `Pending` and must be woken by the next change.
    fn poll_stop(&mut self, cx: &mut Context<'_>, waiting: bool) -> Option<GatewayError> {
        use futures_util::Stream;
        // A closed channel (the handle is gone) counts as a change, so the stream is polled
        // once more and ends its interest.
        let probed = self.probe.has_changed().unwrap_or(true);
        if !probed && (self.armed || !waiting) {
            return None;
        }
        if probed {
            self.probe.borrow_and_update();
        }
        let mut changed = false;
        while let Poll::Ready(Some(_)) = Pin::new(&mut self.changes).poll_next(cx) {
            changed = true;
        }
        self.armed = true;
        if !changed {
            return None;
        }
        let snapshot = self.handle.load()?;
        super::kill_switch::stream_must_stop(&snapshot, &self.key, &self.route, &self.model, chrono::Utc::now())
    }
}

/// A provider's response body as it comes: the upstream connection's, unboxed (the usual case:
/// one allocation and one dynamic call per frame fewer), or any other (the mock provider's).
pub type ProviderBody = http_body_util::Either<UpstreamBody, GatewayBody>;

pub struct MeteredBody {
    inner: ProviderBody,
    budget: Option<BudgetGuard>,
    guard: Option<StreamGuard>,
    flavor: ApiFlavor,
    reader: UsageReader,
    record: Option<AccessRecord>,
    outcome: &'static str,
    idle_timeout: Duration,
    /// Fires at the earliest moment the body could be idle too long; re-armed lazily from
    /// `last_frame` (re-arming per frame would touch the timer wheel for every SSE event).
    /// Created the first time the body waits: a response already read never needs one.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the last frame arrived (`None` until the first frame or the first wait).
    last_frame: Option<tokio::time::Instant>,
    ended: bool,
}

impl std::fmt::Debug for MeteredBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody").field("ended", &self.ended).finish_non_exhaustive()
    }
}

impl MeteredBody {
    pub fn new(
        inner: ProviderBody,
        reader: UsageReader,
        record: AccessRecord,
        outcome: &'static str,
        idle_timeout: Duration,
        budget: Option<BudgetGuard>,
        guard: Option<StreamGuard>,
    ) -> Self {
        let flavor = record.flavor();
        Self {
            inner,
            budget,
            guard,
            flavor,
            reader,
            record: Some(record),
            outcome,
            idle_timeout,
            idle: None,
            last_frame: None,
            ended: false,
        }
    }

    /// The body ended normally: flush what the reader held back, record, and return the last
    /// bytes to send (`last` followed by anything held back). `now` is the clock reading taken
    /// for the frame that ended it, if one did.
    fn end_with(&mut self, last: Option<Bytes>, now: Option<tokio::time::Instant>) -> Option<Bytes> {
        let (rest, usage) = self.reader.finish();
        if let Some(mut record) = self.record.take() {
            record.usage = usage;
            record.observed_output = self.reader.output_if_cut();
            record.finish_at(self.outcome, now.map(tokio::time::Instant::into_std));
        }
        self.ended = true;
        match (last, rest) {
            (Some(a), Some(b)) => {
                let mut joined = bytes::BytesMut::with_capacity(a.len() + b.len());
                joined.extend_from_slice(&a);
                joined.extend_from_slice(&b);
                Some(joined.freeze())
            }
            (a, b) => a.or(b).filter(|b| !b.is_empty()),
        }
    }

    fn finish(&mut self, outcome: &str) {
        self.ended = true;
        if let Some(mut record) = self.record.take() {
            record.usage = self.reader.usage_so_far();
            record.observed_output = self.reader.output_so_far();
            record.finish(outcome);
        }
    }

    /// True when the stream has used more than its budget allowed.
    fn over_budget(&self) -> Option<GatewayError> {
        let guard = self.budget?;
        let usage = self.reader.usage_so_far();
        let used = usage.input.unwrap_or(guard.input_estimate) + self.reader.output_so_far();
        (used > guard.allowance).then_some(GatewayError::BudgetExceededMidStream)
    }

    /// Ends the stream with a final error event in the API's format.
    fn cut(&mut self, error: &GatewayError, forwarded: Option<Bytes>) -> Bytes {
        let shape = error.shape();
        self.finish(shape.code);
        let message = error.message();
        let event = match self.flavor {
            ApiFlavor::OpenAi => format!(
                "data: {}\n\n",
                serde_json::json!({"error": {"message": message, "type": shape.openai_type, "param": null, "code": shape.code}})
            ),
            ApiFlavor::Anthropic => format!(
                "event: error\ndata: {}\n\n",
                serde_json::json!({"type": "error", "error": {"type": shape.anthropic_type, "message": message}})
            ),
        };
        let mut out = bytes::BytesMut::new();
        if let Some(forwarded) = forwarded {
            out.extend_from_slice(&forwarded);
        }
        out.extend_from_slice(event.as_bytes());
        out.freeze()
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(error) = this.guard.as_mut().and_then(|g| g.poll_stop(cx, false)) {
            let last = this.cut(&error, None);
            return Poll::Ready(Some(Ok(Frame::data(last))));
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // One clock read per frame: the idle timer's reference and, on the first, the
                    // time to first byte.
                    let now = tokio::time::Instant::now();
                    this.last_frame = Some(now);
                    match frame.into_data() {
                        Ok(data) => {
                            if let Some(record) = this.record.as_mut() {
                                record.mark_first_byte(now.into_std());
                            }
                            let out = this.reader.push(data, this.inner.is_end_stream());
                            if let Some(error) = this.over_budget() {
                                let last = this.cut(&error, out);
                                return Poll::Ready(Some(Ok(Frame::data(last))));
                            }
                            // hyper stops polling a body of known length after its last byte,
                            // so the end is recognised here rather than by a final `None`.
                            if this.inner.is_end_stream() {
                                let out = this.end_with(out, Some(now));
                                return Poll::Ready(out.map(|b| Ok(Frame::data(b))));
                            }
                            match out {
                                Some(out) if !out.is_empty() => return Poll::Ready(Some(Ok(Frame::data(out)))),
                                _ => continue,
                            }
                        }
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream response stream failed");
                    this.finish("upstream_broken");
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let rest = this.end_with(None, None);
                    return Poll::Ready(rest.map(|b| Ok(Frame::data(b))));
                }
                Poll::Pending => {
                    if let Some(error) = this.guard.as_mut().and_then(|g| g.poll_stop(cx, true)) {
                        let last = this.cut(&error, None);
                        return Poll::Ready(Some(Ok(Frame::data(last))));
                    }
                    loop {
                        // Nothing received yet: the idle time counts from the first wait.
                        let last_frame = *this.last_frame.get_or_insert_with(tokio::time::Instant::now);
                        let deadline = last_frame + this.idle_timeout;
                        let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        if idle.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        if tokio::time::Instant::now() >= deadline {
                            this.finish("upstream_idle_timeout");
                            return Poll::Ready(Some(Err("upstream sent nothing within the idle timeout".into())));
                        }
                        // Frames arrived since the timer was armed: wait out the remainder.
                        idle.as_mut().reset(deadline);
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        if self.reader.rewrites() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if self.record.is_some() {
            if self.inner.is_end_stream() {
                // Nothing was left to send: a 204 or 304 (whose body a server never polls)
                // ended as it should.
                self.end_with(None, None);
            } else {
                self.finish("client_closed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn record() -> AccessRecord {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        AccessRecord::new(metrics, Instant::now(), http::HeaderValue::from_static("req-test"))
    }

    /// The settlement lands at the request's end on the limiter's clock, derived from the
    /// admission's time and the monotonic end the caller read (the limiter's clock is not read
    /// again): a reservation whose window has passed by then is left alone, one still in it is
    /// corrected.
    #[tokio::test]
    async fn settlement_is_timed_from_the_admission_and_the_end() {
        use crate::limits::testing::{admission, limiter, FixedClock};
        for (after, tokens_counted) in [(Duration::from_secs(1), 30), (Duration::from_secs(61), 0)] {
            let limiter = limiter(Arc::new(FixedClock(1_700_000_000_000.into())));
            let ticket = limiter.admit(admission(&limiter, None, Some(1_000), None, 80)).await.expect("admitted");
            let mut record = record();
            record.ticket = Some((limiter.clone(), ticket));
            record.usage = Usage { input: Some(10), output: Some(20) };
            let ended = record.admitted_at + after;
            record.finish_at("ok", Some(ended));
            let (_, tokens, ..) = limiter.usage("ns/k").await;
            assert_eq!(tokens, tokens_counted, "settled {after:?} after the admission");
        }
    }

    /// A fresh in-process limiter, and a record holding its reservation of 1,000 tokens for the
    /// key `ns/k` (with a limit of 10,000 tokens a minute, so its usage is counted).
    async fn reserving_1000_tokens() -> (Arc<crate::limits::Limiter>, AccessRecord) {
        use crate::limits::testing::{admission, limiter, FixedClock};
        let limiter = limiter(Arc::new(FixedClock(1_700_000_000_000.into())));
        let ticket = limiter.admit(admission(&limiter, None, Some(10_000), None, 1_000)).await.expect("admitted");
        let mut record = record();
        record.ticket = Some((limiter.clone(), ticket));
        (limiter, record)
    }

    /// What a reservation of 1,000 tokens is settled to, by what the answer said and was.
    #[tokio::test]
    async fn the_charge_follows_what_the_provider_reported_did_and_was_asked() {
        // (what, status, sent, provider answered, usage, events seen, tokens charged)
        let cases: [(&str, u16, bool, bool, Usage, u64, u64); 8] = [
            // Reported usage, the events seen being fewer.
            ("reported", 200, true, true, Usage { input: Some(10), output: Some(20) }, 5, 30),
            // Anthropic's `message_start` says one output token; the stream was cut after 275.
            ("cut early", 200, true, true, Usage { input: Some(25), output: Some(1) }, 275, 300),
            // Nothing reported or seen on a success: the reservation stands.
            ("unreported", 200, true, true, Usage::default(), 0, 1_000),
            // The provider refused without usage: nothing.
            ("provider error", 400, true, true, Usage::default(), 0, 0),
            // The gateway refused before sending (a kill switch set meanwhile): nothing.
            ("refused unsent", 503, false, false, Usage::default(), 0, 0),
            // Written, then no answer in time, or the connection failed: the provider may be at
            // work, the reservation stands.
            ("timed out", 504, true, false, Usage::default(), 0, 1_000),
            ("failed after writing", 502, true, false, Usage::default(), 0, 1_000),
            // The client left before the answer: the reservation stands.
            ("client gone", 0, true, false, Usage::default(), 0, 1_000),
        ];
        for (what, status, sent, answered, usage, observed, charged) in cases {
            let (limiter, mut record) = reserving_1000_tokens().await;
            record.input_estimate = 10;
            record.status = status;
            record.sent = sent;
            record.provider_answered = answered;
            record.usage = usage;
            record.observed_output = observed;
            if status == 0 {
                // The request's future dropped with its client.
                drop(record);
            } else {
                let ended = record.admitted_at;
                record.finish_at(if status < 400 { "ok" } else { "upstream_error" }, Some(ended));
            }
            let (_, tokens, ..) = limiter.usage("ns/k").await;
            assert_eq!(tokens, charged, "{what}");
        }
    }

    /// A stream is settled on its reported usage only when it ended with its final event. One
    /// that ends cleanly after anything else (here Anthropic's error event, after
    /// `message_start`'s count of one output token) was cut: the events delivered count.
    #[tokio::test]
    async fn a_stream_without_its_final_event_is_charged_for_what_it_delivered() {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n";
        let delta =
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"x\"}}\n\n";
        let usage = "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":30}}\n\n";
        let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n";
        let stop = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let deltas = delta.repeat(200);
        // (what, events, tokens charged)
        let cases = [
            // Finished: the reported 25 + 30, though 203 events went by.
            ("finished", vec![start, &deltas, usage, stop], 55),
            // Cut by an error event: 25 + one per event delivered (202).
            ("error event", vec![start, &deltas, error], 227),
            // Closed mid-way, with no error either.
            ("closed", vec![start, &deltas], 226),
        ];
        for (what, chunks, charged) in cases {
            let (limiter, mut record) = reserving_1000_tokens().await;
            record.status = 200;
            record.sent = true;
            record.provider_answered = true;
            let frames: Vec<Result<Frame<Bytes>, BoxError>> =
                chunks.into_iter().map(|c| Ok(Frame::data(Bytes::from(c.to_owned())))).collect();
            let body = MeteredBody::new(
                ProviderBody::Right(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()),
                UsageReader::Sse(SseScanner::new(false)),
                record,
                "ok",
                Duration::from_secs(5),
                None,
                None,
            );
            body.collect().await.expect("the stream ends cleanly");
            let (_, tokens, ..) = limiter.usage("ns/k").await;
            assert_eq!(tokens, charged, "{what}");
        }
    }

    /// A record whose request went away unfinished is still logged and counted, once.
    #[test]
    fn a_record_dropped_unfinished_is_finished_as_client_closed() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        drop(AccessRecord::new(metrics.clone(), Instant::now(), http::HeaderValue::from_static("req-1")));
        let mut finished = AccessRecord::new(metrics.clone(), Instant::now(), http::HeaderValue::from_static("req-2"));
        finished.status = 200;
        finished.finish("ok");
        let text = String::from_utf8(metrics.render()).expect("utf-8");
        let closed: Vec<_> = text.lines().filter(|l| l.contains("client_closed") && !l.starts_with('#')).collect();
        assert_eq!(closed.len(), 1, "{closed:?}");
        assert!(closed[0].ends_with(" 1"), "{closed:?}");
    }

    /// A response with no body to send (a 204 or 304: the server writes its head and drops the
    /// body unpolled) is finished with its own outcome; one dropped with body left to send was
    /// cut off by its client.
    #[test]
    fn a_body_dropped_with_nothing_left_to_send_is_not_client_closed() {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let outcomes = |metrics: &Metrics| {
            let text = String::from_utf8(metrics.render()).expect("utf-8");
            let mut found: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("portcullis_requests_total{") && !l.ends_with(" 0"))
                .filter_map(|l| l.split("outcome=\"").nth(1)?.split('"').next().map(str::to_owned))
                .collect();
            found.sort();
            found
        };
        for (inner, outcome) in [
            (ProviderBody::Right(http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync()), "ok"),
            (ProviderBody::Right(trickle(1, Duration::from_secs(60))), "client_closed"),
        ] {
            let mut record =
                AccessRecord::new(metrics.clone(), Instant::now(), http::HeaderValue::from_static("req-1"));
            record.status = 204;
            let body = MeteredBody::new(
                inner,
                UsageReader::Json(JsonTail::default()),
                record,
                "ok",
                Duration::from_secs(5),
                None,
                None,
            );
            drop(body);
            assert!(outcomes(&metrics).contains(&outcome.to_owned()), "{outcome}: {:?}", outcomes(&metrics));
        }
        assert_eq!(outcomes(&metrics), ["client_closed", "ok"]);
    }

    /// Sends `frames` frames `gap` apart, then stalls forever.
    fn trickle(frames: usize, gap: Duration) -> GatewayBody {
        let stream = futures_util::stream::unfold(0usize, move |i| async move {
            if i < frames {
                tokio::time::sleep(gap).await;
                Some((Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"data: {}\n\n"))), i + 1))
            } else {
                std::future::pending::<()>().await;
                None
            }
        });
        StreamBody::new(stream).boxed_unsync()
    }

    #[tokio::test]
    async fn idle_timeout_counts_from_the_last_frame() {
        let idle = Duration::from_millis(150);
        // Eight frames 60 ms apart: 480 ms in all, never idle for 150 ms, so none is cut...
        let mut body = MeteredBody::new(
            ProviderBody::Right(trickle(8, Duration::from_millis(60))),
            UsageReader::Sse(SseScanner::new(false)),
            record(),
            "ok",
            idle,
            None,
            None,
        );
        let started = Instant::now();
        for _ in 0..8 {
            let frame = body.frame().await.expect("a frame").expect("not an error");
            assert!(frame.is_data());
        }
        // ...then the stall ends the body with an error about 150 ms after the last frame.
        let last = Instant::now();
        let end = body.frame().await.expect("an error frame");
        assert!(end.is_err());
        let waited = last.elapsed();
        assert!(waited >= idle && waited < idle * 4, "waited {waited:?}");
        assert!(started.elapsed() >= Duration::from_millis(480));
    }
}
