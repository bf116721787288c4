//! A deadline on every Kubernetes API call but a watch, as a layer of the client's stack: the
//! answer's head arrives within it, and then each piece of its body within it of the last, or
//! the call fails. (Not the whole body: a list an API server answers from its watch cache comes
//! in one answer, whatever page size was asked, and can take longer on a large cluster.)
//!
//! kube's client has no read timeout by default (it would cut the watches, which wait quietly
//! for events and have their own timeouts). Without one, a call on a half-open connection waits
//! forever: the operator's snapshot writer then holds its lock and no kill switch flipped after
//! it is ever published; a replica's Lease renewal or Secret read hangs the same way. The
//! operator and the data plane build their clients with [`client`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the operator and the data plane give an answer's head, and each piece of its body.
pub const API_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// The error of a call that ran out of time, in the head or between two pieces of the body.
#[derive(Debug, thiserror::Error)]
#[error("the API server did not answer in {} s", .0.as_secs())]
pub struct NoAnswer(pub Duration);

/// kube's client from the environment (in-cluster config or `KUBECONFIG`), its calls under
/// [`API_CALL_DEADLINE`].
pub async fn client() -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    client_for(config, API_CALL_DEADLINE)
}

/// kube's client for `config`, every call but a watch under `deadline`.
pub fn client_for(config: kube::Config, deadline: Duration) -> Result<kube::Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&DeadlineLayer::new(deadline)).build())
}

/// Whether `uri` asks for a watch (`watch=true`, as kube's watcher sends it, or `watch=1`).
pub fn is_watch(uri: &Uri) -> bool {
    uri.query().is_some_and(|query| query.split('&').any(|pair| matches!(pair, "watch=true" | "watch=1")))
}

/// Gives every call but a watch `deadline` for its answer's head, then for each piece of its body.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    deadline: Duration,
}

impl DeadlineLayer {
    pub fn new(deadline: Duration) -> Self {
        Self { deadline }
    }
}

impl<S> tower_layer::Layer<S> for DeadlineLayer {
    type Service = Deadlined<S>;

    fn layer(&self, inner: S) -> Deadlined<S> {
        Deadlined { inner, deadline: self.deadline }
    }
}

/// The service [`DeadlineLayer`] makes.
#[derive(Debug, Clone)]
pub struct Deadlined<S> {
    inner: S,
    deadline: Duration,
}

impl<S, RequestBody, ResponseBody> tower_service::Service<Request<RequestBody>> for Deadlined<S>
where
    S: tower_service::Service<Request<RequestBody>, Response = Response<ResponseBody>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ResponseBody: Body + Unpin + Send + 'static,
{
    type Response = Response<DeadlineBody<ResponseBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<RequestBody>) -> Self::Future {
        let deadline = self.deadline;
        let until = (!is_watch(request.uri())).then(|| Instant::now() + deadline);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let Some(until) = until else {
                let response = answer.await.map_err(Into::into)?;
                return Ok(response.map(|inner| DeadlineBody { inner, until: None }));
            };
            match tokio::time::timeout_at(until, answer).await {
                Ok(response) => {
                    let response = response.map_err(Into::into)?;
                    let sleep = Box::pin(tokio::time::sleep_until(until));
                    Ok(response.map(|inner| DeadlineBody { inner, until: Some((sleep, deadline)) }))
                }
                Err(_) => Err(Box::new(NoAnswer(deadline)) as BoxError),
            }
        })
    }
}

/// An answer's body that fails when no piece of it has come for the deadline (never for a watch).
#[derive(Debug)]
pub struct DeadlineBody<B> {
    inner: B,
    until: Option<(Pin<Box<Sleep>>, Duration)>,
}

impl<B> Body for DeadlineBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            // A body that keeps coming (a large list in one answer) is not cut: the next piece
            // has its own deadline.
            if let (Some(Ok(_)), Some((sleep, deadline))) = (&frame, &mut this.until) {
                sleep.as_mut().reset(Instant::now() + *deadline);
            }
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let Some((sleep, deadline)) = &mut this.until else { return Poll::Pending };
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(NoAnswer(*deadline))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower_layer::Layer;
    use tower_service::Service;

    /// A body of `pieces` pieces (`{}` each), one every `every`, then its end, or, when it
    /// `stalls`, nothing more.
    #[derive(Debug)]
    struct Trickle {
        pieces: u32,
        every: Duration,
        stalls: bool,
        next: Pin<Box<Sleep>>,
    }

    impl Trickle {
        fn new(pieces: u32, every: Duration, stalls: bool) -> Self {
            Self { pieces, every, stalls, next: Box::pin(tokio::time::sleep(every)) }
        }
    }

    impl Body for Trickle {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            let this = &mut *self;
            if this.pieces == 0 {
                return if this.stalls { Poll::Pending } else { Poll::Ready(None) };
            }
            if this.next.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.pieces -= 1;
            let every = this.every;
            this.next.as_mut().reset(Instant::now() + every);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from("{}")))))
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum ApiServer {
        /// Never sends a head.
        Silent,
        /// Sends a head at once, then `pieces` pieces of body, one every `every` seconds; then
        /// the end, or, when it `stalls`, nothing.
        Sends { pieces: u32, every: u64, stalls: bool },
    }

    impl Service<Request<()>> for ApiServer {
        type Response = Response<Trickle>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<Trickle>, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            let behaviour = *self;
            Box::pin(async move {
                match behaviour {
                    ApiServer::Silent => std::future::pending().await,
                    ApiServer::Sends { pieces, every, stalls } => {
                        Ok(Response::new(Trickle::new(pieces, Duration::from_secs(every), stalls)))
                    }
                }
            })
        }
    }

    const DEADLINE: Duration = Duration::from_secs(30);
    const PATH: &str = "/api/v1/namespaces/portcullis/secrets/portcullis-snapshot";

    /// The call's body, or its error, and when it ended, from its start; `None` when it had not
    /// ended after `DEADLINE * 20`.
    async fn call(server: ApiServer, uri: &str) -> Option<(Result<Bytes, BoxError>, Duration)> {
        let started = Instant::now();
        let mut service = DeadlineLayer::new(DEADLINE).layer(server);
        let answer = service.call(Request::get(uri).body(()).unwrap());
        let read = async move { Ok(answer.await?.into_body().collect().await?.to_bytes()) };
        let read = tokio::time::timeout(DEADLINE * 20, read).await.ok()?;
        Some((read, started.elapsed()))
    }

    #[test]
    fn watches_are_told_from_other_calls() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert!(is_watch(&uri("/api/v1/secrets?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true")));
        assert!(is_watch(&uri("/api/v1/namespaces/a/secrets?watch=1")));
        assert!(!is_watch(&uri("/api/v1/namespaces/a/secrets/b")));
        assert!(!is_watch(&uri("/api/v1/secrets?limit=500&labelSelector=watch%3Dtrue")));
        assert!(!is_watch(&uri("/api/v1/secrets?watch=false")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_fails_when_its_head_or_the_next_piece_of_its_body_is_late() {
        let error = |read: Option<(Result<Bytes, BoxError>, Duration)>| {
            let (read, took) = read.expect("no deadline: the call still waits");
            (read.expect_err("answered").to_string(), took)
        };
        let no_answer = "the API server did not answer in 30 s".to_owned();
        let (body, took) = call(ApiServer::Sends { pieces: 1, every: 0, stalls: false }, PATH).await.unwrap();
        assert_eq!((body.unwrap(), took), (Bytes::from("{}"), Duration::ZERO));
        assert_eq!(error(call(ApiServer::Silent, PATH).await), (no_answer.clone(), DEADLINE));
        let stalled = ApiServer::Sends { pieces: 0, every: 0, stalls: true };
        assert_eq!(error(call(stalled, PATH).await), (no_answer.clone(), DEADLINE));
        // A long answer that keeps coming is read whole; one that stops fails a deadline after
        // its last piece.
        let (body, took) = call(ApiServer::Sends { pieces: 5, every: 20, stalls: false }, PATH).await.unwrap();
        assert_eq!((body.unwrap().len(), took), (10, Duration::from_secs(100)));
        let stops = ApiServer::Sends { pieces: 2, every: 20, stalls: true };
        assert_eq!(error(call(stops, PATH).await), (no_answer, Duration::from_secs(40) + DEADLINE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_is_left_to_its_own_timeouts() {
        let watch = "/api/v1/secrets?&watch=true&timeoutSeconds=290";
        assert!(call(ApiServer::Silent, watch).await.is_none(), "a watch waiting for its head was cut");
        let quiet = ApiServer::Sends { pieces: 1, every: 0, stalls: true };
        assert!(call(quiet, watch).await.is_none(), "a quiet watch was cut");
    }
}
