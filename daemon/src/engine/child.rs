//! `hearth-engine`: one model's engine in a process of its own.
//!
//! hearthd starts it with one end of a socket pair as stdin, an empty environment, and
//! stderr shared with its own (the journal, under systemd). It reads [`Start`] and the
//! model's descriptors, sandboxes itself step by step (sandbox.rs) around loading the
//! model, says [`FromEngine::Ready`], and serves: the worker (worker/) runs on the main
//! thread, and an I/O thread turns the socket's messages into [`Command`]s and the worker's
//! events back into messages. It exits when hearthd says Shutdown, when the socket closes,
//! or (parent-death signal) when hearthd dies.

use std::collections::HashMap;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use hearth_ffi::{AbortSwitch, Backend, Context, ContextParams, Model, ModelParams};
use tokio::sync::{mpsc, oneshot, watch};

use super::protocol::{self, FromEngine, SandboxReport, Start, ToEngine};
use super::session::SessionLink;
use super::{CancelToken, Command, EngineStatus, KvGauges, Liveness, LoadedModelInfo, Throttle, Wake, worker};

/// Most descriptors [`Start`] may come with (the model and its adapters).
const MAX_START_FDS: usize = 16;

/// The program's `main`.
pub fn main() -> ExitCode {
    init_logging();
    if std::env::args_os().nth(1).is_some_and(|a| a == "--devices") {
        return list_devices();
    }
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "engine stopped");
            1
        }
    };
    // Everything it said is written (the I/O thread drained); skip C++ static teardown, which
    // would run under the syscall allowlist for nothing.
    hearth_ffi::exit_now(code)
}

/// `hearth-engine --devices`: the compute devices ggml finds in this process, as one frame
/// on stdout, for hearthd (which itself never opens a GPU: only engines hold one).
fn list_devices() -> ExitCode {
    let listed = super::sandbox::limit_resources().and_then(|()| {
        let devices = Backend::init().devices();
        let frame = protocol::frame(&devices).map_err(|e| format!("cannot encode the devices: {e}"))?;
        // Flushed here: exit_now skips the buffered stdout's flush.
        let mut out = std::io::stdout().lock();
        out.write_all(&frame).and_then(|()| out.flush()).map_err(|e| format!("cannot write the devices: {e}"))
    });
    let code = match listed {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "engine could not list the devices");
            1
        }
    };
    hearth_ffi::exit_now(code)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HEARTH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
}

fn run() -> Result<(), String> {
    // Dies with hearthd, whatever killed it; then checks hearthd did not die before that.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| format!("cannot set the parent-death signal: {e}"))?;
    if rustix::process::getppid().is_none_or(|p| p.is_init()) {
        return Err("hearthd is already gone".into());
    }
    let socket: OwnedFd = std::os::fd::AsFd::as_fd(&std::io::stdin())
        .try_clone_to_owned()
        .map_err(|e| format!("stdin is not hearthd's socket: {e}"))?;
    let mut socket = UnixStream::from(socket);
    super::sandbox::limit_resources()?;
    let (start, files) = read_start(&mut socket)?;
    match load(&start, files, &mut socket) {
        Ok(serving) => serving.serve(socket, &start),
        Err(e) => {
            let _ = send_sync(&mut socket, &FromEngine::Failed(e.clone()));
            Err(e)
        }
    }
}

/// Reads the first frame and the descriptors sent with it.
fn read_start(socket: &mut UnixStream) -> Result<(Start, Vec<OwnedFd>), String> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_START_FDS))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let mut chunk = vec![0u8; 64 * 1024];
    let got = recvmsg(&*socket, &mut [IoSliceMut::new(&mut chunk)], &mut ancillary, RecvFlags::CMSG_CLOEXEC)
        .map_err(|e| format!("cannot read the start message: {e}"))?;
    let mut files = Vec::new();
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            files.extend(fds);
        }
    }
    let mut buf = BytesMut::from(&chunk[..got.bytes]);
    let payload = loop {
        if let Some(payload) = protocol::unframe(&mut buf).map_err(|e| format!("bad start frame: {e}"))? {
            break payload;
        }
        let n = socket.read(&mut chunk).map_err(|e| format!("cannot read the start message: {e}"))?;
        if n == 0 {
            return Err("hearthd closed the socket before the start message".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let start: Start = protocol::decode(&payload).map_err(|e| format!("bad start message: {e}"))?;
    if start.version != protocol::VERSION {
        return Err(format!("hearthd speaks protocol {}, this engine {}", start.version, protocol::VERSION));
    }
    let expected = 1 + start.load.adapters.len() + usize::from(start.load.mmproj.is_some());
    if files.len() != expected {
        return Err(format!("expected {expected} files, got {}", files.len()));
    }
    Ok((start, files))
}

fn send_sync(socket: &mut UnixStream, msg: &FromEngine) -> std::io::Result<()> {
    socket.write_all(&protocol::frame(msg)?)
}

/// A loaded, sandboxed engine, ready to serve.
struct Serving {
    ctx: Context,
    info: LoadedModelInfo,
    weights: u64,
    kv: u64,
    report: SandboxReport,
    gpu_access: super::sandbox::GpuAccess,
    vision: Option<super::image::Vision>,
    native: Option<Arc<super::template::NativeTemplate>>,
}

/// Sandboxes the process and loads the model and its context.
fn load(start: &Start, files: Vec<OwnedFd>, socket: &mut UnixStream) -> Result<Serving, String> {
    let backend = Backend::init();
    // Listing the devices loads the GPU drivers and opens their device nodes: before
    // landlock closes the file system.
    let listed = backend.devices();
    let gpu = super::probe::offload_device(&listed, start.load.gpu_layers, &start.load.devices).cloned();
    let mut files = files.into_iter();
    let model_file = std::fs::File::from(files.next().ok_or("no model file")?);
    let mut adapters: Vec<OwnedFd> = files.collect();
    let mmproj = if start.load.mmproj.is_some() { adapters.pop() } else { None };
    let readable: Vec<&OwnedFd> = adapters.iter().chain(&mmproj).collect();
    let landlock = super::sandbox::restrict_files(&readable)?;
    let probes = super::sandbox::probe_paths(&start.probes);
    let landlock_probes: Vec<String> = probes.iter().map(|p| super::sandbox::probe_open(p)).collect();

    // With no devices named, exactly the one hearthd counted against its budget (llama.cpp
    // would otherwise split the layers over every GPU it finds).
    let devices = match &gpu {
        Some(d) if start.load.devices.is_empty() => vec![d.name.clone()],
        _ => start.load.devices.clone(),
    };
    let params = ModelParams { n_gpu_layers: start.load.gpu_layers, use_mmap: true, devices };
    let mut last = -1.0f32;
    let mut model = Model::load_from_file(backend, &model_file, &params, &mut |f| {
        // Whole percent steps only.
        if (f * 100.0).floor() > (last * 100.0).floor() {
            last = f;
            let _ = send_sync(socket, &FromEngine::Progress(f));
        }
    })
    .map_err(|e| format!("llama.cpp cannot load it: {e}"))?;
    drop(model_file);
    for (fd, (name, scale)) in adapters.iter().zip(&start.load.adapters) {
        // The adapter's descriptor by its /proc name: landlock allows reading exactly it.
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd)));
        model.attach_lora(&path, name, *scale).map_err(|e| format!("adapter {name:?}: {e}"))?;
    }
    drop(adapters);
    let model = Arc::new(model);
    let settings = &start.settings;
    // The projector's weights (read into memory by libmtmd) count with the model's.
    let projector_bytes = mmproj.as_ref().and_then(|fd| rustix::fs::fstat(fd).ok()).map_or(0, |st| st.st_size as u64);
    let vision = match &mmproj {
        Some(fd) => {
            let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd)));
            let projector = hearth_ffi::Projector::load(&path, Arc::clone(&model), settings.threads)
                .map_err(|e| format!("vision projector: {e}"))?;
            Some(super::image::Vision::new(projector, start.load.mmproj.as_deref().unwrap_or_default()))
        }
        None => None,
    };
    drop(mmproj);
    let ctx = Context::new(
        Arc::clone(&model),
        ContextParams {
            n_ctx: settings.kv_tokens(),
            n_batch: settings.batch_size,
            n_seq_max: settings.sequences(),
            n_threads: settings.threads,
            n_threads_batch: settings.threads,
            flash_attn: Some(settings.flash_attn),
            kv_unified: false,
            embeddings: false,
            kv_type: settings.kv_cache.ffi(),
        },
    )
    .map_err(|e| format!("cannot create its context: {e}"))?;
    let geometry = model.kv_geometry();
    let kv = geometry.bytes(settings.kv_tokens(), settings.kv_cache.ffi());
    // llama.cpp offloads the last n repeating layers, and the output layer past them.
    let layers = geometry.n_layer + 1;
    let gpu_layers = match (&gpu, start.load.gpu_layers) {
        (None, _) => 0,
        (Some(_), n) if n < 0 => layers,
        (Some(_), n) => (n as u32).min(layers),
    };
    let gpu_access = match &gpu {
        Some(d) if gpu_layers > 0 => super::sandbox::GpuAccess::for_device(&d.name, &d.description),
        _ => super::sandbox::GpuAccess::None,
    };
    let native = native_template(&model, &start.model);
    let info = LoadedModelInfo {
        tool_format: native.as_ref().map_or(crate::structured::ToolFormat::Constrained, |t| t.format()),
        name: start.model.clone(),
        description: model.description(),
        n_params: model.n_params(),
        size_bytes: model.size_bytes(),
        trained_context: model.n_ctx_train(),
        context_length: ctx.n_ctx_seq(),
        gpu_device: gpu.filter(|_| gpu_layers > 0).map(|d| d.name),
        gpu_layers,
        layers,
    };
    let report = SandboxReport {
        landlock: landlock.to_owned(),
        landlock_abi: hearth_ffi::landlock_abi(),
        seccomp: false,
        probes: probes.into_iter().zip(landlock_probes).collect(),
        socket: String::new(),
        gpu_access: gpu_access.as_str().to_owned(),
    };
    Ok(Serving { ctx, info, weights: model.size_bytes() + projector_bytes, kv, report, gpu_access, vision, native })
}

/// The model's own chat template, where it shows tools in a format Hearth reads.
fn native_template(model: &hearth_ffi::Model, name: &str) -> Option<Arc<super::template::NativeTemplate>> {
    let source = model.chat_template()?;
    let (bos, eos) = model.bos_eos_text();
    match super::template::NativeTemplate::new(&source, &bos, &eos) {
        Ok(Some(t)) => {
            tracing::info!(model = name, format = t.format().as_str(), "the model's chat template shows tools");
            Some(Arc::new(t))
        }
        Ok(None) => None,
        Err(why) => {
            tracing::warn!(model = name, %why, "the model's chat template names a tool format but is not used for tools");
            None
        }
    }
}

/// Cancel switches of the requests and Embed calls in the engine, by hearthd's key.
type Cancels = Arc<Mutex<HashMap<u64, CancelToken>>>;

fn lock(c: &Cancels) -> std::sync::MutexGuard<'_, HashMap<u64, CancelToken>> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Serving {
    fn serve(self, mut socket: UnixStream, start: &Start) -> Result<(), String> {
        let Serving { ctx, info, weights, kv, mut report, gpu_access, vision, native } = self;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (status_tx, status_rx) = watch::channel(EngineStatus::default());
        let gauges = Arc::new(KvGauges::default());
        gauges.size.store(ctx.n_ctx(), std::sync::atomic::Ordering::Relaxed);
        let liveness = Arc::new(Liveness::default());
        let wake = Arc::new(Wake::default());
        let throttle = Arc::new(Throttle::default());
        throttle.apply(&start.throttle);
        let sessions = Arc::new(SessionLink::new(out_tx.clone()));
        let preempt = ctx.abort_switch();
        let compute = Arc::new(super::Compute::default());
        let preparer = super::prepare::Preparer::new(
            Arc::clone(ctx.model()),
            info.name.clone(),
            ctx.n_ctx_seq(),
            Arc::clone(&throttle),
            vision,
            native,
            Arc::clone(&compute),
        );
        let worker = worker::Worker::new(
            ctx,
            info.name.clone(),
            cmd_rx,
            status_tx,
            Arc::clone(&gauges),
            Arc::clone(&liveness),
            Arc::clone(&compute),
            &start.settings,
            Arc::clone(&throttle),
            Arc::clone(&sessions),
            Arc::clone(&wake),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the I/O runtime: {e}"));
        // The last step: from here on only the allowlisted calls work.
        let sandboxed = runtime.and_then(|rt| super::sandbox::restrict_syscalls(gpu_access).map(|()| rt));
        let runtime = match sandboxed {
            Ok(rt) => rt,
            Err(e) => {
                let _ = send_sync(&mut socket, &FromEngine::Failed(e.clone()));
                return Err(e);
            }
        };
        report.seccomp = true;
        for (path, result) in &mut report.probes {
            *result = format!("{result}, then {}", super::sandbox::probe_open(path));
        }
        report.socket = super::sandbox::probe_socket();
        tracing::info!(
            model = %info.name, landlock = %report.landlock, abi = report.landlock_abi,
            socket = %report.socket, "engine sandboxed and serving"
        );
        send_sync(&mut socket, &FromEngine::Ready { info, weights, kv, sandbox: report })
            .map_err(|e| format!("cannot answer hearthd: {e}"))?;
        socket.set_nonblocking(true).map_err(|e| format!("socket: {e}"))?;
        let (done_tx, done_rx) = oneshot::channel();
        let (prep, jobs) = mpsc::unbounded_channel();
        let prep_thread = {
            let (cmd, wake, preempt) = (cmd_tx.clone(), Arc::clone(&wake), Arc::clone(&preempt));
            std::thread::Builder::new()
                .name("engine-prep".into())
                .spawn(move || preparer.run(jobs, &cmd, &wake, &preempt))
                .map_err(|e| format!("cannot start the preparation thread: {e}"))?
        };
        let io = Io {
            prep,
            cmd: cmd_tx,
            out: out_tx,
            sessions,
            throttle,
            preempt,
            wake,
            cancels: Cancels::default(),
            status: status_rx.clone(),
            kv: Arc::clone(&gauges),
            compute: Arc::clone(&compute),
        };
        let status =
            Status { rx: status_rx, kv: Arc::clone(&gauges), liveness, throttle: Arc::clone(&io.throttle), compute };
        let io_thread = std::thread::Builder::new()
            .name("engine-io".into())
            .spawn(move || runtime.block_on(io.run(socket, out_rx, status, done_rx)))
            .map_err(|e| format!("cannot start the I/O thread: {e}"))?;
        worker.run();
        let _ = done_tx.send(());
        // The I/O thread's end drops the jobs' sender, which ends the preparation thread.
        let io_result = io_thread.join().map_err(|_| "the I/O thread panicked".to_owned());
        prep_thread.join().map_err(|_| "the preparation thread panicked".to_owned())?;
        io_result?
    }
}

/// The I/O thread's side: what it hands the worker and where answers go.
struct Io {
    cmd: mpsc::Sender<Command>,
    out: mpsc::UnboundedSender<FromEngine>,
    sessions: Arc<SessionLink>,
    throttle: Arc<Throttle>,
    preempt: Arc<AbortSwitch>,
    /// Wakes the worker out of a timed wait after every message (commands, cancels,
    /// the governors' demands).
    wake: Arc<Wake>,
    /// Submits go to the preparation thread first.
    prep: mpsc::UnboundedSender<super::prepare::Job>,
    cancels: Cancels,
    /// The queue as the worker published it, sent ahead of each acceptance.
    status: watch::Receiver<EngineStatus>,
    kv: Arc<KvGauges>,
    /// Reported ahead of each answer that ends work.
    compute: Arc<super::Compute>,
}

/// Sends the compute gathered since the last report, if any.
fn report_compute(out: &mpsc::UnboundedSender<FromEngine>, compute: &super::Compute) {
    let taken = compute.take();
    if !taken.is_empty() {
        let _ = out.send(FromEngine::Compute(taken));
    }
}

/// What the status forwarder reads.
struct Status {
    rx: watch::Receiver<EngineStatus>,
    kv: Arc<KvGauges>,
    liveness: Arc<Liveness>,
    throttle: Arc<Throttle>,
    compute: Arc<super::Compute>,
}

impl Io {
    async fn run(
        self,
        socket: UnixStream,
        mut out_rx: mpsc::UnboundedReceiver<FromEngine>,
        status: Status,
        done: oneshot::Receiver<()>,
    ) -> Result<(), String> {
        let socket = tokio::net::UnixStream::from_std(socket).map_err(|e| format!("socket: {e}"))?;
        let (read, write) = socket.into_split();
        let mut frames_in = tokio_util::codec::FramedRead::new(read, protocol::codec());
        let mut frames_out = tokio_util::codec::FramedWrite::new(write, protocol::codec());
        let writer = async move {
            while let Some(msg) = out_rx.recv().await {
                let payload = match protocol::encode(&msg) {
                    Ok(p) if p.len() <= protocol::MAX_FRAME => p,
                    Ok(_) | Err(_) => {
                        tracing::error!("a message for hearthd does not encode within the frame limit: dropped");
                        continue;
                    }
                };
                frames_out.send(payload).await.map_err(|e| format!("cannot write to hearthd: {e}"))?;
            }
            Ok::<(), String>(())
        };
        let out = self.out.clone();
        // Its own task: status and heartbeats go out even while the reader waits on a full
        // command queue.
        let status_task = tokio::spawn(forward_status(status, out.clone()));
        let reader = async move {
            tokio::pin!(done);
            loop {
                tokio::select! {
                    _ = &mut done => break,
                    frame = frames_in.next() => match frame {
                        Some(Ok(payload)) => match protocol::decode::<ToEngine>(&payload) {
                            Ok(msg) => {
                                self.handle(msg).await;
                                self.wake.notify();
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "undecodable message from hearthd: stopping");
                                let _ = self.cmd.send(Command::Shutdown).await;
                            }
                        },
                        // hearthd is gone (or the stream broke): finish up.
                        Some(Err(_)) | None => {
                            let _ = self.cmd.send(Command::Shutdown).await;
                            let _ = (&mut done).await;
                            break;
                        }
                    },
                }
            }
            // Every sender but the worker's finished requests' forwarders goes now.
            status_task.abort();
            drop(self);
            drop(out);
        };
        let (written, ()) = tokio::join!(writer, reader);
        written
    }

    async fn handle(&self, msg: ToEngine) {
        match msg {
            ToEngine::Submit { key, request, caller, kv } => {
                let session = request.session;
                if let Some(id) = session {
                    self.sessions.turn(id, kv);
                }
                let cancel = CancelToken::default();
                lock(&self.cancels).insert(key, cancel.clone());
                let (events, mut events_rx) = mpsc::unbounded_channel();
                let (reply, verdict) = oneshot::channel();
                // Rendered, tokenised and compiled on the preparation thread, in arrival order;
                // it hands the request to the worker (or answers a refusal).
                self.wake.preparing();
                let work = super::prepare::Work::Submit { events, reply };
                if self.prep.send(super::prepare::Job { request, caller, cancel, work }).is_err() {
                    self.wake.prepared();
                    return;
                }
                let (out, cancels) = (self.out.clone(), Arc::clone(&self.cancels));
                let (status, kv) = (self.status.clone(), Arc::clone(&self.kv));
                let (sessions, compute) = (Arc::clone(&self.sessions), Arc::clone(&self.compute));
                tokio::spawn(async move {
                    let result =
                        verdict.await.unwrap_or(Err(super::EngineError::Cancelled(super::CancelReason::Shutdown)));
                    let accepted = result.is_ok();
                    if let (false, Some(id)) = (accepted, session) {
                        // A refused turn's KV is not kept in the engine (the next turn recomputes).
                        drop(sessions.take(id));
                    }
                    if accepted {
                        // The worker counted the request before accepting it: so does hearthd,
                        // before its caller hears it was accepted.
                        let status = status.borrow().clone();
                        let _ = out.send(FromEngine::Status { status, kv: kv.snapshot() });
                    }
                    let _ = out.send(FromEngine::Verdict { key, result });
                    if accepted {
                        while let Some(event) = events_rx.recv().await {
                            if matches!(event, super::Event::Finished(_)) {
                                // As for acceptance: the queue without it reaches hearthd
                                // first, and so does the compute it took.
                                report_compute(&out, &compute);
                                let status = status.borrow().clone();
                                let _ = out.send(FromEngine::Status { status, kv: kv.snapshot() });
                            }
                            let _ = out.send(FromEngine::Event { key, event });
                        }
                    }
                    lock(&cancels).remove(&key);
                });
            }
            ToEngine::Cancel { key, reason } => {
                if let Some(c) = lock(&self.cancels).get(&key) {
                    c.cancel(reason);
                }
            }
            ToEngine::Embed { key, caller, texts } => {
                let cancel = CancelToken::default();
                lock(&self.cancels).insert(key, cancel.clone());
                let (reply, answer) = oneshot::channel();
                let job = worker::EmbedJob::new(caller, texts, cancel, reply);
                if self.cmd.send(Command::Embed(Box::new(job))).await.is_err() {
                    return;
                }
                let (out, cancels) = (self.out.clone(), Arc::clone(&self.cancels));
                let compute = Arc::clone(&self.compute);
                tokio::spawn(async move {
                    let result =
                        answer.await.unwrap_or(Err(super::EngineError::Cancelled(super::CancelReason::Shutdown)));
                    report_compute(&out, &compute);
                    let _ = out.send(FromEngine::Embedded { key, result });
                    lock(&cancels).remove(&key);
                });
            }
            ToEngine::CountTokens { key, caller, request } => {
                // On the preparation thread, in its fair turn among the apps' jobs.
                let (reply, answer) = oneshot::channel();
                self.wake.preparing();
                let work = super::prepare::Work::Count(reply);
                if self
                    .prep
                    .send(super::prepare::Job { request, caller, cancel: CancelToken::default(), work })
                    .is_err()
                {
                    self.wake.prepared();
                    return;
                }
                let (out, compute) = (self.out.clone(), Arc::clone(&self.compute));
                tokio::spawn(async move {
                    let result =
                        answer.await.unwrap_or(Err(super::EngineError::Cancelled(super::CancelReason::Shutdown)));
                    // An image counted was encoded: its compute goes ahead of the answer.
                    report_compute(&out, &compute);
                    let _ = out.send(FromEngine::Counted { key, result });
                });
            }
            ToEngine::CloseSession(id) => {
                self.sessions.close(id);
                let _ = self.cmd.send(Command::CloseSession(id)).await;
            }
            ToEngine::ConnectionClosed(connection) => {
                let _ = self.cmd.send(Command::ConnectionClosed(connection)).await;
            }
            ToEngine::Throttle(state) => {
                self.throttle.apply(&state);
                // Over the memory ceiling every decode in flight stops at once (interactive
                // ones too), so the worker can end the work, and freed heap goes back.
                self.preempt.force(state.over_ceiling);
                if state.over_ceiling {
                    hearth_ffi::release_free_heap();
                }
            }
            ToEngine::Shutdown { park } => {
                if !park {
                    self.sessions.close_all();
                }
                let _ = self.cmd.send(Command::Shutdown).await;
            }
        }
    }
}

/// Sends the queue status whenever the worker publishes a new one, and a heartbeat while
/// the worker is busy. Ends when the worker is gone.
async fn forward_status(mut s: Status, out: mpsc::UnboundedSender<FromEngine>) {
    let mut beat = tokio::time::interval(protocol::HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_beat = None;
    loop {
        tokio::select! {
            changed = s.rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let status = s.rx.borrow_and_update().clone();
                let _ = out.send(FromEngine::Status { status, kv: s.kv.snapshot() });
            }
            _ = beat.tick() => {
                let idle = s.liveness.idle();
                // An idle loop that has not beaten since the last heartbeat has nothing new
                // to say; any work in between (even a refusal) beats, and is reported, as is
                // compute done beside it (an image encoded for a request later refused).
                report_compute(&out, &s.compute);
                let last = s.liveness.last_beat();
                if idle && sent_beat == Some(last) {
                    continue;
                }
                sent_beat = Some(last);
                if s.throttle.over_ceiling.load(std::sync::atomic::Ordering::Relaxed) {
                    hearth_ffi::release_free_heap();
                }
                let _ = out.send(FromEngine::Heartbeat {
                    beat_ago_ms: s.liveness.since_beat().as_millis() as u64,
                    idle,
                    kv: s.kv.snapshot(),
                    potential_mtps: s.throttle.potential_mtps.load(std::sync::atomic::Ordering::Relaxed),
                });
            }
        }
    }
}
