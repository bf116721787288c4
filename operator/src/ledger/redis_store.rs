//! Ledger storage in a Redis Stream: one stream entry per ledger entry, its stream ID derived
//! from the sequence (`<sequence>-0`), fields `hash` and `entry` (the entry's JSON).
//!
//! ```text
//!   append(n) ──EVALSHA──▶ [ last stream entry is n-1 with hash h(n-1)? ] ─yes─▶ XADD <n>-0
//!                                                                        └─no──▶ Forked: reload, retry
//! ```
//!
//! The check and the `XADD` run in one script, atomically, so two writers racing (a leader and
//! a deposed leader that has not noticed yet) can never both extend the same head: the loser is
//! told the head moved and rereads the ledger. Stream IDs must grow, so even a writer that
//! bypassed the script could not insert an entry before the head. Opening reads the whole
//! stream and verifies it, so a restarted operator continues the chain it verified.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::entry::{LedgerEntry, NewEntry};
use super::file_store::LedgerError;
use super::verify::{verify, Checkpoint, VerifyError, VerifyReport};

/// Default stream key.
pub const DEFAULT_STREAM_KEY: &str = "portcullis:audit-ledger";

/// Entries read per `XRANGE`, so a long ledger never arrives as one huge reply.
const PAGE: usize = 500;

/// KEYS: stream. ARGV: expected head sequence (0 = empty), expected head hash, entry hash,
/// entry JSON. Returns {1, seq, hash} after appending, or {0, seq, hash} of the actual head.
const APPEND: &str = r#"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local seq, hash = 0, ''
if #last > 0 then
  seq = tonumber(string.match(last[1][1], '^(%d+)-')) or -1
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'hash' then hash = fields[i + 1] end
  end
end
if seq ~= tonumber(ARGV[1]) or (seq > 0 and hash ~= ARGV[2]) then
  return {0, seq, hash}
end
local n = seq + 1
redis.call('XADD', KEYS[1], string.format('%d-0', n), 'hash', ARGV[3], 'entry', ARGV[4])
return {1, n, ARGV[3]}
"#;

/// Where the ledger lives in Redis. The URL may hold a password: it is never logged or shown.
#[derive(Clone)]
pub struct RedisLedgerSettings {
    pub url: String,
    pub stream_key: String,
    /// Per-command timeout.
    pub timeout: Duration,
}

impl std::fmt::Debug for RedisLedgerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLedgerSettings")
            .field("url", &"<redacted>")
            .field("stream_key", &self.stream_key)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisLedgerSettings {
    pub fn new(url: impl Into<String>, stream_key: impl Into<String>) -> Self {
        Self { url: url.into(), stream_key: stream_key.into(), timeout: Duration::from_secs(5) }
    }
}

pub struct RedisLedger {
    connection: ConnectionManager,
    stream_key: String,
    append: Script,
    head: Option<LedgerEntry>,
}

impl std::fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLedger")
            .field("stream_key", &self.stream_key)
            .field("head", &self.head.as_ref().map(|h| h.sequence))
            .finish_non_exhaustive()
    }
}

fn redis_error(what: &'static str) -> impl FnOnce(redis::RedisError) -> LedgerError {
    // The error's text names the failure (connection refused, script error), not the URL.
    move |source| LedgerError::Redis { what, detail: source.to_string() }
}

/// Connects (eagerly: an operator that cannot reach its ledger should say so at start).
pub async fn connect(settings: &RedisLedgerSettings) -> Result<ConnectionManager, LedgerError> {
    let client = redis::Client::open(settings.url.as_str()).map_err(|_| LedgerError::Redis {
        what: "parsing the Redis URL",
        detail: "expected redis://[user:password@]host:port[/db] (TLS to Redis, rediss://, is not built in)".into(),
    })?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.timeout))
        .set_response_timeout(Some(settings.timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client, config).await.map_err(redis_error("connecting to Redis"))
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// `(stream id, entry JSON)` of one `XRANGE` item, whatever the protocol's shape.
fn item(value: &Value) -> Option<(String, Option<String>)> {
    let Value::Array(parts) = value else { return None };
    let id = text(parts.first()?)?;
    let pairs: Vec<(String, Option<String>)> = match parts.get(1)? {
        Value::Array(flat) => {
            flat.chunks(2).filter_map(|p| Some((text(p.first()?)?, p.get(1).and_then(text)))).collect()
        }
        Value::Map(map) => map.iter().filter_map(|(k, v)| Some((text(k)?, text(v)))).collect(),
        _ => return None,
    };
    let entry = pairs.into_iter().find(|(k, _)| k == "entry").and_then(|(_, v)| v);
    Some((id, entry))
}

/// One stream item as a ledger entry; `Err(position)` when it is not one, or sits under a
/// stream ID that is not its own sequence.
fn parse(position: usize, value: &Value) -> (Option<String>, Result<LedgerEntry, usize>) {
    let Some((id, json)) = item(value) else { return (None, Err(position)) };
    let entry = json
        .and_then(|j| LedgerEntry::from_stored(j.as_bytes()))
        .filter(|e| id == format!("{}-0", e.sequence))
        .ok_or(position);
    (Some(id), entry)
}

/// Whether stream ID `id` (`ms-seq`) comes after `before`; IDs that do not parse come after nothing.
fn stream_id_after(id: &str, before: &str) -> bool {
    let parts = |id: &str| -> Option<(u64, u64)> {
        let (ms, seq) = id.split_once('-')?;
        Some((ms.parse().ok()?, seq.parse().ok()?))
    };
    matches!((parts(id), parts(before)), (Some(a), Some(b)) if a > b)
}

/// Every entry of the stream, oldest first, in pages. Positions (for "line" in errors) count
/// from 1.
pub async fn read_stream(
    connection: &mut ConnectionManager,
    stream_key: &str,
) -> Result<Vec<Result<LedgerEntry, usize>>, LedgerError> {
    let mut out = Vec::new();
    let mut start = "-".to_owned();
    let mut seen: Option<String> = None;
    loop {
        let page: Vec<Value> = redis::cmd("XRANGE")
            .arg(stream_key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query_async(connection)
            .await
            .map_err(redis_error("reading the ledger stream"))?;
        let mut last_id = None;
        for value in &page {
            let (id, entry) = parse(out.len() + 1, value);
            out.push(entry);
            last_id = id.or(last_id);
        }
        match last_id {
            // Exclusive start (Redis 6.2+): the page after the last ID seen. A Redis that
            // answers a page again, or one that goes back, would have this read forever.
            Some(id) if page.len() == PAGE => {
                if seen.as_ref().is_some_and(|before| !stream_id_after(&id, before)) {
                    return Err(LedgerError::Redis {
                        what: "reading the ledger stream",
                        detail: format!(
                            "Redis answered a page ending at {id} after one ending at {}",
                            seen.as_deref().unwrap_or_default()
                        ),
                    });
                }
                start = format!("({id}");
                seen = Some(id);
            }
            _ => return Ok(out),
        }
    }
}

/// The newest `count` entries, oldest first.
pub async fn tail_stream(
    connection: &mut ConnectionManager,
    stream_key: &str,
    count: usize,
) -> Result<Vec<Result<LedgerEntry, usize>>, LedgerError> {
    let mut page: Vec<Value> = redis::cmd("XREVRANGE")
        .arg(stream_key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(count)
        .query_async(connection)
        .await
        .map_err(redis_error("reading the ledger stream"))?;
    page.reverse();
    Ok(page.iter().enumerate().map(|(i, v)| parse(i + 1, v).1).collect())
}

/// How many entries were ever added to the stream (`XINFO STREAM`, Redis 7+); `None` when the
/// stream does not exist yet or Redis does not say.
pub async fn entries_added(connection: &mut ConnectionManager, stream_key: &str) -> Result<Option<u64>, LedgerError> {
    let exists: i64 = redis::cmd("EXISTS")
        .arg(stream_key)
        .query_async(connection)
        .await
        .map_err(redis_error("reading the ledger stream"))?;
    if exists == 0 {
        return Ok(None);
    }
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream_key)
        .query_async(connection)
        .await
        .map_err(redis_error("reading the ledger stream's info"))?;
    let pairs: Vec<(Option<String>, &Value)> = match &info {
        Value::Array(flat) => flat.chunks(2).filter_map(|p| Some((text(p.first()?), p.get(1)?))).collect(),
        Value::Map(map) => map.iter().map(|(k, v)| (text(k), v)).collect(),
        _ => Vec::new(),
    };
    Ok(pairs.into_iter().find(|(k, _)| k.as_deref() == Some("entries-added")).and_then(|(_, v)| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other).and_then(|t| t.parse().ok()),
    }))
}

/// Reads and verifies the whole stream: the chain, the checkpoint if given, and that Redis
/// never saw more entries added than it holds. The outer error is Redis failing; the inner one
/// is the ledger not verifying.
pub async fn verify_stream(
    connection: &mut ConnectionManager,
    stream_key: &str,
    checkpoint: Option<&Checkpoint>,
) -> Result<(Vec<Result<LedgerEntry, usize>>, Result<VerifyReport, VerifyError>), LedgerError> {
    // Counted first: appends racing this read can only make the stream hold more, never less.
    let added = entries_added(connection, stream_key).await?;
    let entries = read_stream(connection, stream_key).await?;
    let verdict = verify(&entries, checkpoint).and_then(|report| {
        let held = entries.len() as u64;
        match added {
            Some(added) if added > held => Err(VerifyError::StreamDeletions { added, held }),
            _ => Ok(report),
        }
    });
    Ok((entries, verdict))
}

impl RedisLedger {
    /// Connects, reads and verifies the whole stream (appending to a tampered ledger would
    /// bless the tampering), and continues from its head.
    pub async fn open(settings: &RedisLedgerSettings) -> Result<Self, LedgerError> {
        let connection = connect(settings).await?;
        let mut ledger =
            Self { connection, stream_key: settings.stream_key.clone(), append: Script::new(APPEND), head: None };
        ledger.reload().await?;
        Ok(ledger)
    }

    pub fn stream_key(&self) -> &str {
        &self.stream_key
    }

    pub fn head(&self) -> Option<&LedgerEntry> {
        self.head.as_ref()
    }

    /// Rereads and verifies the stream, moving the head to its end; returns the entries.
    pub async fn reload(&mut self) -> Result<Vec<Result<LedgerEntry, usize>>, LedgerError> {
        let (entries, verdict) = verify_stream(&mut self.connection, &self.stream_key, None).await?;
        verdict.map_err(LedgerError::Broken)?;
        self.head = entries.iter().rev().find_map(|e| e.as_ref().ok()).cloned();
        Ok(entries)
    }

    /// Appends one entry after the head this writer knows; `Forked` when another writer
    /// extended the ledger first (nothing is written then).
    pub async fn append_entry(&mut self, new: NewEntry) -> Result<LedgerEntry, LedgerError> {
        let entry = LedgerEntry::next(self.head.as_ref(), new);
        let json = serde_json::to_string(&entry).unwrap_or_default();
        let (expected_sequence, expected_hash) =
            self.head.as_ref().map_or((0, String::new()), |h| (h.sequence, h.hash.clone()));
        let (appended, found_sequence, _found_hash): (i64, i64, String) = self
            .append
            .key(&self.stream_key)
            .arg(expected_sequence)
            .arg(&expected_hash)
            .arg(&entry.hash)
            .arg(&json)
            .invoke_async(&mut self.connection)
            .await
            .map_err(redis_error("appending to the ledger stream"))?;
        if appended != 1 {
            return Err(LedgerError::Forked { expected: expected_sequence, found: found_sequence });
        }
        self.head = Some(entry.clone());
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    #[test]
    fn stream_ids_compare_by_time_then_sequence() {
        assert!(stream_id_after("2-0", "1-0"));
        assert!(stream_id_after("1-10", "1-9"));
        assert!(!stream_id_after("1-0", "1-0"));
        assert!(!stream_id_after("1-0", "2-0"));
        assert!(!stream_id_after("garbage", "1-0"));
        assert!(!stream_id_after("2-0", "garbage"));
    }

    /// A stand-in Redis that answers every XRANGE with the same full page (one that ignores the
    /// exclusive start would): the read stops with an error instead of growing without end.
    #[tokio::test]
    async fn a_redis_that_answers_the_same_page_again_is_an_error_not_an_endless_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let page: String = {
            let item = |i: usize| format!("*2\r\n$5\r\n{i}-0\r\n*2\r\n$5\r\nentry\r\n$2\r\n{{}}\r\n");
            format!("*{PAGE}\r\n{}", (100..100 + PAGE).map(item).collect::<String>())
        };
        let xranges = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = xranges.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (page, counted) = (page.clone(), counted.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    // Each command: `*N`, then `$len` and the argument N times.
                    while let Ok(Some(header)) = lines.next_line().await {
                        let n: usize = header.trim_start_matches('*').parse().unwrap_or(0);
                        let mut args = Vec::new();
                        for _ in 0..n {
                            let _len = lines.next_line().await;
                            args.push(lines.next_line().await.ok().flatten().unwrap_or_default());
                        }
                        let answer = if args.first().is_some_and(|a| a.eq_ignore_ascii_case("XRANGE")) {
                            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            page.clone()
                        } else {
                            "+OK\r\n".to_owned()
                        };
                        if write.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let settings = RedisLedgerSettings::new(format!("redis://{addr}/0"), "k");
        let mut connection = connect(&settings).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(20), read_stream(&mut connection, "k")).await;
        let error = read.expect("the read ends").expect_err("a repeated page is an error").to_string();
        assert!(error.contains("Redis answered a page ending at 599-0 after one ending at 599-0"), "{error}");
        assert_eq!(xranges.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn the_url_and_its_password_never_reach_debug_output_or_errors() {
        let settings = RedisLedgerSettings::new("redis://:hunter2-password@127.0.0.1:1/0", "k");
        assert!(!format!("{settings:?}").contains("hunter2"));
        let bad = RedisLedgerSettings::new("nonsense://:hunter2-password@host", "k");
        let error = connect(&bad).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("expected redis://"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
