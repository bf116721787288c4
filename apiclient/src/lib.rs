//! A deadline on every Kubernetes API call but a watch, as a layer of the client's stack: the
//! head and the whole body of the answer arrive within it, or the call fails.
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

/// What the operator and the data plane give one call. Long enough for a page of a large list
/// (the watchers list 500 objects a page) on a busy API server.
pub const API_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// The error of a call that ran out of time, in the head or in the body.
#[derive(Debug, thiserror::Error)]
#[error("the API server did not answer in {} s", .0.as_secs())]
pub struct NoAnswer(pub Duration);

/// kube's client from the environment (in-cluster config or `KUBECONFIG`), its calls under
/// [`API_CALL_DEADLINE`].
pub async fn client() -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&DeadlineLayer::new(API_CALL_DEADLINE)).build())
}

/// Whether `uri` asks for a watch (`watch=true`, as kube's watcher sends it, or `watch=1`).
pub fn is_watch(uri: &Uri) -> bool {
    uri.query().is_some_and(|query| query.split('&').any(|pair| matches!(pair, "watch=true" | "watch=1")))
}

/// Gives every call but a watch `deadline` for its whole answer.
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

/// An answer's body that fails once the call's deadline has passed (none for a watch).
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
    use http_body_util::{BodyExt, Full};
    use tower_layer::Layer;
    use tower_service::Service;

    /// A body whose end never comes.
    #[derive(Debug)]
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum ApiServer {
        /// Answers `{}` at once.
        Answers,
        /// Never sends a head.
        Silent,
        /// Sends a head, then a body that never ends.
        StallsInTheBody,
    }

    type Answer = Response<http_body_util::Either<Full<Bytes>, Stalled>>;

    impl Service<Request<()>> for ApiServer {
        type Response = Answer;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Answer, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            let behaviour = *self;
            Box::pin(async move {
                match behaviour {
                    ApiServer::Answers => Ok(Response::new(http_body_util::Either::Left(Full::new(Bytes::from("{}"))))),
                    ApiServer::Silent => std::future::pending().await,
                    ApiServer::StallsInTheBody => Ok(Response::new(http_body_util::Either::Right(Stalled))),
                }
            })
        }
    }

    const DEADLINE: Duration = Duration::from_secs(30);

    fn call(server: ApiServer, uri: &str) -> impl Future<Output = Result<Bytes, BoxError>> {
        let mut service = DeadlineLayer::new(DEADLINE).layer(server);
        let answer = service.call(Request::get(uri).body(()).unwrap());
        async move { Ok(answer.await?.into_body().collect().await?.to_bytes()) }
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
    async fn a_call_unanswered_in_its_head_or_its_body_fails_at_the_deadline() {
        let path = "/api/v1/namespaces/portcullis/secrets/portcullis-snapshot";
        assert_eq!(call(ApiServer::Answers, path).await.unwrap(), Bytes::from("{}"));
        for server in [ApiServer::Silent, ApiServer::StallsInTheBody] {
            let started = Instant::now();
            let answer = tokio::time::timeout(DEADLINE * 2, call(server, path)).await;
            let error = answer.expect("no deadline: the call still waits").unwrap_err();
            assert_eq!(started.elapsed(), DEADLINE, "{server:?}");
            assert_eq!(error.to_string(), "the API server did not answer in 30 s", "{server:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_is_left_to_its_own_timeouts() {
        for server in [ApiServer::Silent, ApiServer::StallsInTheBody] {
            let watch = call(server, "/api/v1/secrets?&watch=true&timeoutSeconds=290");
            let waited = tokio::time::timeout(DEADLINE * 20, watch).await;
            assert!(waited.is_err(), "{server:?}: a quiet watch was cut");
        }
    }
}
