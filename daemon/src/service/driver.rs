//! Runs an admitted request where the router sent it: on the device (an engine lease and its
//! event stream), or in the cloud, falling back to the device when the cloud fails before the
//! first token and migrating to it — continuing from exactly the text so far — when the cloud
//! stream breaks off. Either way the caller sees one stream of events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_dbus::FinishReason;
use tokio::sync::mpsc;

use crate::cloud::{Cloud, CloudError};
use crate::engine::{Caller, CancelToken, Event, GenerateRequest, Outcome};
use crate::error::Error;
use crate::manager::{Lease, ModelManager};
use crate::privacy::{Decision, Route};

/// A running request: its events, and the model lease that keeps a local engine loaded.
#[derive(Debug)]
pub struct Running {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub _lease: Option<Lease>,
}

/// Starts `request` on its route. Errors of the local route (validation, Busy, ...) are
/// returned at once; the cloud route always starts and reports through its events.
pub async fn start(
    models: &ModelManager,
    cloud: Option<&Arc<Cloud>>,
    request: GenerateRequest,
    who: Caller,
    cancel: CancelToken,
    decision: &Decision,
) -> Result<Running, Error> {
    match (decision.route, cloud) {
        (Route::Cloud, Some(cloud)) => {
            let (tx, events) = mpsc::unbounded_channel();
            tokio::spawn(drive_cloud(models.clone(), Arc::clone(cloud), request, who, cancel, tx));
            Ok(Running { events, _lease: None })
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
            Ok(Running { events: submission.events, _lease: Some(lease) })
        }
    }
}

fn cloud_outcome(text: String, model: &str, reason: FinishReason, started: Instant, first: Option<Instant>) -> Outcome {
    let first = first.unwrap_or_else(Instant::now);
    Outcome {
        reason,
        text,
        token_ids: Vec::new(),
        prompt_tokens: 0,
        cached_tokens: 0,
        model: model.to_owned(),
        prefill: first.duration_since(started),
        decode: first.elapsed(),
        error: None,
        // Served where the router sent it, for the router's reason.
        route: None,
    }
}

async fn drive_cloud(
    models: ModelManager,
    cloud: Arc<Cloud>,
    request: GenerateRequest,
    who: Caller,
    cancel: CancelToken,
    tx: mpsc::UnboundedSender<Event>,
) {
    let local_name = request.model.clone().unwrap_or_else(|| models.default_model());
    let Some(remote) = cloud.remote_model(&local_name).map(str::to_owned) else {
        let why = format!("no remote model is mapped for {local_name:?}");
        return run_local(&models, request, who, cancel, &tx, String::new(), 0, ("local".into(), why)).await;
    };
    let started = Instant::now();
    let mut first = None;
    let mut text = String::new();
    let mut index = 0u32;
    let result = cloud
        .stream(&remote, &request.messages, request.max_tokens, request.sampling, |chunk| {
            if cancel.reason().is_some() || tx.is_closed() {
                return false;
            }
            first.get_or_insert_with(Instant::now);
            let _ = tx.send(Event::Token { index, id: -1, text: chunk.to_owned() });
            text.push_str(chunk);
            index += 1;
            true
        })
        .await;
    if let Some(reason) = cancel.reason() {
        let mut o = cloud_outcome(text, &remote, FinishReason::Cancelled, started, first);
        o.error = Some(Error::Cancelled(reason));
        let _ = tx.send(Event::Finished(o));
        return;
    }
    match result {
        Ok(done) => {
            let reason = if done.reason == "length" { FinishReason::Length } else { FinishReason::Stop };
            let _ = tx.send(Event::Finished(cloud_outcome(text, &done.remote_model, reason, started, first)));
        }
        Err(CloudError::BeforeFirstToken(why)) => {
            tracing::info!(app = %who.app, reason = %why, "cloud failed before the first token: running on the device");
            let route = ("local".into(), format!("the cloud failed before the first token ({why}); ran on the device"));
            run_local(&models, request, who, cancel, &tx, String::new(), 0, route).await;
        }
        Err(CloudError::MidStream(why)) => {
            tracing::info!(app = %who.app, at = index, reason = %why, "cloud stream broke off: migrating to the device");
            let _ = tx.send(Event::Migrated { from: "cloud", to: "local", index });
            let route = (
                "cloud+local".into(),
                format!("the cloud stream broke off after {index} chunks ({why}); the device continued from there"),
            );
            let mut rest = request;
            rest.max_tokens = rest.max_tokens.saturating_sub(index).max(1);
            rest.assistant_prefix = Some(text.clone());
            run_local(&models, rest, who, cancel, &tx, text, index, route).await;
        }
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
    tx: &mpsc::UnboundedSender<Event>,
    before: String,
    offset: u32,
    route: (String, String),
) {
    let fail = |e: Error| {
        let e = match e {
            Error::ContextLengthExceeded { .. } | Error::ModelNotFound(_) | Error::ModelUnavailable { .. } => {
                Error::CloudUnavailable(format!("the cloud failed and the device cannot take the request: {e}"))
            }
            e => e,
        };
        Outcome {
            reason: if matches!(e, Error::Cancelled(_)) { FinishReason::Cancelled } else { FinishReason::Error },
            text: before.clone(),
            token_ids: Vec::new(),
            prompt_tokens: 0,
            cached_tokens: 0,
            model: String::new(),
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            error: Some(e),
            route: Some(route.clone()),
        }
    };
    let lease = match models.acquire(request.model.as_deref()).await {
        Ok(l) => l,
        Err(e) => {
            let _ = tx.send(Event::Finished(fail(e)));
            return;
        }
    };
    let mut submission = match lease.engine.submit(request, who, cancel).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Event::Finished(fail(e)));
            return;
        }
    };
    while let Some(event) = submission.events.recv().await {
        let event = match event {
            Event::Token { index, id, text } => Event::Token { index: index + offset, id, text },
            Event::Finished(mut o) => {
                o.text = format!("{before}{}", o.text);
                o.route = Some(route.clone());
                Event::Finished(o)
            }
            other => other,
        };
        let last = matches!(event, Event::Finished(_));
        if tx.send(event).is_err() || last {
            break;
        }
    }
    drop(lease);
}
