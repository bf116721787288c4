//! The shared store: Redis, reached through one auto-reconnecting multiplexed connection.
//!
//! Every admission is decided by an atomic server-side script per subject that checks all of
//! the subject's limits and records them only if all pass. Concurrent requests of one subject
//! share a script call ([`super::batch`]): the script still decides each of them on its own, in
//! order, so this changes the number of round trips and nothing else. Keys of one subject share a hash tag
//! (`{pcl:<digest>}`), so a script only ever touches one slot and works on Redis Cluster; the
//! digest keeps names and addresses out of Redis. Time comes from Redis (`TIME`), so replicas
//! with skewed clocks still share one window. Every call has a tight timeout. A call the store
//! fails, or leaves unanswered while it answers nothing else (or has answered nothing in time for
//! a while), marks it unhealthy until a background probe sees it answer again in time; a call
//! left unanswered while other answers arrive is only late (an admission's requests are refused
//! as busy, and what its answer admits is given back). See [`Shared::timed_out`].
//!
//! The connection lives on a thread of its own ([`IoThread`]), not on the runtime that serves
//! requests: answers are read, and timed, as they arrive, so a flooded gateway (every worker
//! busy, or off the core) does not take its own slowness to read them for the store's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use futures_util::StreamExt as _;
use prometheus::IntCounterVec;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script, ScriptInvocation};
use sha2::{Digest, Sha256};

use super::batch::{BatchFuture, Batcher};
use super::slice::{self, Grant, LaneLimits, Refund, Slices};
use super::window::{GRANULES, GRANULE_MS};
use super::{Admission, Decision, Granted, Period, Refusal, Subject, SubjectLimits, Which};

const WINDOW_SCRIPT_PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local G = tonumber(ARGV[1])
local N = tonumber(ARGV[2])
local cur = math.floor(now / G)
local function expire(h, l)
  while true do
    local head = redis.call('LINDEX', l, 0)
    if not head then break end
    if tonumber(head) + N >= cur then break end
    local c = tonumber(redis.call('HGET', h, head) or '0')
    redis.call('HDEL', h, head)
    redis.call('LPOP', l)
    redis.call('HINCRBY', h, 't', -c)
  end
  return tonumber(redis.call('HGET', h, 't') or '0')
end
"#;

/// KEYS: requests hash, requests list, tokens hash, tokens list, day counter, month counter.
/// ARGV: granule ms, granules, rpm, tpm, day budget, month budget, day ttl, month ttl (0 = no
/// such limit), requests and tokens wanted for a slice ([`super::slice`]; 0 and 0 for none), then
/// one cost per request of the batch. Each request is decided on its own, in order, exactly as if
/// it had come alone; the reply is ten numbers per request, then ten for the slice: requests and
/// tokens granted, ms left in the granule, requests and tokens used, day and month used, the two
/// resets, and the granule it is recorded in.
const ADMIT_BODY: &str = r#"
local function retry_after(h, l, total, cost, limit)
  local items = redis.call('LRANGE', l, 0, -1)
  local freed = 0
  for _, head in ipairs(items) do
    freed = freed + tonumber(redis.call('HGET', h, head) or '0')
    if total - freed + cost <= limit then return (tonumber(head) + N + 1) * G - now end
  end
  return N * G
end
-- Never record behind the newest granule: Redis's clock can step back (NTP, a failover to a
-- replica), and the granules must stay in order for `expire` and for settlements to find theirs.
-- The lists' tails also say whether `cur` is listed yet (a granule settled down to 0 still is).
local tails = {}
for _, l in ipairs({KEYS[2], KEYS[4]}) do
  local tail = redis.call('LINDEX', l, -1)
  tails[l] = tail and tonumber(tail) or -1
  if tails[l] > cur then cur = tails[l] end
end
local function add(h, l, c)
  if tails[l] ~= cur then redis.call('RPUSH', l, cur); tails[l] = cur end
  redis.call('HINCRBY', h, cur, c)
  redis.call('HINCRBY', h, 't', c)
end
local rpm = tonumber(ARGV[3])
local tpm = tonumber(ARGV[4])
local dayb = tonumber(ARGV[5])
local monb = tonumber(ARGV[6])
local rq, tk, dayu, monu = 0, 0, 0, 0
local rq_head, tk_head = false, false
if rpm > 0 then rq = expire(KEYS[1], KEYS[2]); rq_head = redis.call('LINDEX', KEYS[2], 0) end
if tpm > 0 then tk = expire(KEYS[3], KEYS[4]); tk_head = redis.call('LINDEX', KEYS[4], 0) end
if dayb > 0 then dayu = tonumber(redis.call('GET', KEYS[5]) or '0') end
if monb > 0 then monu = tonumber(redis.call('GET', KEYS[6]) or '0') end
-- Admitted requests are counted in rq/tk at once and written in one go: at the end, or before
-- a refusal reads the stored granules to say when to retry.
local pending_rq, pending_tk, spent, added = 0, 0, 0, false
local function flush()
  if pending_rq > 0 then add(KEYS[1], KEYS[2], pending_rq) end
  if pending_tk > 0 then add(KEYS[3], KEYS[4], pending_tk) end
  pending_rq, pending_tk = 0, 0
end
-- Counts n requests and t tokens as admitted in the current granule.
local function record(n, t)
  if rpm > 0 then
    rq, pending_rq = rq + n, pending_rq + n
    rq_head = rq_head or cur
  end
  if tpm > 0 then
    tk, pending_tk = tk + t, pending_tk + t
    tk_head = tk_head or cur
  end
  added, spent = true, spent + t
end
local function reset_of(head)
  if head then return (tonumber(head) + N + 1) * G - now end
  return 0
end
local out = {}
local function push(a, b, c, d, e, f, g, h, i, j)
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5] = a, b, c, d, e
  out[n + 6], out[n + 7], out[n + 8], out[n + 9], out[n + 10] = f, g, h, i, j
end
for i = 11, #ARGV do
  local cost = tonumber(ARGV[i])
  if rpm > 0 and rq + 1 > rpm then
    flush()
    push(0, 1, retry_after(KEYS[1], KEYS[2], rq, 1, rpm), rq, tk, 0, 0, 0, 0, 0)
  elseif tpm > 0 and tk + cost > tpm then
    flush()
    push(0, 2, retry_after(KEYS[3], KEYS[4], tk, cost, tpm), rq, tk, 0, 0, 0, 0, 0)
  elseif dayb > 0 and dayu >= dayb then
    push(0, 3, 0, rq, tk, 0, dayu, 0, 0, 0)
  elseif monb > 0 and monu >= monb then
    push(0, 4, 0, rq, tk, 0, dayu, monu, 0, 0)
  else
    record(1, cost)
    push(1, 0, 0, rq, tk, cur, dayu, monu, reset_of(rq_head), reset_of(tk_head))
    dayu, monu = dayu + cost, monu + cost
  end
end
-- The slice: what is left of each limit, up to what was asked; nothing unless every limit the
-- subject has can give some (a slice of requests without tokens admits nothing).
local want_rq, want_tk = tonumber(ARGV[9]), tonumber(ARGV[10])
local slice_rq, slice_tk = 0, 0
if want_rq > 0 or want_tk > 0 then
  local tokens_limited = tpm > 0 or dayb > 0 or monb > 0
  if rpm > 0 then slice_rq = math.max(0, math.min(want_rq, rpm - rq)) end
  if tokens_limited then
    slice_tk = want_tk
    if tpm > 0 then slice_tk = math.min(slice_tk, tpm - tk) end
    if dayb > 0 then slice_tk = math.min(slice_tk, dayb - dayu) end
    if monb > 0 then slice_tk = math.min(slice_tk, monb - monu) end
    slice_tk = math.max(0, slice_tk)
  end
  if (rpm > 0 and slice_rq == 0) or (tokens_limited and slice_tk == 0) then slice_rq, slice_tk = 0, 0 end
  if slice_rq > 0 or slice_tk > 0 then
    record(slice_rq, slice_tk)
    dayu, monu = dayu + slice_tk, monu + slice_tk
  end
end
flush()
-- At most a granule: after a clock step back, `cur` (the newest listed) may lie ahead of `now`.
push(slice_rq, slice_tk, math.min(G, (cur + 1) * G - now), rq, tk, dayu, monu, reset_of(rq_head), reset_of(tk_head), cur)
if added then
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], (N + 2) * G) end
  if dayb > 0 then redis.call('INCRBY', KEYS[5], spent); redis.call('PEXPIRE', KEYS[5], ARGV[7]) end
  if monb > 0 then redis.call('INCRBY', KEYS[6], spent); redis.call('PEXPIRE', KEYS[6], ARGV[8]) end
end
return out
"#;

/// KEYS as for admit. ARGV: granule ms, granules, then four numbers per settlement: granule,
/// request delta, token delta, budget delta (applied to the day and month counters that exist).
const SETTLE_BODY: &str = r#"
local function adjust(h, g, delta)
  local c = redis.call('HGET', h, g)
  if not c then return end
  local new = math.max(0, tonumber(c) + delta)
  redis.call('HSET', h, g, new)
  redis.call('HINCRBY', h, 't', new - tonumber(c))
end
expire(KEYS[1], KEYS[2])
expire(KEYS[3], KEYS[4])
-- Sum per granule first: a batch mostly shares one or two granules.
local rqd, tkd, order, b = {}, {}, {}, 0
for i = 3, #ARGV, 4 do
  local g = ARGV[i]
  if rqd[g] == nil then rqd[g], tkd[g] = 0, 0; order[#order + 1] = g end
  rqd[g] = rqd[g] + tonumber(ARGV[i + 1])
  tkd[g] = tkd[g] + tonumber(ARGV[i + 2])
  b = b + tonumber(ARGV[i + 3])
end
for _, g in ipairs(order) do
  if rqd[g] ~= 0 then adjust(KEYS[1], g, rqd[g]) end
  if tkd[g] ~= 0 then adjust(KEYS[3], g, tkd[g]) end
end
if b ~= 0 then
  for i = 5, 6 do
    local v = redis.call('GET', KEYS[i])
    if v then
      local new = math.max(0, tonumber(v) + b)
      local ttl = redis.call('PTTL', KEYS[i])
      redis.call('SET', KEYS[i], new)
      if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
  end
end
return 1
"#;

/// KEYS as for admit. ARGV: granule ms, granules. Returns current counts.
const USAGE_BODY: &str = r#"
return {expire(KEYS[1], KEYS[2]), expire(KEYS[3], KEYS[4]), tonumber(redis.call('GET', KEYS[5]) or '0'), tonumber(redis.call('GET', KEYS[6]) or '0')}
"#;

/// KEYS: failures counter, lock. ARGV: threshold, window ms, backoff ms.
/// Returns the lockout's remaining ms, or -1.
const AUTH_FAILED: &str = r#"
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then return ttl end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], 1, 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return tonumber(ARGV[3])
end
return -1
"#;

/// Most requests one script call decides: bounds the time a script holds Redis.
const MAX_BATCH: usize = 128;

/// How often the flusher ends spent-out granules' slices and sends what is owed.
const FLUSH_EVERY: Duration = Duration::from_millis(GRANULE_MS / 2);
/// Settle calls one flush has in flight at most.
const FLUSH_CALLS_AT_ONCE: usize = 16;
/// Granules of owed settlements kept per lane while the store is down (one minute's worth).
const MAX_OWED_PER_LANE: usize = GRANULES as usize;

/// Waits up to `limit` for `call`. Past it, gives it a short grace (a tenth of `limit`, 1 to
/// 10 ms) in which the tasks already woken can run, and looks again: a gateway too busy to look
/// by the deadline has not been left without an answer. An answer that arrives on the store's
/// thread within the grace counts as in time ([`Shared::in_time`]).
async fn within<F: std::future::Future>(limit: Duration, call: F) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut call = std::pin::pin!(call);
    match tokio::time::timeout(limit, &mut call).await {
        Ok(output) => Ok(output),
        Err(_) => {
            tokio::task::yield_now().await;
            tokio::time::timeout(grace(limit), call).await
        }
    }
}

/// The second look's wait past a deadline of `limit` (see [`within`]).
fn grace(limit: Duration) -> Duration {
    (limit / 10).clamp(Duration::from_millis(1), Duration::from_millis(10))
}

/// How long after it was sent an admit call's answer is still read (to give back what it
/// admitted); and how long a store that answers, but nothing within the timeout, is taken for
/// late, not down.
fn late_answer_bound(timeout: Duration) -> Duration {
    (timeout * 20).max(Duration::from_secs(1))
}

/// Where the store's connection lives, and its calls run ([`Shared::on_io`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreThread {
    /// A thread of its own ([`IoThread`]): answers are read as they arrive, however busy the
    /// runtime serving requests is.
    #[default]
    Own,
    /// The runtime serving requests, for a busy-polling data plane (`--busy-poll-us`): its one
    /// thread never sleeps while traffic flows, so a thread of the store's would wait for the
    /// scheduler to take the core from it (measured: p99 at 32 connections ~1.5 ms higher),
    /// while the one thread, never asleep, reads answers within a turn anyway.
    Serving,
}

/// The store's own thread: a runtime of one worker that the connection lives on, and every call
/// to the store runs on ([`Shared::on_io`]). Answers are read from the socket as they arrive and
/// stamped there, whatever the runtime serving requests is doing: with every worker of that
/// runtime busy (a flood), an answer left for one of them to read waited unread past its
/// deadline, and the store was taken for down. Dropped, it stops at once; calls still out end
/// unanswered.
#[derive(Debug)]
struct IoThread(Option<tokio::runtime::Runtime>);

impl IoThread {
    /// Starts the thread; returns it with the handle calls are spawned on.
    fn start() -> anyhow::Result<(Self, tokio::runtime::Handle)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("limits-redis")
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("starting the Redis connection's thread: {e}"))?;
        let handle = runtime.handle().clone();
        Ok((Self(Some(runtime)), handle))
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // Without waiting: the store may be dropped on a runtime's thread.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The connection, the scripts, the health flag and the slices, shared with the batch drainers
/// and the flusher.
#[derive(Debug)]
struct Shared {
    connection: ConnectionManager,
    /// The store's thread ([`IoThread`]), where every call runs.
    /// `None`: no thread of its own ([`StoreThread::Serving`]); calls run in their callers.
    io: Option<tokio::runtime::Handle>,
    admit: Script,
    settle: Script,
    usage: Script,
    auth_failed: Script,
    healthy: AtomicBool,
    timeout: Duration,
    /// When the store last answered a call, and last answered one within the timeout, in µs
    /// since `epoch` (see [`Shared::timed_out`]).
    answered_us: AtomicU64,
    answered_in_time_us: AtomicU64,
    epoch: Instant,
    errors: IntCounterVec,
    slices: Slices<AdmitLane>,
    /// Settlements of sliced subjects and unspent slices, summed per granule until the next flush.
    owed: Mutex<HashMap<SettleLane, Vec<SettleItem>>>,
    flusher: AtomicBool,
    /// Held for a whole flush, so `flush_all` waits for one already sending.
    flushing: tokio::sync::Mutex<()>,
}

/// Requests of one subject that can be decided by one script call: same counters, same limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AdmitLane {
    subject: Arc<str>,
    /// rpm, tpm, day budget, month budget; 0 = none (budgets are 0 for team subjects).
    limits: [u64; 4],
    day: u32,
    month: u32,
}

#[derive(Debug, Clone, Copy)]
struct AdmitItem {
    cost: u64,
    day_ttl_ms: u64,
    month_ttl_ms: u64,
    /// Admitted from a slice when one has room; asks for one when not.
    sliced: bool,
}

impl AdmitLane {
    fn settle_lane(&self) -> SettleLane {
        SettleLane { subject: self.subject.clone(), day: self.day, month: self.month }
    }
}

/// A subject's limits as a lane sees them (budgets only for keys: teams have none).
fn lane_limits(limits: &SubjectLimits, budgets: bool) -> LaneLimits {
    let budget = |b: Option<u64>| if budgets { b.unwrap_or(0) } else { 0 };
    [
        limits.requests_per_minute.unwrap_or(0),
        limits.tokens_per_minute.unwrap_or(0),
        budget(limits.tokens_per_day),
        budget(limits.tokens_per_month),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SettleLane {
    subject: Arc<str>,
    day: u32,
    month: u32,
}

#[derive(Debug, Clone, Copy)]
struct SettleItem {
    granule: u64,
    requests: i64,
    tokens: i64,
    budget: i64,
}

/// One admission's answer: admitted?, which limit, retry-after ms, requests used, tokens used,
/// granule, day used, month used, requests reset ms, tokens reset ms.
type AdmitReply = slice::Reply;

/// Why the shared store gave no decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The call failed or the store is down: the key's failure policy decides.
    Failed,
    /// The store answers, but not this decision in time: its call was answered late (behind
    /// other calls), or this key's decisions are queued past twice the timeout (a flood of one
    /// key). Refused, whatever the policy.
    Busy,
}

/// The admit script's reply for `items` requests: each one's answer, then the slice granted
/// (see `ADMIT_BODY`). `None` when its length is not that.
fn split_admit_reply(reply: &[i64], items: usize) -> Option<(Vec<AdmitReply>, Grant)> {
    if reply.len() != (items + 1) * 10 {
        return None;
    }
    let mut replies: Vec<AdmitReply> = reply.chunks_exact(10).map(|c| std::array::from_fn(|i| c[i])).collect();
    let trailer = replies.pop()?;
    let u = |v: i64| v.max(0) as u64;
    let grant = Grant {
        requests: u(trailer[0]),
        tokens: u(trailer[1]),
        ms_left: u(trailer[2]),
        requests_used: u(trailer[3]),
        tokens_used: u(trailer[4]),
        day_used: u(trailer[5]),
        month_used: u(trailer[6]),
        requests_reset_ms: u(trailer[7]),
        tokens_reset_ms: u(trailer[8]),
        granule: u(trailer[9]),
    };
    Some((replies, grant))
}

/// A team reservation whose request is still waiting for its key's decision. Dropped while
/// armed (the request went away: its client left, or it was cancelled), it is given back with
/// the next flush instead of counting for nobody.
struct TeamHold<'a> {
    shared: &'a Arc<Shared>,
    /// What giving it back takes; taken once the key is decided.
    refund: Option<(SettleLane, SettleItem)>,
}

impl Drop for TeamHold<'_> {
    fn drop(&mut self) {
        if let Some((lane, item)) = self.refund.take() {
            self.shared.owe(lane, item);
            self.shared.start_flusher();
        }
    }
}

#[derive(Debug)]
pub struct RedisStore {
    shared: Arc<Shared>,
    /// Each item's answer, or why the store gave none.
    admits: Arc<Batcher<AdmitLane, AdmitItem, Result<AdmitReply, Unanswered>>>,
    settles: Arc<Batcher<SettleLane, SettleItem, ()>>,
    /// Lockout lookups, one lane per client address.
    locks: Arc<Batcher<String, (), i64>>,
    /// Stops the store's thread, if it has one, when the store is dropped.
    _io: Option<IoThread>,
}

fn settle_lane(subject: &Subject, period: Period) -> SettleLane {
    SettleLane { subject: subject.id.clone(), day: period.day, month: period.month }
}

/// What settling an admission whose reservation was off by `delta` tokens changes: the key's
/// per-minute tokens (when it has that limit) and its budgets, and the team's per-minute tokens
/// (when the team has that limit; teams have no budgets).
fn settlements<'a>(
    admission: &'a Admission,
    granted: &Granted,
    delta: i64,
) -> impl Iterator<Item = (&'a Subject, SettleItem)> {
    let key_tokens = admission.key().limits.tokens_per_minute.map_or(0, |_| delta);
    let key = SettleItem { granule: granted.granule, requests: 0, tokens: key_tokens, budget: delta };
    let team = admission.team().filter(|t| t.limits.tokens_per_minute.is_some());
    let team = team.map(|t| (t, SettleItem { granule: granted.team_granule, requests: 0, tokens: delta, budget: 0 }));
    std::iter::once((admission.key(), key)).chain(team)
}

/// `{pcl:<digest>}` for a subject or client address.
fn tag(kind: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{kind}\0{name}").as_bytes());
    format!("{{pcl:{}}}", hex::encode(&digest[..10]))
}

fn subject_keys(subject: &str, day: u32, month: u32) -> [String; 6] {
    let t = tag("subject", subject);
    [
        format!("{t}:rq"),
        format!("{t}:rql"),
        format!("{t}:tk"),
        format!("{t}:tkl"),
        format!("{t}:d:{day}"),
        format!("{t}:m:{month}"),
    ]
}

impl Shared {
    fn failed(&self, kind: &str, error: &str) {
        self.errors.with_label_values(&[kind]).inc();
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(kind, error, "shared limit store unavailable; applying the failure policy");
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Whether an answer that arrived at `arrived` for a call sent at `sent` came within the
    /// timeout and its grace.
    fn in_time(&self, sent: Instant, arrived: Instant) -> bool {
        arrived.saturating_duration_since(sent) <= self.timeout + grace(self.timeout)
    }

    /// Notes that the store answered a call at `at`, in time or not.
    fn answered(&self, at: Instant, in_time: bool) {
        // At least 1: 0 stands for never.
        let at = self.micros(at).max(1);
        self.answered_us.fetch_max(at, Ordering::Relaxed);
        if in_time {
            self.answered_in_time_us.fetch_max(at, Ordering::Relaxed);
        }
    }

    /// Runs `call` on the store's thread. The answer is stamped there as it arrives (see
    /// [`Self::answered`]) and comes back with that moment, so that it is judged by when the store
    /// answered, not by when a busy caller looked. The call is sent at once, before the returned
    /// future is first polled. Without a thread of its own the call runs in the returned future
    /// (a hop through a busy runtime's queue each way would cost more than it tells), and comes
    /// back without a moment: when its caller reads it is no measure of when it came, so the
    /// caller stamps it, in time if read within its wait ([`Self::judge`]).
    fn on_io<T: Send + 'static>(
        self: &Arc<Self>,
        call: impl std::future::Future<Output = RedisResult<T>> + Send + 'static,
    ) -> impl std::future::Future<Output = RedisResult<(T, Option<Instant>)>> + Send + 'static {
        let Some(io) = &self.io else {
            return Either::Left(async move { call.await.map(|value| (value, None)) });
        };
        let shared = self.clone();
        let sent = Instant::now();
        let (answer, answered) = tokio::sync::oneshot::channel();
        // On a store already dropped (its thread stopped) the task is dropped, and with it
        // `answer`: the call ends unanswered.
        io.spawn(async move {
            let outcome = call.await;
            let arrived = Instant::now();
            if outcome.is_ok() {
                shared.answered(arrived, shared.in_time(sent, arrived));
            }
            let _ = answer.send(outcome.map(|value| (value, Some(arrived))));
        });
        Either::Right(async move {
            answered
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("the Redis connection's thread has stopped").into()))
        })
    }

    /// Runs one of the scripts on the store's thread, with the keys and arguments `fill` adds.
    fn script<T: redis::FromRedisValue + Send + 'static>(
        self: &Arc<Self>,
        script: fn(&Self) -> &Script,
        fill: impl FnOnce(&mut ScriptInvocation<'_>) + Send + 'static,
    ) -> impl std::future::Future<Output = RedisResult<(T, Option<Instant>)>> + Send + 'static {
        let shared = self.clone();
        self.on_io(async move {
            let mut invocation = script(&shared).prepare_invoke();
            fill(&mut invocation);
            let mut connection = shared.connection.clone();
            invocation.invoke_async(&mut connection).await
        })
    }

    /// Runs a plain command on the store's thread.
    fn command<T: redis::FromRedisValue + Send + 'static>(
        self: &Arc<Self>,
        command: redis::Cmd,
    ) -> impl std::future::Future<Output = RedisResult<(T, Option<Instant>)>> + Send + 'static {
        let mut connection = self.connection.clone();
        self.on_io(async move { command.query_async(&mut connection).await })
    }

    /// What a call that went unanswered for the whole timeout says. The store answers one
    /// connection's calls in order, so when another answer has arrived since this call was sent,
    /// the store is answering and this call waits behind the calls ahead of it: it is late, not
    /// lost (a store that falls behind for a moment, or a gateway too busy to read its answers at
    /// once), and the store is not marked down for it, which would hand every key to its failure
    /// policy. But a store that answers everything late is as good as down: once no call has been
    /// answered within the timeout for `late_answer_bound`, or nothing has arrived since this call
    /// was sent, the store is marked down.
    fn timed_out(&self, kind: &str, sent: Instant) -> Unanswered {
        let in_time = self.answered_in_time_us.load(Ordering::Relaxed);
        let lately = self.micros(Instant::now()).saturating_sub(in_time);
        // An answer in time is an answer too (the two stamps are written one after the other,
        // on the store's thread, and may be seen here in either order).
        let answering = self.answered_us.load(Ordering::Relaxed).max(in_time) > self.micros(sent);
        if answering && in_time > 0 && lately < late_answer_bound(self.timeout).as_micros() as u64 {
            self.errors.with_label_values(&[kind]).inc();
            Unanswered::Busy
        } else {
            self.failed(kind, "timed out");
            Unanswered::Failed
        }
    }

    /// Judges a call's outcome (`Err(Elapsed)`: none within the timeout and its grace); marks
    /// the store down on a failure, and on a late answer only as [`Self::timed_out`] says. An
    /// answer was stamped when it arrived ([`Self::on_io`]); one without that moment is stamped
    /// here, in time.
    fn judge<T>(
        &self,
        kind: &str,
        sent: Instant,
        outcome: Result<RedisResult<(T, Option<Instant>)>, tokio::time::error::Elapsed>,
    ) -> Result<(T, Option<Instant>), Unanswered> {
        match outcome {
            Ok(Ok((value, arrived))) => {
                if arrived.is_none() {
                    self.answered(Instant::now(), true);
                }
                Ok((value, arrived))
            }
            Ok(Err(e)) if e.is_timeout() => Err(self.timed_out(kind, sent)),
            Ok(Err(e)) => {
                self.failed(kind, &e.to_string());
                Err(Unanswered::Failed)
            }
            Err(_) => Err(self.timed_out(kind, sent)),
        }
    }

    /// Waits for a call (sent by [`Self::on_io`]) under the timeout.
    async fn call<T>(
        &self,
        kind: &str,
        call: impl std::future::Future<Output = RedisResult<(T, Option<Instant>)>>,
    ) -> Result<T, Unanswered> {
        let sent = Instant::now();
        let outcome = within(self.timeout, call).await;
        self.judge(kind, sent, outcome).map(|(value, _)| value)
    }

    /// Decides a batch: from the lane's slice what fits (a slice may have arrived while the
    /// batch waited), the rest in one script call that also takes the next slice. When that call
    /// fails, the items the slice admitted keep their answers; the others fail.
    async fn admit_batch(
        self: &Arc<Self>,
        lane: &AdmitLane,
        items: &[AdmitItem],
    ) -> Vec<Result<AdmitReply, Unanswered>> {
        let sent = Instant::now();
        let from_slice: Vec<Option<AdmitReply>> = items
            .iter()
            .map(|item| if item.sliced { self.slices.take(lane, &lane.limits, item.cost, sent) } else { None })
            .collect();
        let remote: Vec<AdmitItem> =
            items.iter().zip(&from_slice).filter(|(_, reply)| reply.is_none()).map(|(item, _)| *item).collect();
        let mut decided = if remote.is_empty() {
            Ok(Vec::new().into_iter())
        } else {
            self.admit_remote(lane, &remote, sent).await.map(Vec::into_iter)
        };
        from_slice
            .into_iter()
            .map(|reply| match (reply, &mut decided) {
                (Some(reply), _) => Ok(reply),
                (None, Ok(decided)) => decided.next().ok_or(Unanswered::Failed),
                (None, Err(unanswered)) => Err(*unanswered),
            })
            .collect()
    }

    async fn admit_remote(
        self: &Arc<Self>,
        lane: &AdmitLane,
        items: &[AdmitItem],
        sent: Instant,
    ) -> Result<Vec<AdmitReply>, Unanswered> {
        let sliced = items.iter().any(|item| item.sliced);
        let costs: Vec<u64> = items.iter().map(|item| item.cost).collect();
        let want = if sliced { self.slices.want(lane, &lane.limits, &costs, sent) } else { (0, 0) };
        let ttl = |f: fn(&AdmitItem) -> u64| items.iter().map(f).max().unwrap_or(0) + 86_400_000;
        let mut args = vec![
            GRANULE_MS,
            GRANULES,
            lane.limits[0],
            lane.limits[1],
            lane.limits[2],
            lane.limits[3],
            ttl(|i| i.day_ttl_ms),
            ttl(|i| i.month_ttl_ms),
            want.0,
            want.1,
        ];
        args.extend(&costs);
        let subject = lane.clone();
        let called = Instant::now();
        let mut call = Box::pin(self.script::<Vec<i64>>(
            |s| &s.admit,
            move |invocation| {
                for key in subject_keys(&subject.subject, subject.day, subject.month) {
                    invocation.key(key);
                }
                for arg in args {
                    invocation.arg(arg);
                }
            },
        ));
        let reply = within(self.timeout, &mut call).await;
        if reply.is_err() {
            // Its requests are answered without it; an answer that comes later is still read
            // and what it admitted given back.
            let (shared, lane) = (self.clone(), lane.clone());
            tokio::spawn(async move {
                if let Ok(Ok((late, arrived))) = tokio::time::timeout(late_answer_bound(shared.timeout), call).await {
                    if arrived.is_none() {
                        shared.answered(Instant::now(), false);
                    }
                    shared.give_back_late(&lane, &costs, &late);
                }
            });
        }
        let (reply, _) = self.judge("admit", called, reply)?;
        let Some((replies, grant)) = split_admit_reply(&reply, items.len()) else {
            self.failed("admit", "reply of the wrong length");
            return Err(Unanswered::Failed);
        };
        if sliced {
            let admitted = items
                .iter()
                .zip(&replies)
                .filter(|(_, reply)| reply[0] == 1)
                .fold((0, 0), |(n, t), (item, _)| (n + 1, t + item.cost));
            if let Some(refund) = self.slices.deposit(lane, &lane.limits, grant, admitted, sent) {
                self.owe_refund(lane, refund);
            }
            self.start_flusher();
        }
        Ok(replies)
    }

    /// Adds a settlement to what the next flush sends, summed with others of its granule.
    fn owe(&self, lane: SettleLane, item: SettleItem) {
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        let items = owed.entry(lane).or_default();
        match items.iter().position(|i| i.granule == item.granule) {
            Some(at) => {
                let sum = &mut items[at];
                sum.requests += item.requests;
                sum.tokens += item.tokens;
                sum.budget += item.budget;
            }
            None if items.len() >= MAX_OWED_PER_LANE => {
                // The store has been down for a while: the oldest granule's share is given up.
                items.remove(0);
                items.push(item);
                self.errors.with_label_values(&["settle_dropped"]).inc();
            }
            None => items.push(item),
        }
    }

    /// Gives a slice's unspent part back to the granule it was recorded in.
    fn owe_refund(&self, lane: &AdmitLane, refund: Refund) {
        let [_, tpm, day, month] = lane.limits;
        let tokens = -(refund.tokens as i64);
        self.owe(
            lane.settle_lane(),
            SettleItem {
                granule: refund.granule,
                requests: -(refund.requests as i64),
                tokens: if tpm > 0 { tokens } else { 0 },
                budget: if day > 0 || month > 0 { tokens } else { 0 },
            },
        );
    }

    /// Gives back what an answer admitted for a request that is no longer waiting for it.
    fn give_back_admitted(&self, lane: &AdmitLane, cost: u64, reply: &AdmitReply) {
        if reply[0] == 1 {
            self.owe_refund(lane, Refund { granule: reply[5].max(0) as u64, requests: 1, tokens: cost });
        }
    }

    /// Gives back all an admit call's answer reserved, when it arrived after its requests had
    /// been answered without it: the requests it admitted and the slice it granted.
    fn give_back_late(self: &Arc<Self>, lane: &AdmitLane, costs: &[u64], reply: &[i64]) {
        let Some((replies, slice)) = split_admit_reply(reply, costs.len()) else { return };
        for (cost, reply) in costs.iter().zip(&replies) {
            self.give_back_admitted(lane, *cost, reply);
        }
        if slice.requests > 0 || slice.tokens > 0 {
            self.owe_refund(lane, Refund { granule: slice.granule, requests: slice.requests, tokens: slice.tokens });
        }
        self.start_flusher();
    }

    /// Starts the flusher once: every `FLUSH_EVERY` it ends the slices whose granule is over and
    /// sends what is owed, one settle call per lane. It stops when the store is dropped.
    fn start_flusher(self: &Arc<Self>) {
        // Outside a runtime (a request dropped as the runtime shuts down) there is nothing to
        // start it on; what is owed waits for the next call made inside one.
        if tokio::runtime::Handle::try_current().is_err() || self.flusher.swap(true, Ordering::Relaxed) {
            return;
        }
        let shared: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = shared.upgrade() else { return };
                shared.flush(Instant::now()).await;
            }
        });
    }

    /// Ends expired slices and sends every owed settlement, a bounded number of calls at a time.
    /// While the store is known to be down nothing is sent and what is owed waits (up to
    /// `MAX_OWED_PER_LANE` granules per lane). A call that fails is not repeated, since it may have
    /// run before failing: what it carried is dropped and counted (`settle_dropped` is the
    /// oldest granule given up; a failed call counts under `settle`). Most of what a flush carries
    /// is refunds (unspent slices, reservations above real usage), so a lost call mostly errs high
    /// (strict); a settlement above its reservation (a prompt of more tokens than its bytes ÷ 4)
    /// errs low by its excess. The windows heal within a minute, but a lost budget correction
    /// stays until the day or month ends.
    async fn flush(self: &Arc<Self>, now: Instant) {
        let _one_at_a_time = self.flushing.lock().await;
        for (lane, refund) in self.slices.expire(|lane| lane.limits, now) {
            self.owe_refund(&lane, refund);
        }
        if !self.healthy.load(Ordering::Relaxed) {
            return;
        }
        let owed = std::mem::take(&mut *self.owed.lock().unwrap_or_else(|p| p.into_inner()));
        let calls = owed.into_iter().map(|(lane, items)| async move { self.settle_batch(&lane, &items).await });
        futures_util::stream::iter(calls).buffer_unordered(FLUSH_CALLS_AT_ONCE).for_each(|_| async {}).await;
    }

    async fn settle_batch(self: &Arc<Self>, lane: &SettleLane, items: &[SettleItem]) -> Option<Vec<()>> {
        let keys = subject_keys(&lane.subject, lane.day, lane.month);
        let count = items.len();
        let items = items.to_vec();
        let call = self.script::<i64>(
            |s| &s.settle,
            move |invocation| {
                for key in keys {
                    invocation.key(key);
                }
                invocation.arg(GRANULE_MS).arg(GRANULES);
                for item in items {
                    invocation.arg(item.granule).arg(item.requests).arg(item.tokens).arg(item.budget);
                }
            },
        );
        self.call("settle", call).await.ok()?;
        Some(vec![(); count])
    }

    async fn lock_ttl(self: &Arc<Self>, client: &str, waiting: usize) -> Option<Vec<i64>> {
        let mut pttl = redis::cmd("PTTL");
        pttl.arg(format!("{}:lock", tag("client", client)));
        let ttl: i64 = self.call("lockout", self.command(pttl)).await.ok()?;
        Some(vec![ttl; waiting])
    }
}

impl RedisStore {
    /// A store at `url` (connected on first use), its connection living where `thread` says.
    /// With [`StoreThread::Serving`] it must be called on that runtime.
    pub fn connect(url: &str, timeout: Duration, errors: IntCounterVec, thread: StoreThread) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("--redis-url is invalid: {e}"))?;
        let (io, handle) = match thread {
            StoreThread::Own => IoThread::start().map(|(io, handle)| (Some(io), Some(handle)))?,
            StoreThread::Serving => (None, None),
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
            // Our own timeout judges each call; the connection keeps waiting longer, so that an
            // admission's late answer is still read and given back.
            .set_response_timeout(Some(late_answer_bound(timeout)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        // Lazy: the gateway starts (and serves under its failure policy) while Redis is down.
        // The connection's tasks (and those it starts to reconnect) run on the store's thread,
        // if it has one; else on the runtime `connect` is called on.
        let connection = {
            let _on_io = handle.as_ref().map(tokio::runtime::Handle::enter);
            ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| anyhow::anyhow!("connecting to Redis: {e}"))?
        };
        let shared = Arc::new(Shared {
            connection,
            io: handle,
            admit: Script::new(&format!("{WINDOW_SCRIPT_PRELUDE}{ADMIT_BODY}")),
            settle: Script::new(&format!("{WINDOW_SCRIPT_PRELUDE}{SETTLE_BODY}")),
            usage: Script::new(&format!("{WINDOW_SCRIPT_PRELUDE}{USAGE_BODY}")),
            auth_failed: Script::new(AUTH_FAILED),
            healthy: AtomicBool::new(false),
            timeout,
            answered_us: AtomicU64::new(0),
            answered_in_time_us: AtomicU64::new(0),
            epoch: Instant::now(),
            errors,
            slices: Slices::default(),
            owed: Mutex::new(HashMap::new()),
            flusher: AtomicBool::new(false),
            flushing: tokio::sync::Mutex::new(()),
        });
        let s = shared.clone();
        let given_up = shared.clone();
        let admits = Batcher::for_admissions(
            MAX_BATCH,
            move |lane: AdmitLane, items: Vec<AdmitItem>| -> BatchFuture<Result<AdmitReply, Unanswered>> {
                let s = s.clone();
                Box::pin(async move { Some(s.admit_batch(&lane, &items).await) })
            },
            // Admitted after its request stopped waiting (refused as busy, or its client left):
            // counted for nobody, so given back with the next flush.
            move |lane: &AdmitLane, item: AdmitItem, reply: Result<AdmitReply, Unanswered>| {
                if let Ok(reply) = reply {
                    given_up.give_back_admitted(lane, item.cost, &reply);
                    given_up.start_flusher();
                }
            },
        );
        let s = shared.clone();
        let settles = Batcher::new(MAX_BATCH, move |lane: SettleLane, items: Vec<SettleItem>| -> BatchFuture<()> {
            let s = s.clone();
            Box::pin(async move { s.settle_batch(&lane, &items).await })
        });
        let s = shared.clone();
        let locks = Batcher::new(MAX_BATCH, move |client: String, items: Vec<()>| -> BatchFuture<i64> {
            let s = s.clone();
            Box::pin(async move { s.lock_ttl(&client, items.len()).await })
        });
        Ok(Self { shared, admits, settles, locks, _io: io })
    }

    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Waits for a batched answer, but never longer than the store's timeout.
    async fn answer<O>(&self, answer: impl std::future::Future<Output = Option<O>>) -> Result<O, ()> {
        match tokio::time::timeout(self.shared.timeout, answer).await {
            Ok(Some(value)) => Ok(value),
            Ok(None) | Err(_) => Err(()),
        }
    }

    /// One PING; flips the store back to healthy when it answers in time.
    pub async fn probe(&self) {
        let shared = &self.shared;
        let sent = Instant::now();
        let answered = within(shared.timeout, shared.command::<String>(redis::cmd("PING"))).await;
        match shared.judge("probe", sent, answered) {
            Ok((_, arrived)) if arrived.is_none_or(|arrived| shared.in_time(sent, arrived)) => {
                if !shared.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("shared limit store reachable; limits are shared again");
                }
            }
            // A late PONG, read late by a busy caller too. It is an answer itself, so only
            // another call answered in time since the PING was sent shows the store keeping up
            // (then the PING only queued behind it); else the store is down, as with no PONG.
            Ok(_) => {
                if shared.answered_in_time_us.load(Ordering::Relaxed) > shared.micros(sent) {
                    shared.errors.with_label_values(&["probe"]).inc();
                } else {
                    shared.failed("probe", "answered late");
                }
            }
            Err(_) => {}
        }
    }

    /// One subject's decision: from this replica's slice when it has room (no round trip),
    /// else through the lane's batched script call.
    async fn admit_subject(
        &self,
        subject: &Subject,
        admission: &Admission,
        budgets: bool,
    ) -> Result<AdmitReply, Unanswered> {
        let lane = AdmitLane {
            subject: subject.id.clone(),
            limits: lane_limits(&subject.limits, budgets),
            day: admission.period.day,
            month: admission.period.month,
        };
        let sliced = slice::sliceable(&lane.limits, admission.tokens);
        if sliced {
            if let Some(reply) = self.shared.slices.take(&lane, &lane.limits, admission.tokens, Instant::now()) {
                return Ok(reply);
            }
        }
        let item = AdmitItem {
            cost: admission.tokens,
            day_ttl_ms: admission.period.day_reset_ms,
            month_ttl_ms: admission.period.month_reset_ms,
            sliced,
        };
        // Each call is judged within the timeout and its grace (late: busy, or down once the
        // store has answered nothing in time for a while; unanswered: down); an item waits for
        // the call ahead of it and its own, so twice that tells a store that stopped answering
        // (marked down by then, unless the call ahead was judged late) from a lane that is only
        // queued deep.
        let judged = self.shared.timeout + grace(self.shared.timeout);
        match tokio::time::timeout(judged * 2 + Duration::from_millis(2), self.admits.submit(lane, item)).await {
            Ok(Some(answer)) => answer,
            Ok(None) => Err(Unanswered::Failed),
            // Queued behind this lane's earlier calls while the store answers: the key is
            // flooded, not the store down. Its failure policy would let a flood of one key
            // through unlimited (`open`), or add an in-process allowance to what the store
            // counts (`local`): refused instead.
            Err(_) if self.is_healthy() => Err(Unanswered::Busy),
            Err(_) => Err(Unanswered::Failed),
        }
    }

    fn refusal(reply: &AdmitReply, subject: &Subject, team: bool, period: Period) -> Refusal {
        let l = &subject.limits;
        let (which, limit) = match (reply[1], team) {
            (1, false) => (Which::Requests, l.requests_per_minute),
            (1, true) => (Which::TeamRequests, l.requests_per_minute),
            (2, false) => (Which::Tokens, l.tokens_per_minute),
            (2, true) => (Which::TeamTokens, l.tokens_per_minute),
            (3, _) => (Which::DayBudget, l.tokens_per_day),
            _ => (Which::MonthBudget, l.tokens_per_month),
        };
        let retry_after_ms = match which {
            Which::DayBudget => period.day_reset_ms,
            Which::MonthBudget => period.month_reset_ms,
            _ => reply[2].max(0) as u64,
        };
        let used = match which {
            Which::Requests | Which::TeamRequests => reply[3],
            Which::Tokens | Which::TeamTokens => reply[4],
            Which::DayBudget => reply[6],
            Which::MonthBudget => reply[7],
        };
        Refusal { which, limit: limit.unwrap_or(0), used: used.max(0) as u64, retry_after_ms }
    }

    pub async fn admit(&self, admission: &Admission) -> Result<Decision, Unanswered> {
        let mut team_hold = None;
        if let Some(team) = admission.team() {
            let reply = self.admit_subject(team, admission, false).await?;
            if reply[0] != 1 {
                return Ok(Decision::Refused(Self::refusal(&reply, team, true, admission.period)));
            }
            let granule = reply[5].max(0) as u64;
            let item = SettleItem { granule, requests: -1, tokens: -(admission.tokens as i64), budget: 0 };
            team_hold =
                Some(TeamHold { shared: &self.shared, refund: Some((settle_lane(team, admission.period), item)) });
        }
        let key_reply = self.admit_subject(admission.key(), admission, true).await;
        // Decided one way or the other: the team's reservation is kept, or given back at once.
        let team_refund = team_hold.as_mut().and_then(|hold| hold.refund.take());
        let team_granule = team_refund.as_ref().map(|(_, item)| item.granule);
        let admitted = matches!(key_reply, Ok(reply) if reply[0] == 1);
        if let (false, Some((lane, item))) = (admitted, team_refund) {
            let _ = self.answer(self.settles.submit(lane, item)).await;
        }
        let reply = match key_reply {
            Ok(reply) if admitted => reply,
            Ok(reply) => return Ok(Decision::Refused(Self::refusal(&reply, admission.key(), false, admission.period))),
            Err(unanswered) => return Err(unanswered),
        };
        let as_u64 = |v: i64| v.max(0) as u64;
        Ok(Decision::Granted(Granted {
            granule: as_u64(reply[5]),
            requests_used: as_u64(reply[3]),
            tokens_used: as_u64(reply[4]),
            requests_reset_ms: as_u64(reply[8]),
            tokens_reset_ms: as_u64(reply[9]),
            team_granule: team_granule.unwrap_or(as_u64(reply[5])),
            budget_remaining: super::budget_remaining(&admission.key().limits, as_u64(reply[6]), as_u64(reply[7])),
            // The script charges the counters named after the admission's period.
            budget_day: admission.period.day,
        }))
    }

    /// Settles without waiting when every subject of the admission is sliced: the corrections
    /// join the next flush, summed per granule. False (nothing done) otherwise.
    pub fn settle_deferred(&self, admission: &Admission, granted: &Granted, delta: i64) -> bool {
        let sliced = |limits: LaneLimits| slice::sliceable(&limits, admission.tokens);
        let key = sliced(lane_limits(&admission.key().limits, true));
        // A team is only settled when it limits tokens per minute (see `settlements`).
        let team = admission.team().filter(|t| t.limits.tokens_per_minute.is_some());
        if !key || team.is_some_and(|t| !sliced(lane_limits(&t.limits, false))) {
            return false;
        }
        for (subject, item) in settlements(admission, granted, delta) {
            self.shared.owe(settle_lane(subject, admission.period), item);
        }
        true
    }

    /// Sends every owed settlement now and gives back every slice (shutdown, and tests).
    pub async fn flush_all(&self) {
        for (lane, refund) in self.shared.slices.drain(|lane| lane.limits) {
            self.shared.owe_refund(&lane, refund);
        }
        self.shared.flush(Instant::now()).await;
    }

    pub async fn settle(&self, admission: &Admission, granted: &Granted, delta: i64) {
        if self.settle_deferred(admission, granted, delta) {
            return;
        }
        for (subject, item) in settlements(admission, granted, delta) {
            let lane = settle_lane(subject, admission.period);
            if !self.is_healthy() {
                // The store is down: the correction waits with what is owed and goes out when it
                // answers again (nothing was sent, so nothing can count twice).
                self.shared.owe(lane, item);
                self.shared.start_flusher();
                continue;
            }
            let _ = self.answer(self.settles.submit(lane, item)).await;
        }
    }

    pub async fn usage(&self, subject_id: &str, period: Period) -> Option<(u64, u64, u64, u64)> {
        let keys = subject_keys(subject_id, period.day, period.month);
        let call = self.shared.script::<Vec<i64>>(
            |s| &s.usage,
            move |invocation| {
                for key in keys {
                    invocation.key(key);
                }
                invocation.arg(GRANULE_MS).arg(GRANULES);
            },
        );
        let reply = self.shared.call("usage", call).await.ok()?;
        let v = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        Some((v(0), v(1), v(2), v(3)))
    }

    /// The lockout's remaining ms (`Ok(None)`: not locked out; `Err`: the store did not answer).
    pub async fn locked(&self, client: &str) -> Result<Option<u64>, ()> {
        let ttl = self.answer(self.locks.submit(client.to_owned(), ())).await?;
        Ok((ttl > 0).then_some(ttl as u64))
    }

    /// `Some(result)` when the shared store answered (result = lockout remaining, if any).
    pub async fn auth_failed(
        &self,
        client: &str,
        threshold: u64,
        window_ms: u64,
        backoff_ms: u64,
    ) -> Option<Option<u64>> {
        let t = tag("client", client);
        let call = self.shared.script::<i64>(
            |s| &s.auth_failed,
            move |invocation| {
                invocation
                    .key(format!("{t}:fails"))
                    .key(format!("{t}:lock"))
                    .arg(threshold)
                    .arg(window_ms)
                    .arg(backoff_ms);
            },
        );
        let remaining = self.shared.call("lockout", call).await.ok()?;
        Some((remaining > 0).then_some(remaining as u64))
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    use std::io::{Read as _, Write as _};

    /// A store on a thread of its own that answers every command: `+PONG` to a PING, after the
    /// ms in the returned counter (0 at first), and `+OK` at once to anything else (the
    /// client's setup). Its URL and that counter.
    fn answering_store() -> (String, Arc<AtomicU64>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let pong_after_ms = Arc::new(AtomicU64::new(0));
        let delay = pong_after_ms.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let delay = delay.clone();
                std::thread::spawn(move || answer_commands(stream, &delay));
            }
        });
        (format!("redis://127.0.0.1:{port}/"), pong_after_ms)
    }

    fn answer_commands(mut stream: std::net::TcpStream, pong_after_ms: &AtomicU64) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            // A command is an array of bulk strings: `*<n>\r\n` then n × `$<len>\r\n<bytes>\r\n`.
            while let Some((name, used)) = command(&buf) {
                buf.drain(..used);
                let reply: &[u8] = if name.eq_ignore_ascii_case(b"PING") {
                    std::thread::sleep(Duration::from_millis(pong_after_ms.load(Ordering::SeqCst)));
                    b"+PONG\r\n"
                } else {
                    b"+OK\r\n"
                };
                if stream.write_all(reply).is_err() {
                    return;
                }
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The first complete command in `buf`: its name and the bytes it takes.
    fn command(buf: &[u8]) -> Option<(Vec<u8>, usize)> {
        let line = |at: usize| -> Option<(&[u8], usize)> {
            let end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
            Some((&buf[at..end], end + 2))
        };
        let number = |bytes: &[u8]| std::str::from_utf8(bytes).ok()?.parse::<usize>().ok();
        let (head, mut at) = line(0)?;
        let parts = number(head.strip_prefix(b"*")?)?;
        let mut name = None;
        for _ in 0..parts {
            let (len, start) = line(at)?;
            let len = number(len.strip_prefix(b"$")?)?;
            let part = buf.get(start..start + len)?;
            name.get_or_insert_with(|| part.to_vec());
            at = start + len + 2;
        }
        (at <= buf.len()).then(|| (name.unwrap_or_default(), at))
    }

    /// The store's answers are read and timed on its own thread as they arrive, while the
    /// runtime that sent the call runs nothing at all (a flooded gateway): the call counts as
    /// answered in time, not as a store gone quiet.
    #[tokio::test(flavor = "current_thread")]
    async fn answers_are_read_as_they_arrive_while_the_callers_runtime_is_held_up() {
        const LIMIT: Duration = Duration::from_millis(200);
        let (url, _) = answering_store();
        let store = healthy_store(&url, LIMIT).await;
        let shared = &store.shared;
        for _ in 0..5 {
            let sent = Instant::now();
            let pong = shared.command::<String>(redis::cmd("PING"));
            // Held past the deadline and its grace: nothing on this runtime runs meanwhile.
            std::thread::sleep(LIMIT * 3);
            let in_time = shared.answered_in_time_us.load(Ordering::Relaxed);
            assert!(in_time > shared.micros(sent), "the answer was read and stamped while the caller was held up");
            let (_, arrived) = shared.judge("probe", sent, within(LIMIT, pong).await).expect("answered");
            let arrived = arrived.expect("stamped on the store's thread");
            assert!(shared.in_time(sent, arrived), "judged by when it arrived, not by when the caller looked");
            assert!(store.is_healthy());
        }
    }

    /// A store connected to `url` that has answered a probe in time.
    async fn healthy_store(url: &str, timeout: Duration) -> RedisStore {
        healthy_store_on(url, timeout, StoreThread::Own).await
    }

    async fn healthy_store_on(url: &str, timeout: Duration, thread: StoreThread) -> RedisStore {
        let errors = IntCounterVec::new(prometheus::Opts::new("errors", "errors"), &["kind"]).expect("counter");
        let store = RedisStore::connect(url, timeout, errors, thread).expect("connect");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.is_healthy() {
            assert!(Instant::now() < deadline, "the store never answered the probe");
            store.probe().await;
        }
        store
    }

    /// Without a thread of its own, an answer read late by a held-up caller, but within its
    /// wait, counts as in time: when it was read is no measure of when it came.
    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_read_late_in_the_callers_wait_counts_in_time_without_a_thread() {
        const LIMIT: Duration = Duration::from_millis(50);
        let (url, _) = answering_store();
        let store = healthy_store_on(&url, LIMIT, StoreThread::Serving).await;
        let shared = &store.shared;
        for _ in 0..5 {
            let sent = Instant::now();
            let pong = Box::pin(shared.command::<String>(redis::cmd("PING")));
            // The PING goes out on the first poll; then something holds the thread past the
            // deadline and the grace.
            tokio::spawn(async { std::thread::sleep(LIMIT * 3) });
            let outcome = within(LIMIT, pong).await;
            assert!(shared.judge("probe", sent, outcome).is_ok(), "read within the wait");
            let in_time = shared.answered_in_time_us.load(Ordering::Relaxed);
            assert!(in_time > shared.micros(sent), "read in the wait: in time");
        }
    }

    /// The store's own thread, as `/proc/self/task/<tid>` (asked from inside it), or `None`
    /// when it has none. A path of its own, so other tests' stores in the same process (under
    /// `cargo test`) do not count.
    async fn store_thread(store: &RedisStore) -> Option<std::path::PathBuf> {
        let io = store.shared.io.clone()?;
        let tid = io
            .spawn(async {
                let own = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
                own.file_name().expect("a thread id").to_owned()
            })
            .await
            .expect("ran on the store's thread");
        Some(std::path::Path::new("/proc/self/task").join(tid))
    }

    /// A busy-polling data plane keeps the connection on its one serving thread; otherwise it
    /// gets a thread of its own, which goes when the store does. Both answer.
    #[tokio::test(flavor = "current_thread")]
    async fn the_connection_lives_where_it_is_told() {
        let (url, _) = answering_store();
        let serving = healthy_store_on(&url, Duration::from_millis(200), StoreThread::Serving).await;
        assert_eq!(store_thread(&serving).await, None, "no thread of its own on the serving runtime");
        drop(serving);
        let own = healthy_store_on(&url, Duration::from_millis(200), StoreThread::Own).await;
        let thread = store_thread(&own).await.expect("a thread of its own");
        let named = std::fs::read_to_string(thread.join("comm")).expect("the thread is alive");
        assert_eq!(named.trim(), "limits-redis");
        drop(own);
        let deadline = Instant::now() + Duration::from_secs(10);
        while thread.exists() {
            assert!(Instant::now() < deadline, "the store's thread outlived the store");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A PONG that comes after the timeout, while nothing else is answered, marks the store down
    /// even when the probe, held up longer still, finds it waiting: it is its own answer, not a
    /// sign of another call answered.
    #[tokio::test(flavor = "current_thread")]
    async fn a_late_pong_read_late_marks_an_otherwise_quiet_store_down() {
        const LIMIT: Duration = Duration::from_millis(100);
        let (url, pong_after_ms) = answering_store();
        let store = Arc::new(healthy_store(&url, LIMIT).await);
        pong_after_ms.store(LIMIT.as_millis() as u64 * 2, Ordering::SeqCst);
        let probing = tokio::spawn({
            let store = store.clone();
            async move { store.probe().await }
        });
        // The probe sends its PING; then this thread is held until well after the PONG came.
        tokio::task::yield_now().await;
        std::thread::sleep(LIMIT * 5);
        probing.await.expect("probe");
        assert!(!store.is_healthy(), "a late PONG alone is no sign the store keeps up");
    }

    /// An answer that has arrived but is read by a task the runtime has not run yet when the
    /// deadline passes (here: a task whose timer fired with the waiter's, after the thread was
    /// held up past both) is taken in the grace, not judged missing.
    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_a_busy_runtime_has_not_read_by_the_deadline_is_taken() {
        const LIMIT: Duration = Duration::from_millis(20);
        for _ in 0..20 {
            let (answer, answered) = tokio::sync::oneshot::channel();
            // The connection's task: its answer is there once the timer it waits on fires.
            tokio::spawn(async move {
                tokio::time::sleep(LIMIT + Duration::from_millis(1)).await;
                let _ = answer.send(());
            });
            // Something else holds the thread past both timers.
            tokio::spawn(async { std::thread::sleep(LIMIT * 3) });
            assert!(matches!(within(LIMIT, answered).await, Ok(Ok(()))), "the answer was there to read");
        }
    }
}
