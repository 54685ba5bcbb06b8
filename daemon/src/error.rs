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
    /// No such model is installed.
    #[error("no model named {0:?} is installed")]
    ModelNotFound(String),
    /// The model is installed but cannot serve.
    #[error("model {name:?} is unavailable: {reason}")]
    ModelUnavailable { name: String, reason: String },
    /// The app used its `requests_per_minute` quota.
    #[error(
        "this app made {used} requests in the last minute (its requests_per_minute quota is {limit}); retry in about {retry_after_ms} ms"
    )]
    Quota { used: usize, limit: u32, retry_after_ms: u64 },
    /// The app's on-device work drew its hard cap of energy for the day.
    #[error("this app's on-device work drew {used_j} J in the last day; its energy_cap_per_day_j is {cap_j} J")]
    EnergyCap { used_j: u64, cap_j: u32 },
    /// The app holds as many open sessions as it may.
    #[error("this app holds {held} open sessions (limit {limit}); close one first")]
    TooManySessions { held: usize, limit: usize },
    /// A turn of the session is running, and a session runs one at a time.
    #[error("a turn of this session is running; one at a time")]
    TurnRunning,
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
    /// What the engine answered (a context overflow, its queue full, a cancellation, its
    /// death...): kept as the engine said it, named here.
    #[error(transparent)]
    Engine(EngineError),
    /// A failure inside hearthd.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Self {
        match e {
            // One spelling of each: the engine's malformed-request and internal errors are
            // hearthd's own kinds.
            EngineError::InvalidArgs(m) => Error::InvalidArgs(m),
            EngineError::Internal(m) => Error::Internal(m),
            e => Error::Engine(e),
        }
    }
}

impl Error {
    /// A request cancelled for `reason`.
    pub fn cancelled(reason: CancelReason) -> Self {
        Error::Engine(EngineError::Cancelled(reason))
    }

    /// Whether this is a cancellation.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Error::Engine(EngineError::Cancelled(_)))
    }
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

/// The D-Bus error of each kind: the one table of names.
fn named(e: &Error, msg: String) -> BusError {
    match e {
        Error::InvalidArgs(_) => BusError::InvalidArgs(msg),
        Error::ModelNotFound(_) => BusError::ModelNotFound(msg),
        Error::ModelUnavailable { .. } => BusError::ModelUnavailable(msg),
        Error::Quota { .. }
        | Error::EnergyCap { .. }
        | Error::TooManySessions { .. }
        | Error::TurnRunning
        | Error::InUse { .. } => BusError::Busy(msg),
        Error::NotAuthorized(_) => BusError::NotAuthorized(msg),
        Error::PrivacyViolation(_) => BusError::PrivacyViolation(msg),
        Error::CloudUnavailable(_) => BusError::CloudUnavailable(msg),
        Error::Engine(e) => match e {
            EngineError::InvalidArgs(_) => BusError::InvalidArgs(msg),
            EngineError::ContextLengthExceeded { .. } => BusError::ContextLengthExceeded(msg),
            EngineError::Busy { .. } | EngineError::MemoryCeiling { .. } => BusError::Busy(msg),
            EngineError::Cancelled(_) => BusError::Cancelled(msg),
            EngineError::NotYourSession(_) => BusError::NotAuthorized(msg),
            EngineError::Failed { .. } => BusError::EngineFailed(msg),
            EngineError::Internal(_) => BusError::Internal(msg),
        },
        Error::Internal(_) => BusError::Internal(msg),
    }
}

impl Error {
    /// The error's kind, as in its D-Bus name: what log lines say of a refusal, since the
    /// message may quote the caller's input and app content never reaches a log line.
    pub fn kind(&self) -> &'static str {
        match named(self, String::new()) {
            BusError::InvalidArgs(_) => "InvalidArgs",
            BusError::ContextLengthExceeded(_) => "ContextLengthExceeded",
            BusError::ModelNotFound(_) => "ModelNotFound",
            BusError::ModelUnavailable(_) => "ModelUnavailable",
            BusError::Busy(_) => "Busy",
            BusError::Cancelled(_) => "Cancelled",
            BusError::NotAuthorized(_) => "NotAuthorized",
            BusError::PrivacyViolation(_) => "PrivacyViolation",
            BusError::CloudUnavailable(_) => "CloudUnavailable",
            BusError::EngineFailed(_) => "EngineFailed",
            BusError::Internal(_) | BusError::ZBus(_) => "Internal",
        }
    }
}

impl From<Error> for BusError {
    /// Every reply's error goes through here, so none carries an unbounded message.
    fn from(e: Error) -> Self {
        let msg = bounded(&e.to_string(), MAX_MESSAGE_BYTES).into_owned();
        named(&e, msg)
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
        assert_eq!(Error::Quota { used: 0, limit: 0, retry_after_ms: 0 }.kind(), "Busy");
        assert_eq!(Error::from(EngineError::NotYourSession(1)).kind(), "NotAuthorized");
        assert_eq!(Error::cancelled(CancelReason::Caller).kind(), "Cancelled");
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
