//! The audit ledger: every admin action as one entry in an append-only, hash-chained log.
//!
//! ```text
//!  entry n:   { sequence, time, actor, action, object, changedFields, previousHash = hash(n-1) }
//!  hash(n) =  SHA-256( canonical JSON of entry n without its hash )
//! ```
//!
//! Editing an entry breaks its hash; deleting or reordering one breaks the sequence and the
//! chain; cutting the tail is caught against a published checkpoint (head sequence and hash).
//! Entries hold names and field paths only — never a secret value or any request content.
//! Storage is a JSON-lines file (`file_store`) or a Redis Stream (`redis_store`); `store`
//! chooses between them.

mod entry;
mod file_store;
pub mod redis_store;
mod store;
mod verify;

pub use entry::{changed_fields, Action, Actor, ActorSource, LedgerEntry, NewEntry, ObjectReference, GENESIS_HASH};
pub use file_store::{read_lines, FileLedger, LedgerError};
pub use redis_store::{RedisLedger, RedisLedgerSettings};
pub use store::LedgerStore;
pub use verify::{verify, Checkpoint, VerifyError, VerifyReport};
