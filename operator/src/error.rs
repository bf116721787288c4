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

/// How long the snapshot writer waits on one API call.
pub const API_CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// `call`'s answer, or an error once it has gone unanswered for [`API_CALL_DEADLINE`]. The
/// client has no read timeout (kube's default, kept for the watches, which have their own), so
/// one call hung on a half-open connection stopped every snapshot after it: the writer waits
/// for it under the snapshot lock, and a kill switch flipped meanwhile was never published.
pub async fn answered<T>(call: impl std::future::Future<Output = Result<T, kube::Error>>) -> Result<T, kube::Error> {
    match tokio::time::timeout(API_CALL_DEADLINE, call).await {
        Ok(answer) => answer,
        Err(_) => Err(kube::Error::Service(format!("no answer in {} s", API_CALL_DEADLINE.as_secs()).into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_never_answered_is_an_error_after_the_deadline() {
        let started = tokio::time::Instant::now();
        let error = answered(std::future::pending::<Result<(), kube::Error>>()).await.unwrap_err();
        assert_eq!(started.elapsed(), API_CALL_DEADLINE);
        let error = Error::write("Secret portcullis/portcullis-snapshot")(error);
        assert_eq!(error.category(), Category::Write);
        assert!(error.to_string().contains("no answer in 30 s"), "{error}");
        assert_eq!(answered(async { Ok::<_, kube::Error>(7) }).await.unwrap(), 7);
    }

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
