//! Authorization of admin methods by polkit (`org.freedesktop.PolicyKit1.Authority`).
//!
//! The subject is always the caller's unique bus name (`system-bus-name`): polkit then looks
//! the process up through the bus itself, so there is no pid-reuse race, and hearthd never
//! asks about its own process. ALLOW_INTERACTIVE_AUTHORIZATION on the caller's message lets
//! polkit ask the user. Without polkit on the bus only root is authorized.

use std::collections::HashMap;

use zbus::Variant;
use zbus::proxy;

/// polkit's CheckAuthorization flag: the caller allows an interactive authentication dialog.
const ALLOW_USER_INTERACTION: u32 = 1;

#[proxy(
    interface = "org.freedesktop.PolicyKit1.Authority",
    default_service = "org.freedesktop.PolicyKit1",
    default_path = "/org/freedesktop/PolicyKit1/Authority"
)]
trait Authority {
    fn check_authorization(
        &self,
        subject: &(&str, HashMap<&str, Variant<'_>>),
        action_id: &str,
        details: HashMap<&str, &str>,
        flags: u32,
        cancellation_id: &str,
    ) -> zbus::Result<(bool, bool, HashMap<String, String>)>;
}

/// The admin actions (dbus/data/org.hearth.Hearth1.policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    ManageModels,
    Reload,
    SetAppPolicy,
}

impl Action {
    pub fn id(self) -> &'static str {
        match self {
            Self::ManageModels => "org.hearth.Hearth1.manage-models",
            Self::Reload => "org.hearth.Hearth1.reload",
            Self::SetAppPolicy => "org.hearth.Hearth1.set-app-policy",
        }
    }
}

/// polkit's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Authorized,
    /// Not authorized; `challenge` when authenticating could have changed that.
    Denied {
        challenge: bool,
    },
    /// polkit is not on the bus; the caller is root.
    NoPolkitRoot,
    /// polkit is not on the bus; the caller is not root.
    NoPolkit,
}

/// Asks polkit whether the connection `sender` (with Unix user `uid`) may do `action`.
pub async fn check(
    conn: &zbus::Connection,
    sender: &str,
    uid: u32,
    action: Action,
    interactive: bool,
) -> Result<Verdict, String> {
    let authority = AuthorityProxy::new(conn).await.map_err(|e| e.to_string())?;
    let subject = ("system-bus-name", HashMap::from([("name", Variant::from(sender))]));
    let flags = if interactive { ALLOW_USER_INTERACTION } else { 0 };
    match authority.check_authorization(&subject, action.id(), HashMap::new(), flags, "").await {
        Ok((true, _, _)) => Ok(Verdict::Authorized),
        Ok((false, challenge, _)) => Ok(Verdict::Denied { challenge }),
        // zbus reports the bus's standard error replies as fdo::Error.
        Err(zbus::Error::FDO(e))
            if matches!(*e, zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)) =>
        {
            Ok(if uid == 0 { Verdict::NoPolkitRoot } else { Verdict::NoPolkit })
        }
        Err(e) => Err(e.to_string()),
    }
}
