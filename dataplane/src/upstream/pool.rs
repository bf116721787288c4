//! Keep-alive connections, pooled per thread and driven by the request that holds them.
//!
//! With the single-threaded runtime every request runs on one thread, so the pool is a
//! thread-local and checkout takes no lock. With the multi-threaded runtime each worker keeps
//! its own idle set; a connection returns to whichever thread finished with it. A connection
//! goes back only when its response was read to the end, its framing allows another request,
//! and the provider sent nothing beyond it; one dropped mid-response is closed.

use std::cell::RefCell;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::h1::{self, Decoder, H1Error, Io};
use super::{Origin, ProviderResponse};

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

/// The idle connections of one client to one origin, newest last.
struct IdleSet {
    client: u64,
    origin: Origin,
    conns: Vec<Idle>,
}

#[derive(Default)]
struct ThreadPool {
    /// One per (client, origin) this thread has pooled for: a handful, scanned in order. An
    /// origin compares by its precomputed hash first, so this beats hashing it into nested maps
    /// twice per request.
    sets: Vec<IdleSet>,
    last_sweep: Option<Instant>,
}

impl ThreadPool {
    fn position(&self, client: u64, origin: &Origin) -> Option<usize> {
        self.sets.iter().position(|set| set.client == client && set.origin == *origin)
    }
}

thread_local! {
    static POOL: RefCell<ThreadPool> = RefCell::new(ThreadPool::default());
}

/// The newest unexpired idle connection to `origin`, if any.
pub(super) fn checkout(settings: &PoolSettings, origin: &Origin, now: Instant) -> Option<Lease> {
    // Expired connections are dropped after the borrow ends: closing one runs TLS code.
    let (found, _expired) = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let at = pool.position(settings.client, origin)?;
        let set = &mut pool.sets[at].conns;
        let idle = set.pop()?;
        if now.saturating_duration_since(idle.since) < settings.idle_timeout {
            Some((Some(idle.lease), None))
        } else {
            // The newest has expired, so have all the others.
            Some((None, Some((idle, std::mem::take(set)))))
        }
    })?;
    found
}

fn check_in(mut lease: Lease) {
    // Idle, it no longer counts as in use (other threads' pools cannot lend it anyway).
    lease.0.slot = None;
    let now = Instant::now();
    let mut expired = Vec::new();
    let refused = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let settings = &lease.0.settings;
        if pool.last_sweep.is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY) {
            pool.last_sweep = Some(now);
            for set in &mut pool.sets {
                let keep_from =
                    set.conns.partition_point(|idle| now.duration_since(idle.since) >= settings.idle_timeout);
                expired.extend(set.conns.drain(..keep_from));
            }
            pool.sets.retain(|set| !set.conns.is_empty());
        }
        let at = match pool.position(settings.client, &lease.0.origin) {
            Some(at) => at,
            None => {
                let origin = lease.0.origin.clone();
                pool.sets.push(IdleSet { client: settings.client, origin, conns: Vec::new() });
                pool.sets.len() - 1
            }
        };
        let set = &mut pool.sets[at].conns;
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
/// (read buffer, and a rustls session for HTTPS) moves between the pool, the request future and
/// the response body; moving it inline would cost a memcpy at every step.
pub(super) struct Lease(Box<Conn>);

struct Conn {
    io: Io,
    /// Bytes read from the provider and not consumed yet. Empty while the connection is idle.
    read_buf: BytesMut,
    origin: Origin,
    settings: PoolSettings,
    /// Counts the connection as in use; given back when it goes idle.
    slot: Option<super::ConnSlot>,
}

/// A request that failed, and whether none of it was written (so another connection may take it).
pub(super) struct SendFailure {
    pub error: H1Error,
    pub unsent: bool,
}

impl Lease {
    pub(super) fn new(io: Io, origin: Origin, settings: PoolSettings, slot: super::ConnSlot) -> Self {
        Self(Box::new(Conn { io, read_buf: BytesMut::new(), origin, settings, slot: Some(slot) }))
    }

    /// Counts a connection taken from the pool as in use again.
    pub(super) fn hold(&mut self, slot: super::ConnSlot) {
        self.0.slot = Some(slot);
    }

    /// One non-blocking read: a pooled connection the provider closed (EOF or error), or that
    /// holds bytes nobody asked for, is discarded.
    pub(super) async fn revalidate(mut self) -> Option<Self> {
        let conn = &mut *self.0;
        std::future::poll_fn(|cx| match h1::poll_fill(&mut conn.io, cx, &mut conn.read_buf) {
            Poll::Pending => Poll::Ready(true),
            Poll::Ready(_) => Poll::Ready(false),
        })
        .await
        .then_some(self)
    }

    /// Writes the encoded request; the caller may let go of it once this returns.
    pub(super) async fn write(mut self, head: &[u8], body: &[u8]) -> Result<Written, SendFailure> {
        let conn = &mut *self.0;
        let wrote = h1::write_request(&mut conn.io, &mut conn.read_buf, head, body)
            .await
            .map_err(|failure| SendFailure { error: failure.error, unsent: failure.unsent })?;
        Ok(Written { lease: self, interrupted: wrote == h1::Wrote::Interrupted })
    }
}

/// A connection whose request is written (or answered before all of it was), its response
/// still to come.
pub(super) struct Written {
    lease: Lease,
    /// The provider answered before it took the whole request: the connection is not reused.
    interrupted: bool,
}

impl Written {
    /// Reads the response head. The body is read as it is polled.
    pub(super) async fn response(self, head_request: bool) -> Result<ProviderResponse, H1Error> {
        let Written { mut lease, interrupted } = self;
        let conn = &mut *lease.0;
        let head = h1::read_head(&mut conn.io, &mut conn.read_buf, head_request).await?;
        let reusable = head.reusable && !interrupted;
        let mut body = UpstreamBody { lease: Some(lease), decoder: head.decoder, reusable };
        if body.decoder.is_done() {
            body.finish();
        }
        Ok(ProviderResponse { status: head.status, fields: head.fields, body })
    }
}

/// A provider's response body, read from the connection as it is polled: data already buffered
/// is returned without another read, and a burst of chunks read at once comes out as
/// consecutive frames with no read in between. Read to the end, it returns the connection to
/// the pool; dropped before, it closes it.
pub struct UpstreamBody {
    lease: Option<Lease>,
    decoder: Decoder,
    reusable: bool,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").field("pooled", &self.lease.is_some()).finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// The body ended: the connection goes back to the pool if its framing allows another
    /// request and the provider sent nothing more.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        let Some(lease) = self.lease.take() else { return };
        if self.reusable && lease.0.read_buf.is_empty() {
            check_in(lease);
        }
    }

    fn fail(&mut self, error: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.decoder = Decoder::Done;
        self.lease = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            if this.decoder.is_done() {
                return Poll::Ready(None);
            }
            let Some(lease) = this.lease.as_mut() else { return Poll::Ready(None) };
            let conn = &mut *lease.0;
            match this.decoder.decode(&mut conn.read_buf) {
                Err(error) => return this.fail(error),
                Ok(data) if this.decoder.is_done() => {
                    // The end is already here: release the connection with the last data.
                    this.finish();
                    return Poll::Ready(data.map(|data| Ok(Frame::data(data))));
                }
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) => {}
            }
            match h1::poll_fill(&mut conn.io, cx, &mut conn.read_buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => match this.decoder.eof() {
                    // Close-delimited: the body ended with the connection.
                    Ok(()) => this.lease = None,
                    Err(error) => return this.fail(error),
                },
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => return this.fail(H1Error::Read(error)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}
