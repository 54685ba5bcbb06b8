//! The daemon's error enum, why requests are cancelled, and the one place that maps them to
//! the stable D-Bus error names.

use std::fmt;

use hearth_dbus::Error as BusError;

#[derive(Debug, Clone, thiserror::Error, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Error {
    /// A request is malformed.
    #[error("{0}")]
    InvalidArgs(String),
    /// The prompt does not fit the context.
    #[error(
        "the prompt has {prompt} tokens; the context holds {context} (and needs room for at least one generated token)"
    )]
    ContextLengthExceeded { prompt: usize, context: u32 },
    /// No such model is installed.
    #[error("no model named {0:?} is installed")]
    ModelNotFound(String),
    /// The model is installed but cannot serve.
    #[error("model {name:?} is unavailable: {reason}")]
    ModelUnavailable { name: String, reason: String },
    /// Admission control refused the request.
    #[error(
        "hearthd is busy: {waiting} requests are waiting {scope} (limit {limit}); retry in about {retry_after_ms} ms"
    )]
    Busy { scope: String, waiting: usize, limit: usize, retry_after_ms: u64 },
    /// hearthd's anonymous memory reached its ceiling: device work ends, new work waits.
    #[error(
        "hearthd is at its memory ceiling ({ceiling_mib} MiB): device work is ended and refused until memory use falls; retry in a few seconds"
    )]
    MemoryCeiling { ceiling_mib: u64 },
    /// The request was cancelled.
    #[error("{0}")]
    Cancelled(CancelReason),
    /// The model is serving requests, so it cannot be unloaded now.
    #[error("model {name:?} is serving {requests} request(s); retry when they finish")]
    InUse { name: String, requests: u32 },
    /// The caller may not do this.
    #[error("{0}")]
    NotAuthorized(String),
    /// Serving the request would send data somewhere its scope forbids.
    #[error("{0}")]
    PrivacyViolation(String),
    /// The cloud route was asked for and cannot be used.
    #[error("the cloud route is unavailable: {0}")]
    CloudUnavailable(String),
    /// The model's engine process died or hung (and is being restarted).
    #[error("the engine of model {model:?} failed ({reason}); it is restarting, retry the request")]
    EngineFailed { model: String, reason: String },
    /// A failure inside hearthd.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Longest error message a reply carries: messages name what was wrong, and may quote a
/// piece of the caller's input, which must not make a reply (or a log line) megabytes long.
const MAX_MESSAGE_BYTES: usize = 512;

/// `text` cut to at most `max` bytes, on a character boundary, marked when cut.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end]).into()
}

impl Error {
    /// The error's kind, as in its D-Bus name: what log lines say of a refusal, since the
    /// message may quote the caller's input and app content never reaches a log line.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidArgs(_) => "InvalidArgs",
            Error::ContextLengthExceeded { .. } => "ContextLengthExceeded",
            Error::ModelNotFound(_) => "ModelNotFound",
            Error::ModelUnavailable { .. } => "ModelUnavailable",
            Error::Busy { .. } | Error::InUse { .. } | Error::MemoryCeiling { .. } => "Busy",
            Error::Cancelled(_) => "Cancelled",
            Error::NotAuthorized(_) => "NotAuthorized",
            Error::PrivacyViolation(_) => "PrivacyViolation",
            Error::CloudUnavailable(_) => "CloudUnavailable",
            Error::EngineFailed { .. } => "EngineFailed",
            Error::Internal(_) => "Internal",
        }
    }
}

impl From<Error> for BusError {
    fn from(e: Error) -> Self {
        let msg = bounded(&e.to_string(), MAX_MESSAGE_BYTES).into_owned();
        match e {
            Error::InvalidArgs(_) => BusError::InvalidArgs(msg),
            Error::ContextLengthExceeded { .. } => BusError::ContextLengthExceeded(msg),
            Error::ModelNotFound(_) => BusError::ModelNotFound(msg),
            Error::ModelUnavailable { .. } => BusError::ModelUnavailable(msg),
            Error::Busy { .. } | Error::InUse { .. } | Error::MemoryCeiling { .. } => BusError::Busy(msg),
            Error::Cancelled(_) => BusError::Cancelled(msg),
            Error::NotAuthorized(_) => BusError::NotAuthorized(msg),
            Error::PrivacyViolation(_) => BusError::PrivacyViolation(msg),
            Error::CloudUnavailable(_) => BusError::CloudUnavailable(msg),
            Error::EngineFailed { .. } => BusError::EngineFailed(msg),
            Error::Internal(_) => BusError::Internal(msg),
        }
    }
}

impl From<hearth_ffi::Error> for Error {
    fn from(e: hearth_ffi::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

/// Why a request was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_bounded_and_cut_on_a_character_boundary() {
        let long = format!("unknown request key {:?}", "é".repeat(100_000));
        let BusError::InvalidArgs(msg) = BusError::from(Error::InvalidArgs(long)) else { panic!() };
        assert!(msg.len() <= MAX_MESSAGE_BYTES && msg.ends_with("..."), "{}", msg.len());
        assert_eq!(bounded("short", 512), "short");
        assert_eq!(Error::Busy { scope: String::new(), waiting: 0, limit: 0, retry_after_ms: 0 }.kind(), "Busy");
    }
}
