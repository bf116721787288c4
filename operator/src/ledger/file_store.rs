//! Ledger storage in an append-only file (one JSON entry per line), fsynced per entry, for a
//! PersistentVolume. The head is re-read on open, so the chain continues across restarts.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::entry::{Action, Actor, LedgerEntry, NewEntry, ObjectReference};
use super::verify::{verify, VerifyError};

#[derive(Debug)]
pub struct FileLedger {
    path: PathBuf,
    file: File,
    head: Option<LedgerEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the existing ledger does not verify, refusing to append to it: {0}")]
    Broken(VerifyError),
    #[error("{what}: {detail}")]
    Redis { what: &'static str, detail: String },
    /// Another writer extended the ledger first; nothing was written. Reload and decide again.
    #[error("another writer appended first (expected head {expected}, found {found}); nothing written")]
    Forked { expected: u64, found: i64 },
}

impl FileLedger {
    /// Opens (or creates) the ledger, verifying the existing chain first: appending to a
    /// tampered ledger would bless the tampering.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let io = |source| LedgerError::Io { path: path.to_path_buf(), source };
        let file = OpenOptions::new().create(true).append(true).read(true).open(path).map_err(io)?;
        let entries = read_lines(path).map_err(io)?;
        verify(&entries, None).map_err(LedgerError::Broken)?;
        let head = entries.into_iter().last().and_then(Result::ok);
        Ok(Self { path: path.to_path_buf(), file, head })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn head(&self) -> Option<&LedgerEntry> {
        self.head.as_ref()
    }

    /// Appends one entry and makes it durable before returning.
    pub fn append(
        &mut self,
        time: DateTime<Utc>,
        actor: Actor,
        action: Action,
        object: ObjectReference,
        changed_fields: Vec<String>,
    ) -> Result<LedgerEntry, LedgerError> {
        self.append_entry(NewEntry { time, actor, action, object, changed_fields, facts: BTreeMap::new() })
    }

    /// Appends one entry (with the facts it was decided from) and makes it durable.
    pub fn append_entry(&mut self, new: NewEntry) -> Result<LedgerEntry, LedgerError> {
        let entry = LedgerEntry::next(self.head.as_ref(), new);
        let mut line = serde_json::to_vec(&entry).unwrap_or_default();
        line.push(b'\n');
        let io = |source| LedgerError::Io { path: self.path.clone(), source };
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.head = Some(entry.clone());
        Ok(entry)
    }
}

/// Raw lines of a ledger file; a line that does not parse is kept as `Err(line number)`.
pub fn read_lines(path: &Path) -> std::io::Result<Vec<Result<LedgerEntry, usize>>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        out.push(LedgerEntry::from_stored(&line).ok_or(i + 1));
    }
    Ok(out)
}
