//! The daemon's error enum, and the one place errors become the stable D-Bus error names:
//! the engine's own ([`EngineError`]) map into it here, it maps into `hearth_dbus::Error`.

use hearth_dbus::Error as BusError;

pub use crate::engine::CancelReason;
use crate::engine::EngineError;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
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

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidArgs(m) => Error::InvalidArgs(m),
            EngineError::ContextLengthExceeded { prompt, context } => Error::ContextLengthExceeded { prompt, context },
            EngineError::Busy { scope, waiting, limit, retry_after_ms } => {
                Error::Busy { scope, waiting, limit, retry_after_ms }
            }
            EngineError::MemoryCeiling { ceiling_mib } => Error::MemoryCeiling { ceiling_mib },
            EngineError::Cancelled(reason) => Error::Cancelled(reason),
            e @ EngineError::NotYourSession(_) => Error::NotAuthorized(e.to_string()),
            EngineError::Failed { model, reason } => Error::EngineFailed { model, reason },
            EngineError::Internal(m) => Error::Internal(m),
        }
    }
}

impl From<hearth_ffi::Error> for Error {
    fn from(e: hearth_ffi::Error) -> Self {
        Error::Internal(e.to_string())
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

    #[test]
    fn engine_errors_keep_their_message_and_get_their_names() {
        let cases = [
            (EngineError::NotYourSession(7), "org.hearth.Hearth1.Error.NotAuthorized"),
            (
                EngineError::Failed { model: "m".into(), reason: "killed by signal 6".into() },
                "org.hearth.Hearth1.Error.EngineFailed",
            ),
            (EngineError::MemoryCeiling { ceiling_mib: 900 }, "org.hearth.Hearth1.Error.Busy"),
            (EngineError::Cancelled(CancelReason::Deadline), "org.hearth.Hearth1.Error.Cancelled"),
            (
                EngineError::ContextLengthExceeded { prompt: 9, context: 8 },
                "org.hearth.Hearth1.Error.ContextLengthExceeded",
            ),
        ];
        for (engine, name) in cases {
            let message = engine.to_string();
            let bus = BusError::from(Error::from(engine));
            assert_eq!((bus.dbus_name().to_string(), bus.message().to_owned()), (name.to_owned(), message));
        }
    }
}
