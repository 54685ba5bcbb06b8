//! The engine: everything that touches llama.cpp state and untrusted model bytes, behind a
//! narrow interface of its own. It imports nothing of config, routing, the cloud or D-Bus.
//!
//! Each loaded model's engine runs in a `hearth-engine` child process (child.rs), in a
//! sandbox (sandbox.rs), talking to hearthd over a socket pair (protocol.rs). Inside it one
//! dedicated OS thread owns the llama model and context (worker/); the child's I/O thread
//! hands it [`Command`]s through a bounded channel and forwards the per-request events and
//! the [`EngineStatus`] back. In hearthd, [`EngineHandle`] (remote.rs) is the engine: the
//! same calls as before, the same events, plus a process to supervise. An engine that dies
//! or hangs ends its requests with `EngineFailed` and is restarted; hearthd lives on.
//!
//! The worker must never let another thread touch llama state; nothing here blocks the
//! tokio runtime: the only blocking call, `blocking_recv`, runs on the worker's own thread.

pub mod child;
#[cfg(test)]
pub mod fake;
mod prepare;
pub mod probe;
pub mod protocol;
mod remote;
mod sandbox;
mod scheduler;
mod sequence;
pub mod session;
mod signals;
mod speculate;
mod template;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use hearth_ffi::{SamplerParams, Token};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

mod error;
mod image;
pub(crate) mod stop;

pub use error::{CancelReason, EngineError};
pub use signals::{Compute, KvGauges, KvSnapshot, Liveness, Throttle, ThrottleState, Wake};

/// One turn of a conversation, as the engine renders it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls (the model's earlier answer).
    pub tool_calls: Vec<crate::structured::ToolCall>,
    /// A tool turn: the id of the call it answers.
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), ..Self::default() }
    }

    /// The turn for a template that knows no tools: its calls written the constrained way
    /// after its text, one per line.
    pub fn plain(&self) -> hearth_ffi::ChatMessage {
        let mut content = self.content.clone();
        for call in &self.tool_calls {
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&call.constrained_text());
        }
        hearth_ffi::ChatMessage { role: self.role.clone(), content }
    }
}

/// A validated generation request, as the D-Bus layer hands it to the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub messages: Vec<Message>,
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
    /// GBNF grammar the sampled output must follow (structured output, compiled from the
    /// caller's schema above the engine; on-device only).
    pub grammar: Option<Arc<str>>,
    /// Tools the model may call (on-device only): the engine shows them in its model's own
    /// format where the model's template has one, else the constrained way, and sets the
    /// grammar of that format.
    pub tools: Option<Arc<crate::structured::ToolPrompt>>,
    /// LoRA adapters by name → scale (on-device only); None: the manifest's scales.
    pub adapters: Option<std::collections::BTreeMap<String, f32>>,
    /// The session whose turn this is: its KV is reused, and kept for the next turn.
    pub session: Option<u64>,
    /// Speculative decoding by prompt lookup (the output is the same either way).
    pub speculative: bool,
    /// Images (encoded PNG or JPEG), each placed at the start of its message's text. Only a
    /// model with a vision projector takes them; they are decoded inside the engine.
    pub images: Vec<ImageInput>,
    /// The text ends just before the first of these appears in it (none: no stop strings).
    pub stop: Vec<String>,
    /// Some(n): report each generated token's log-probability and the n likeliest tokens at
    /// its step (on-device only).
    pub logprobs: Option<u8>,
}

/// A generated token's log-probability and the likeliest alternatives at its step (see
/// [`hearth_ffi::Logprobs`]), with their texts (lossy where a token is part of a character).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub id: Token,
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(Token, String, f32)>,
}

/// An image of a request: the index of the message it belongs to, and its encoded bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInput {
    pub message: u32,
    pub bytes: Arc<serde_bytes::ByteBuf>,
}

/// The LoRA adapter scales a sequence runs with, one per adapter of the model in manifest
/// order (0: left out). One decode step runs one set, and KV computed under one set is only
/// reused under the same set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AdapterSet(Vec<u32>);

impl AdapterSet {
    pub fn new(scales: &[f32]) -> Self {
        // +0.0 and -0.0 are the same scale (adapter left out).
        Self(scales.iter().map(|s| if *s == 0.0 { 0 } else { s.to_bits() }).collect())
    }

    pub fn scales(&self) -> Vec<f32> {
        self.0.iter().map(|b| f32::from_bits(*b)).collect()
    }

    /// Whether every adapter is left out: the base model.
    pub fn is_base(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }
}

/// Scheduling priority of a request. Ordered: `Background < Normal < Interactive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Interactive => 0,
            Self::Normal => 1,
            Self::Background => 2,
        }
    }
}

/// Who is asking, as the bus says (never as the caller claims).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The caller's unique connection name; its requests end when it disconnects.
    pub connection: String,
    /// The fair-share identity: for now uid + process of the connection.
    pub app: String,
    /// The connection's Unix user, as the bus vouches.
    pub uid: u32,
}

/// Shared cancellation state of one request: set from any thread, polled by the engine at
/// every token boundary, and awaitable (hearthd forwards it to the engine process). The
/// first reason wins.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    reason: Arc<AtomicU8>,
    token: tokio_util::sync::CancellationToken,
}

impl CancelToken {
    pub fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire);
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<CancelReason> {
        CancelReason::from_code(self.reason.load(Ordering::Acquire))
    }

    /// Resolves with the reason once the request is cancelled.
    pub async fn cancelled(&self) -> CancelReason {
        self.token.cancelled().await;
        self.reason().unwrap_or(CancelReason::Caller)
    }
}

/// What the engine streams back for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Finished comes once per request, the tokens each in a channel slot of this size: boxing the
// outcome would save a few hundred bytes per token in flight, and cost an allocation each end.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// One generated token and the text it completes (may be empty mid-character).
    Token { index: u32, id: Token, text: String },
    /// The end; always the last event.
    Finished(Outcome),
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    /// `max_tokens` was reached, or the context is full.
    Length,
    /// Cancelled (by the caller, a deadline, shutdown, a caller gone).
    Cancelled,
    /// Failed; the outcome's error says why.
    Error,
}

/// The result of a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub reason: FinishReason,
    pub text: String,
    pub token_ids: Vec<Token>,
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV was reused from the same app's earlier request.
    pub cached_tokens: u32,
    /// Speculative decoding: draft tokens verified, and those taken.
    pub draft_tokens: u32,
    pub draft_accepted: u32,
    /// Prompt tokens that were image embeddings, and the time decoding and encoding the
    /// request's images took (before it was queued; an image encoded recently: none).
    pub image_tokens: u32,
    pub image_encode: Duration,
    pub model: String,
    pub prefill: Duration,
    pub decode: Duration,
    /// Per generated token, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
    /// How the request's tools were shown, so how its calls are written.
    pub tool_format: crate::structured::ToolFormat,
    /// The compute time attributed to it (its share of each decode step it was in, its
    /// images' encoding and decoding): what the energy ledger prices.
    pub compute: Duration,
    /// Set when `reason` is Cancelled or EngineError.
    pub error: Option<EngineError>,
}

impl Outcome {
    /// An outcome of nothing generated (yet): fill in what is known.
    pub fn empty(reason: FinishReason, model: &str, error: Option<EngineError>) -> Self {
        Self {
            reason,
            text: String::new(),
            token_ids: Vec::new(),
            prompt_tokens: 0,
            cached_tokens: 0,
            draft_tokens: 0,
            draft_accepted: 0,
            image_tokens: 0,
            image_encode: Duration::ZERO,
            model: model.to_owned(),
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            logprobs: Vec::new(),
            tool_format: crate::structured::ToolFormat::Constrained,
            compute: Duration::ZERO,
            error,
        }
    }
}

/// What a request's prompt takes of its model's context (CountTokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCount {
    /// Prompt tokens after the chat template, images included.
    pub prompt_tokens: u32,
    /// Of them, image embeddings.
    pub image_tokens: u32,
    /// Tokens one request's context holds.
    pub context_length: u32,
}

/// The engine's verdict on a submitted request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Queue a prepared generation (after the admission checks only the worker can make);
    /// the verdict goes to `reply`, the stream to `events`.
    Submit {
        request: Box<GenerateRequest>,
        prepared: Box<prepare::Prepared>,
        caller: Caller,
        cancel: CancelToken,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<Accepted, EngineError>>,
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// Static facts about a loaded model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedModelInfo {
    pub name: String,
    pub description: String,
    pub n_params: u64,
    pub size_bytes: u64,
    pub trained_context: u32,
    pub context_length: u32,
    /// The GPU the model's layers were offloaded to, if any, and how many of its layers
    /// (llama.cpp's count: the repeating layers, and the output layer as one more).
    pub gpu_device: Option<String>,
    pub gpu_layers: u32,
    pub layers: u32,
    /// How its chat template shows tools (engine/template.rs): its own format, or the
    /// constrained one.
    pub tool_format: crate::structured::ToolFormat,
}

/// How an engine's KV cache stores keys and values ([`hearth_ffi::KvType`]): `q8_0`
/// (the default: batching, chunking and prefix reuse never change a request's output)
/// or `f16` (faster prompt processing; outputs may depend on them past 64 prompt tokens or
/// 256 cells, and speculative drafts stop there), or `f32` (as f16, at twice its memory,
/// without rounding: for comparing a GPU backend with the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum KvCache {
    #[default]
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "f32")]
    F32,
}

impl KvCache {
    pub fn ffi(self) -> hearth_ffi::KvType {
        match self {
            KvCache::Q8_0 => hearth_ffi::KvType::Q8_0,
            KvCache::F16 => hearth_ffi::KvType::F16,
            KvCache::F32 => hearth_ffi::KvType::F32,
        }
    }
}

/// How one model's engine runs: its context shape and queue limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSettings {
    /// Context of one request (one KV stream) in tokens.
    pub context_length: u32,
    pub batch_size: u32,
    pub max_sequences: u32,
    pub interactive_sequences: u32,
    pub threads: i32,
    pub flash_attn: bool,
    pub kv_cache: KvCache,
    pub prefix_cache: bool,
    pub queue_capacity: u32,
    pub queue_per_app: u32,
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

pub use remote::{EngineHandle, Launch, SandboxReport, SessionVault, SpawnSpec};
