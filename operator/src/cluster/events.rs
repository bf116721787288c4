//! Kubernetes Events, all through [`report`], and only for transitions.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// A transition worth telling a person about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    KeyIssued {
        prefix: String,
    },
    KeyRotated {
        prefix: String,
    },
    KeyRecovered {
        prefix: String,
    },
    RevealDeleted,
    /// `Ready` changed to `reason`.
    Ready {
        ready: bool,
        reason: &'static str,
        message: String,
    },
    SnapshotWritten {
        generation: u64,
    },
    /// The audit ledger's head, published as a checkpoint.
    LedgerCheckpoint {
        head: String,
    },
    /// The object could not be read as its kind.
    Malformed {
        message: String,
    },
}

impl Transition {
    fn event(&self) -> Event {
        let (type_, reason, action, note) = match self {
            Transition::KeyIssued { prefix } => (
                EventType::Normal,
                "KeyIssued",
                "Issue",
                format!("issued key {prefix}; it is revealed once in the Secret named in status"),
            ),
            Transition::KeyRotated { prefix } => (
                EventType::Normal,
                "KeyRotated",
                "Rotate",
                format!("issued key {prefix}; the previous key stays valid for the grace period"),
            ),
            Transition::KeyRecovered { prefix } => (
                EventType::Normal,
                "KeyRecovered",
                "Issue",
                format!("recorded key {prefix} found in the reveal Secret"),
            ),
            Transition::RevealDeleted => (
                EventType::Normal,
                "RevealDeleted",
                "Delete",
                "deleted the reveal Secret; the key stays valid".to_owned(),
            ),
            Transition::Ready { ready, reason, message } => {
                (if *ready { EventType::Normal } else { EventType::Warning }, *reason, "Reconcile", message.clone())
            }
            Transition::SnapshotWritten { generation } => {
                (EventType::Normal, "SnapshotWritten", "Write", format!("wrote snapshot generation {generation}"))
            }
            Transition::LedgerCheckpoint { head } => (
                EventType::Normal,
                "LedgerCheckpoint",
                "Checkpoint",
                format!("audit ledger head {head}; verify with `portcullis-operator audit verify --checkpoint {head}`"),
            ),
            Transition::Malformed { message } => (EventType::Warning, "InvalidSpec", "Reconcile", message.clone()),
        };
        Event {
            type_,
            reason: reason.to_owned(),
            note: Some(clip_note(note)),
            action: action.to_owned(),
            secondary: None,
        }
    }
}

/// The API server takes an Event note of at most 1 KiB, counted in bytes: a longer one is cut at
/// a character boundary (a note can quote names with characters of several bytes).
const NOTE_BYTES: usize = 1024;

fn clip_note(mut note: String) -> String {
    note.truncate(note.floor_char_boundary(NOTE_BYTES));
    note
}

/// Publishes `transition` about `regarding`. Failing to publish an Event never fails a
/// reconcile.
pub async fn report(recorder: Option<&Recorder>, regarding: &ObjectReference, transition: Transition) {
    tracing::info!(
        object = regarding.name.as_deref().unwrap_or_default(),
        namespace = regarding.namespace.as_deref().unwrap_or_default(),
        kind = regarding.kind.as_deref().unwrap_or_default(),
        transition = ?transition,
        "transition"
    );
    if let Some(recorder) = recorder {
        if let Err(error) = recorder.publish(&transition.event(), regarding).await {
            tracing::warn!(%error, "could not publish an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_is_cut_to_the_api_servers_bytes_at_a_character_boundary() {
        assert_eq!(clip_note("short".into()), "short");
        let exact = "a".repeat(NOTE_BYTES);
        assert_eq!(clip_note(exact.clone()), exact);
        // 1,023 bytes of ASCII, then two-byte characters: the one across the limit is left out.
        let clipped = clip_note(format!("{}{}", "a".repeat(NOTE_BYTES - 1), "é".repeat(600)));
        assert_eq!(clipped.len(), NOTE_BYTES - 1);
        let clipped = clip_note("é".repeat(1000));
        assert_eq!((clipped.len(), clipped.chars().count()), (NOTE_BYTES, NOTE_BYTES / 2));
    }
}
