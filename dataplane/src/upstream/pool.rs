//! Keep-alive connections, pooled per thread and driven by the request that holds them.
//!
//! With the single-threaded runtime every request runs on one thread, so the pool is a
//! thread-local and checkout takes no lock. With the multi-threaded runtime each worker keeps
//! its own idle set; a connection returns to whichever thread finished with it. A connection
//! goes back only when its response was read to the end and hyper is ready for the next
//! request; one dropped mid-response is closed.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::fast::RandomState;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Origin;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Dispatch = Connection<Io, Full<Bytes>>;

/// How often idle sets are swept of expired connections (lazily, on check-in).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(super) struct PoolSettings {
    pub client: u64,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

struct Idle {
    lease: Lease,
    since: Instant,
}

#[derive(Default)]
struct ThreadPool {
    /// Per client, per origin; newest last.
    idle: HashMap<u64, HashMap<Origin, Vec<Idle>, RandomState>, RandomState>,
    last_sweep: Option<Instant>,
}

thread_local! {
    static POOL: RefCell<ThreadPool> = RefCell::new(ThreadPool::default());
}

/// The newest unexpired idle connection to `origin`, if any.
pub(super) fn checkout(settings: &PoolSettings, origin: &Origin) -> Option<Lease> {
    let now = Instant::now();
    // Expired connections are dropped after the borrow ends: closing one runs TLS code.
    let (found, _expired) = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let set = pool.idle.get_mut(&settings.client)?.get_mut(origin)?;
        let idle = set.pop()?;
        if now.duration_since(idle.since) < settings.idle_timeout {
            Some((Some(idle.lease), None))
        } else {
            // The newest has expired, so have all the others.
            Some((None, Some((idle, std::mem::take(set)))))
        }
    })?;
    found
}

fn check_in(lease: Lease) {
    let now = Instant::now();
    let mut expired = Vec::new();
    let refused = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let settings = lease.0.settings.clone();
        if pool.last_sweep.is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY) {
            pool.last_sweep = Some(now);
            for sets in pool.idle.values_mut() {
                for set in sets.values_mut() {
                    let keep_from = set.partition_point(|idle| now.duration_since(idle.since) >= settings.idle_timeout);
                    expired.extend(set.drain(..keep_from));
                }
                sets.retain(|_, set| !set.is_empty());
            }
        }
        let set = pool.idle.entry(settings.client).or_default().entry(lease.0.origin.clone()).or_default();
        if set.len() >= settings.max_idle {
            return Some(lease);
        }
        set.push(Idle { lease, since: now });
        None
    });
    drop(refused);
    drop(expired);
}

/// One HTTP/1.1 connection, held by one request at a time. Boxed: the connection state
/// (buffers, and a rustls session for HTTPS) is kilobytes, and a lease moves between the pool,
/// the request future and the response body; moving it inline cost a memcpy at every step.
pub(super) struct Lease(Box<Held>);

struct Held {
    sender: SendRequest<Full<Bytes>>,
    dispatch: Dispatch,
    origin: Origin,
    settings: PoolSettings,
}

/// A request that failed, and the request itself when none of it was written.
type SendFailure = (hyper::Error, Option<Request<Full<Bytes>>>);

impl Lease {
    pub(super) fn new(
        sender: SendRequest<Full<Bytes>>,
        dispatch: Dispatch,
        origin: Origin,
        settings: PoolSettings,
    ) -> Self {
        Self(Box::new(Held { sender, dispatch, origin, settings }))
    }

    /// Gives a pooled connection one turn to notice that the provider closed it meanwhile.
    pub(super) async fn revalidate(mut self) -> Option<Self> {
        let held = &mut *self.0;
        std::future::poll_fn(|cx| match Pin::new(&mut held.dispatch).poll(cx) {
            Poll::Ready(_) => Poll::Ready(false),
            Poll::Pending => Poll::Ready(held.sender.is_ready() && !held.sender.is_closed()),
        })
        .await
        .then_some(self)
    }

    /// Sends the request, polling the connection alongside until the response head arrives.
    pub(super) async fn send(mut self, request: Request<Full<Bytes>>) -> Result<Response<UpstreamBody>, SendFailure> {
        let mut response = std::pin::pin!(self.0.sender.try_send_request(request));
        let mut lease = Some(self);
        let result = std::future::poll_fn(|cx| {
            if let Some(held) = lease.as_mut() {
                if Pin::new(&mut held.0.dispatch).poll(cx).is_ready() {
                    // The connection is done; dropping it hands any pending request its error.
                    lease = None;
                }
            }
            response.as_mut().poll(cx)
        })
        .await;
        match result {
            // Without a lease the response arrived as the connection closed: serve it, reuse
            // nothing.
            Ok(response) => Ok(response.map(|incoming| UpstreamBody { incoming, lease })),
            Err(mut error) => {
                let unsent = error.take_message();
                Err((error.into_error(), unsent))
            }
        }
    }
}

/// A provider's response body. Polling it drives the connection, so everything already read
/// is decoded without a task switch. Read to the end, it returns the connection to the pool.
pub struct UpstreamBody {
    incoming: Incoming,
    lease: Option<Lease>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").field("pooled", &self.lease.is_some()).finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// Returns the connection to the pool if hyper is ready for another request on it.
    fn release(&mut self, cx: &mut Context<'_>) {
        let Some(mut lease) = self.lease.take() else { return };
        let held = &mut *lease.0;
        if !held.sender.is_ready() && Pin::new(&mut held.dispatch).poll(cx).is_ready() {
            return;
        }
        if held.sender.is_ready() {
            check_in(lease);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(lease) = this.lease.as_mut() {
            if Pin::new(&mut lease.0.dispatch).poll(cx).is_ready() {
                // Closed or failed: the body channel reports how, and the connection is gone.
                this.lease = None;
            }
        }
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) if this.incoming.is_end_stream() => this.release(cx),
            Poll::Ready(None) => this.release(cx),
            Poll::Ready(Some(Err(_))) => this.lease = None,
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
