//! End-to-end verification of a ledger, naming the first broken entry.

use super::entry::{LedgerEntry, GENESIS_HASH};

/// A published head: the ledger must reach at least this far, through this exact entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub sequence: u64,
    pub hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("line {line}: not a ledger entry (corrupted or edited beyond parsing)")]
    Unreadable { line: usize },
    #[error("entry {sequence} (line {line}): content was edited (hash mismatch)")]
    Edited { line: usize, sequence: u64 },
    #[error("line {line}: expected entry {expected}, found entry {found} (entries deleted or reordered)")]
    Sequence { line: usize, expected: u64, found: u64 },
    #[error("entry {sequence} (line {line}): does not chain to the entry before it")]
    Chain { line: usize, sequence: u64 },
    #[error("ledger ends at entry {head} but checkpoint {checkpoint} was published (tail truncated)")]
    Truncated { head: u64, checkpoint: u64 },
    #[error("entry {sequence} differs from the published checkpoint (history rewritten)")]
    CheckpointMismatch { sequence: u64 },
    /// Redis counts every entry ever added to a stream: fewer held means some were deleted,
    /// even from the tail, where the chain alone cannot tell.
    #[error("the Redis stream had {added} entries added but holds {held} (entries deleted)")]
    StreamDeletions { added: u64, held: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub entries: u64,
    pub head: Option<Checkpoint>,
}

/// Verifies `entries` (in file order) and, when given, that they reach `checkpoint`.
pub fn verify(
    entries: &[Result<LedgerEntry, usize>],
    checkpoint: Option<&Checkpoint>,
) -> Result<VerifyReport, VerifyError> {
    let mut previous: Option<&LedgerEntry> = None;
    for (index, entry) in entries.iter().enumerate() {
        let line = index + 1;
        let entry = entry.as_ref().map_err(|&line| VerifyError::Unreadable { line })?;
        let expected = previous.map_or(1, |p| p.sequence + 1);
        if entry.sequence != expected {
            return Err(VerifyError::Sequence { line, expected, found: entry.sequence });
        }
        if entry.compute_hash() != entry.hash {
            return Err(VerifyError::Edited { line, sequence: entry.sequence });
        }
        let expected_previous = previous.map_or(GENESIS_HASH, |p| p.hash.as_str());
        if entry.previous_hash != expected_previous {
            return Err(VerifyError::Chain { line, sequence: entry.sequence });
        }
        if let Some(cp) = checkpoint.filter(|cp| cp.sequence == entry.sequence) {
            if cp.hash != entry.hash {
                return Err(VerifyError::CheckpointMismatch { sequence: entry.sequence });
            }
        }
        previous = Some(entry);
    }
    let head = previous.map(|p| Checkpoint { sequence: p.sequence, hash: p.hash.clone() });
    if let Some(cp) = checkpoint {
        let reached = head.as_ref().map_or(0, |h| h.sequence);
        if reached < cp.sequence {
            return Err(VerifyError::Truncated { head: reached, checkpoint: cp.sequence });
        }
    }
    Ok(VerifyReport { entries: entries.len() as u64, head })
}
