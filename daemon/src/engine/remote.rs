//! hearthd's side of an engine process: [`EngineHandle`] starts `hearth-engine`, hands it
//! the verified model, and then is the engine for the rest of hearthd (submit, embed,
//! status, gauges), forwarding over the socket. A supervisor task per process reaps it,
//! kills it when its loop stops making progress, and ends everything still in it with
//! `EngineFailed` when it dies; the model manager restarts it.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::FinishReason;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};

mod process;
mod streams;

use self::process::Process;

use self::streams::{forward_throttle, read_frames, send_start, supervise, write_frames};
pub use super::protocol::SandboxReport;
use super::protocol::{self, FromEngine, ModelLoad, SessionKv, Start, ToEngine};
use super::{
    Accepted, Caller, CancelReason, CancelToken, EngineSettings, EngineStatus, Event, GenerateRequest, KvGauges,
    Liveness, LoadedModelInfo, Outcome, Submission, Throttle, TokenCount,
};
use crate::engine::EngineError;

/// How long a model may take to load before its engine is given up on.
const LOAD_LIMIT: Duration = Duration::from_secs(600);
/// How long a stopping engine may take to finish up before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// Where hearthd keeps sessions' KV between turns (sealed, outside the engine): the handle
/// checks each turn's session against it, takes the session's parked KV for the turn, and
/// gives it the KV the engine hands over.
pub trait SessionVault: Send + Sync + std::fmt::Debug {
    /// Whether session `id` is open, belongs to `app` and runs `model`.
    fn owns(&self, id: u64, app: &str, model: &str) -> bool;
    /// Whether session `id` is open and runs `model` (so `model`'s engine may park its KV).
    fn runs(&self, id: u64, model: &str) -> bool;
    /// Takes session `id`'s parked KV, opened; None when it has none.
    fn take(&self, id: u64) -> Option<Result<SessionKv, String>>;
    /// Keeps `kv` for session `id`'s next turn; Ok(false), keeping nothing, when it closed.
    fn keep(&self, id: u64, kv: SessionKv) -> Result<bool, String>;
}

/// What runs an engine.
#[derive(Debug, Clone)]
pub enum Launch {
    /// The `hearth-engine` program, as a child process.
    Program(PathBuf),
    /// The protocol-speaking fake of the unit tests, in this process.
    #[cfg(test)]
    Fake(Arc<super::fake::FakeEngine>),
}

/// What an engine process is started with.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub launch: Launch,
    pub model: String,
    /// The verified model file, and its adapters' (in `load.adapters` order).
    pub files: Vec<Arc<File>>,
    pub load: ModelLoad,
    pub settings: EngineSettings,
    /// Paths the engine must not be able to open (reported back).
    pub probes: Vec<PathBuf>,
    /// An engine whose loop makes no progress this long is killed.
    pub hang_limit: Duration,
    /// Environment the engine gets (its own is cleared).
    pub env: Vec<(String, String)>,
}

/// A request in the engine, by key.
#[derive(Debug)]
enum Pending {
    Generate {
        verdict: Option<oneshot::Sender<Result<Accepted, EngineError>>>,
        events: mpsc::UnboundedSender<Event>,
        prompt_tokens: u32,
        /// Dropped when the request ends, which ends its cancel forwarder.
        _done: oneshot::Sender<()>,
    },
    Embed {
        reply: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
        _done: oneshot::Sender<()>,
    },
    Count {
        reply: oneshot::Sender<Result<TokenCount, EngineError>>,
    },
}

/// The requests in the engine; once it is gone (`dead`), nothing new is put in.
#[derive(Debug, Default)]
struct PendingTable {
    by_key: HashMap<u64, Pending>,
    dead: bool,
    /// Sessions whose turns were given to this engine: the only ones it may park KV for.
    sessions: std::collections::HashSet<u64>,
}

#[derive(Debug)]
struct Remote {
    out: mpsc::UnboundedSender<ToEngine>,
    pending: Mutex<PendingTable>,
    next_key: AtomicU64,
    status: watch::Receiver<EngineStatus>,
    kv: KvGauges,
    liveness: Liveness,
    model: LoadedModelInfo,
    weights: u64,
    kv_bytes: u64,
    sandbox: SandboxReport,
    pid: u32,
    sessions: Arc<dyn SessionVault>,
    /// Set by [`EngineHandle::shutdown`]: the exit that follows is no failure.
    stopping: AtomicBool,
    /// None while the process runs; then why it ended.
    exited: watch::Receiver<Option<String>>,
    kill: mpsc::UnboundedSender<&'static str>,
}

/// The handle the rest of the daemon holds; cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    inner: Arc<Remote>,
}

impl EngineHandle {
    /// Starts an engine process for `spec` and waits until it has loaded the model and
    /// sandboxed itself, reporting the loaded fraction to `progress`.
    pub async fn spawn(
        spec: &SpawnSpec,
        throttle: &Arc<Throttle>,
        compute: &Arc<super::Compute>,
        sessions: &Arc<dyn SessionVault>,
        progress: &mut (dyn FnMut(f32) + Send),
    ) -> Result<Self, String> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| format!("socket pair: {e}"))?;
        let mut child = Process::start(spec, theirs)?;
        let pid = child.id();
        let start = Start {
            version: protocol::VERSION,
            model: spec.model.clone(),
            load: spec.load.clone(),
            settings: spec.settings.clone(),
            throttle: throttle.state(),
            probes: spec.probes.clone(),
        };
        let fds: Vec<BorrowedFd<'_>> = spec.files.iter().map(|f| f.as_fd()).collect();
        send_start(&ours, &start, &fds).map_err(|e| format!("cannot hand the engine its model: {e}"))?;
        ours.set_nonblocking(true).map_err(|e| format!("socket: {e}"))?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(|e| format!("socket: {e}"))?;
        let (read, write) = stream.into_split();
        let mut frames = FramedRead::new(read, protocol::codec());
        let ready = tokio::time::timeout(LOAD_LIMIT, async {
            loop {
                tokio::select! {
                    frame = frames.next() => {
                        let Some(Ok(payload)) = frame else { break Err("the engine closed its socket while loading".to_owned()) };
                        match protocol::decode::<FromEngine>(&payload) {
                            Ok(FromEngine::Progress(f)) => progress(f),
                            Ok(FromEngine::Ready { info, weights, kv, sandbox }) => break Ok((info, weights, kv, sandbox)),
                            Ok(FromEngine::Failed(reason)) => break Err(reason),
                            Ok(_) | Err(_) => break Err("the engine sent something else than its start-up answer".to_owned()),
                        }
                    }
                    status = child.wait() => {
                        // Its last words (why the load failed) may still be in the socket.
                        let last_words = async {
                            while let Some(Ok(payload)) = frames.next().await {
                                if let Ok(FromEngine::Failed(reason)) = protocol::decode::<FromEngine>(&payload) {
                                    return Some(reason);
                                }
                            }
                            None
                        };
                        let said = tokio::time::timeout(Duration::from_secs(1), last_words).await.ok().flatten();
                        break Err(said.unwrap_or_else(|| format!("the engine exited while loading ({status})")));
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("the engine did not load within {} s", LOAD_LIMIT.as_secs())));
        let (info, weights, kv_bytes, sandbox) = match ready {
            Ok(r) => r,
            Err(e) => {
                child.kill();
                let _ = child.wait().await;
                return Err(e);
            }
        };
        if info.name != spec.model {
            return Err("the engine loaded another model than it was given".into());
        }
        let (out, out_rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(EngineStatus::default());
        let (exited_tx, exited) = watch::channel(None);
        let (kill, kill_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Remote {
            out,
            pending: Mutex::new(PendingTable::default()),
            next_key: AtomicU64::new(1),
            status,
            kv: KvGauges::default(),
            liveness: Liveness::default(),
            model: info,
            weights,
            kv_bytes,
            sandbox,
            pid,
            sessions: Arc::clone(sessions),
            stopping: AtomicBool::new(false),
            exited,
            kill,
        });
        inner.liveness.observe(Duration::ZERO, true);
        tokio::spawn(write_frames(FramedWrite::new(write, protocol::codec()), out_rx));
        let reader =
            tokio::spawn(read_frames(Arc::clone(&inner), frames, status_tx, Arc::clone(throttle), Arc::clone(compute)));
        tokio::spawn(forward_throttle(Arc::clone(&inner), Arc::clone(throttle), start.throttle));
        let handle = Self { inner };
        tokio::spawn(supervise(handle.clone(), child, reader, kill_rx, exited_tx, spec.hang_limit));
        Ok(handle)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, PendingTable> {
        self.inner.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts `entry` in the table, unless the engine is already gone.
    fn insert(&self, key: u64, entry: Pending, session: Option<u64>) -> Result<(), EngineError> {
        let mut table = self.pending();
        if table.dead {
            drop(table);
            return Err(self.gone());
        }
        table.by_key.insert(key, entry);
        table.sessions.extend(session);
        Ok(())
    }

    fn gone(&self) -> EngineError {
        if self.inner.stopping.load(Ordering::Acquire) {
            EngineError::Cancelled(CancelReason::Shutdown)
        } else {
            let reason = self.inner.exited.borrow().clone().unwrap_or_else(|| "its process is gone".into());
            EngineError::Failed { model: self.inner.model.name.clone(), reason }
        }
    }

    fn send(&self, msg: ToEngine) -> Result<(), EngineError> {
        self.inner.out.send(msg).map_err(|_| self.gone())
    }

    /// Hands the engine work: an idle engine's last beat is old, so the hang clock starts
    /// now (its next heartbeat, within [`protocol::HEARTBEAT`], takes over).
    fn send_work(&self, msg: ToEngine) -> Result<(), EngineError> {
        let l = &self.inner.liveness;
        if l.idle() {
            l.observe(Duration::ZERO, true);
        }
        self.send(msg)
    }

    /// Submits a request. Returns once the engine has validated and queued it (or refused).
    /// `cancel` is the request's switch, which the caller may already have handed out.
    pub async fn submit(
        &self,
        request: GenerateRequest,
        caller: Caller,
        cancel: CancelToken,
    ) -> Result<Submission, EngineError> {
        let model = &self.inner.model.name;
        let owned = |id| {
            if self.inner.sessions.owns(id, &caller.app, model) { Ok(()) } else { Err(EngineError::NotYourSession(id)) }
        };
        let mut kv = None;
        if let Some(id) = request.session {
            owned(id)?;
            kv = self.unpark(id).await;
            // Checked again after the wait: a close in between must not be undone.
            owned(id)?;
            if kv.as_ref().is_some_and(|kv| kv.state.len() > protocol::MAX_FRAME / 2) {
                kv = None;
            }
        }
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        let (events, events_rx) = mpsc::unbounded_channel();
        let (verdict_tx, verdict) = oneshot::channel();
        let (done, done_rx) = oneshot::channel();
        let watch_events = events.clone();
        let entry = Pending::Generate { verdict: Some(verdict_tx), events, prompt_tokens: 0, _done: done };
        self.insert(key, entry, request.session)?;
        if let Err(e) = self.send_work(ToEngine::Submit { key, request: Box::new(request), caller, kv }) {
            self.pending().by_key.remove(&key);
            return Err(e);
        }
        let out = self.inner.out.clone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                reason = cancel.cancelled() => reason,
                () = watch_events.closed() => CancelReason::Disconnected,
                _ = done_rx => return,
            };
            let _ = out.send(ToEngine::Cancel { key, reason });
        });
        let accepted = verdict.await.map_err(|_| self.gone())??;
        Ok(Submission { accepted, events: events_rx })
    }

    /// Takes session `id`'s parked KV out of the store, opened, for its turn.
    async fn unpark(&self, id: u64) -> Option<SessionKv> {
        let sessions = Arc::clone(&self.inner.sessions);
        match tokio::task::spawn_blocking(move || sessions.take(id)).await.ok().flatten()? {
            Ok(kv) => Some(kv),
            Err(e) => {
                tracing::warn!(session = id, error = %e, "parked session KV refused: the turn recomputes it");
                None
            }
        }
    }

    /// Mean-pooled, unit-length embeddings of `texts`, computed in the engine one text at a
    /// time between decode steps, in `caller`'s fair share. Ends with Cancelled when
    /// `cancel` is set or the caller leaves, and when this future is dropped.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        caller: Caller,
        cancel: CancelToken,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let (done, done_rx) = oneshot::channel();
        self.insert(key, Pending::Embed { reply, _done: done }, None)?;
        if let Err(e) = self.send_work(ToEngine::Embed { key, caller, texts }) {
            self.pending().by_key.remove(&key);
            return Err(e);
        }
        let out = self.inner.out.clone();
        // Dropping this future drops `done` only once the entry is gone; cancel on drop too.
        let guard = CancelOnDrop { out: out.clone(), key, armed: true };
        tokio::spawn(async move {
            tokio::select! {
                reason = cancel.cancelled() => { let _ = out.send(ToEngine::Cancel { key, reason }); }
                _ = done_rx => {}
            }
        });
        let result = answer.await.map_err(|_| self.gone())?;
        guard.disarm();
        result
    }

    /// What `request` (already admitted) would take of the model's context: rendered and
    /// tokenized by the engine as a generation would be, images encoded, nothing run.
    pub async fn count_tokens(&self, request: GenerateRequest, caller: Caller) -> Result<TokenCount, EngineError> {
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.insert(key, Pending::Count { reply }, None)?;
        if let Err(e) = self.send_work(ToEngine::CountTokens { key, caller, request: Box::new(request) }) {
            self.pending().by_key.remove(&key);
            return Err(e);
        }
        // A caller that stops waiting leaves the entry to be answered and dropped.
        answer.await.map_err(|_| self.gone())?
    }

    /// Tells the engine that a session closed, so its resident KV is dropped.
    pub async fn close_session(&self, id: u64) {
        let _ = self.send(ToEngine::CloseSession(id));
    }

    /// Tells the engine that a bus connection is gone, so its requests end and free their KV.
    pub async fn connection_closed(&self, connection: String) {
        let _ = self.send(ToEngine::ConnectionClosed(connection));
    }

    /// KV cache gauges, as the engine last reported them.
    pub fn kv(&self) -> &KvGauges {
        &self.inner.kv
    }

    /// Asks the engine to cancel everything and exit, handing its idle sessions' KV over to
    /// be parked when `park` is set (else it is dropped). Returns at once;
    /// [`EngineHandle::wait`] waits for the process.
    pub async fn shutdown(&self, park: bool) {
        self.inner.stopping.store(true, Ordering::Release);
        let _ = self.inner.out.send(ToEngine::Shutdown { park });
    }

    /// Waits until the process has exited and everything it said is handled (parked KV
    /// stored), killing it if it takes longer than [`STOP_LIMIT`] after a shutdown.
    pub async fn wait(&self) -> String {
        let mut exited = self.inner.exited.clone();
        let limit = tokio::time::sleep(STOP_LIMIT);
        tokio::pin!(limit);
        loop {
            if let Some(why) = exited.borrow_and_update().clone() {
                return why;
            }
            tokio::select! {
                changed = exited.changed() => if changed.is_err() { return "gone".into() },
                () = &mut limit => {
                    tracing::warn!(model = %self.inner.model.name, "engine did not stop in time: killing it");
                    let _ = self.inner.kill.send("it did not stop in time");
                    limit.as_mut().reset(tokio::time::Instant::now() + STOP_LIMIT);
                }
            }
        }
    }

    /// Kills the process now (its requests end with EngineFailed, saying `why`; it is
    /// restarted like any engine that died).
    pub fn kill(&self, why: &'static str) {
        let _ = self.inner.kill.send(why);
    }

    /// Resolves with why the process ended, when it ends.
    pub fn exited(&self) -> watch::Receiver<Option<String>> {
        self.inner.exited.clone()
    }

    /// Whether the process was told to stop (its exit is no failure).
    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }

    /// A receiver of the engine's status.
    pub fn status(&self) -> watch::Receiver<EngineStatus> {
        self.inner.status.clone()
    }

    /// Facts about the loaded model.
    pub fn model(&self) -> &LoadedModelInfo {
        &self.inner.model
    }

    /// Bytes of the weights and of the KV cache, as the engine reported them.
    pub fn memory(&self) -> (u64, u64) {
        (self.inner.weights, self.inner.kv_bytes)
    }

    /// The engine process's id.
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The sandbox as the engine found it after applying it.
    pub fn sandbox(&self) -> &SandboxReport {
        &self.inner.sandbox
    }

    /// Ends everything still in the engine: its process is gone.
    fn fail_all(&self) {
        let error = self.gone();
        let all: Vec<Pending> = {
            let mut table = self.pending();
            table.dead = true;
            table.by_key.drain().map(|(_, p)| p).collect()
        };
        for p in all {
            match p {
                Pending::Generate { verdict: Some(v), .. } => {
                    let _ = v.send(Err(error.clone()));
                }
                Pending::Generate { verdict: None, events, prompt_tokens, .. } => {
                    let reason = if matches!(error, EngineError::Cancelled(_)) {
                        FinishReason::Cancelled
                    } else {
                        FinishReason::Error
                    };
                    let outcome = Outcome {
                        prompt_tokens,
                        ..Outcome::empty(reason, &self.inner.model.name, Some(error.clone()))
                    };
                    let _ = events.send(Event::Finished(outcome));
                }
                Pending::Embed { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                Pending::Count { reply } => {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Sends a Cancel for an Embed call whose future was dropped before it was answered.
struct CancelOnDrop {
    out: mpsc::UnboundedSender<ToEngine>,
    key: u64,
    armed: bool,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.out.send(ToEngine::Cancel { key: self.key, reason: CancelReason::Disconnected });
        }
    }
}
