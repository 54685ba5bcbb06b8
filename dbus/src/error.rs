//! The error enum of the D-Bus API. Each variant is a stable D-Bus error name
//! `org.hearth.Hearth1.Error.<Variant>`; the String is a human-readable message.

use zbus::DBusError;

/// Errors returned by hearthd, as seen on the bus. Clients match on the name
/// (the variant), never on the message text.
#[derive(Debug, DBusError)]
#[zbus(prefix = "org.hearth.Hearth1.Error")]
pub enum Error {
    /// A transport-level error of zbus itself (not a hearthd error name).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// A request key is missing, unknown, of the wrong type, or out of range.
    InvalidArgs(String),
    /// The prompt does not fit the model's context.
    ContextLengthExceeded(String),
    /// No model of that name is installed.
    ModelNotFound(String),
    /// The model exists but cannot be used now.
    ModelUnavailable(String),
    /// The queue is full; the message carries a retry hint.
    Busy(String),
    /// The request was cancelled by its caller or because the daemon is stopping.
    Cancelled(String),
    /// The caller may not do this.
    NotAuthorized(String),
    /// Serving the request would break a privacy scope.
    PrivacyViolation(String),
    /// The cloud route is not available.
    CloudUnavailable(String),
    /// The model's engine process died or hung while serving the request; it is restarted
    /// and the request may be retried (a session keeps its transcript).
    EngineFailed(String),
    /// A failure inside hearthd.
    Internal(String),
}

/// Every error name hearthd may answer with, as the XML lists them.
pub const ERROR_NAMES: [&str; 11] = [
    "org.hearth.Hearth1.Error.InvalidArgs",
    "org.hearth.Hearth1.Error.ContextLengthExceeded",
    "org.hearth.Hearth1.Error.ModelNotFound",
    "org.hearth.Hearth1.Error.ModelUnavailable",
    "org.hearth.Hearth1.Error.Busy",
    "org.hearth.Hearth1.Error.Cancelled",
    "org.hearth.Hearth1.Error.NotAuthorized",
    "org.hearth.Hearth1.Error.PrivacyViolation",
    "org.hearth.Hearth1.Error.CloudUnavailable",
    "org.hearth.Hearth1.Error.EngineFailed",
    "org.hearth.Hearth1.Error.Internal",
];

impl Error {
    /// The full D-Bus error name, e.g. `org.hearth.Hearth1.Error.Busy`.
    pub fn dbus_name(&self) -> String {
        zbus::DBusError::name(self).to_string()
    }

    /// The human-readable message.
    pub fn message(&self) -> String {
        zbus::DBusError::description(self).unwrap_or_default().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_lists_every_variant() {
        let m = String::new;
        let all = [
            Error::InvalidArgs(m()),
            Error::ContextLengthExceeded(m()),
            Error::ModelNotFound(m()),
            Error::ModelUnavailable(m()),
            Error::Busy(m()),
            Error::Cancelled(m()),
            Error::NotAuthorized(m()),
            Error::PrivacyViolation(m()),
            Error::CloudUnavailable(m()),
            Error::EngineFailed(m()),
            Error::Internal(m()),
        ];
        for e in &all {
            // A new variant must be added above (this match has no wildcard) and to the list.
            match e {
                Error::ZBus(_) => unreachable!(),
                Error::InvalidArgs(_)
                | Error::ContextLengthExceeded(_)
                | Error::ModelNotFound(_)
                | Error::ModelUnavailable(_)
                | Error::Busy(_)
                | Error::Cancelled(_)
                | Error::NotAuthorized(_)
                | Error::PrivacyViolation(_)
                | Error::CloudUnavailable(_)
                | Error::EngineFailed(_)
                | Error::Internal(_) => {}
            }
        }
        let names: Vec<String> = all.iter().map(Error::dbus_name).collect();
        assert_eq!(names, ERROR_NAMES);
    }
}
