//! Runs an admitted request where the router sent it: on the device (an engine lease and its
//! event stream), or in the cloud, falling back to the device when the cloud fails before the
//! first token and migrating to it — continuing from exactly the text so far — when the cloud
//! stream breaks off. Either way the caller sees one stream of events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::cloud::{Cloud, CloudError};
use crate::engine::{Caller, CancelReason, CancelToken, EngineError, Event, FinishReason, GenerateRequest, Outcome};
use crate::error::Error;
use crate::governor::{GovernorStatus, ThermalState};
use crate::manager::{Lease, ModelManager};
use crate::privacy::{Decision, Route};
use hearth_ffi::Token;

/// A running request: its events, and the model lease that keeps a local engine loaded.
#[derive(Debug)]
pub struct Running {
    pub events: Events,
    pub _lease: Option<Lease>,
}

/// One event of a caller's stream: a token (the device's, or a chunk of the cloud's), a
/// move between the device and the cloud, and the end.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Token {
        index: u32,
        id: Token,
        text: String,
    },
    /// The stream moved between the cloud and the device at token `index`.
    Migrated {
        from: &'static str,
        to: &'static str,
        index: u32,
    },
    /// The end; always the last event.
    Finished(Box<Finish>),
}

/// How a request ended, and where it ran and why when that differs from the routing
/// decision (cloud fallback, migration).
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub outcome: Outcome,
    pub route: Option<(String, String)>,
    /// Why it failed or was cancelled, as the caller is told: the engine's error, or one of
    /// the route (the cloud, a model that cannot take the request).
    pub error: Option<Error>,
    /// What its device compute cost, mJ, and the energy source, and whether its app is past
    /// its energy budget (None: it has none); set by the activity table.
    pub energy: Option<(f64, &'static str)>,
    pub over_budget: Option<bool>,
}

impl StreamEvent {
    /// The end, as the outcome says (its error, if any, is the engine's).
    fn finished(outcome: Outcome, route: Option<(String, String)>) -> Self {
        let error = outcome.error.clone().map(Error::from);
        Self::Finished(Box::new(Finish { outcome, route, error, energy: None, over_budget: None }))
    }

    /// The end, with an error of the route rather than of the engine.
    fn failed(outcome: Outcome, route: Option<(String, String)>, error: Option<Error>) -> Self {
        Self::Finished(Box::new(Finish { outcome, route, error, energy: None, over_budget: None }))
    }
}

impl From<Event> for StreamEvent {
    fn from(e: Event) -> Self {
        match e {
            Event::Token { index, id, text } => Self::Token { index, id, text },
            Event::Finished(outcome) => Self::finished(outcome, None),
        }
    }
}

/// A request's stream: the engine's own (a device request nothing watches), or one that
/// routing code feeds (cloud, fallback, migration, a session's bookkeeping).
#[derive(Debug)]
pub enum Events {
    Engine(mpsc::UnboundedReceiver<Event>),
    Routed(mpsc::UnboundedReceiver<StreamEvent>),
}

impl Events {
    pub async fn recv(&mut self) -> Option<StreamEvent> {
        match self {
            Self::Engine(rx) => rx.recv().await.map(StreamEvent::from),
            Self::Routed(rx) => rx.recv().await,
        }
    }
}

/// A request's time budget (`deadline_ms`), end to end: counted from its start across
/// retries, the fallback to the device and migrations, so no leg starts the clock again.
#[derive(Debug, Clone, Copy)]
struct Budget(Option<Instant>);

impl Budget {
    fn start(request: &GenerateRequest) -> Self {
        Self(request.deadline.map(|d| Instant::now() + d))
    }

    /// What is left of it, as the deadline of the leg that runs next.
    fn left(self) -> Option<Duration> {
        self.0.map(|d| d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))
    }
}

/// Resolves once the caller cancelled or the budget ran out (then marking `cancel` with
/// Deadline), with the reason: woken by the cancel itself, so a stalled or trickling
/// endpoint holds a cancelled request no longer than it takes to drop its stream.
async fn stopped(cancel: &CancelToken, budget: Budget) -> CancelReason {
    let out_of_time = async {
        match budget.0 {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        reason = cancel.cancelled() => reason,
        () = out_of_time => {
            cancel.cancel(CancelReason::Deadline);
            cancel.reason().unwrap_or(CancelReason::Deadline)
        }
    }
}

/// Starts `request` on its route. Errors of the local route (validation, Busy, ...) are
/// returned at once; the cloud route always starts and reports through its events.
pub async fn start(
    models: &ModelManager,
    cloud: Option<&Arc<Cloud>>,
    governor: &watch::Receiver<GovernorStatus>,
    request: GenerateRequest,
    who: Caller,
    cancel: CancelToken,
    decision: &Decision,
) -> Result<Running, Error> {
    match (decision.route, cloud) {
        // A local request that admission let leave the device: watched, so it can move to the
        // cloud if the device turns critical mid-generation. Nothing here re-derives that.
        (Route::Local, Some(cloud)) if decision.may_leave => {
            let lease = models.acquire(request.model.as_deref()).await?;
            let engine_cancel = CancelToken::default();
            let submission = lease.engine.submit(request.clone(), who.clone(), engine_cancel.clone()).await?;
            let (tx, events) = mpsc::unbounded_channel();
            let watch = LocalWatch {
                models: models.clone(),
                cloud: Arc::clone(cloud),
                governor: governor.clone(),
                user: cancel,
                engine_cancel,
                budget: Budget::start(&request),
                who,
            };
            tokio::spawn(watch.run(request, submission.events, tx));
            Ok(Running { events: Events::Routed(events), _lease: Some(lease) })
        }
        (Route::Cloud, Some(cloud)) => {
            let (tx, events) = mpsc::unbounded_channel();
            tokio::spawn(drive_cloud(models.clone(), Arc::clone(cloud), request, who, cancel, tx));
            Ok(Running { events: Events::Routed(events), _lease: None })
        }
        (Route::Cloud, None) => Err(Error::CloudUnavailable("no cloud model is configured".into())),
        (Route::Local, _) => {
            let lease = models.acquire(request.model.as_deref()).await?;
            let submission = lease.engine.submit(request, who, cancel).await?;
            tracing::debug!(
                id = submission.accepted.id,
                prompt_tokens = submission.accepted.prompt_tokens,
                "running on the device"
            );
            Ok(Running { events: Events::Engine(submission.events), _lease: Some(lease) })
        }
    }
}

fn cloud_outcome(text: String, model: &str, reason: FinishReason, started: Instant, first: Option<Instant>) -> Outcome {
    let first = first.unwrap_or_else(Instant::now);
    Outcome {
        text,
        prefill: first.duration_since(started),
        decode: first.elapsed(),
        ..Outcome::empty(reason, model, None)
    }
}

async fn drive_cloud(
    models: ModelManager,
    cloud: Arc<Cloud>,
    request: GenerateRequest,
    who: Caller,
    cancel: CancelToken,
    tx: mpsc::UnboundedSender<StreamEvent>,
) {
    let local_name = request.model.clone().unwrap_or_else(|| models.default_model());
    let Some(remote) = cloud.remote_model(&local_name).map(str::to_owned) else {
        let why = format!("no remote model is mapped for {local_name:?}");
        return run_local(&models, request, who, cancel, &tx, String::new(), 0, ("local".into(), why)).await;
    };
    let started = Instant::now();
    let budget = Budget::start(&request);
    let (result, text, index, first) = stream_cloud(&cloud, &remote, &request, None, 0, &tx, &cancel, budget).await;
    if let Some(reason) = cancel.reason() {
        let o = cloud_outcome(text, &remote, FinishReason::Cancelled, started, first);
        let _ = tx.send(StreamEvent::failed(o, None, Some(Error::cancelled(reason))));
        return;
    }
    match result {
        Ok(done) => {
            let reason = if done.reason == "length" { FinishReason::Length } else { FinishReason::Stop };
            let _ =
                tx.send(StreamEvent::finished(cloud_outcome(text, &done.remote_model, reason, started, first), None));
        }
        Err(CloudError::BeforeFirstToken(why)) => {
            tracing::info!(app = %who.app, reason = %why, "cloud failed before the first token: running on the device");
            let route = ("local".into(), format!("the cloud failed before the first token ({why}); ran on the device"));
            let mut request = request;
            request.deadline = budget.left();
            run_local(&models, request, who, cancel, &tx, String::new(), 0, route).await;
        }
        Err(CloudError::MidStream(why)) => {
            tracing::info!(app = %who.app, at = index, reason = %why, "cloud stream broke off: migrating to the device");
            let _ = tx.send(StreamEvent::Migrated { from: "cloud", to: "local", index });
            let route = (
                "cloud+local".into(),
                format!("the cloud stream broke off after {index} chunks ({why}); the device continued from there"),
            );
            let mut rest = request;
            rest.max_tokens = rest.max_tokens.saturating_sub(index).max(1);
            rest.assistant_prefix = Some(text.clone());
            rest.deadline = budget.left();
            run_local(&models, rest, who, cancel, &tx, text, index, route).await;
        }
    }
}

/// Streams `request` from the cloud as Token events numbered from `offset`, continuing after
/// `prefix` when given, until it ends, the caller cancels or the budget runs out (whatever
/// the endpoint is doing then: stalled, trickling, retrying). Returns the result, the cloud's
/// text, the next index and the time of the first chunk. Stop sequences are applied here
/// too, whether or not the endpoint honours them.
#[allow(clippy::too_many_arguments)]
async fn stream_cloud(
    cloud: &Cloud,
    remote: &str,
    request: &GenerateRequest,
    prefix: Option<&str>,
    offset: u32,
    tx: &mpsc::UnboundedSender<StreamEvent>,
    cancel: &CancelToken,
    budget: Budget,
) -> (Result<crate::cloud::CloudFinish, CloudError>, String, u32, Option<Instant>) {
    let mut first = None;
    let mut text = String::new();
    let mut index = offset;
    let mut stop = crate::engine::stop::StopFilter::new(&request.stop);
    let send = |out: Vec<crate::engine::stop::Released>| {
        for r in out {
            let _ = tx.send(StreamEvent::Token { index: r.index, id: -1, text: r.text });
        }
    };
    let result = tokio::select! {
        result = cloud.stream(remote, request, prefix, |chunk| {
            if cancel.reason().is_some() || tx.is_closed() {
                return false;
            }
            first.get_or_insert_with(Instant::now);
            text.push_str(chunk);
            let mut out = Vec::new();
            let stopped = stop.push(&mut text, index, -1, chunk.to_owned(), &mut out);
            send(out);
            index += 1;
            // A stop sequence ends the stream as the caller's cancel does: finished, "stop".
            !stopped
        }) => result,
        _ = stopped(cancel, budget) => {
            Ok(crate::cloud::CloudFinish { reason: "cancelled".into(), remote_model: remote.to_owned() })
        }
    };
    let mut held = Vec::new();
    stop.flush(&mut held);
    send(held);
    (result, text, index, first)
}

/// A local request that may move to the cloud: forwards the engine's events and, when the
/// device turns critical while the cloud is available, stops the local sequence and goes on
/// in the cloud from the text so far.
struct LocalWatch {
    models: ModelManager,
    cloud: Arc<Cloud>,
    governor: watch::Receiver<GovernorStatus>,
    /// The caller's switch (Cancel; the deadline is the engine's own until a move).
    user: CancelToken,
    /// The engine's switch: the caller's cancel, or a migration.
    engine_cancel: CancelToken,
    budget: Budget,
    who: Caller,
}

impl LocalWatch {
    async fn run(
        mut self,
        request: GenerateRequest,
        mut events: mpsc::UnboundedReceiver<Event>,
        tx: mpsc::UnboundedSender<StreamEvent>,
    ) {
        let mut cancelled = false;
        let mut count = 0u32;
        let mut moving = false;
        let outcome = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Finished(o)) => break o,
                    Some(e) => {
                        if matches!(e, Event::Token { .. }) {
                            count += 1;
                        }
                        if tx.send(e.into()).is_err() {
                            self.engine_cancel.cancel(CancelReason::Disconnected);
                        }
                    }
                    None => return,
                },
                reason = self.user.cancelled(), if !cancelled => {
                    cancelled = true;
                    self.engine_cancel.cancel(reason);
                }
                _ = self.governor.changed(), if !moving => {
                    let critical = self.governor.borrow().thermal == ThermalState::Critical;
                    if critical && self.cloud.available() && self.user.reason().is_none() {
                        // Once: the engine may take a while to stop the sequence, and every
                        // governor tick in between would ask (and log) again.
                        moving = true;
                        tracing::info!(at = count, "the device turned critical: moving the request to the cloud");
                        // To the engine this is its caller ending the request.
                        self.engine_cancel.cancel(CancelReason::Caller);
                    }
                }
            }
        };
        // Moved only if the engine stopped for the move: it may have finished first, and a
        // Cancel of the caller's own wins.
        let moved = moving
            && self.user.reason().is_none()
            && outcome.error == Some(EngineError::Cancelled(CancelReason::Caller));
        if !moved {
            let _ = tx.send(StreamEvent::finished(outcome, None));
            return;
        }
        // Moved: the cloud continues the assistant's turn from exactly the device's text.
        let before = outcome.text;
        let _ = tx.send(StreamEvent::Migrated { from: "local", to: "cloud", index: count });
        let local_name = request.model.clone().unwrap_or_else(|| self.models.default_model());
        let remote = self.cloud.remote_model(&local_name).unwrap_or_default().to_owned();
        let mut rest = request;
        rest.max_tokens = rest.max_tokens.saturating_sub(count).max(1);
        let started = Instant::now();
        let (result, text, index, first) =
            stream_cloud(&self.cloud, &remote, &rest, Some(&before), count, &tx, &self.user, self.budget).await;
        let why = match result {
            Ok(done) => {
                let mut o = cloud_outcome(format!("{before}{text}"), &remote, FinishReason::Stop, started, first);
                let route = (
                    "local+cloud".into(),
                    format!("the device turned critical after {count} tokens; the cloud continued from there"),
                );
                let mut error = None;
                match done.reason.as_str() {
                    "length" => o.reason = FinishReason::Length,
                    // The caller's cancel; else the stream was ended by a stop sequence.
                    "cancelled" if self.user.reason().is_some() => {
                        o.reason = FinishReason::Cancelled;
                        error = self.user.reason().map(Error::cancelled);
                    }
                    _ => {}
                }
                let _ = tx.send(StreamEvent::failed(o, Some(route), error));
                return;
            }
            Err(e) => e,
        };
        // The cloud failed (the breaker has counted it): the device carries on from exactly
        // the text so far, hot or not, rather than the answer ending in an error.
        tracing::info!(at = index, reason = %why, "the cloud failed after the move: the device carries on");
        let so_far = format!("{before}{text}");
        // Back: the caller saw the move out, so it sees the move back too.
        let _ = tx.send(StreamEvent::Migrated { from: "cloud", to: "local", index });
        rest.max_tokens = rest.max_tokens.saturating_sub(index - count).max(1);
        rest.assistant_prefix = Some(so_far.clone());
        rest.deadline = self.budget.left();
        let route = (
            if index > count { "local+cloud+local" } else { "local" }.to_owned(),
            format!(
                "the device turned critical after {count} tokens and the cloud failed ({why}); the device carried on"
            ),
        );
        run_local(&self.models, rest, self.who, self.user, &tx, so_far, index, route).await;
    }
}

/// Runs `request` on the device, forwarding its events after `offset` earlier tokens whose
/// text is `before`, and reports `route` in Finished.
#[allow(clippy::too_many_arguments)]
async fn run_local(
    models: &ModelManager,
    request: GenerateRequest,
    who: Caller,
    cancel: CancelToken,
    tx: &mpsc::UnboundedSender<StreamEvent>,
    before: String,
    offset: u32,
    route: (String, String),
) {
    let fail = |e: Error| {
        let error = match e {
            Error::Engine(EngineError::ContextLengthExceeded { .. })
            | Error::ModelNotFound(_)
            | Error::ModelUnavailable { .. } => {
                Error::CloudUnavailable(format!("the cloud failed and the device cannot take the request: {e}"))
            }
            e => e,
        };
        let reason = if error.is_cancelled() { FinishReason::Cancelled } else { FinishReason::Error };
        let outcome = Outcome { text: before.clone(), ..Outcome::empty(reason, "", None) };
        StreamEvent::failed(outcome, Some(route.clone()), Some(error))
    };
    let lease = match models.acquire(request.model.as_deref()).await {
        Ok(l) => l,
        Err(e) => {
            let _ = tx.send(fail(e));
            return;
        }
    };
    let mut submission = match lease.engine.submit(request, who, cancel).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(fail(e.into()));
            return;
        }
    };
    while let Some(event) = submission.events.recv().await {
        let event = match event {
            Event::Token { index, id, text } => StreamEvent::Token { index: index + offset, id, text },
            Event::Finished(mut o) => {
                o.text = format!("{before}{}", o.text);
                StreamEvent::finished(o, Some(route.clone()))
            }
        };
        let last = matches!(event, StreamEvent::Finished(_));
        if tx.send(event).is_err() || last {
            break;
        }
    }
    drop(lease);
}
