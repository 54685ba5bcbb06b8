//! Running an admitted request: the request object and its signals (Generate), or the whole
//! result (Complete); shared by the service and its sessions.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hearth_dbus::GenerationResult;
use zbus::Connection;
use zbus::OwnedObjectPath;

use super::driver::{Events, Finish, StreamEvent};
use super::request_object::{self, RequestObject};
use super::{HearthService, driver, generation_result, internal};

use crate::engine::{Caller, CancelToken, FinishReason, GenerateRequest};
use crate::error::Error;
use crate::privacy::Decision;
use crate::structured::Structure;

/// Called once when a generation ends: with its outcome, or None when it never started or
/// its stream broke off. Sessions record their turns with it.
pub(crate) type OnFinish = Box<dyn FnOnce(Option<&Finish>) + Send>;

/// An admitted generation: the engine's request, where it runs, and the structure (schema,
/// grammar or tools) its result is checked against above the engine.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub request: GenerateRequest,
    pub decision: Decision,
    pub structure: Option<Arc<Structure>>,
}

/// Passes `events` through, calling `on_finish` with the Finished outcome before it goes on.
fn tap(mut events: Events, on_finish: OnFinish) -> Events {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut on_finish = Some(on_finish);
        while let Some(event) = events.recv().await {
            if let StreamEvent::Finished(finish) = &event
                && let Some(f) = on_finish.take()
            {
                f(Some(finish));
            }
            if tx.send(event).is_err() {
                break; // nobody listens: dropping `events` cancels the generation
            }
        }
        if let Some(f) = on_finish {
            f(None);
        }
    });
    Events::Routed(rx)
}

impl HearthService {
    /// Exports a request object for `sender` at the path of `handle_token` (or of a fresh
    /// token of hearthd's when None), cancelling through `cancel`. A handle token already in
    /// use is refused.
    async fn export_request_object(
        &self,
        server: &zbus::ObjectServer,
        sender: &zbus::names::OwnedUniqueName,
        handle_token: Option<&str>,
        cancel: &CancelToken,
    ) -> Result<OwnedObjectPath, Error> {
        loop {
            let token = match handle_token {
                Some(t) => t.to_owned(),
                None => format!("r{}", self.next_request.fetch_add(1, Ordering::Relaxed)),
            };
            let Some(path) = hearth_dbus::request_path(sender.as_str(), &token) else {
                return Err(Error::Internal(format!("cannot build a request path for {sender}")));
            };
            let object = RequestObject::new(sender.clone(), cancel.clone());
            match server.at(&path, object).await {
                Ok(None) => {
                    request_object::hide_request_listing(server).await;
                    return Ok(path);
                }
                Ok(Some(_)) if handle_token.is_none() => {}
                Ok(Some(_)) => return Err(Error::InvalidArgs(format!("handle_token {token:?} is already in use"))),
                Err(e) => return Err(internal("cannot export the request object", &e)),
            }
        }
    }

    /// Exports a request object for an admitted request and starts it (Generate, and a
    /// session's Generate).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn start_generation(
        &self,
        conn: &Connection,
        sender: zbus::names::OwnedUniqueName,
        who: Caller,
        admitted: Admitted,
        handle_token: Option<String>,
        cancel: CancelToken,
        on_finish: Option<OnFinish>,
    ) -> Result<OwnedObjectPath, Error> {
        let Admitted { request, decision, structure } = admitted;
        let server = conn.object_server();
        let refused = |on_finish: Option<OnFinish>| on_finish.map(|f| f(None));
        // Claim the request path first, so the caller's early subscription can never see
        // someone else's object, and a duplicate handle token is refused.
        let path = match self.export_request_object(server, &sender, handle_token.as_deref(), &cancel).await {
            Ok(path) => path,
            Err(e) => {
                refused(on_finish);
                return Err(e);
            }
        };
        let guard = self.in_flight.enter();
        let app = who.app.clone();
        match driver::start(&self.models, self.cloud.as_ref(), &self.governor, request, who, cancel, &decision).await {
            Ok(running) => {
                tracing::info!(caller = %sender, path = %path.as_str(), route = decision.route.as_str(), "generate");
                let conn = conn.clone();
                let out_path = path.clone();
                let activity = Arc::clone(&self.activity);
                tokio::spawn(async move {
                    let driver::Running { events, _lease: lease } = running;
                    let events = activity.watch(&app, events);
                    let events = match on_finish {
                        Some(f) => tap(events, f),
                        None => events,
                    };
                    request_object::forward(&conn, path, sender, events, decision, structure).await;
                    drop(lease);
                    drop(guard);
                });
                Ok(out_path)
            }
            Err(e) => {
                let _ = server.remove::<RequestObject, _>(&path).await;
                tracing::info!(caller = %sender, error = e.kind(), "generate refused");
                refused(on_finish);
                Err(e)
            }
        }
    }

    /// Runs an admitted request to its end and returns the result (Complete, and a session's
    /// Complete). With a `handle_token`, a request object (Cancel only: no signals) is
    /// exported at the path Generate would use, for as long as the request runs.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn complete_generation(
        &self,
        conn: &Connection,
        sender: &zbus::names::OwnedUniqueName,
        who: Caller,
        admitted: Admitted,
        handle_token: Option<String>,
        cancel: CancelToken,
        on_finish: Option<OnFinish>,
    ) -> Result<GenerationResult, Error> {
        let server = conn.object_server();
        let path = match handle_token {
            Some(token) => match self.export_request_object(server, sender, Some(&token), &cancel).await {
                Ok(path) => Some(path),
                Err(e) => {
                    if let Some(f) = on_finish {
                        f(None);
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        let result = self.run_to_end(sender, who, admitted, cancel, on_finish).await;
        if let Some(path) = path
            && let Err(e) = server.remove::<RequestObject, _>(&path).await
        {
            tracing::warn!(error = %e, path = %path.as_str(), "cannot remove request object");
        }
        result
    }

    async fn run_to_end(
        &self,
        sender: &zbus::names::OwnedUniqueName,
        who: Caller,
        admitted: Admitted,
        cancel: CancelToken,
        on_finish: Option<OnFinish>,
    ) -> Result<GenerationResult, Error> {
        let Admitted { request, decision, structure } = admitted;
        let _guard = self.in_flight.enter();
        let app = who.app.clone();
        let started =
            driver::start(&self.models, self.cloud.as_ref(), &self.governor, request, who, cancel, &decision).await;
        let running = match started {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(caller = %sender, error = e.kind(), "complete refused");
                if let Some(f) = on_finish {
                    f(None);
                }
                return Err(e);
            }
        };
        tracing::info!(caller = %sender, route = decision.route.as_str(), "complete");
        let driver::Running { events, _lease } = running;
        let events = self.activity.watch(&app, events);
        let mut events = match on_finish {
            Some(f) => tap(events, f),
            None => events,
        };
        let mut streamed = 0u32;
        while let Some(event) = events.recv().await {
            match event {
                StreamEvent::Token { .. } => streamed += 1,
                StreamEvent::Finished(finish) => {
                    return match (finish.outcome.reason, finish.error.clone()) {
                        (FinishReason::Cancelled | FinishReason::Error, Some(e)) => Err(e),
                        _ => Ok(generation_result(&finish, &decision, structure.as_deref(), streamed)),
                    };
                }
                StreamEvent::Migrated { .. } => {}
            }
        }
        Err(Error::Internal("the engine stopped without finishing the request".into()))
    }
}
