//! What the engine answers when it cannot do what it was asked, and why a request was
//! cancelled. hearthd maps these into its own error (and the D-Bus names) in one place,
//! `crate::error`; the engine knows nothing of either.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why the engine refused or ended a request.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Serialize, Deserialize)]
pub enum EngineError {
    /// The request is malformed (its adapters, grammar, messages...).
    #[error("{0}")]
    InvalidArgs(String),
    /// The prompt does not fit the context.
    #[error(
        "the prompt has {prompt} tokens; the context holds {context} (and needs room for at least one generated token)"
    )]
    ContextLengthExceeded { prompt: usize, context: u32 },
    /// The engine's queue is full (for everyone, or for this app).
    #[error(
        "hearthd is busy: {waiting} requests are waiting {scope} (limit {limit}); retry in about {retry_after_ms} ms"
    )]
    Busy { scope: String, waiting: usize, limit: usize, retry_after_ms: u64 },
    /// hearthd is over its memory ceiling: device work ends, new work waits.
    #[error(
        "hearthd is at its memory ceiling ({ceiling_mib} MiB): device work is ended and refused until memory use falls; retry in a few seconds"
    )]
    MemoryCeiling { ceiling_mib: u64 },
    #[error("{0}")]
    Cancelled(CancelReason),
    /// A turn named a session that is not the caller's on this model.
    #[error("session {0} is not this app's session on this model")]
    NotYourSession(u64),
    /// The engine process died or hung (and is being restarted).
    #[error("the engine of model {model:?} failed ({reason}); it is restarting, retry the request")]
    Failed { model: String, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<hearth_ffi::Error> for EngineError {
    fn from(e: hearth_ffi::Error) -> Self {
        EngineError::Internal(e.to_string())
    }
}

/// Why a request was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelReason {
    /// Its caller called Cancel.
    Caller,
    /// hearthd is stopping.
    Shutdown,
    /// Nobody is listening for the result any more.
    Disconnected,
    /// Its `deadline_ms` passed before it finished.
    Deadline,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Caller => "cancelled by the caller",
            Self::Shutdown => "cancelled: hearthd is shutting down",
            Self::Disconnected => "cancelled: the caller went away",
            Self::Deadline => "cancelled: its deadline_ms passed before it finished",
        })
    }
}

impl CancelReason {
    /// A one-byte code, so a cancellation can be stored in an atomic.
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::Caller => 1,
            Self::Shutdown => 2,
            Self::Disconnected => 3,
            Self::Deadline => 4,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Caller),
            2 => Some(Self::Shutdown),
            3 => Some(Self::Disconnected),
            4 => Some(Self::Deadline),
            _ => None,
        }
    }
}
