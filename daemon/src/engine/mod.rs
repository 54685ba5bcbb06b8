//! The engine actor. One dedicated OS thread owns the llama model and context; everything
//! else talks to it through a bounded channel of [`Command`]s and hears back through
//! per-request event channels and a `watch` of [`EngineStatus`].
//!
//! This module must never let another thread touch llama state, and never block the tokio
//! runtime: the only blocking call, `blocking_recv`, runs on the engine's own thread.

mod scheduler;
mod sequence;
pub mod session;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use hearth_dbus::FinishReason;
use hearth_ffi::{ChatMessage, Context, ContextParams, Model, SamplerParams, Token};
use tokio::sync::{mpsc, oneshot, watch};

pub use crate::error::CancelReason;
use crate::error::Error;
pub use session::SessionStore;

/// A validated generation request, as the D-Bus layer hands it to the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub messages: Vec<ChatMessage>,
    /// None: the default model. The model manager routes the request to its engine.
    pub model: Option<String>,
    pub max_tokens: u32,
    pub sampling: SamplerParams,
    pub priority: Priority,
    /// The request is cancelled if it has not finished this long after it was submitted.
    pub deadline: Option<Duration>,
    /// Text the assistant has already said (a cloud stream that broke off): the model
    /// continues the assistant's turn from exactly here.
    pub assistant_prefix: Option<String>,
    /// GBNF grammar the sampled output must follow (structured output and tool calls,
    /// compiled from the caller's schema or tools above the engine; on-device only).
    pub grammar: Option<Arc<str>>,
    /// LoRA adapters by name → scale (on-device only); None: the manifest's scales.
    pub adapters: Option<std::collections::BTreeMap<String, f32>>,
    /// The session whose turn this is: its KV is reused, and kept for the next turn.
    pub session: Option<u64>,
}

/// The LoRA adapter scales a sequence runs with, one per adapter of the model in manifest
/// order (0: left out). One decode step runs one set, and KV computed under one set is only
/// reused under the same set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AdapterSet(Vec<u32>);

impl AdapterSet {
    pub fn new(scales: &[f32]) -> Self {
        // +0.0 and -0.0 are the same scale (adapter left out).
        Self(scales.iter().map(|s| if *s == 0.0 { 0 } else { s.to_bits() }).collect())
    }

    pub fn scales(&self) -> Vec<f32> {
        self.0.iter().map(|b| f32::from_bits(*b)).collect()
    }
}

/// Scheduling priority of a request. Ordered: `Background < Normal < Interactive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Work nobody waits for (summaries, indexing).
    Background,
    /// The default.
    Normal,
    /// A person is waiting (keyboard suggestions, chat).
    Interactive,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Interactive, Priority::Normal, Priority::Background];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Background => "background",
            Self::Normal => "normal",
            Self::Interactive => "interactive",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    fn index(self) -> usize {
        match self {
            Self::Interactive => 0,
            Self::Normal => 1,
            Self::Background => 2,
        }
    }
}

/// Who is asking, as the bus says (never as the caller claims).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The caller's unique connection name; its requests end when it disconnects.
    pub connection: String,
    /// The fair-share identity: for now uid + process of the connection.
    pub app: String,
    /// The connection's Unix user, as the bus vouches.
    pub uid: u32,
}

/// Shared cancellation state of one request: set from any thread, polled by the engine at
/// every token boundary. The first reason wins.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicU8>);

impl CancelToken {
    pub fn cancel(&self, reason: CancelReason) {
        let _ = self.0.compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn reason(&self) -> Option<CancelReason> {
        CancelReason::from_code(self.0.load(Ordering::Acquire))
    }
}

/// What the engine streams back for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token and the text it completes (may be empty mid-character).
    Token { index: u32, id: Token, text: String },
    /// The end; always the last event.
    Finished(Outcome),
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub reason: FinishReason,
    pub text: String,
    pub token_ids: Vec<Token>,
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV was reused from the same app's earlier request.
    pub cached_tokens: u32,
    pub model: String,
    pub prefill: Duration,
    pub decode: Duration,
    /// Set when `reason` is Cancelled or Error.
    pub error: Option<Error>,
}

/// The engine's verdict on a submitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: u64,
    pub prompt_tokens: u32,
}

/// An accepted request and its event stream.
#[derive(Debug)]
pub struct Submission {
    pub accepted: Accepted,
    pub events: mpsc::UnboundedReceiver<Event>,
}

/// Commands to the engine thread.
#[derive(Debug)]
enum Command {
    /// Validate and queue a generation; the verdict goes to `reply`, the stream to `events`.
    Submit {
        request: Box<GenerateRequest>,
        caller: Caller,
        cancel: CancelToken,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<Accepted, Error>>,
    },
    /// A bus connection went away: cancel its requests and free their KV.
    ConnectionClosed(String),
    /// Embeddings of texts, one text at a time between decode steps.
    Embed(Box<worker::EmbedJob>),
    /// A session closed: drop its resident KV.
    CloseSession(u64),
    /// Finish every request as Cancelled and stop the thread.
    Shutdown,
}

/// Queue state, published when it changes (admission, finish), never per token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStatus {
    /// Requests decoding now.
    pub running: u32,
    /// Requests accepted and waiting for a slot.
    pub waiting: u32,
    /// Requests waiting or running, per priority (interactive, normal, background).
    pub by_priority: [u32; 3],
}

impl EngineStatus {
    pub fn queue_depth(&self) -> u32 {
        self.running + self.waiting
    }

    /// Requests waiting or running with `priority`.
    pub fn count(&self, priority: Priority) -> u32 {
        self.by_priority[priority.index()]
    }
}

/// KV cache gauges, updated by the engine every step without waking anyone; read on demand.
#[derive(Debug, Default)]
pub struct KvGauges {
    /// Tokens held in the cache by live sequences.
    pub used: AtomicU32,
    /// Tokens reserved by admitted requests (prompt + max_tokens).
    pub reserved: AtomicU32,
    /// Cache size in tokens.
    pub size: AtomicU32,
    /// Tokens kept in free slots for prefix reuse by the same app.
    pub cached: AtomicU32,
}

/// Whether the engine loop makes progress, for the watchdog: the loop beats at every turn
/// (one decode step, one embedded text: bounded units), and says when it sleeps for want
/// of work. A long job that progresses beats; a hung loop does not.
#[derive(Debug)]
pub struct Liveness {
    epoch: std::time::Instant,
    /// Milliseconds since `epoch` of the last beat.
    beat_ms: AtomicU64,
    idle: AtomicBool,
}

impl Default for Liveness {
    fn default() -> Self {
        Self { epoch: std::time::Instant::now(), beat_ms: AtomicU64::new(0), idle: AtomicBool::new(false) }
    }
}

impl Liveness {
    pub fn beat(&self) {
        self.beat_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    pub fn set_idle(&self, idle: bool) {
        self.beat();
        self.idle.store(idle, Ordering::Release);
    }

    /// Whether the loop waits for work or beat within `limit`.
    pub fn alive(&self, limit: Duration) -> bool {
        let since = self.epoch.elapsed().saturating_sub(Duration::from_millis(self.beat_ms.load(Ordering::Acquire)));
        self.idle.load(Ordering::Acquire) || since <= limit
    }
}

/// What the governors ask of every engine, read before each decode step.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Decode token-rate cap per engine, in milli-tokens per second (0: none). A fixed cap
    /// (`static_rate_tps`) is set here.
    pub rate_cap_mtps: AtomicU64,
    /// Share of wall time an engine may spend in decode steps, in thousandths (0: no limit).
    /// The thermal controller drives this one: heat follows compute time, and a step's time
    /// does not depend on how many sequences share it, while its token count does.
    pub duty_milli: AtomicU32,
    /// Compute threads (0: as configured).
    pub threads: AtomicU32,
    /// Keep background requests queued.
    pub defer_background: AtomicBool,
    /// hearthd's anonymous memory is over its ceiling (set by the ceiling watch): every
    /// engine ends its device work and refuses new work until it is cleared.
    pub over_ceiling: AtomicBool,
    /// The ceiling in MiB, for the error the refused work gets.
    pub ceiling_mib: AtomicU64,
    /// What the engines could do uncapped: tokens per second of decode-step time (EWMA over
    /// steps without a prompt chunk), in milli-tokens per second. Shown as the duty cycle's
    /// equivalent rate cap.
    pub potential_mtps: AtomicU64,
}

impl Throttle {
    pub fn rate_cap(&self) -> Option<f64> {
        match self.rate_cap_mtps.load(Ordering::Relaxed) {
            0 => None,
            m => Some(m as f64 / 1000.0),
        }
    }

    /// The error device work gets while memory is over the ceiling, if it is.
    pub fn ceiling_refusal(&self) -> Option<Error> {
        self.over_ceiling
            .load(Ordering::Acquire)
            .then(|| Error::MemoryCeiling { ceiling_mib: self.ceiling_mib.load(Ordering::Relaxed) })
    }

    /// The duty cycle asked for, in (0, 1); None: no limit.
    pub fn duty(&self) -> Option<f64> {
        match self.duty_milli.load(Ordering::Relaxed) {
            0 | 1000.. => None,
            m => Some(f64::from(m) / 1000.0),
        }
    }
}

/// Static facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedModelInfo {
    pub name: String,
    pub description: String,
    pub n_params: u64,
    pub size_bytes: u64,
    pub trained_context: u32,
    pub context_length: u32,
}

/// How one model's engine runs: its context shape and queue limits.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Context of one request (one KV stream) in tokens.
    pub context_length: u32,
    pub batch_size: u32,
    pub max_sequences: u32,
    pub interactive_sequences: u32,
    pub threads: i32,
    pub flash_attn: bool,
    pub prefix_cache: bool,
    pub queue_capacity: u32,
    pub queue_per_app: u32,
    /// The governors' current demands, shared by all engines.
    pub throttle: Arc<Throttle>,
    /// Open sessions and their parked KV, shared by all engines.
    pub sessions: Arc<SessionStore>,
}

impl EngineSettings {
    /// The same engine with its KV cache cut to one shared and one interactive slot (memory
    /// pressure): requests still run, fewer at a time.
    pub fn shrunk(&self) -> Self {
        Self { max_sequences: 1, interactive_sequences: self.interactive_sequences.min(1), ..self.clone() }
    }

    /// Sequence slots of the context.
    pub fn sequences(&self) -> u32 {
        self.max_sequences + self.interactive_sequences
    }

    /// Tokens the KV cache holds.
    pub fn kv_tokens(&self) -> u32 {
        self.context_length * self.sequences()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Ffi(#[from] hearth_ffi::Error),
    #[error("cannot start the engine thread: {0}")]
    Thread(std::io::Error),
}

/// The handle the rest of the daemon holds: a command sender and a status receiver.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    /// The context's abort flag: set when an interactive request arrives, so the decode step
    /// in flight (lower-priority work) stops at once and the newcomer goes first.
    preempt: Arc<hearth_ffi::AbortSwitch>,
    status: watch::Receiver<EngineStatus>,
    kv: Arc<KvGauges>,
    liveness: Arc<Liveness>,
    model: Arc<LoadedModelInfo>,
}

/// Capacity of the command channel; submitters wait (briefly) when it is full.
const COMMAND_QUEUE: usize = 64;

impl EngineHandle {
    /// Creates `model`'s context and starts its engine thread.
    pub fn start(
        model: &Arc<Model>,
        name: &str,
        settings: &EngineSettings,
    ) -> Result<(Self, std::thread::JoinHandle<()>), StartError> {
        let sequences = settings.sequences();
        let params = ContextParams {
            n_ctx: settings.kv_tokens(),
            n_batch: settings.batch_size,
            n_seq_max: sequences,
            n_threads: settings.threads,
            n_threads_batch: settings.threads,
            flash_attn: Some(settings.flash_attn),
            kv_unified: false,
            embeddings: false,
        };
        let ctx = Context::new(Arc::clone(model), params)?;
        let info = Arc::new(LoadedModelInfo {
            name: name.to_owned(),
            description: model.description(),
            n_params: model.n_params(),
            size_bytes: model.size_bytes(),
            trained_context: model.n_ctx_train(),
            context_length: ctx.n_ctx_seq(),
        });
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (status_tx, status_rx) = watch::channel(EngineStatus::default());
        let preempt = ctx.abort_switch();
        let kv = Arc::new(KvGauges::default());
        kv.size.store(ctx.n_ctx(), Ordering::Relaxed);
        let liveness = Arc::new(Liveness::default());
        let worker =
            worker::Worker::new(ctx, name.to_owned(), rx, status_tx, Arc::clone(&kv), Arc::clone(&liveness), settings);
        let join = std::thread::Builder::new()
            .name(format!("engine:{}", name.chars().take(8).collect::<String>()))
            .spawn(move || worker.run())
            .map_err(StartError::Thread)?;
        tracing::debug!(model = %name, sequences, kv_tokens = settings.kv_tokens(), "engine started");
        Ok((Self { tx, preempt, status: status_rx, kv, liveness, model: info }, join))
    }

    /// Submits a request. Returns once the engine has validated and queued it (or refused).
    /// `cancel` is the request's switch, which the caller may already have handed out.
    pub async fn submit(
        &self,
        request: GenerateRequest,
        caller: Caller,
        cancel: CancelToken,
    ) -> Result<Submission, Error> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reply, verdict) = oneshot::channel();
        let interactive = request.priority == Priority::Interactive;
        let cmd =
            Command::Submit { request: Box::new(request), caller, cancel: cancel.clone(), events: events_tx, reply };
        self.tx.send(cmd).await.map_err(|_| Error::Cancelled(CancelReason::Shutdown))?;
        if interactive {
            // After the send, so the aborted step's next intake finds the request.
            self.preempt.request();
        }
        let accepted = verdict.await.map_err(|_| Error::Cancelled(CancelReason::Shutdown))??;
        Ok(Submission { accepted, events })
    }

    /// Whether the engine loop is alive: waiting for work, or progressing (it beat within
    /// `limit`). Read without a round trip, so a full command queue or a long job made of
    /// bounded units is no false alarm, and a loop stuck in one step is caught.
    pub fn alive(&self, limit: Duration) -> bool {
        self.liveness.alive(limit)
    }

    /// Mean-pooled, unit-length embeddings of `texts`, computed on the engine thread one text
    /// at a time between decode steps (in a small context of their own, so running
    /// generations keep their KV), in `caller`'s fair share. Ends with Cancelled when
    /// `cancel` is set or the caller leaves, and when this future is dropped.
    pub async fn embed(&self, texts: Vec<String>, caller: Caller, cancel: CancelToken) -> Result<Vec<Vec<f32>>, Error> {
        let (reply, answer) = oneshot::channel();
        let job = worker::EmbedJob { caller, texts, cancel, reply, out: Vec::new() };
        self.tx.send(Command::Embed(Box::new(job))).await.map_err(|_| Error::Cancelled(CancelReason::Shutdown))?;
        answer.await.map_err(|_| Error::Cancelled(CancelReason::Shutdown))?
    }

    /// Tells the engine that a session closed, so its resident KV is dropped.
    pub async fn close_session(&self, id: u64) {
        let _ = self.tx.send(Command::CloseSession(id)).await;
    }

    /// Tells the engine that a bus connection is gone, so its requests end and free their KV.
    pub async fn connection_closed(&self, connection: String) {
        let _ = self.tx.send(Command::ConnectionClosed(connection)).await;
    }

    /// KV cache gauges.
    pub fn kv(&self) -> &KvGauges {
        &self.kv
    }

    /// Asks the engine to cancel everything and stop. Returns at once; join the thread to wait.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }

    /// A receiver of the engine's status.
    pub fn status(&self) -> watch::Receiver<EngineStatus> {
        self.status.clone()
    }

    /// Facts about the loaded model.
    pub fn model(&self) -> &LoadedModelInfo {
        &self.model
    }
}
