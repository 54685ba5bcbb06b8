//! `org.hearth.Hearth1.Request`: one object per Generate call, at a path derived from the
//! caller's unique name. Its signals go to that caller only (unicast), and only that caller
//! may cancel it.

use hearth_dbus::{Error as BusError, GenerationResult};
use zbus::OwnedObjectPath;
use zbus::message::Header;
use zbus::names::{BusName, OwnedUniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, interface};

use super::driver::{Events, StreamEvent};
use super::generation_result;
use crate::engine::{CancelReason, CancelToken};
use crate::error::Error;
use crate::privacy::Decision;

#[derive(Debug)]
pub struct RequestObject {
    owner: OwnedUniqueName,
    cancel: CancelToken,
}

impl RequestObject {
    pub fn new(owner: OwnedUniqueName, cancel: CancelToken) -> Self {
        Self { owner, cancel }
    }
}

#[interface(name = "org.hearth.Hearth1.Request")]
impl RequestObject {
    /// Cancels the generation; only its creator may.
    async fn cancel(&self, #[zbus(header)] header: Header<'_>) -> Result<(), BusError> {
        match header.sender() {
            Some(sender) if sender.as_str() == self.owner.as_str() => {
                self.cancel.cancel(CancelReason::Caller);
                Ok(())
            }
            other => {
                tracing::warn!(owner = %self.owner, caller = ?other.map(|s| s.as_str()), "Cancel refused: not the request's owner");
                Err(Error::NotAuthorized("only the connection that started this request may cancel it".into()).into())
            }
        }
    }

    #[zbus(signal)]
    async fn token(emitter: &SignalEmitter<'_>, index: u32, token_id: i32, text: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn migrated(emitter: &SignalEmitter<'_>, from: &str, to: &str, index: u32) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn finished(emitter: &SignalEmitter<'_>, result: &GenerationResult) -> zbus::Result<()>;
}

/// The introspection of `/org/hearth/Hearth1/request`, in place of zbus's own: that one lists
/// every live request object, and so which connections use Hearth and their handle tokens, to
/// anyone on the bus. This one lists none; a request's own object still introspects.
#[derive(Debug)]
struct RequestListing;

#[interface(name = "org.freedesktop.DBus.Introspectable")]
impl RequestListing {
    async fn introspect(&self) -> String {
        concat!(
            "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n",
            " \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n",
            "<node>\n",
            "  <interface name=\"org.freedesktop.DBus.Introspectable\">\n",
            "    <method name=\"Introspect\"><arg type=\"s\" direction=\"out\"/></method>\n",
            "  </interface>\n",
            "</node>\n"
        )
        .to_owned()
    }
}

/// Puts [`RequestListing`] at the request objects' parent node. Called after each request
/// object is exported: zbus makes the parent (with its default introspection) when its first
/// child arrives and drops it with its last, so it is replaced every time; the name is a
/// default interface's, so zbus still drops the parent once it has no children.
pub async fn hide_request_listing(server: &zbus::ObjectServer) {
    use zbus::object_server::Interface;
    let parent = hearth_dbus::REQUEST_PATH_PREFIX;
    let _ = server.remove_named(parent, RequestListing::name()).await;
    if let Err(e) = server.at(parent, RequestListing).await {
        tracing::warn!(error = %e, "cannot replace the request objects' introspection");
    }
}

/// Streams a request's events as unicast signals to `owner`, then removes the object.
pub async fn forward(
    conn: &Connection,
    path: OwnedObjectPath,
    owner: OwnedUniqueName,
    mut events: Events,
    decision: Decision,
    structure: Option<std::sync::Arc<crate::structured::Structure>>,
) {
    let emitter = match SignalEmitter::new(conn, path.clone()) {
        Ok(e) => e.set_destination(BusName::Unique(owner.clone().into_inner())),
        Err(e) => {
            tracing::error!(error = %e, path = %path.as_str(), "cannot create signal emitter");
            return;
        }
    };
    let mut streamed = 0u32;
    while let Some(event) = events.recv().await {
        match event {
            StreamEvent::Token { index, id, text } => {
                streamed += 1;
                if let Err(e) = RequestObject::token(&emitter, index, id, &text).await {
                    tracing::warn!(error = %e, "cannot emit Token");
                }
            }
            StreamEvent::Migrated { from, to, index } => {
                tracing::info!(path = %path.as_str(), from, to, index, "stream migrated");
                if let Err(e) = RequestObject::migrated(&emitter, from, to, index).await {
                    tracing::warn!(error = %e, "cannot emit Migrated");
                }
            }
            StreamEvent::Finished(finish) => {
                let outcome = &finish.outcome;
                tracing::info!(path = %path.as_str(), reason = ?outcome.reason, tokens = outcome.token_ids.len(), "finished");
                if let Err(e) = RequestObject::finished(
                    &emitter,
                    &generation_result(&finish, &decision, structure.as_deref(), streamed),
                )
                .await
                {
                    tracing::warn!(error = %e, "cannot emit Finished");
                }
                break;
            }
        }
    }
    if let Err(e) = conn.object_server().remove::<RequestObject, _>(&path).await {
        tracing::warn!(error = %e, path = %path.as_str(), "cannot remove request object");
    }
}
