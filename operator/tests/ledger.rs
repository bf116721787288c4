//! The audit ledger: append across restarts, and detection of every kind of tampering —
//! including any single-byte edit — by `verify` and by `portcullis-operator audit verify`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use chrono::{TimeZone, Utc};
use portcullis_operator::ledger::{
    self, Action, Actor, ActorSource, Checkpoint, FileLedger, ObjectReference, VerifyError,
};

fn object(name: &str) -> ObjectReference {
    ObjectReference {
        kind: "ApiKey".into(),
        namespace: "team-a".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        generation: 1,
    }
}

fn write_ledger(path: &Path, n: u64) {
    let mut ledger = FileLedger::open(path).expect("open");
    for i in 0..n {
        let actor = Actor {
            username: format!("user{i}@example.com"),
            groups: vec!["admins".into()],
            source: ActorSource::AdmissionWebhook,
        };
        let action = if i % 2 == 0 { Action::ApiKeyCreated } else { Action::ApiKeyRevoked };
        let time = Utc.timestamp_opt(1_790_000_000 + i as i64, 0).single().expect("time");
        ledger.append(time, actor, action, object(&format!("key{i}")), vec!["spec.revoked".into()]).expect("append");
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).expect("read").lines().map(str::to_owned).collect()
}

fn check(path: &Path, checkpoint: Option<&Checkpoint>) -> Result<ledger::VerifyReport, VerifyError> {
    ledger::verify(&ledger::read_lines(path).expect("read"), checkpoint)
}

#[test]
fn chain_survives_restart_and_verifies() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ledger.jsonl");
    write_ledger(&path, 3);
    write_ledger(&path, 2); // a restarted operator continues the chain
    let report = check(&path, None).expect("verifies");
    assert_eq!(report.entries, 5);
    assert_eq!(report.head.as_ref().map(|h| h.sequence), Some(5));
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains("\"previousHash\""));
    assert!(!text.contains("sk-"), "no secret-looking value in the ledger");
}

#[test]
fn edit_delete_reorder_and_truncate_are_each_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ledger.jsonl");
    write_ledger(&path, 5);
    let original = lines(&path);
    let head = check(&path, None).expect("ok").head.expect("head");
    let write = |l: &[String]| std::fs::write(&path, l.join("\n") + "\n").expect("write");

    let mut edited = original.clone();
    edited[2] = edited[2].replace("user2@example.com", "mallory@example.com");
    write(&edited);
    assert_eq!(check(&path, None), Err(VerifyError::Edited { line: 3, sequence: 3 }));

    let mut deleted = original.clone();
    deleted.remove(1);
    write(&deleted);
    assert_eq!(check(&path, None), Err(VerifyError::Sequence { line: 2, expected: 2, found: 3 }));

    let mut reordered = original.clone();
    reordered.swap(1, 2);
    write(&reordered);
    assert!(matches!(check(&path, None), Err(VerifyError::Sequence { line: 2, .. })));

    write(&original[..3]);
    assert!(check(&path, None).is_ok(), "without a checkpoint a clean cut looks like a shorter ledger");
    assert_eq!(check(&path, Some(&head)), Err(VerifyError::Truncated { head: 3, checkpoint: 5 }));

    write(&original);
    assert!(check(&path, Some(&head)).is_ok());
}

#[test]
fn every_single_byte_edit_is_detected_by_the_command() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ledger.jsonl");
    write_ledger(&path, 3);
    // And one whose fields hold their defaults (no groups, generation 0, nothing changed), as
    // the operator's own entries do: renaming such a key reads back as the same entry, so only
    // the canonical encoding, byte for byte, tells the edit.
    let mut ledger = FileLedger::open(&path).expect("open");
    let operator = Actor { username: "portcullis-operator".into(), groups: vec![], source: ActorSource::Operator };
    let keyring = ObjectReference { kind: "Secret".into(), generation: 0, ..object("keyring") };
    let time = Utc.timestamp_opt(1_790_000_100, 123_456_789).single().expect("time");
    ledger.append(time, operator, Action::MasterKeyRotated, keyring, vec![]).expect("append");
    drop(ledger);
    let bin = env!("CARGO_BIN_EXE_portcullis-operator");
    let run = |p: &Path| Command::new(bin).args(["audit", "verify", "--file"]).arg(p).output().expect("run");
    let ok = run(&path);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    let original = std::fs::read(&path).expect("read");
    let tampered = dir.path().join("tampered.jsonl");
    // Every byte position, changed to a different printable byte (newlines excluded: splitting
    // a line is an edit too, but it is covered by the unreadable-line case above).
    let mut undetected = Vec::new();
    for i in 0..original.len() {
        if original[i] == b'\n' {
            continue;
        }
        let mut copy = original.clone();
        copy[i] = if original[i] == b'a' { b'b' } else { b'a' };
        std::fs::write(&tampered, &copy).expect("write");
        let entries = ledger::read_lines(&tampered).expect("read");
        if ledger::verify(&entries, None).is_ok() {
            undetected.push(i);
        }
    }
    assert!(undetected.is_empty(), "single-byte edits at {undetected:?} went unnoticed");
    // And the command reports it and exits non-zero.
    let mut copy = original.clone();
    copy[40] ^= 0x01;
    std::fs::write(&tampered, &copy).expect("write");
    let out = run(&tampered);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("broken"));
}

#[test]
fn open_refuses_to_extend_a_tampered_ledger() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("ledger.jsonl");
    write_ledger(&path, 2);
    let text = std::fs::read_to_string(&path).expect("read").replace("key0", "keyX");
    std::fs::write(&path, text).expect("write");
    assert!(FileLedger::open(&path).is_err());
}
