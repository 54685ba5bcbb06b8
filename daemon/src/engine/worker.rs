//! The engine thread's loop: intake, admission, one batched decode step (step.rs), an
//! embedded text (embed.rs), retirement.
//!
//! Every running sequence contributes to each step: one token if it is decoding, or a chunk
//! of its prompt if it is still prefilling, so a new request joins between steps and a long
//! prompt never holds the others for more than one batch. Preemption happens at token
//! boundaries: while a higher-priority request is prefilling, lower-priority sequences skip
//! their decode steps (their KV stays, so they resume without recomputation).
//!
//! LoRA: the whole batch of a decode shares the context's adapter set, so a step takes only
//! the sequences of one set; when sequences need different sets, the sets take turns.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::FinishReason;
use hearth_ffi::{Batch, Context, Model};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

mod embed;
mod kv;
mod step;
mod throttle;
mod tune;

pub(super) use embed::EmbedJob;

use super::EngineError;
use super::scheduler::{Keep, Limits, Scheduler};
use super::sequence::{Sequence, Waiting, stop_reason, unstarted_outcome};
use super::session::SessionLink;
use super::{
    Accepted, AdapterSet, Caller, CancelReason, CancelToken, Command, EngineSettings, EngineStatus, Event,
    GenerateRequest, KvGauges, Priority,
};

pub(super) struct Worker {
    ctx: Context,
    model: Arc<Model>,
    model_name: String,
    rx: mpsc::Receiver<Command>,
    status: watch::Sender<EngineStatus>,
    kv: Arc<KvGauges>,
    liveness: Arc<super::Liveness>,
    /// Compute time per app, for the energy ledger.
    compute: Arc<super::Compute>,
    batch: Batch,
    /// Thrown by the handle when an interactive request arrives; aborts a decode step that
    /// holds only lower-priority work (held while a step carries interactive work).
    preempt: Arc<hearth_ffi::AbortSwitch>,
    /// A decode (or embedded text) was aborted this turn; the next admission says whether it
    /// was worth it.
    preempted: bool,
    /// Preemption is held off until then: an abort that admitted no interactive request
    /// (refused, or gone) must not be repeatable at will, or refused interactive requests
    /// would abort every step and stall everyone.
    preempt_held_until: Option<Instant>,
    scheduler: Scheduler,
    running: Vec<Sequence>,
    next_id: u64,
    prefix_cache: bool,
    /// Debug builds only: with HEARTH_DEBUG_STALL_ENGINE set, the first decode step hangs, so
    /// tests can watch the systemd watchdog ping stop.
    stall: bool,
    throttle: Arc<super::Throttle>,
    /// Ends a timed wait (pacing, deferred work) when a command, cancel or new demand comes.
    wake: Arc<super::Wake>,
    /// Configured compute threads, and the count in force.
    threads: (i32, i32),
    /// Fewer compute threads while other processes take the cores (tune.rs).
    tuner: tune::ThreadTuner,
    /// The context Embed runs in, made on first use, and the Embed jobs in progress.
    embedder: Option<Context>,
    embeds: embed::EmbedQueue,
    sessions: Arc<SessionLink>,
    /// The adapter set the context has now, and the one the last step served.
    adapters_set: Option<AdapterSet>,
    last_group: Option<AdapterSet>,
    /// [`super::Wake::arrived`] at the last wait for preparation.
    arrivals_waited: u64,
    /// Cells a sequence's KV may reach with a draft in it: with an f16 KV cache, ggml's
    /// one-token steps past 256 cells take another attention kernel than a verification
    /// does, so drafts stop there.
    draft_cells: usize,
}

/// How long preemption stays held off after an abort that admitted no interactive request.
const PREEMPT_HOLD: Duration = Duration::from_secs(1);
/// With only deferred background work waiting, how long the loop sleeps before it looks
/// again without being woken (the governors lifting the deferral, a command, a cancel wake
/// it at once; this only bounds how late a waiting request's deadline is noticed).
const DEFERRED_RECHECK: Duration = Duration::from_secs(1);
/// How long admission waits for requests still being prepared (rendered, tokenised: well
/// under a millisecond for a chat turn) to join it: longer only for a large grammar or a
/// huge prompt, whose preparation then goes on beside the running streams.
const PREPARATION_GRACE: Duration = Duration::from_millis(10);

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: Context,
        model_name: String,
        rx: mpsc::Receiver<Command>,
        status: watch::Sender<EngineStatus>,
        kv: Arc<KvGauges>,
        liveness: Arc<super::Liveness>,
        compute: Arc<super::Compute>,
        settings: &EngineSettings,
        throttle: Arc<super::Throttle>,
        sessions: Arc<SessionLink>,
        wake: Arc<super::Wake>,
    ) -> Self {
        let limits = Limits {
            shared_sequences: settings.max_sequences as usize,
            interactive_sequences: settings.interactive_sequences as usize,
            queue_capacity: settings.queue_capacity as usize,
            queue_per_app: settings.queue_per_app as usize,
        };
        Self {
            model: Arc::clone(ctx.model()),
            preempt: ctx.abort_switch(),
            preempted: false,
            preempt_held_until: None,
            ctx,
            model_name,
            rx,
            status,
            kv,
            liveness,
            compute,
            batch: Batch::new(settings.batch_size as usize, 1),
            scheduler: Scheduler::new(limits),
            running: Vec::new(),
            next_id: 1,
            prefix_cache: settings.prefix_cache,
            stall: cfg!(debug_assertions) && std::env::var_os("HEARTH_DEBUG_STALL_ENGINE").is_some(),
            throttle,
            wake,
            threads: (settings.threads, settings.threads),
            tuner: tune::ThreadTuner::new(settings.threads),
            embedder: None,
            embeds: embed::EmbedQueue::new(),
            sessions,
            adapters_set: None,
            last_group: None,
            arrivals_waited: 0,
            draft_cells: match settings.kv_cache {
                super::KvCache::Q8_0 => usize::MAX,
                super::KvCache::F16 | super::KvCache::F32 => 256,
            },
        }
    }

    pub fn run(mut self) {
        tracing::debug!("engine thread running");
        loop {
            self.liveness.beat();
            // Read before anything is looked at: a wake after this ends the waits below.
            let seen = self.wake.seen();
            if self.running.is_empty() && self.scheduler.waiting().is_empty() && self.embeds.is_empty() {
                self.liveness.set_idle(true);
                let cmd = self.rx.blocking_recv();
                self.liveness.set_idle(false);
                match cmd {
                    Some(
                        cmd @ (Command::Submit { .. }
                        | Command::ConnectionClosed(_)
                        | Command::Embed(_)
                        | Command::CloseSession(_)),
                    ) => self.handle(cmd),
                    Some(Command::Shutdown) | None => break,
                }
            }
            // Requests that arrived since the last admission and are still being prepared join
            // this one, for a little while (once per arrival, not at every step).
            let arrived = self.wake.arrived();
            if arrived != self.arrivals_waited {
                self.arrivals_waited = arrived;
                self.wake.wait_for_preparation(Instant::now() + PREPARATION_GRACE);
            }
            let mut stop = false;
            loop {
                match self.rx.try_recv() {
                    Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                        stop = true;
                        break;
                    }
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                }
            }
            if stop {
                break;
            }
            self.shed_over_ceiling();
            self.reap_stopped();
            self.reap_embeds();
            // The governors' demands before admission: a deferred request must not start.
            self.apply_throttle();
            self.admit();
            if std::mem::take(&mut self.preempted) && !self.interactive_present() {
                tracing::debug!("a preemption admitted no interactive request: preemption held off for a while");
                self.preempt_held_until = Some(Instant::now() + PREEMPT_HOLD);
            }
            // Publish before decoding, so a caller that was just accepted sees itself counted.
            self.publish_status();
            if !self.running.is_empty() {
                let started = Instant::now();
                let (tokens, prefilled) = self.step();
                self.tune_threads(tokens, prefilled, started);
                self.pace(tokens, prefilled, started);
            }
            let mut embedded = false;
            if !self.embeds.is_empty() && !self.preempted {
                // (Not right after a preempted step: the interactive request comes first.)
                // One text between decode steps, paced like a prompt chunk.
                let started = Instant::now();
                embedded = self.embed_step();
                if embedded {
                    self.pace(0, true, started);
                }
            }
            // Only deferred work (background requests, an over-budget app's Embed jobs that
            // wait their turn): sleep until something changes, a waiting request's deadline
            // or the next such job's turn is due.
            let held_embeds = self.next_embed_turn();
            if !embedded
                && self.running.is_empty()
                && (self.embeds.is_empty() || held_embeds.is_some())
                && (self.scheduler.waiting().is_empty() || self.scheduler.only_deferred_waiting())
                && (!self.scheduler.waiting().is_empty() || held_embeds.is_some())
            {
                let mut until = Instant::now() + DEFERRED_RECHECK;
                if let Some(d) = self.scheduler.waiting().iter().filter_map(|w| w.deadline).min() {
                    until = until.min(d);
                }
                if let Some(t) = held_embeds {
                    until = until.min(t);
                }
                self.liveness.beat_until(until);
                self.wake.wait(seen, until);
            }
            self.retire();
            self.publish_status();
        }
        self.shutdown();
        tracing::debug!("engine thread stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { request, prepared, caller, cancel, events, reply } => {
                self.submit(&request, *prepared, caller, cancel, events, reply)
            }
            Command::ConnectionClosed(connection) => {
                let mut n = 0;
                let owned = |c: &Caller| c.connection == connection;
                for s in self.running.iter().filter(|s| owned(&s.caller)) {
                    s.cancel.cancel(CancelReason::Disconnected);
                    n += 1;
                }
                for w in self.scheduler.waiting().iter().filter(|w| owned(&w.caller)) {
                    w.cancel.cancel(CancelReason::Disconnected);
                    n += 1;
                }
                for job in self.embeds.iter().filter(|j| owned(&j.caller)) {
                    job.cancel.cancel(CancelReason::Disconnected);
                    n += 1;
                }
                if n > 0 {
                    tracing::info!(connection, requests = n, "caller disconnected: cancelling its requests");
                }
            }
            Command::Embed(job) => self.queue_embed(*job),
            Command::CloseSession(id) => {
                if let Some(seq) = self.scheduler.resident(id) {
                    self.scheduler.unpin(seq);
                    self.ctx.remove_sequence(seq);
                    tracing::debug!(session = id, seq, "closed session's KV dropped");
                }
            }
            Command::Shutdown => {}
        }
    }

    /// Queues a prepared request, if the queue bounds let it in.
    fn submit(
        &mut self,
        request: &GenerateRequest,
        prepared: super::prepare::Prepared,
        caller: Caller,
        cancel: CancelToken,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<Accepted, EngineError>>,
    ) {
        // (hearthd checked that a session is the caller's on this model; the preparer checked
        // the request against the model.)
        if let Err(e) = self.scheduler.check_admission(&caller.app, request.priority) {
            let _ = reply.send(Err(e));
            return;
        }
        let super::prepare::Prepared { prompt, images, image_encode, max_tokens, sampler, adapters, tool_format } =
            prepared;
        let id = self.next_id;
        self.next_id += 1;
        let accepted = Accepted { id, prompt_tokens: prompt.len() as u32 };
        let on_refusal = cancel.clone();
        tracing::debug!(id, app = %caller.app, priority = request.priority.as_str(), prompt_tokens = prompt.len(), max_tokens, "request queued");
        self.scheduler.push(Waiting {
            id,
            caller,
            priority: request.priority,
            deadline: request.deadline.map(|d| Instant::now() + d),
            prompt,
            max_tokens,
            sampler,
            adapters,
            session: request.session,
            speculative: request.speculative,
            images,
            image_encode,
            stop: super::stop::StopFilter::new(&request.stop),
            logprobs: request.logprobs,
            tool_format,
            cancel,
            events,
        });
        // Counted in the published queue before the submitter hears it was accepted, so a
        // caller that reads QueueDepth right after its Generate returned sees itself.
        self.publish_status();
        if reply.send(Ok(accepted)).is_err() {
            // The submitter is gone: nothing to serve; reaped before the next admission.
            on_refusal.cancel(CancelReason::Disconnected);
        }
    }

    /// Ends requests that were cancelled, lost their caller, or ran past their deadline.
    fn reap_stopped(&mut self) {
        let now = Instant::now();
        for s in &mut self.running {
            if s.finished.is_none()
                && let Some(reason) = s.stop_reason(now)
            {
                s.finish_cancelled(reason);
            }
        }
        let mut i = 0;
        while i < self.scheduler.waiting().len() {
            let w = &self.scheduler.waiting()[i];
            let Some(reason) = stop_reason(&w.cancel, &w.events, w.deadline, now) else {
                i += 1;
                continue;
            };
            let w = self.scheduler.remove_waiting(i);
            tracing::debug!(id = w.id, %reason, "waiting request ended");
            let outcome =
                unstarted_outcome(&w, &self.model_name, FinishReason::Cancelled, EngineError::Cancelled(reason));
            self.publish_status();
            let _ = w.events.send(Event::Finished(outcome));
        }
    }

    /// Whether interactive work runs or waits.
    pub(super) fn interactive_present(&self) -> bool {
        self.running.iter().any(|s| s.finished.is_none() && s.priority == Priority::Interactive)
            || self.scheduler.waiting().iter().any(|w| w.priority == Priority::Interactive)
    }

    /// Holds the abort switch for a decode that must not be aborted: one carrying interactive
    /// work, or any while preemption is held off.
    pub(super) fn hold_preemption(&mut self, interactive: bool) {
        if self.preempt_held_until.is_some_and(|t| Instant::now() >= t) {
            self.preempt_held_until = None;
        }
        if interactive {
            self.preempt.clear();
        }
        self.preempt.hold(interactive || self.preempt_held_until.is_some());
    }

    /// Starts waiting requests while the scheduler's best candidate fits, parking an idle
    /// session's KV when only pinned slots are left: one per loop turn (a park copies, seals
    /// and writes up to a whole context's KV), so decoding goes on between parks.
    fn admit(&mut self) {
        loop {
            if let Some((w, slot)) = self.scheduler.pop_next() {
                self.start(w, slot);
            } else if let Some(seq) = self.scheduler.slot_to_unpin() {
                if let Some(pin) = self.scheduler.unpin(seq) {
                    self.park(seq, pin);
                    break;
                }
            } else {
                break;
            }
        }
        // Kept prefixes pay off for one app talking in turns; once several requests run, the
        // slots are worth more cold (llama.cpp attends over every KV stream between the lowest
        // and highest one in a batch), so kept KV is dropped.
        if self.running.len() > 1 {
            for seq in self.scheduler.drain_warm() {
                self.ctx.remove_sequence(seq);
            }
        }
    }

    /// Frees the KV and slot of every finished sequence and sends its Finished event.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finished.is_none() {
                i += 1;
                continue;
            }
            let mut s = self.running.swap_remove(i);
            // A request that ended normally leaves its KV for its session's next turn, or for
            // the same app's next prompt; cancelled and failed ones free it at once.
            let ended_well = matches!(s.finished, Some((FinishReason::Stop | FinishReason::Length, _)));
            let keep = match s.session {
                Some(id) if ended_well && self.sessions.is_open(id) => {
                    Keep::Session(id, s.kv_tokens(), s.adapters.clone())
                }
                None if ended_well && self.prefix_cache => Keep::Prefix(s.kv_tokens(), s.adapters.clone()),
                _ => Keep::Nothing,
            };
            if matches!(keep, Keep::Nothing) {
                self.ctx.remove_sequence(s.seq);
            }
            let released = self.scheduler.release(&s.caller.app, s.priority, s.seq, s.kv_reserved, keep);
            for seq in released.dropped {
                self.ctx.remove_sequence(seq);
            }
            if let Some((from, to)) = released.moved {
                self.ctx.copy_sequence(from, to);
                self.ctx.remove_sequence(from);
            }
            let outcome = s.outcome(&self.model_name);
            tracing::debug!(
                id = s.id,
                reason = ?outcome.reason,
                tokens = outcome.token_ids.len(),
                "request finished"
            );
            // The queue without it is published first: a caller that reads QueueDepth right
            // after its result sees it gone.
            self.publish_status();
            let _ = s.events.send(Event::Finished(outcome));
        }
        // Keep admission order stable for the next step (swap_remove reorders).
        self.running.sort_by_key(|s| s.id);
    }

    fn publish_status(&self) {
        let used: u32 = self.running.iter().map(Sequence::kv_used).sum();
        self.kv.used.store(used, Ordering::Relaxed);
        self.kv.reserved.store(self.scheduler.kv_reserved(), Ordering::Relaxed);
        self.kv.cached.store(self.scheduler.cached_tokens(), Ordering::Relaxed);
        let mut by_priority = [0u32; 3];
        let priorities =
            self.running.iter().map(|s| s.priority).chain(self.scheduler.waiting().iter().map(|w| w.priority));
        for p in priorities {
            by_priority[Priority::ALL.iter().position(|&q| q == p).unwrap_or(0)] += 1;
        }
        let running = self.running.len() as u32;
        let waiting = self.scheduler.waiting().len() as u32;
        self.status.send_if_modified(|st| {
            let changed = st.running != running || st.waiting != waiting || st.by_priority != by_priority;
            st.running = running;
            st.waiting = waiting;
            st.by_priority = by_priority;
            changed
        });
    }

    /// Ends every request as Cancelled, refuses late submissions, and publishes an empty queue.
    fn shutdown(&mut self) {
        // Idle sessions' KV outlives this engine (unloaded, or restarted with a smaller cache).
        for (seq, pin) in self.scheduler.unpin_all() {
            self.park(seq, pin);
        }
        for s in &mut self.running {
            if s.finished.is_none() {
                s.finish_cancelled(CancelReason::Shutdown);
            }
        }
        self.cancel_embeds();
        self.retire();
        while !self.scheduler.waiting().is_empty() {
            let w = self.scheduler.remove_waiting(0);
            let outcome = unstarted_outcome(
                &w,
                &self.model_name,
                FinishReason::Cancelled,
                EngineError::Cancelled(CancelReason::Shutdown),
            );
            let _ = w.events.send(Event::Finished(outcome));
        }
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            if let Command::Submit { reply, .. } = cmd {
                let _ = reply.send(Err(EngineError::Cancelled(CancelReason::Shutdown)));
            }
        }
        self.publish_status();
    }
}
