//! A fake engine for hearthd's unit tests: it speaks the real protocol (protocol.rs) on the
//! other end of the real socket pair, so everything above it — [`super::EngineHandle`], its
//! supervisor, the model manager, the routing driver, session parking — runs as in
//! production, without a model, llama.cpp or a process.
//!
//! It "generates" tokens derived from the prompt (deterministic: the same prompt gives the
//! same tokens), honours cancels, sessions and shutdown like the child does (status before
//! a verdict and before a result; parked KV on a parking shutdown), and can be scripted to
//! die or hang after some tokens, as a crashing or wedged llama.cpp would.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::FinishReason;
use futures_util::{SinkExt, StreamExt};
use hearth_ffi::Token;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::protocol::{self, FromEngine, SandboxReport, SessionKv, Start, ToEngine};
use super::{
    Accepted, AdapterSet, CancelReason, EngineStatus, Event, GenerateRequest, LoadedModelInfo, Outcome, TokenCount,
};
use crate::engine::EngineError;

/// What the fake engine does; read at each start and each token, so a test may change it
/// between restarts.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Pause before each token.
    pub token_delay: Duration,
    /// The process dies (SIGABRT, as a failed `GGML_ASSERT`) once this many tokens were
    /// generated since it started.
    pub abort_after: Option<u32>,
    /// The loop stops making progress (no token, a heartbeat that ages) after this many.
    pub hang_after: Option<u32>,
    /// Loading fails with this reason.
    pub fail_load: Option<String>,
}

/// What a test can see of what the engine was asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub app: String,
    pub session: Option<u64>,
    /// Tokens of parked KV handed over with the request.
    pub kv_tokens: Option<usize>,
    /// Text the assistant had already said (a continuation).
    pub prefix: Option<String>,
    pub max_tokens: u32,
}

/// The fake, shared by all its starts (of every model).
#[derive(Debug, Default)]
pub struct FakeEngine {
    script: Mutex<Script>,
    /// Scripts of particular models, over the shared one.
    scripts: Mutex<HashMap<String, Script>>,
    /// How many times it was started.
    pub starts: AtomicU32,
    pub seen: Mutex<Vec<Seen>>,
}

/// A started fake: the task standing in for the process, and its kill switch.
#[derive(Debug)]
pub struct Running {
    task: Option<tokio::task::JoinHandle<String>>,
    ended: Option<String>,
    kill: CancellationToken,
    pid: u32,
}

impl Running {
    pub fn id(&self) -> u32 {
        self.pid
    }

    pub fn kill(&self) {
        self.kill.cancel();
    }

    /// How the "process" ended, once it has.
    pub async fn wait(&mut self) -> String {
        if let Some(task) = self.task.as_mut() {
            let ended = task.await.unwrap_or_else(|e| format!("fake engine panicked: {e}"));
            self.task = None;
            self.ended = Some(ended);
        }
        self.ended.clone().unwrap_or_default()
    }
}

static NEXT_PID: AtomicU32 = AtomicU32::new(1_000_000);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeEngine {
    pub fn new(script: Script) -> Arc<Self> {
        Arc::new(Self { script: Mutex::new(script), ..Self::default() })
    }

    /// The script of `model`'s engine.
    pub fn script(&self, model: &str) -> Script {
        lock(&self.scripts).get(model).cloned().unwrap_or_else(|| lock(&self.script).clone())
    }

    /// Scripts `model`'s engine from now on (None: back to the shared script).
    pub fn set_script(&self, model: &str, script: Option<Script>) {
        let mut scripts = lock(&self.scripts);
        match script {
            Some(s) => scripts.insert(model.to_owned(), s),
            None => scripts.remove(model),
        };
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// Starts serving on `socket` (the engine's end of the pair).
    pub fn start(self: &Arc<Self>, socket: std::os::unix::net::UnixStream) -> std::io::Result<Running> {
        socket.set_nonblocking(true)?;
        let socket = tokio::net::UnixStream::from_std(socket)?;
        let kill = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(self).serve(socket, kill.clone()));
        Ok(Running { task: Some(task), ended: None, kill, pid: NEXT_PID.fetch_add(1, Ordering::Relaxed) })
    }

    async fn serve(self: Arc<Self>, socket: tokio::net::UnixStream, kill: CancellationToken) -> String {
        tokio::select! {
            ended = self.run(socket) => ended,
            () = kill.cancelled() => "killed by signal 9".into(),
        }
    }

    async fn run(self: Arc<Self>, socket: tokio::net::UnixStream) -> String {
        let (read, write) = socket.into_split();
        let mut frames = FramedRead::new(read, protocol::codec());
        let mut sink = FramedWrite::new(write, protocol::codec());
        // The descriptors that came with the start frame are dropped by the kernel: a plain
        // read takes no ancillary data.
        let Some(Ok(first)) = frames.next().await else { return "exit status 1".into() };
        let Ok(start) = protocol::decode::<Start>(&first) else { return "exit status 1".into() };
        self.starts.fetch_add(1, Ordering::Relaxed);
        let script = self.script(&start.model);
        let send = |msg: &FromEngine| protocol::encode(msg).expect("encodable");
        if let Some(reason) = script.fail_load {
            let _ = sink.send(send(&FromEngine::Failed(reason))).await;
            return "exit status 1".into();
        }
        let _ = sink.send(send(&FromEngine::Progress(1.0))).await;
        let info = LoadedModelInfo {
            name: start.model.clone(),
            description: "fake engine".into(),
            n_params: 1,
            size_bytes: 1 << 20,
            trained_context: start.settings.context_length,
            context_length: start.settings.context_length,
            gpu_device: None,
            gpu_layers: 0,
            layers: 1,
            tool_format: crate::structured::ToolFormat::Constrained,
        };
        let sandbox = SandboxReport { landlock: "none".into(), socket: "fake".into(), ..SandboxReport::default() };
        let ready = FromEngine::Ready { info: info.clone(), weights: 1 << 20, kv: 1 << 20, sandbox };
        if sink.send(send(&ready)).await.is_err() {
            return "exit status 1".into();
        }

        let (out, mut out_rx) = mpsc::unbounded_channel::<FromEngine>();
        let state = Arc::new(Serving {
            fake: Arc::clone(&self),
            info,
            out,
            queue: Mutex::new(Queue::default()),
            generated: AtomicU32::new(0),
            epoch: Instant::now(),
            progress_ms: AtomicU64::new(0),
            died: CancellationToken::new(),
        });
        let mut generations = tokio::task::JoinSet::new();
        let mut beat = tokio::time::interval(protocol::HEARTBEAT);
        loop {
            tokio::select! {
                frame = frames.next() => {
                    let Some(Ok(payload)) = frame else { return "exit status 0".into() };
                    let Ok(msg) = protocol::decode::<ToEngine>(&payload) else { return "exit status 1".into() };
                    if let Some(ended) = state.handle(msg, &mut generations) {
                        // Everything said before exiting reaches hearthd.
                        while let Ok(msg) = out_rx.try_recv() {
                            let _ = sink.send(send(&msg)).await;
                        }
                        return ended;
                    }
                }
                Some(msg) = out_rx.recv() => {
                    if sink.send(send(&msg)).await.is_err() {
                        return "exit status 1".into();
                    }
                }
                () = state.died.cancelled() => return "killed by signal 6".into(),
                _ = beat.tick() => {
                    let busy = !lock(&state.queue).running.is_empty();
                    if busy {
                        let now = state.epoch.elapsed().as_millis() as u64;
                        let ago = now.saturating_sub(state.progress_ms.load(Ordering::Relaxed));
                        let heartbeat = FromEngine::Heartbeat {
                            beat_ago_ms: ago,
                            idle: false,
                            kv: Default::default(),
                            potential_mtps: 0,
                        };
                        let _ = sink.send(send(&heartbeat)).await;
                    }
                }
            }
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    /// Running generations: key → (priority index, cancel switch).
    running: HashMap<u64, (usize, CancellationToken, Option<CancelReason>)>,
    /// Resident session KV: the tokens it covers.
    sessions: HashMap<u64, Vec<Token>>,
    next_id: u64,
}

#[derive(Debug)]
struct Serving {
    fake: Arc<FakeEngine>,
    info: LoadedModelInfo,
    out: mpsc::UnboundedSender<FromEngine>,
    queue: Mutex<Queue>,
    generated: AtomicU32,
    epoch: Instant,
    progress_ms: AtomicU64,
    died: CancellationToken,
}

/// Stand-in tokens of a prompt: a few per message, derived from its bytes.
fn prompt_tokens(request: &GenerateRequest) -> Vec<Token> {
    request
        .messages
        .iter()
        .flat_map(|m| m.content.as_bytes().chunks(4).map(|c| c.iter().map(|&b| Token::from(b)).sum::<Token>()))
        .collect()
}

impl Serving {
    fn status(&self, queue: &Queue) -> FromEngine {
        let mut by_priority = [0; 3];
        for (p, ..) in queue.running.values() {
            by_priority[*p] += 1;
        }
        let status = EngineStatus { running: queue.running.len() as u32, waiting: 0, by_priority };
        FromEngine::Status { status, kv: Default::default() }
    }

    /// Handles one message; Some(how it exited) when it exits.
    fn handle(self: &Arc<Self>, msg: ToEngine, generations: &mut tokio::task::JoinSet<()>) -> Option<String> {
        match msg {
            ToEngine::Submit { key, request, caller, kv } => {
                lock(&self.fake.seen).push(Seen {
                    app: caller.app.clone(),
                    session: request.session,
                    kv_tokens: kv.as_ref().map(|kv| kv.tokens.len()),
                    prefix: request.assistant_prefix.clone(),
                    max_tokens: request.max_tokens,
                });
                let prompt = prompt_tokens(&request);
                if prompt.len() as u32 >= self.info.context_length {
                    let e =
                        EngineError::ContextLengthExceeded { prompt: prompt.len(), context: self.info.context_length };
                    let _ = self.out.send(FromEngine::Verdict { key, result: Err(e) });
                    return None;
                }
                let mut queue = lock(&self.queue);
                let cached = match request.session {
                    Some(id) => {
                        let resident = match kv {
                            Some(kv) => Some(kv.tokens),
                            None => queue.sessions.remove(&id),
                        };
                        resident.map_or(0, |t| t.iter().zip(&prompt).take_while(|(a, b)| a == b).count() as u32)
                    }
                    None => 0,
                };
                queue.next_id += 1;
                let accepted = Accepted { id: queue.next_id, prompt_tokens: prompt.len() as u32 };
                let cancel = CancellationToken::new();
                queue.running.insert(key, (request.priority.index(), cancel.clone(), None));
                let _ = self.out.send(self.status(&queue));
                let _ = self.out.send(FromEngine::Verdict { key, result: Ok(accepted) });
                drop(queue);
                generations.spawn(Arc::clone(self).generate(key, *request, prompt, cached, cancel));
            }
            ToEngine::Cancel { key, reason } => {
                if let Some((_, cancel, why)) = lock(&self.queue).running.get_mut(&key) {
                    why.get_or_insert(reason);
                    cancel.cancel();
                }
            }
            ToEngine::Embed { key, texts, .. } => {
                let vectors = texts.iter().map(|t| vec![t.len() as f32, 1.0]).collect();
                let _ = self.out.send(FromEngine::Embedded { key, result: Ok(vectors) });
            }
            ToEngine::CountTokens { key, request, .. } => {
                let prompt_tokens = prompt_tokens(&request).len() as u32;
                let count = TokenCount { prompt_tokens, image_tokens: 0, context_length: self.info.context_length };
                let _ = self.out.send(FromEngine::Counted { key, result: Ok(count) });
            }
            ToEngine::CloseSession(id) => {
                lock(&self.queue).sessions.remove(&id);
            }
            ToEngine::ConnectionClosed(_) | ToEngine::Throttle(_) => {}
            ToEngine::Shutdown { park } => {
                let mut queue = lock(&self.queue);
                for (_, cancel, why) in queue.running.values_mut() {
                    why.get_or_insert(CancelReason::Shutdown);
                    cancel.cancel();
                }
                let sessions = std::mem::take(&mut queue.sessions);
                drop(queue);
                if park {
                    for (session, tokens) in sessions {
                        let kv = SessionKv { tokens, adapters: AdapterSet::new(&[]), state: vec![7; 64] };
                        let _ = self.out.send(FromEngine::Parked { session, kv });
                    }
                }
                return Some("exit status 0".into());
            }
        }
        None
    }

    async fn generate(
        self: Arc<Self>,
        key: u64,
        request: GenerateRequest,
        prompt: Vec<Token>,
        cached: u32,
        cancel: CancellationToken,
    ) {
        let started = Instant::now();
        let seed: Token = prompt.iter().fold(17, |a, &t| a.wrapping_mul(31).wrapping_add(t));
        let mut tokens = Vec::new();
        let mut text = String::new();
        let mut stop = super::stop::StopFilter::new(&request.stop);
        let reason = loop {
            if tokens.len() as u32 >= request.max_tokens {
                break FinishReason::Length;
            }
            let script = self.fake.script(&self.info.name);
            tokio::select! {
                () = cancel.cancelled() => break FinishReason::Cancelled,
                () = tokio::time::sleep(script.token_delay) => {}
            }
            let generated = self.generated.load(Ordering::Relaxed);
            if script.hang_after.is_some_and(|n| generated >= n) {
                // Wedged: only a kill ends it (a cancel cannot reach a stuck loop).
                std::future::pending::<()>().await;
            }
            if script.abort_after.is_some_and(|n| generated >= n) {
                self.died.cancel();
                std::future::pending::<()>().await;
            }
            let id = seed.wrapping_add(tokens.len() as Token).rem_euclid(1000);
            let piece = format!("t{id} ");
            text.push_str(&piece);
            let index = tokens.len() as u32;
            tokens.push(id);
            self.generated.fetch_add(1, Ordering::Relaxed);
            self.progress_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            let mut out = Vec::new();
            let stopped = stop.push(&mut text, index, id, piece, &mut out);
            for r in out {
                let event = Event::Token { index: r.index, id: r.id, text: r.text };
                let _ = self.out.send(FromEngine::Event { key, event });
            }
            if stopped {
                break FinishReason::Stop;
            }
        };
        let mut held = Vec::new();
        stop.flush(&mut held);
        for r in held {
            let _ = self
                .out
                .send(FromEngine::Event { key, event: Event::Token { index: r.index, id: r.id, text: r.text } });
        }
        let mut queue = lock(&self.queue);
        let why = queue.running.remove(&key).and_then(|(_, _, why)| why);
        if let (Some(id), FinishReason::Length) = (request.session, reason) {
            queue.sessions.insert(id, prompt.iter().chain(&tokens).copied().collect());
        }
        let _ = self.out.send(self.status(&queue));
        drop(queue);
        let error =
            (reason == FinishReason::Cancelled).then(|| EngineError::Cancelled(why.unwrap_or(CancelReason::Caller)));
        let outcome = Outcome {
            text,
            token_ids: tokens,
            prompt_tokens: prompt.len() as u32,
            cached_tokens: cached,
            decode: started.elapsed(),
            ..Outcome::empty(reason, &self.info.name, error)
        };
        let _ = self.out.send(FromEngine::Event { key, event: Event::Finished(outcome) });
    }
}
