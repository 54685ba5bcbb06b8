//! Sessions: `OpenSession(a{sv}) -> o` exports one `org.hearth.Hearth1.Session` object per
//! conversation, with `Generate`, `Complete`, `Close` and a `Tokens` property.
//!
//! A session's object keeps its transcript (message parts with their scopes, sealed parts
//! still sealed); whose it is, its model, its running turn and its parked KV are in the one
//! registry of sessions, the model manager's `SessionStore` (parked.rs); its KV cache is in
//! the engine, so a turn sends only its new messages and the
//! engine prefills only what the KV does not hold yet (see `engine::session`). Each turn is
//! admitted like any request over the whole transcript, so a session that saw `local` data
//! stays local (taint). Only the connection that opened a session may use it; it is closed,
//! and everything it holds freed, by `Close` or when that connection leaves the bus.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hearth_dbus::{Error as BusError, request_key as key};
use zbus::message::Header;
use zbus::names::{InterfaceName, OwnedUniqueName};
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::{BoxDBusError, Connection, ObjectServer, interface};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use super::driver::Finish;
use super::{HearthService, OnFinish, caller, identify};
use crate::engine::CancelToken;
use crate::error::Error;
use crate::manager::ModelManager;
use crate::parked::TurnRefused;
use crate::privacy::{Content, Part, Scope};
use crate::request::parse_off_runtime;

/// Most sessions one app may hold open at once.
pub const MAX_SESSIONS_PER_APP: usize = 8;

/// What a connection other than a session's owner is told.
const NOT_THE_OWNER: &str = "only the connection that opened this session may use it";

/// Where session objects live.
const SESSION_PATH: &str = "/org/hearth/Hearth1/session";

/// What a session's object remembers between turns.
#[derive(Debug, Default)]
struct State {
    /// The transcript: every turn's messages and the assistant's answers, with scopes.
    history: Vec<Part>,
    /// Tokens of the transcript after the last turn (prompt + answer).
    tokens: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn session_path(id: u64) -> Result<OwnedObjectPath, Error> {
    OwnedObjectPath::try_from(format!("{SESSION_PATH}/s{id}"))
        .map_err(|e| Error::Internal(format!("session path: {e}")))
}

/// Opens a session of `owner` (app `app`) on `model` and exports its object.
pub(super) async fn open(
    conn: &Connection,
    svc: &HearthService,
    owner: &OwnedUniqueName,
    app: &str,
    model: String,
) -> Result<OwnedObjectPath, Error> {
    let id = svc
        .models
        .sessions()
        .open(app, &model, owner.as_str(), MAX_SESSIONS_PER_APP)
        .map_err(|held| Error::TooManySessions { held, limit: MAX_SESSIONS_PER_APP })?;
    let path = match session_path(id) {
        Ok(p) => p,
        Err(e) => {
            close(conn, &svc.models, id, "export failed").await;
            return Err(e);
        }
    };
    let state = Arc::new(Mutex::new(State::default()));
    let object = SessionObject { id, owner: owner.clone(), model: model.clone(), state, svc: svc.clone() };
    if let Err(e) = conn.object_server().at(&path, object).await {
        close(conn, &svc.models, id, "export failed").await;
        return Err(Error::Internal(format!("cannot export the session object: {e}")));
    }
    if let Err(e) = SessionProperties::install(conn.object_server(), &path, id, owner.clone()).await {
        close(conn, &svc.models, id, "export failed").await;
        return Err(Error::Internal(format!("cannot export the session's properties: {e}")));
    }
    tracing::info!(target: "hearth::audit", app, session = id, model = %model, "session opened");
    Ok(path)
}

/// Closes session `id`: stops its running turn, drops its resident and parked KV, and its
/// object (with the transcript).
pub async fn close(conn: &Connection, models: &ModelManager, id: u64, why: &str) {
    let Some((app, model)) = models.sessions().close(id) else { return };
    models.close_session(&model, id).await;
    if let Ok(path) = session_path(id) {
        let _ = conn.object_server().remove::<SessionObject, _>(&path).await;
    }
    tracing::info!(target: "hearth::audit", app = %app, session = id, why, "session closed");
}

/// Closes every session a connection that left the bus had open.
pub async fn connection_closed(conn: &Connection, models: &ModelManager, connection: &str) {
    for id in models.sessions().of_owner(connection) {
        close(conn, models, id, "its connection left the bus").await;
    }
}

/// `OpenSession`'s options: `model` only.
pub(super) fn parse_options(options: &HashMap<String, OwnedVariant>) -> Result<Option<String>, Error> {
    let mut model = None;
    for (k, v) in options {
        match (k.as_str(), &**v) {
            (key::MODEL, Variant::Str(s)) if !s.is_empty() => model = Some(s.to_string()),
            (key::MODEL, other) => {
                return Err(Error::InvalidArgs(format!(
                    "model must be a non-empty string (s), got {}",
                    other.value_signature()
                )));
            }
            (other, _) => {
                return Err(Error::InvalidArgs(format!("unknown session option {other:?} (known: model)")));
            }
        }
    }
    Ok(model)
}

/// `org.hearth.Hearth1.Session`.
#[derive(Debug)]
pub struct SessionObject {
    id: u64,
    owner: OwnedUniqueName,
    model: String,
    state: Arc<Mutex<State>>,
    svc: HearthService,
}

/// A turn that was admitted and may start.
struct Turn {
    who: crate::engine::Caller,
    admitted: super::Admitted,
    handle_token: Option<String>,
    cancel: CancelToken,
    on_finish: OnFinish,
}

impl SessionObject {
    fn check_owner(&self, sender: &OwnedUniqueName) -> Result<(), Error> {
        if sender.as_str() == self.owner.as_str() {
            return Ok(());
        }
        tracing::warn!(target: "hearth::audit", session = self.id, caller = %sender, "session refused: not its owner");
        Err(Error::NotAuthorized(NOT_THE_OWNER.into()))
    }

    /// Admits a turn: the transcript plus the new messages, as one request on the session's
    /// model, and the bookkeeping that records the turn when it ends well.
    async fn begin(
        &self,
        header: &Header<'_>,
        conn: &Connection,
        dict: HashMap<String, OwnedVariant>,
    ) -> Result<Turn, Error> {
        let sender = caller(header)?;
        self.check_owner(&sender)?;
        let svc = &self.svc;
        let parsed = parse_off_runtime(dict, svc.models.config().limits.default_max_tokens).await?;
        if parsed.request.model.as_ref().is_some_and(|m| *m != self.model) {
            return Err(Error::InvalidArgs(format!(
                "this session runs model {:?}; open another for another",
                self.model
            )));
        }
        let (who, _) = identify(conn, &svc.callers, &sender).await?;
        let cancel = CancelToken::default();
        let store = Arc::clone(svc.models.sessions());
        store.begin_turn(self.id, cancel.clone()).map_err(|refused| match refused {
            TurnRefused::Closed => Error::InvalidArgs("the session is closed".into()),
            TurnRefused::Busy => Error::TurnRunning,
        })?;
        let history = lock(&self.state).history.clone();
        let new_parts = parsed.parts.clone();
        let mut request = parsed.request;
        request.model = Some(self.model.clone());
        request.session = Some(self.id);
        let parts: Vec<Part> = history.into_iter().chain(parsed.parts).collect();
        // Every turn sends the whole transcript: its images count against one request's limits.
        if let Err(e) = crate::request::check_image_limits(&parts, "the session's transcript and this turn") {
            store.end_turn(self.id);
            return Err(e);
        }
        let admitted = match svc.admit(&who, request, parts, parsed.route, parsed.structure) {
            Ok(admitted) => admitted,
            Err(e) => {
                store.end_turn(self.id);
                return Err(e);
            }
        };
        let (state, id) = (Arc::clone(&self.state), self.id);
        let taint = admitted.decision.taint;
        let on_finish: OnFinish = Box::new(move |finish: Option<&Finish>| {
            let open = store.end_turn(id);
            let mut state = lock(&state);
            if let Some(o) = finish.filter(|f| f.error.is_none() && open).map(|f| &f.outcome) {
                state.history.extend(new_parts);
                state.history.push(Part {
                    role: "assistant".into(),
                    content: Content::Text(o.text.clone()),
                    scope: taint,
                    images: Vec::new(),
                    tool_calls: Vec::new(),
                    tool_call_id: None,
                });
                state.tokens = o.prompt_tokens + o.token_ids.len() as u32;
            }
        });
        Ok(Turn { who, admitted, handle_token: parsed.handle_token, cancel, on_finish })
    }

    /// Property reads, like methods, are the owner's only. zbus passes no header when it reads
    /// a property itself; nothing is shown then either.
    fn owner_only(&self, header: Option<Header<'_>>) -> Result<(), Error> {
        match header {
            Some(h) => self.check_owner(&caller(&h)?),
            None => Err(Error::NotAuthorized(NOT_THE_OWNER.into())),
        }
    }
}

#[interface(name = "org.hearth.Hearth1.Session")]
impl SessionObject {
    /// Starts the next turn and streams it through a request object; see
    /// org.hearth.Hearth1.xml.
    #[zbus(out_args("handle"))]
    async fn generate(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<OwnedObjectPath, BusError> {
        let turn = self.begin(&header, conn, request).await?;
        let svc = &self.svc;
        let started = svc.start_generation(
            conn,
            self.owner.clone(),
            turn.who,
            turn.admitted,
            turn.handle_token,
            turn.cancel,
            Some(turn.on_finish),
        );
        Ok(started.await?)
    }

    /// Runs the next turn and returns its result; see org.hearth.Hearth1.xml.
    #[zbus(out_args("result"))]
    async fn complete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedVariant>,
    ) -> Result<hearth_dbus::GenerationResult, BusError> {
        let turn = self.begin(&header, conn, request).await?;
        let finished = self.svc.complete_generation(
            conn,
            &self.owner,
            turn.who,
            turn.admitted,
            turn.handle_token,
            turn.cancel,
            Some(turn.on_finish),
        );
        Ok(finished.await?)
    }

    /// Ends the session and frees everything it holds; see org.hearth.Hearth1.xml.
    async fn close(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        self.check_owner(&caller(&header)?)?;
        close(conn, &self.svc.models, self.id, "closed by its owner").await;
        Ok(())
    }

    /// Tokens of the conversation so far (what the next turn does not prefill again).
    #[zbus(property(emits_changed_signal = "false"))]
    async fn tokens(&self, #[zbus(header)] header: Option<Header<'_>>) -> Result<u32, BusError> {
        self.owner_only(header)?;
        Ok(lock(&self.state).tokens)
    }

    /// The model the session runs.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn model(&self, #[zbus(header)] header: Option<Header<'_>>) -> Result<String, BusError> {
        self.owner_only(header)?;
        Ok(self.model.clone())
    }

    /// The most private scope the session has seen (`local`: it never leaves the device).
    #[zbus(property(emits_changed_signal = "false"))]
    async fn taint(&self, #[zbus(header)] header: Option<Header<'_>>) -> Result<String, BusError> {
        self.owner_only(header)?;
        let state = lock(&self.state);
        Ok(state.history.iter().map(|p| p.scope).max().unwrap_or(Scope::Public).as_str().to_owned())
    }
}

/// `org.freedesktop.DBus.Properties` of a session object, in place of zbus's own. zbus builds
/// GetAll from the property getters and leaves out every property whose getter fails, so
/// another caller's GetAll answered `{}` where its Get of each property is NotAuthorized.
/// This one refuses anyone but the session's owner first, for Get, GetAll and Set alike, and
/// otherwise answers as zbus would (through the session object's own getters). Session
/// properties never emit PropertiesChanged (their values change only with the owner's turns).
#[derive(Debug)]
struct SessionProperties {
    id: u64,
    owner: OwnedUniqueName,
}

/// zbus's name for its default Properties interface (the one this replaces).
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

impl SessionProperties {
    /// Replaces the default Properties interface at `path` (where the session object was just
    /// exported). The name is a default interface's, so zbus still drops the node when the
    /// session object goes.
    async fn install(
        server: &ObjectServer,
        path: &OwnedObjectPath,
        id: u64,
        owner: OwnedUniqueName,
    ) -> zbus::Result<()> {
        server.remove_named(path, InterfaceName::from_static_str_unchecked(PROPERTIES)).await?;
        server.at(path, SessionProperties { id, owner }).await?;
        Ok(())
    }

    fn check(&self, header: &Header<'_>) -> Result<(), BoxDBusError> {
        let sender = caller(header).map_err(|e| Box::new(BusError::from(e)) as BoxDBusError)?;
        if sender.as_str() == self.owner.as_str() {
            return Ok(());
        }
        tracing::warn!(target: "hearth::audit", session = self.id, caller = %sender, "session properties refused: not its owner");
        Err(Box::new(BusError::from(Error::NotAuthorized(NOT_THE_OWNER.into()))))
    }

    /// The session object at the header's path, for an interface that is the session's; None
    /// for the other interfaces at the node (which have no properties); UnknownInterface else.
    async fn session(
        server: &ObjectServer,
        header: &Header<'_>,
        interface_name: &InterfaceName<'_>,
    ) -> Result<Option<zbus::object_server::InterfaceRef<SessionObject>>, BoxDBusError> {
        if interface_name.as_str() == SessionObject::name().as_str() {
            let path = header.path().ok_or(zbus::Error::MissingField)?;
            let object = server
                .interface::<_, SessionObject>(path)
                .await
                .map_err(|_| zbus::fdo::Error::UnknownInterface(format!("Unknown interface '{interface_name}'")))?;
            return Ok(Some(object));
        }
        match interface_name.as_str() {
            PROPERTIES | "org.freedesktop.DBus.Peer" | "org.freedesktop.DBus.Introspectable" => Ok(None),
            _ => Err(Box::new(zbus::fdo::Error::UnknownInterface(format!("Unknown interface '{interface_name}'")))),
        }
    }
}

fn unknown_property(name: &str) -> BoxDBusError {
    Box::new(zbus::fdo::Error::UnknownProperty(format!("Unknown property '{}'", crate::error::bounded(name, 128))))
}

#[interface(name = "org.freedesktop.DBus.Properties", introspection_docs = false)]
impl SessionProperties {
    /// Get a property value (the session's owner only).
    async fn get(
        &self,
        interface_name: InterfaceName<'_>,
        property_name: &str,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(header)] header: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedVariant, BoxDBusError> {
        self.check(&header)?;
        let Some(object) = Self::session(server, &header, &interface_name).await? else {
            return Err(unknown_property(property_name));
        };
        let object = object.get().await;
        object
            .get(property_name, server, conn, Some(&header), &emitter)
            .await
            .unwrap_or_else(|| Err(unknown_property(property_name)))
    }

    /// Get all properties (the session's owner only).
    async fn get_all(
        &self,
        interface_name: InterfaceName<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] header: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<HashMap<String, OwnedVariant>, BoxDBusError> {
        self.check(&header)?;
        let Some(object) = Self::session(server, &header, &interface_name).await? else {
            return Ok(HashMap::new());
        };
        let object = object.get().await;
        Ok(object.get_all(server, conn, Some(&header), &emitter).await?)
    }

    /// Set a property value (the session's owner only; the session's are all read-only).
    #[allow(clippy::too_many_arguments)]
    async fn set(
        &self,
        interface_name: InterfaceName<'_>,
        property_name: &str,
        value: Variant<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] header: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BoxDBusError> {
        self.check(&header)?;
        let Some(object) = Self::session(server, &header, &interface_name).await? else {
            return Err(unknown_property(property_name));
        };
        {
            let guard = object.get().await;
            match guard.set(property_name, &value, server, conn, Some(&header), &emitter) {
                DispatchResult::NotFound => return Err(unknown_property(property_name)),
                DispatchResult::Async(f) => return f.await,
                DispatchResult::RequiresMut => {}
            }
        }
        let mut guard = object.get_mut().await;
        guard
            .set_mut(property_name, &value, server, conn, Some(&header), &emitter)
            .await
            .unwrap_or_else(|| Err(unknown_property(property_name)))
    }
}
