//! Errors of the session store.

use std::path::PathBuf;
use std::sync::Arc;

/// Cloneable, so that one failed commit can be reported to every request of its batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("cannot open the embedded store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },

    #[error("embedded store failed while {doing}: {source}")]
    Storage {
        doing: &'static str,
        #[source]
        source: Arc<redb::Error>,
    },

    #[error("stored {what} cannot be decoded (written by an incompatible version or corrupted): {detail}")]
    Corrupt { what: &'static str, detail: String },

    #[error("the store has shut down")]
    Closed,

    #[error("Redis failed while {doing}: {source}")]
    Redis {
        doing: &'static str,
        #[source]
        source: Arc<redis::RedisError>,
    },

    #[error("{what} is not available with the {backend} store")]
    Unsupported { what: &'static str, backend: &'static str },
}

impl Error {
    pub(crate) fn storage(doing: &'static str, e: impl Into<redb::Error>) -> Error {
        Error::Storage { doing, source: Arc::new(e.into()) }
    }

    pub(crate) fn redis(doing: &'static str, e: redis::RedisError) -> Error {
        Error::Redis { doing, source: Arc::new(e) }
    }

    /// True when the same operation may succeed later (a full disk may be freed, Redis may come
    /// back; a closed store will not).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Storage { .. } | Error::Redis { .. })
    }
}
