//! Who is calling: the caller's bus name, identified by what the bus daemon and the kernel
//! vouch for (credentials, pidfd, security label), cached per connection.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::Connection;
use zbus::message::Header;

use crate::engine::Caller;
use crate::error::Error;
use crate::identity::{self, Identity};

pub(super) fn caller(header: &Header<'_>) -> Result<zbus::names::OwnedUniqueName, Error> {
    header.sender().map(|s| s.to_owned().into()).ok_or_else(|| Error::InvalidArgs("the call has no sender".into()))
}

/// Callers already identified, by unique name. Unique names are never reused on a bus, so an
/// entry stays true until the connection closes (then `watch_disconnects` drops it).
#[derive(Debug, Clone, Default)]
pub struct CallerCache(Arc<std::sync::Mutex<HashMap<String, (Caller, Identity)>>>);

impl CallerCache {
    pub(super) fn get(&self, name: &str) -> Option<(Caller, Identity)> {
        self.0.lock().ok()?.get(name).cloned()
    }

    pub(super) fn insert(&self, caller: Caller, identity: Identity) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(caller.connection.clone(), (caller, identity));
        }
    }

    pub(crate) fn remove(&self, name: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(name);
        }
    }
}

/// Who the caller is, as the bus daemon and the kernel vouch for it (never what the caller
/// claims). Fails closed: any error is NotAuthorized.
pub(super) async fn identify(
    conn: &Connection,
    cache: &CallerCache,
    sender: &zbus::names::OwnedUniqueName,
) -> Result<(Caller, Identity), Error> {
    if let Some(found) = cache.get(sender.as_str()) {
        return Ok(found);
    }
    let identity = identify_uncached(conn, sender).await.map_err(|reason| {
        tracing::warn!(caller = %sender, reason, "caller not identified");
        Error::NotAuthorized(format!("hearthd could not identify the caller: {reason}"))
    })?;
    let caller = Caller { connection: sender.to_string(), app: identity.app_id.clone(), uid: identity.uid };
    tracing::info!(target: "hearth::audit", caller = %sender, app = %identity.app_id, kind = identity.kind.as_str(), uid = identity.uid, pid = identity.pid, label = ?identity.label, "caller identified");
    cache.insert(caller.clone(), identity.clone());
    Ok((caller, identity))
}

async fn identify_uncached(conn: &Connection, sender: &zbus::names::OwnedUniqueName) -> Result<Identity, String> {
    let dbus = zbus::fdo::DBusProxy::new(conn).await.map_err(|e| format!("cannot ask the bus: {e}"))?;
    let creds = dbus
        .get_connection_credentials(zbus::names::BusName::Unique(sender.as_ref()))
        .await
        .map_err(|e| format!("cannot get the caller's credentials: {e}"))?;
    let (Some(uid), Some(pid)) = (creds.unix_user_id(), creds.process_id()) else {
        return Err("the bus did not vouch for the caller's uid and pid".into());
    };
    let pidfd = match creds.process_fd() {
        Some(fd) => Some(
            std::os::fd::AsFd::as_fd(fd)
                .try_clone_to_owned()
                .map_err(|e| format!("cannot keep the caller's ProcessFD: {e}"))?,
        ),
        None => None,
    };
    let label = creds.linux_security_label().map(|l| String::from_utf8_lossy(l).trim_end_matches('\0').to_owned());
    identity::resolve(uid, pid, pidfd, label, std::path::Path::new("/proc"))
}
