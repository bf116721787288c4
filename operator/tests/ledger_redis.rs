//! The audit ledger in a Redis Stream, against a real `redis-server` on a free loopback port:
//! appends continue across operator and Redis restarts, `verify` (and `audit verify
//! --redis-url`) names an edited or deleted entry, and racing writers never fork the chain.
//! Without a `redis-server` binary each test says so and returns.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use portcullis_operator::audit::{observe_api_key, ActorHints};
use portcullis_operator::cluster::audit::Audit;
use portcullis_operator::ledger::redis_store::{connect, read_stream, verify_stream};
use portcullis_operator::ledger::{
    verify, Action, Actor, ActorSource, LedgerError, LedgerStore, NewEntry, ObjectReference, RedisLedger,
    RedisLedgerSettings, VerifyError,
};
use serde_json::json;

fn redis_server_bin() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PORTCULLIS_REDIS_SERVER") {
        return Some(PathBuf::from(path));
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/local/bin"])
        .map(|dir| PathBuf::from(dir).join("redis-server"))
        .find(|p| p.is_file())
}

/// A `redis-server` with an fsynced append-only file, so it can be restarted with its data.
struct Redis {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Option<Self> {
        let Some(bin) = redis_server_bin() else {
            eprintln!("skipping: redis-server not found (set PORTCULLIS_REDIS_SERVER or install redis-server)");
            return None;
        };
        let mut dir = tempfile::tempdir().unwrap();
        for _ in 0..4 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut redis = Redis { bin: bin.clone(), dir, port, child: None };
            if redis.launch() {
                return Some(redis);
            }
            redis.kill();
            dir = tempfile::tempdir().unwrap();
        }
        panic!("redis-server did not start");
    }

    fn launch(&mut self) -> bool {
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut c) = client.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return true;
                    }
                }
            }
            if matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(Some(_)))) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn settings(&self) -> RedisLedgerSettings {
        RedisLedgerSettings::new(self.url(), "test:ledger")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        assert!(self.launch(), "redis-server did not restart");
    }

    fn cmd(&self, args: &[&str]) -> redis::Value {
        let mut c = redis::Client::open(self.url()).unwrap().get_connection().unwrap();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c).unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn object(name: &str) -> ObjectReference {
    ObjectReference {
        kind: "ApiKey".into(),
        namespace: "team-a".into(),
        name: name.into(),
        uid: format!("u-{name}"),
        generation: 1,
    }
}

fn actor(name: &str) -> Actor {
    Actor { username: name.into(), groups: vec!["admins".into()], source: ActorSource::AdmissionWebhook }
}

async fn append(ledger: &mut RedisLedger, i: u64) -> Result<u64, LedgerError> {
    let time = Utc.timestamp_opt(1_790_000_000 + i as i64, 0).single().unwrap();
    ledger
        .append_entry(NewEntry {
            time,
            actor: actor("alice"),
            action: Action::ApiKeyCreated,
            object: object(&format!("k{i}")),
            changed_fields: vec![],
            facts: BTreeMap::new(),
        })
        .await
        .map(|e| e.sequence)
}

async fn check(settings: &RedisLedgerSettings) -> Result<u64, VerifyError> {
    let mut connection = connect(settings).await.unwrap();
    let (entries, verdict) = verify_stream(&mut connection, &settings.stream_key, None).await.unwrap();
    // The chain alone agrees unless an entry was deleted from the tail.
    if let Ok(report) = &verdict {
        assert_eq!(verify(&entries, None).map(|r| r.entries), Ok(report.entries));
    }
    verdict.map(|r| r.entries)
}

#[tokio::test]
async fn appends_continue_across_operator_and_redis_restarts() {
    let Some(mut redis) = Redis::start() else { return };
    let settings = redis.settings();
    let mut ledger = RedisLedger::open(&settings).await.unwrap();
    assert!(ledger.head().is_none());
    for i in 1..=3 {
        assert_eq!(append(&mut ledger, i).await.unwrap(), i);
    }
    drop(ledger);

    // The operator restarts: the head is read back and the chain continues.
    let mut ledger = RedisLedger::open(&settings).await.unwrap();
    assert_eq!(ledger.head().map(|h| h.sequence), Some(3));
    assert_eq!(append(&mut ledger, 4).await.unwrap(), 4);
    drop(ledger);

    // Redis restarts (from its append-only file): the same.
    redis.restart();
    let mut ledger = RedisLedger::open(&settings).await.unwrap();
    assert_eq!(ledger.head().map(|h| h.sequence), Some(4));
    assert_eq!(append(&mut ledger, 5).await.unwrap(), 5);
    assert_eq!(check(&settings).await, Ok(5));

    // More than one page of entries reads back in order.
    for i in 6..=1_100 {
        append(&mut ledger, i).await.unwrap();
    }
    assert_eq!(check(&settings).await, Ok(1_100));

    // And the command-line verifier and tail agree.
    let bin = env!("CARGO_BIN_EXE_portcullis-operator");
    let out = Command::new(bin)
        .args(["audit", "verify", "--redis-url", &redis.url(), "--stream-key", "test:ledger"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("ok: 1100 entries, head 1100:"), "{stdout}");
    let out = Command::new(bin)
        .args(["audit", "tail", "-n", "2", "--redis-url", &redis.url(), "--stream-key", "test:ledger"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let sequences: Vec<u64> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, [1_099, 1_100]);
}

#[tokio::test]
async fn edited_and_deleted_entries_are_named_and_block_appends() {
    let Some(redis) = Redis::start() else { return };
    let settings = redis.settings();
    let mut ledger = RedisLedger::open(&settings).await.unwrap();
    for i in 1..=4 {
        append(&mut ledger, i).await.unwrap();
    }
    drop(ledger);

    // Stream entries cannot be edited in place: rewrite the stream with entry 2 altered.
    let mut connection = connect(&settings).await.unwrap();
    let entries = read_stream(&mut connection, "test:ledger").await.unwrap();
    redis.cmd(&["DEL", "test:ledger"]);
    for mut entry in entries.into_iter().map(Result::unwrap) {
        // Re-encoded as the struct (the canonical key order), with the hash left as it was.
        if entry.sequence == 2 {
            entry.actor.username = "mallory".into();
        }
        let id = format!("{}-0", entry.sequence);
        redis.cmd(&["XADD", "test:ledger", &id, "hash", &entry.hash, "entry", &serde_json::to_string(&entry).unwrap()]);
    }
    assert_eq!(check(&settings).await, Err(VerifyError::Edited { line: 2, sequence: 2 }));
    assert!(matches!(RedisLedger::open(&settings).await, Err(LedgerError::Broken(VerifyError::Edited { .. }))));
    let bin = env!("CARGO_BIN_EXE_portcullis-operator");
    let verify_cli = || {
        Command::new(bin)
            .args(["audit", "verify", "--redis-url", &redis.url(), "--stream-key", "test:ledger"])
            .output()
            .unwrap()
    };
    let out = verify_cli();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("entry 2 (line 2): content was edited"));

    // Deleting an entry breaks the sequence.
    let other = RedisLedgerSettings::new(redis.url(), "test:other");
    let mut ledger = RedisLedger::open(&other).await.unwrap();
    for i in 1..=4 {
        append(&mut ledger, i).await.unwrap();
    }
    redis.cmd(&["XDEL", "test:other", "3-0"]);
    assert_eq!(check(&other).await, Err(VerifyError::Sequence { line: 3, expected: 3, found: 4 }));
    assert!(matches!(RedisLedger::open(&other).await, Err(LedgerError::Broken(VerifyError::Sequence { .. }))));
    // A writer that opened before the deletion may still append, but the gap stays visible.
    append(&mut ledger, 5).await.unwrap();
    assert_eq!(check(&other).await, Err(VerifyError::Sequence { line: 3, expected: 3, found: 4 }));

    // Deleting the newest entries leaves a valid chain, but Redis remembers how many it took.
    let tail = RedisLedgerSettings::new(redis.url(), "test:tail");
    let mut ledger = RedisLedger::open(&tail).await.unwrap();
    for i in 1..=4 {
        append(&mut ledger, i).await.unwrap();
    }
    redis.cmd(&["XDEL", "test:tail", "4-0"]);
    assert_eq!(check(&tail).await, Err(VerifyError::StreamDeletions { added: 4, held: 3 }));
    assert!(matches!(RedisLedger::open(&tail).await, Err(LedgerError::Broken(VerifyError::StreamDeletions { .. }))));
    let out = Command::new(bin)
        .args(["audit", "verify", "--redis-url", &redis.url(), "--stream-key", "test:tail"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("entries deleted"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn racing_writers_never_fork_the_chain() {
    let Some(redis) = Redis::start() else { return };
    let settings = redis.settings();
    // Two writers that both believe the ledger ends at entry 1.
    let mut first = RedisLedger::open(&settings).await.unwrap();
    append(&mut first, 1).await.unwrap();
    let mut a = RedisLedger::open(&settings).await.unwrap();
    let mut b = RedisLedger::open(&settings).await.unwrap();
    assert_eq!(append(&mut a, 2).await.unwrap(), 2);
    match append(&mut b, 2).await {
        Err(LedgerError::Forked { expected: 1, found: 2 }) => {}
        other => panic!("expected Forked, got {other:?}"),
    }
    // The loser rereads and continues after the winner.
    b.reload().await.unwrap();
    assert_eq!(append(&mut b, 3).await.unwrap(), 3);

    // Many concurrent appends from two writers: every one lands once, in one chain.
    let mut tasks = Vec::new();
    for writer in 0..2u64 {
        let settings = settings.clone();
        tasks.push(tokio::spawn(async move {
            let mut ledger = RedisLedger::open(&settings).await.unwrap();
            let mut done = 0;
            while done < 50 {
                match append(&mut ledger, 1_000 * (writer + 1) + done).await {
                    Ok(_) => done += 1,
                    Err(LedgerError::Forked { .. }) => {
                        ledger.reload().await.unwrap();
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(check(&settings).await, Ok(103));
}

#[tokio::test]
async fn a_deposed_writer_neither_forks_nor_repeats_an_action() {
    let Some(redis) = Redis::start() else { return };
    let settings = redis.settings();
    let open = || async {
        let store = LedgerStore::Redis(RedisLedger::open(&settings).await.unwrap());
        Audit::from_store(store, Arc::new(ActorHints::default())).await.unwrap()
    };
    let (leader, deposed) = (open().await, open().await);
    let key: portcullis_crds::v1alpha1::ApiKey = serde_json::from_value(json!({
        "apiVersion": "portcullis.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "k", "namespace": "team-a", "uid": "u1", "generation": 1}, "spec": {},
    }))
    .unwrap();
    let now = Utc::now();
    let observed = observe_api_key(&key, now);
    assert_eq!(leader.record(&observed, &[], now).await.unwrap().len(), 1);
    // The deposed one saw the same creation: refused, it rereads the ledger...
    assert!(matches!(deposed.record(&observed, &[], now).await, Err(LedgerError::Forked { .. })));
    // ...and its retry finds the action already recorded.
    assert!(deposed.record(&observed, &[], now).await.unwrap().is_empty());
    assert_eq!(check(&settings).await, Ok(1));
}
