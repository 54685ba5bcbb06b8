//! A streaming client for Generate: subscribes to the request object's signals *before*
//! calling (portal-style handle token), then yields Token and Finished in bus order.

use std::collections::HashMap;

use futures_util::StreamExt;
use zbus::fdo::DBusProxy;
use zbus::message::Type as MessageType;
use zbus::names::BusName;
use zbus::{Connection, MatchRule, MessageStream};
use zbus::{OwnedObjectPath, Variant};

use crate::{BUS_NAME, Error, Hearth1Proxy, REQUEST_INTERFACE, RequestProxy, SessionProxy, request_key, request_path};

/// One event of a running generation.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Token {
        index: u32,
        token_id: i32,
        text: String,
    },
    /// The stream moved (cloud → device) before token `index`.
    Migrated {
        from: String,
        to: String,
        index: u32,
    },
    /// (Boxed: a result is far larger than the other events.)
    Finished(Box<crate::GenerationResult>),
}

/// A generation in progress.
#[derive(Debug)]
pub struct Generation {
    conn: Connection,
    path: OwnedObjectPath,
    /// The request object's signals, and the bus's word that the service's unique name left
    /// (read only when no signal is waiting, so a Finished sent before leaving comes first).
    stream: futures_util::stream::SelectWithStrategy<
        MessageStream,
        MessageStream,
        fn(&mut ()) -> futures_util::stream::PollNext,
        (),
    >,
    owner: String,
    done: bool,
}

impl Generation {
    /// Subscribes to the request object that `handle_token` names, then calls Generate with
    /// `request` (the handle token is added to it). No token can be missed.
    pub async fn start(
        conn: &Connection,
        request: HashMap<&str, Variant<'_>>,
        handle_token: &str,
    ) -> Result<Self, Error> {
        Self::start_via(conn, None, request, handle_token).await
    }

    /// Like [`Generation::start`], for the next turn of the session at `session` (the
    /// request's messages are the turn's new ones).
    pub async fn start_turn(
        conn: &Connection,
        session: &OwnedObjectPath,
        request: HashMap<&str, Variant<'_>>,
        handle_token: &str,
    ) -> Result<Self, Error> {
        Self::start_via(conn, Some(session), request, handle_token).await
    }

    async fn start_via(
        conn: &Connection,
        session: Option<&OwnedObjectPath>,
        mut request: HashMap<&str, Variant<'_>>,
        handle_token: &str,
    ) -> Result<Self, Error> {
        let unique = conn.unique_name().ok_or_else(|| Error::InvalidArgs("connection has no unique name".into()))?;
        let path = request_path(unique.as_str(), handle_token)
            .ok_or_else(|| Error::InvalidArgs(format!("invalid handle token {handle_token:?}")))?;
        // Match on the service's unique name: signals carry the unique sender.
        let owner = DBusProxy::new(conn)
            .await?
            .get_name_owner(BusName::try_from(BUS_NAME)?)
            .await
            .map_err(zbus::Error::from)?;
        let rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(owner.as_str())
            .path(path.as_str())
            .interface(REQUEST_INTERFACE)
            .build()?;
        let signals = MessageStream::for_match_rule(rule, conn, None).await?;
        // A hearthd that leaves the bus (stops, crashes, restarts) sends no Finished.
        let gone = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender("org.freedesktop.DBus")
            .interface("org.freedesktop.DBus")
            .member("NameOwnerChanged")
            .arg(0, owner.as_str())
            .build()?;
        let gone = MessageStream::for_match_rule(gone, conn, None).await?;
        request.insert(request_key::HANDLE_TOKEN, Variant::from(handle_token));
        let returned = match session {
            None => Hearth1Proxy::new(conn).await?.generate(request).await?,
            Some(p) => SessionProxy::builder(conn).path(p.clone()).build().await?.generate(request).await?,
        };
        if returned != path {
            return Err(Error::Internal(format!(
                "hearthd returned {} instead of {}",
                returned.as_str(),
                path.as_str()
            )));
        }
        // A hearthd that left before the rules were in place was never watched: the call
        // went to its successor, whose signals the rule does not take.
        let now = DBusProxy::new(conn).await?.get_name_owner(BusName::try_from(BUS_NAME)?).await;
        if now.as_ref().map(|o| o.as_str()) != Ok(owner.as_str()) {
            return Err(Error::ZBus(zbus::Error::Failure(
                "hearthd restarted while the request was being made; try again".into(),
            )));
        }
        let signals_first: fn(&mut ()) -> futures_util::stream::PollNext = |_| futures_util::stream::PollNext::Left;
        let stream = futures_util::stream::select_with_strategy(signals, gone, signals_first);
        Ok(Self { conn: conn.clone(), path, stream, owner: owner.to_string(), done: false })
    }

    /// The request object.
    pub fn path(&self) -> &OwnedObjectPath {
        &self.path
    }

    /// The next event; None after Finished. If hearthd leaves the bus first, an error
    /// (zbus's `Failure`) ends the stream.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, Error>> {
        if self.done {
            return None;
        }
        while let Some(msg) = self.stream.next().await {
            let msg = match msg {
                Ok(m) => m,
                Err(e) => return Some(Err(e.into())),
            };
            let header = msg.header();
            if header.interface().is_some_and(|i| i.as_str() == "org.freedesktop.DBus") {
                let left = msg
                    .body()
                    .deserialize::<(String, String, String)>()
                    .is_ok_and(|(name, _, new)| name == self.owner && new.is_empty());
                if !left {
                    continue;
                }
                self.done = true;
                return Some(Err(Error::ZBus(zbus::Error::Failure(
                    "hearthd left the bus before the request finished".into(),
                ))));
            }
            let event = match header.member().map(|m| m.as_str()) {
                Some("Token") => msg
                    .body()
                    .deserialize::<(u32, i32, String)>()
                    .map(|(index, token_id, text)| StreamEvent::Token { index, token_id, text }),
                Some("Migrated") => msg
                    .body()
                    .deserialize::<(String, String, u32)>()
                    .map(|(from, to, index)| StreamEvent::Migrated { from, to, index }),
                Some("Finished") => {
                    msg.body().deserialize::<crate::GenerationResult>().map(|r| StreamEvent::Finished(Box::new(r)))
                }
                _ => continue,
            };
            if matches!(event, Ok(StreamEvent::Finished(_))) {
                self.done = true;
            }
            return Some(event.map_err(Error::ZBus));
        }
        None
    }

    /// Asks hearthd to cancel; Finished (with finish_reason "cancelled") follows.
    pub async fn cancel(&self) -> Result<(), Error> {
        RequestProxy::builder(&self.conn).path(self.path.clone()).build().await?.cancel().await
    }
}

/// The `messages` value (aa{sv}) for `(role, content)` pairs.
pub fn messages_value(messages: &[(&str, &str)]) -> Variant<'static> {
    Variant::from(self::messages(messages))
}

/// The message dictionaries of `(role, content)` pairs, for adding keys (scope, images).
pub fn messages(messages: &[(&str, &str)]) -> Vec<HashMap<String, Variant<'static>>> {
    messages
        .iter()
        .map(|(role, content)| {
            HashMap::from([
                (request_key::ROLE.to_owned(), Variant::from(role.to_string())),
                (request_key::CONTENT.to_owned(), Variant::from(content.to_string())),
            ])
        })
        .collect()
}
