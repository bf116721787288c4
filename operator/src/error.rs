//! The operator's one error type. Each variant is one step of a reconcile and has a stable
//! category, used as a metric label and an Event reason.

/// Stable, low-cardinality name of an error's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// Reading from the API server failed (transient).
    Read,
    /// A write failed (transient).
    Write,
    /// A write lost an optimistic-concurrency race or a field-ownership conflict (transient).
    Conflict,
    /// The keyring or pepper Secret is unusable (waits for a fix to the Secret).
    KeyMaterial,
    /// `compile` failed in a way no single object explains.
    Compile,
    /// This replica is not the leader and must not write.
    NotLeader,
    /// Appending to the audit ledger failed (transient; the change is retried, never dropped).
    Ledger,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Read => "read",
            Category::Write => "write",
            Category::Conflict => "conflict",
            Category::KeyMaterial => "key_material",
            Category::Compile => "compile",
            Category::NotLeader => "not_leader",
            Category::Ledger => "ledger",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing {what}: {source}")]
    Write {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("key material: {0}")]
    KeyMaterial(String),
    #[error(transparent)]
    Compile(#[from] crate::assemble::AssembleError),
    #[error(
        "the snapshot is {bytes} bytes gzipped ({api_keys} ApiKeys, {credentials} ProviderCredentials), over the \
         {limit} bytes a Secret holds: it is not written and the last one written stays in force"
    )]
    SnapshotTooLarge { bytes: usize, limit: usize, api_keys: usize, credentials: usize },
    #[error("this replica is not the leader")]
    NotLeader,
    #[error("audit ledger: {0}")]
    Ledger(#[from] crate::ledger::LedgerError),
}

impl Error {
    pub fn read(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let what = what.into();
        move |source| Error::Read { what, source }
    }

    pub fn write(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let what = what.into();
        move |source| Error::Write { what, source }
    }

    pub fn category(&self) -> Category {
        match self {
            Error::Read { .. } => Category::Read,
            Error::Write { source, .. } if status_code(source) == Some(409) => Category::Conflict,
            Error::Write { .. } => Category::Write,
            Error::KeyMaterial(_) => Category::KeyMaterial,
            Error::Compile(_) | Error::SnapshotTooLarge { .. } => Category::Compile,
            Error::NotLeader => Category::NotLeader,
            Error::Ledger(_) => Category::Ledger,
        }
    }
}

/// The HTTP status of an API error, if it was one.
pub fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_have_their_own_category() {
        let conflict =
            kube::Error::Api(kube::core::Status::failure("the object has been modified", "Conflict").boxed());
        let mut status = kube::core::Status::failure("boom", "InternalError");
        status.code = 500;
        let mut conflict_status = match conflict {
            kube::Error::Api(s) => *s,
            _ => unreachable!(),
        };
        conflict_status.code = 409;
        let e = Error::write("x")(kube::Error::Api(conflict_status.boxed()));
        assert_eq!(e.category(), Category::Conflict);
        let e = Error::write("x")(kube::Error::Api(status.boxed()));
        assert_eq!(e.category().as_str(), "write");
    }
}
