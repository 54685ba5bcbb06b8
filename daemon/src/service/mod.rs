//! The D-Bus interface layer: thin `#[interface]` impls that parse, call the engine through
//! its handle, and turn results into replies and signals. No inference state lives here.

mod in_flight;
mod request_object;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hearth_dbus::{Error as BusError, FinishReason, result_key};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, interface};

pub use in_flight::InFlight;
use request_object::RequestObject;

use crate::engine::{Caller, CancelToken, EngineHandle, EngineStatus, Event, Outcome, Priority};
use crate::error::Error;
use crate::models::Catalog;
use crate::request::{Method, parse};

/// `org.hearth.Hearth1` at `/org/hearth/Hearth1`.
#[derive(Debug)]
pub struct HearthService {
    engine: EngineHandle,
    catalog: Arc<Catalog>,
    default_max_tokens: u32,
    next_request: AtomicU64,
    in_flight: InFlight,
    callers: CallerCache,
}

impl HearthService {
    pub fn new(
        engine: EngineHandle,
        catalog: Arc<Catalog>,
        default_max_tokens: u32,
        in_flight: InFlight,
        callers: CallerCache,
    ) -> Self {
        Self { engine, catalog, default_max_tokens, next_request: AtomicU64::new(1), in_flight, callers }
    }
}

fn owned(v: Value<'_>) -> OwnedValue {
    // Only values holding file descriptors can fail to convert; ours never do.
    OwnedValue::try_from(v).expect("value without file descriptors")
}

/// The result dictionary of Complete and Request.Finished.
pub(crate) fn outcome_dict(o: &Outcome) -> HashMap<String, OwnedValue> {
    let mut d = HashMap::from([
        (result_key::FINISH_REASON.to_owned(), owned(Value::from(o.reason.as_str()))),
        (result_key::TEXT.to_owned(), owned(Value::from(o.text.as_str()))),
        (result_key::TOKENS.to_owned(), owned(Value::from(o.token_ids.len() as u32))),
        (result_key::TOKEN_IDS.to_owned(), owned(Value::from(o.token_ids.clone()))),
        (result_key::PROMPT_TOKENS.to_owned(), owned(Value::from(o.prompt_tokens))),
        (result_key::CACHED_TOKENS.to_owned(), owned(Value::from(o.cached_tokens))),
        (result_key::MODEL.to_owned(), owned(Value::from(o.model.as_str()))),
        (result_key::PREFILL_US.to_owned(), owned(Value::from(o.prefill.as_micros() as u64))),
        (result_key::DECODE_US.to_owned(), owned(Value::from(o.decode.as_micros() as u64))),
    ]);
    if let Some(e) = &o.error {
        let bus = BusError::from(e.clone());
        d.insert(result_key::ERROR_NAME.to_owned(), owned(Value::from(bus.dbus_name())));
        d.insert(result_key::ERROR_MESSAGE.to_owned(), owned(Value::from(bus.message())));
    }
    d
}

/// A failure of the bus layer itself, as a named `Internal` error: a reply must always carry
/// an org.hearth.Hearth1.Error name, never zbus's own.
fn internal(what: &str, e: &dyn std::fmt::Display) -> BusError {
    BusError::Internal(format!("{what}: {e}"))
}

fn caller(header: &Header<'_>) -> Result<zbus::names::OwnedUniqueName, BusError> {
    header.sender().map(|s| s.to_owned().into()).ok_or_else(|| BusError::InvalidArgs("the call has no sender".into()))
}

/// Callers already identified, by unique name. Unique names are never reused on a bus, so an
/// entry stays true until the connection closes (then `watch_disconnects` drops it).
#[derive(Debug, Clone, Default)]
pub struct CallerCache(Arc<std::sync::Mutex<HashMap<String, Caller>>>);

impl CallerCache {
    fn get(&self, name: &str) -> Option<Caller> {
        self.0.lock().ok()?.get(name).cloned()
    }

    fn insert(&self, caller: Caller) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(caller.connection.clone(), caller);
        }
    }

    fn remove(&self, name: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(name);
        }
    }
}

/// Who the caller is, as the bus daemon vouches for it (never what the caller claims).
async fn identify(
    conn: &Connection,
    cache: &CallerCache,
    sender: &zbus::names::OwnedUniqueName,
) -> Result<Caller, BusError> {
    if let Some(caller) = cache.get(sender.as_str()) {
        return Ok(caller);
    }
    let caller = identify_uncached(conn, sender).await?;
    cache.insert(caller.clone());
    Ok(caller)
}

async fn identify_uncached(conn: &Connection, sender: &zbus::names::OwnedUniqueName) -> Result<Caller, BusError> {
    let dbus =
        zbus::fdo::DBusProxy::new(conn).await.map_err(|e| internal("cannot ask the bus about the caller", &e))?;
    let creds = dbus
        .get_connection_credentials(zbus::names::BusName::Unique(sender.as_ref()))
        .await
        .map_err(|e| internal("cannot get the caller's credentials", &e))?;
    let (Some(uid), Some(pid)) = (creds.unix_user_id(), creds.process_id()) else {
        return Err(BusError::NotAuthorized("the bus did not vouch for the caller's uid and pid".into()));
    };
    Ok(Caller { connection: sender.to_string(), app: format!("uid:{uid}/pid:{pid}") })
}

#[interface(name = "org.hearth.Hearth1")]
impl HearthService {
    /// Starts a generation; see org.hearth.Hearth1.xml.
    #[zbus(out_args("handle"))]
    async fn generate(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, BusError> {
        let sender = caller(&header)?;
        let parsed = parse(&request, Method::Generate, self.default_max_tokens)?;
        let who = identify(conn, &self.callers, &sender).await?;
        let cancel = CancelToken::default();
        let server = conn.object_server();
        // Claim the request path first, so the caller's early subscription can never see
        // someone else's object, and a duplicate handle token is refused.
        let path = loop {
            let token = match &parsed.handle_token {
                Some(t) => t.clone(),
                None => format!("r{}", self.next_request.fetch_add(1, Ordering::Relaxed)),
            };
            let path = hearth_dbus::request_path(sender.as_str(), &token)
                .ok_or_else(|| BusError::Internal(format!("cannot build a request path for {sender}")))?;
            let object = RequestObject::new(sender.clone(), cancel.clone());
            if server.at(&path, object).await.map_err(|e| internal("cannot export the request object", &e))? {
                break path;
            }
            if parsed.handle_token.is_some() {
                return Err(BusError::InvalidArgs(format!("handle_token {token:?} is already in use")));
            }
        };
        let guard = self.in_flight.enter();
        match self.engine.submit(parsed.request, who, cancel).await {
            Ok(submission) => {
                tracing::info!(id = submission.accepted.id, caller = %sender, path = %path.as_str(), prompt_tokens = submission.accepted.prompt_tokens, "generate");
                let conn = conn.clone();
                let out_path = path.clone();
                tokio::spawn(async move {
                    request_object::forward(&conn, path, sender, submission.events).await;
                    drop(guard);
                });
                Ok(out_path)
            }
            Err(e) => {
                let _ = server.remove::<RequestObject, _>(&path).await;
                tracing::info!(caller = %sender, error = %e, "generate refused");
                Err(e.into())
            }
        }
    }

    /// Generates and returns the whole result; see org.hearth.Hearth1.xml.
    #[zbus(out_args("result"))]
    async fn complete(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        request: HashMap<String, OwnedValue>,
    ) -> Result<HashMap<String, OwnedValue>, BusError> {
        let sender = caller(&header)?;
        let parsed = parse(&request, Method::Complete, self.default_max_tokens)?;
        let who = identify(conn, &self.callers, &sender).await?;
        let _guard = self.in_flight.enter();
        let mut submission =
            self.engine.submit(parsed.request, who, CancelToken::default()).await.inspect_err(|e| {
                tracing::info!(caller = %sender, error = %e, "complete refused");
            })?;
        tracing::info!(id = submission.accepted.id, caller = %sender, "complete");
        while let Some(event) = submission.events.recv().await {
            if let Event::Finished(outcome) = event {
                return match (outcome.reason, outcome.error.clone()) {
                    (FinishReason::Cancelled | FinishReason::Error, Some(e)) => Err(e.into()),
                    _ => Ok(outcome_dict(&outcome)),
                };
            }
        }
        Err(Error::Internal("the engine stopped without finishing the request".into()).into())
    }

    /// The installed models; see org.hearth.Hearth1.xml.
    #[zbus(out_args("models"))]
    async fn list_models(&self) -> Result<Vec<HashMap<String, OwnedValue>>, BusError> {
        let loaded = self.engine.model();
        Ok(self
            .catalog
            .iter()
            .map(|entry| {
                let name = &entry.manifest.name;
                let is_loaded = name == &loaded.name;
                let mut d = HashMap::from([
                    ("name".to_owned(), owned(Value::from(name.as_str()))),
                    ("file".to_owned(), owned(Value::from(entry.path.display().to_string()))),
                    ("sha256".to_owned(), owned(Value::from(entry.manifest.sha256.as_str()))),
                    ("loaded".to_owned(), owned(Value::from(is_loaded))),
                    ("default".to_owned(), owned(Value::from(is_loaded))),
                ]);
                if is_loaded {
                    d.insert("n_params".to_owned(), owned(Value::from(loaded.n_params)));
                    d.insert("size_bytes".to_owned(), owned(Value::from(loaded.size_bytes)));
                    d.insert("context_length".to_owned(), owned(Value::from(loaded.context_length)));
                    d.insert("trained_context".to_owned(), owned(Value::from(loaded.trained_context)));
                    d.insert("description".to_owned(), owned(Value::from(loaded.description.as_str())));
                }
                d
            })
            .collect())
    }

    #[zbus(property)]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    #[zbus(property)]
    async fn loaded_models(&self) -> Vec<String> {
        self.engine.status().borrow().loaded_models.clone()
    }

    #[zbus(property)]
    async fn queue_depth(&self) -> u32 {
        self.engine.status().borrow().queue_depth()
    }

    #[zbus(property)]
    async fn queue_by_priority(&self) -> HashMap<String, u32> {
        let status = self.engine.status().borrow().clone();
        Priority::ALL.iter().map(|&p| (p.as_str().to_owned(), status.count(p))).collect()
    }

    /// Changes every token, so it is read on demand and never signalled.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn kv_cache(&self) -> HashMap<String, u32> {
        let kv = self.engine.kv();
        let load = |a: &std::sync::atomic::AtomicU32| a.load(Ordering::Relaxed);
        HashMap::from([
            ("size".to_owned(), load(&kv.size)),
            ("reserved".to_owned(), load(&kv.reserved)),
            ("used".to_owned(), load(&kv.used)),
            ("cached".to_owned(), load(&kv.cached)),
        ])
    }
}

/// Emits PropertiesChanged for QueueDepth and LoadedModels whenever the engine's status moves.
pub async fn publish_status_changes(conn: Connection, mut status: tokio::sync::watch::Receiver<EngineStatus>) {
    let iface = match conn.object_server().interface::<_, HearthService>(hearth_dbus::OBJECT_PATH).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch engine status");
            return;
        }
    };
    let mut last = status.borrow().clone();
    while status.changed().await.is_ok() {
        let now = status.borrow_and_update().clone();
        let emitter: &SignalEmitter<'_> = iface.signal_emitter();
        let service = iface.get().await;
        if now.queue_depth() != last.queue_depth() {
            if let Err(e) = service.queue_depth_changed(emitter).await {
                tracing::warn!(error = %e, "cannot emit QueueDepth change");
            }
        }
        if now.by_priority != last.by_priority {
            if let Err(e) = service.queue_by_priority_changed(emitter).await {
                tracing::warn!(error = %e, "cannot emit QueueByPriority change");
            }
        }
        if now.loaded_models != last.loaded_models {
            if let Err(e) = service.loaded_models_changed(emitter).await {
                tracing::warn!(error = %e, "cannot emit LoadedModels change");
            }
        }
        last = now;
    }
}

/// Cancels the requests of every connection that leaves the bus, freeing their KV at once.
pub async fn watch_disconnects(conn: Connection, engine: EngineHandle, callers: CallerCache) {
    let stream = async {
        let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
        dbus.receive_name_owner_changed().await
    };
    let mut changes = match stream.await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch for disconnecting callers");
            return;
        }
    };
    use futures_util::StreamExt;
    while let Some(signal) = changes.next().await {
        let Ok(args) = signal.args() else { continue };
        // A unique name losing its owner is a connection that closed.
        if args.name().starts_with(':') && args.new_owner().is_none() {
            callers.remove(args.name());
            engine.connection_closed(args.name().to_string()).await;
        }
    }
}
