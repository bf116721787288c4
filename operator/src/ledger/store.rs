//! The ledger's storage, chosen at start: a file on a PersistentVolume or a Redis Stream. Both
//! verify the existing chain on open and continue from its head.

use super::entry::{LedgerEntry, NewEntry};
use super::file_store::{read_lines, FileLedger, LedgerError};
use super::redis_store::RedisLedger;

#[derive(Debug)]
pub enum LedgerStore {
    File(FileLedger),
    Redis(RedisLedger),
}

impl LedgerStore {
    pub fn head(&self) -> Option<&LedgerEntry> {
        match self {
            LedgerStore::File(f) => f.head(),
            LedgerStore::Redis(r) => r.head(),
        }
    }

    /// Where the ledger is, for logs (never a Redis URL: it may hold a password).
    pub fn describe(&self) -> String {
        match self {
            LedgerStore::File(f) => format!("file {}", f.path().display()),
            LedgerStore::Redis(r) => format!("redis stream {}", r.stream_key()),
        }
    }

    /// Every entry, oldest first. For Redis this also moves the head to the stream's end, after
    /// verifying it.
    pub async fn entries(&mut self) -> Result<Vec<Result<LedgerEntry, usize>>, LedgerError> {
        match self {
            LedgerStore::File(f) => {
                read_lines(f.path()).map_err(|source| LedgerError::Io { path: f.path().to_path_buf(), source })
            }
            LedgerStore::Redis(r) => r.reload().await,
        }
    }

    pub async fn append(&mut self, new: NewEntry) -> Result<LedgerEntry, LedgerError> {
        match self {
            LedgerStore::File(f) => f.append_entry(new),
            LedgerStore::Redis(r) => r.append_entry(new).await,
        }
    }
}
