//! One bound on the request bodies held in memory at once, across every connection and stream.
//!
//! The pipeline reads a whole body before it can route it (the model is inside), and holds it
//! until the request is written to the provider (not while the provider thinks, which can take
//! minutes: the body is let go then). `--max-request-body-bytes` bounds one body, and
//! `--max-connections` the connections, but HTTP/2 multiplies each connection by its streams:
//! without a total, enough concurrent large prompts (long contexts, images in base64) would grow
//! the process until the kernel kills it, taking every stream down with it. With it, a body that
//! does not fit is refused at once with a 503 in the API's format and `Retry-After` (the OpenAI
//! and Anthropic SDKs retry those), and the bodies already held are served.
//!
//! A body takes its share chunk by chunk, as it arrives. One of known length that would not fit
//! now is refused before any of it is read; it takes nothing while it has not arrived, so clients
//! that declare large bodies and send them slowly (or never) cannot hold the budget for others.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The bytes of request bodies held at once.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    held: AtomicUsize,
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
#[must_use = "the share is given back when this is dropped"]
pub struct BodyShare<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Self {
        Self { limit, held: AtomicUsize::new(0) }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// An empty share, to grow chunk by chunk.
    #[inline]
    pub fn empty(&self) -> BodyShare<'_> {
        BodyShare { budget: self, bytes: 0 }
    }

    /// Whether `bytes` more would fit now (a body of declared length weighed before reading).
    #[inline]
    pub fn fits(&self, bytes: usize) -> bool {
        self.held().checked_add(bytes).is_some_and(|after| after <= self.limit)
    }

    #[inline]
    fn take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|after| *after <= self.limit)
            })
            .is_ok()
    }
}

impl BodyShare<'_> {
    /// Takes `bytes` more; `false` (and nothing taken) when they do not fit.
    #[inline]
    pub fn grow(&mut self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let taken = self.budget.take(bytes);
        if taken {
            self.bytes += bytes;
        }
        taken
    }

    #[inline]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for BodyShare<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// The least budget that serves every body: one largest body, and the copy of it the gateway
/// writes when it rewrites the body for the provider (the model renamed, usage asked for),
/// which takes its share too while both are held, as much as a rewrite can come to.
pub fn least_limit(max_body: usize) -> usize {
    max_body.saturating_mul(2).saturating_add(super::rewrite::MAX_GROWTH)
}

/// The budget when none is configured: half the container's memory limit (cgroup v2, then
/// v1) when there is one, else 1 GiB; never less than [`least_limit`].
pub fn default_limit(max_body: usize) -> usize {
    const FALLBACK: u64 = 1 << 30;
    let limit = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok().and_then(|text| cgroup_memory_limit(&text)))
        .map_or(FALLBACK, |bytes| bytes / 2);
    usize::try_from(limit).unwrap_or(usize::MAX).max(least_limit(max_body))
}

/// A cgroup memory limit file's value; `None` for "max" or v1's "no limit" (a huge number).
fn cgroup_memory_limit(text: &str) -> Option<u64> {
    let bytes: u64 = text.trim().parse().ok()?;
    // cgroup v1 reports no limit as the largest page-aligned i64.
    (bytes < (1 << 60)).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_taken_up_to_the_limit_and_given_back_when_dropped() {
        let budget = BodyBudget::new(100);
        let mut first = budget.empty();
        assert!(first.grow(60));
        let mut second = budget.empty();
        assert!(!second.grow(41), "60 + 41 > 100");
        assert_eq!(second.bytes(), 0, "a refused share takes nothing");
        assert!(second.grow(40));
        assert_eq!(budget.held(), 100);
        assert!(!budget.empty().grow(1));
        assert!(budget.empty().grow(0), "nothing always fits");
        drop(first);
        assert_eq!(budget.held(), 40);
        assert!(second.grow(60));
        drop(second);
        assert_eq!(budget.held(), 0);
        assert!(!budget.empty().grow(usize::MAX), "no overflow");
    }

    #[test]
    fn the_default_is_half_the_cgroup_limit_and_never_below_one_body() {
        assert_eq!(cgroup_memory_limit("536870912\n"), Some(536_870_912));
        assert_eq!(cgroup_memory_limit("max\n"), None);
        assert_eq!(cgroup_memory_limit("9223372036854771712\n"), None, "cgroup v1's no limit");
        assert_eq!(cgroup_memory_limit("garbage"), None);
        assert!(default_limit(1 << 40) >= 2 << 40, "never below the largest body and its rewritten copy");
    }
}
