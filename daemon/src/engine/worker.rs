//! The engine thread's loop: intake, admission, one batched decode step, retirement.
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

use hearth_dbus::FinishReason;
use hearth_ffi::{Batch, Context, Model, Sampler};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

mod embed;
mod kv;
mod throttle;

pub(super) use embed::EmbedJob;

use super::scheduler::{COST_PER_GENERATED, COST_PER_PROMPT, Keep, Limits, Scheduler};
use super::sequence::{Sequence, Waiting, stop_reason, unstarted_outcome};
use super::session::SessionStore;
use super::{
    Accepted, AdapterSet, Caller, CancelReason, CancelToken, Command, EngineSettings, EngineStatus, Event,
    GenerateRequest, KvGauges, Priority,
};
use crate::error::Error;

pub(super) struct Worker {
    ctx: Context,
    model: Arc<Model>,
    model_name: String,
    rx: mpsc::Receiver<Command>,
    status: watch::Sender<EngineStatus>,
    kv: Arc<KvGauges>,
    liveness: Arc<super::Liveness>,
    batch: Batch,
    /// Set by the handle when an interactive request arrives; aborts a decode step that
    /// holds only lower-priority work.
    preempt: Arc<std::sync::atomic::AtomicBool>,
    scheduler: Scheduler,
    running: Vec<Sequence>,
    n_ctx: u32,
    next_id: u64,
    prefix_cache: bool,
    /// Debug builds only: with HEARTH_DEBUG_STALL_ENGINE set, the first decode step hangs, so
    /// tests can watch the systemd watchdog ping stop.
    stall: bool,
    throttle: Arc<super::Throttle>,
    /// Configured compute threads, and the count in force.
    threads: (i32, i32),
    /// The context Embed runs in, made on first use, and the Embed jobs in progress.
    embedder: Option<Context>,
    embeds: embed::EmbedQueue,
    sessions: Arc<SessionStore>,
    /// The adapter set the context has now, and the one the last step served.
    adapters_set: Option<AdapterSet>,
    last_group: Option<AdapterSet>,
}

impl Worker {
    pub fn new(
        ctx: Context,
        model_name: String,
        rx: mpsc::Receiver<Command>,
        status: watch::Sender<EngineStatus>,
        kv: Arc<KvGauges>,
        liveness: Arc<super::Liveness>,
        settings: &EngineSettings,
    ) -> Self {
        let n_ctx = ctx.n_ctx_seq();
        let limits = Limits {
            shared_sequences: settings.max_sequences as usize,
            interactive_sequences: settings.interactive_sequences as usize,
            queue_capacity: settings.queue_capacity as usize,
            queue_per_app: settings.queue_per_app as usize,
        };
        Self {
            model: Arc::clone(ctx.model()),
            preempt: ctx.abort_flag(),
            ctx,
            model_name,
            rx,
            status,
            kv,
            liveness,
            batch: Batch::new(settings.batch_size as usize, 1),
            scheduler: Scheduler::new(limits),
            running: Vec::new(),
            n_ctx,
            next_id: 1,
            prefix_cache: settings.prefix_cache,
            stall: cfg!(debug_assertions) && std::env::var_os("HEARTH_DEBUG_STALL_ENGINE").is_some(),
            throttle: Arc::clone(&settings.throttle),
            threads: (settings.threads, settings.threads),
            embedder: None,
            embeds: embed::EmbedQueue::new(),
            sessions: Arc::clone(&settings.sessions),
            adapters_set: None,
            last_group: None,
        }
    }

    pub fn run(mut self) {
        tracing::debug!("engine thread running");
        loop {
            self.liveness.beat();
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
            self.reap_stopped();
            self.reap_embeds();
            // The governors' demands before admission: a deferred request must not start.
            self.apply_throttle();
            self.admit();
            // Publish before decoding, so a caller that was just accepted sees itself counted.
            self.publish_status();
            if !self.running.is_empty() {
                let started = Instant::now();
                let (tokens, prefilled) = self.step();
                self.pace(tokens, prefilled, started);
            }
            if !self.embeds.is_empty() {
                // One text between decode steps, paced like a prompt chunk.
                let started = Instant::now();
                self.embed_step();
                self.pace(0, true, started);
            } else if self.running.is_empty() && self.scheduler.only_deferred_waiting() {
                // Only deferred background work: look again shortly (commands wake us too).
                std::thread::sleep(Duration::from_millis(50));
            }
            self.retire();
            self.publish_status();
        }
        self.shutdown();
        tracing::debug!("engine thread stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { request, caller, cancel, events, reply } => {
                self.submit(&request, caller, cancel, events, reply)
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

    fn submit(
        &mut self,
        request: &GenerateRequest,
        caller: Caller,
        cancel: CancelToken,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<Accepted, Error>>,
    ) {
        let verdict = self.prepare(request).and_then(|prompt| {
            let adapters = self.adapter_set(request.adapters.as_ref())?;
            if let Some(id) = request.session {
                if !self.sessions.owns(id, &caller.app, &self.model_name) {
                    return Err(Error::NotAuthorized(format!("session {id} is not this app's session on this model")));
                }
            }
            let max_tokens = request.max_tokens.min(self.n_ctx - prompt.len() as u32);
            let grammar = request.structure.as_ref().and_then(|s| s.grammar());
            let sampler = Sampler::with_grammar(&self.model, request.sampling, grammar).map_err(|e| match e {
                hearth_ffi::Error::Grammar => {
                    Error::InvalidArgs("llama.cpp refused the grammar after hearthd's own checks passed it".into())
                }
                hearth_ffi::Error::InteriorNul { what } => {
                    Error::InvalidArgs(format!("{what} contains a NUL character"))
                }
                e => Error::Internal(e.to_string()),
            })?;
            self.scheduler.check_admission(&caller.app, request.priority)?;
            Ok((prompt, max_tokens, sampler, adapters))
        });
        let (prompt, max_tokens, sampler, adapters) = match verdict {
            Ok(v) => v,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
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

    /// Checks the request against the model and renders + tokenizes its prompt.
    fn prepare(&self, request: &GenerateRequest) -> Result<Vec<hearth_ffi::Token>, Error> {
        if request.max_tokens > self.n_ctx {
            return Err(Error::InvalidArgs(format!(
                "max_tokens {} exceeds the context length {} of model {:?}",
                request.max_tokens, self.n_ctx, self.model_name
            )));
        }
        let messages = match &request.structure {
            Some(s) => s.messages(&request.messages),
            None => request.messages.clone(),
        };
        let mut text = self.model.apply_chat_template(&messages, true).map_err(|e| match e {
            hearth_ffi::Error::InteriorNul { what } => Error::InvalidArgs(format!("{what} contains a NUL character")),
            e => Error::Internal(e.to_string()),
        })?;
        if let Some(prefix) = &request.assistant_prefix {
            text.push_str(prefix);
        }
        let prompt = self.model.tokenize(&text, true, true)?;
        // Room for the prompt and at least one generated token.
        if prompt.len() >= self.n_ctx as usize {
            return Err(Error::ContextLengthExceeded { prompt: prompt.len(), context: self.n_ctx });
        }
        Ok(prompt)
    }

    /// Ends requests that were cancelled, lost their caller, or ran past their deadline.
    fn reap_stopped(&mut self) {
        let now = Instant::now();
        for s in &mut self.running {
            if s.finished.is_none() {
                if let Some(reason) = s.stop_reason(now) {
                    s.finish_cancelled(reason);
                }
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
            let outcome = unstarted_outcome(&w, &self.model_name, FinishReason::Cancelled, Error::Cancelled(reason));
            let _ = w.events.send(Event::Finished(outcome));
        }
    }

    /// Starts waiting requests while the scheduler's best candidate fits, parking idle
    /// sessions' KV when only their pinned slots are left.
    fn admit(&mut self) {
        loop {
            if let Some((w, slot)) = self.scheduler.pop_next() {
                self.start(w, slot);
            } else if let Some(seq) = self.scheduler.slot_to_unpin() {
                if let Some(pin) = self.scheduler.unpin(seq) {
                    self.park(seq, pin);
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

    /// Builds one batch from the running sequences, decodes it and samples. Returns the
    /// number of tokens generated and whether the batch carried a prompt chunk.
    fn step(&mut self) -> (usize, bool) {
        if self.stall {
            tracing::warn!("HEARTH_DEBUG_STALL_ENGINE: the engine hangs here on purpose");
            loop {
                std::thread::park();
            }
        }
        self.batch.clear();
        // While a request prefills, lower-priority sequences pause (no decode step): the
        // newcomer's prompt and first token come first.
        let prefill_priority =
            self.running.iter().filter(|s| s.finished.is_none() && s.in_prefill()).map(|s| s.priority).max();
        let group = self.step_group(prefill_priority);
        let mut push_failed = None;
        // What this step takes from each sequence, to put back if the step is preempted.
        let mut taken: Vec<(usize, hearth_ffi::Token)> = Vec::new();
        let mut prefill_taken: Option<(usize, usize)> = None;
        for (i, s) in self.running.iter_mut().enumerate().filter(|(_, s)| s.finished.is_none()) {
            s.logits_index = None;
            if prefill_priority.is_some_and(|p| p > s.priority) || group.as_ref().is_some_and(|g| *g != s.adapters) {
                continue;
            }
            if let Some(token) = s.next_token {
                match self.batch.push(token, s.pos, &[s.seq], true) {
                    Ok(j) => {
                        s.next_token = None;
                        s.logits_index = Some(j);
                        s.pos += 1;
                        taken.push((i, token));
                    }
                    Err(e) => push_failed = Some(e),
                }
            }
        }
        // One prompt chunk per step: the highest-priority, oldest prefilling sequence's. Two
        // prompts in one batch change llama.cpp's numerics (tested in hearth-ffi's
        // batch_exactness), and batching must never change a request's output.
        let in_group = |s: &Sequence| group.as_ref().is_none_or(|g| *g == s.adapters);
        let next_prefill = (0..self.running.len())
            .filter(|&i| {
                self.running[i].finished.is_none() && self.running[i].in_prefill() && in_group(&self.running[i])
            })
            .min_by_key(|&i| (std::cmp::Reverse(self.running[i].priority), self.running[i].id));
        if let Some(i) = next_prefill {
            let s = &mut self.running[i];
            let n = (s.prompt.len() - s.prefilled).min(self.batch.remaining());
            for k in s.prefilled..s.prefilled + n {
                let last = k + 1 == s.prompt.len();
                match self.batch.push(s.prompt[k], k as i32, &[s.seq], last) {
                    Ok(i) if last => s.logits_index = Some(i),
                    Ok(_) => {}
                    Err(e) => push_failed = Some(e),
                }
            }
            s.prefilled += n;
            prefill_taken = Some((i, n));
        }
        // The sequences this step feeds: only they may be failed by what goes wrong in it
        // (a paused or waiting prefill did nothing).
        let members: Vec<usize> = taken.iter().map(|(i, _)| *i).chain(prefill_taken.map(|(i, _)| i)).collect();
        if let Some(e) = push_failed {
            // Cannot happen with the capacities checked at start; fail loudly, not silently.
            self.undo_step(&taken, prefill_taken);
            self.fail(&members, &Error::Internal(format!("batch construction: {e}")));
            return (0, false);
        }
        if let Some(g) = group.as_ref().filter(|g| self.adapters_set.as_ref() != Some(*g)) {
            if let Err(e) = self.ctx.set_lora_scales(&g.scales()) {
                self.undo_step(&taken, prefill_taken);
                self.fail(&members, &Error::Internal(e.to_string()));
                return (0, false);
            }
            self.adapters_set = Some(g.clone());
        }
        self.last_group = group;
        // A pending preemption may abort this step only if it holds no interactive work.
        if self
            .running
            .iter()
            .any(|s| s.priority == Priority::Interactive && (s.logits_index.is_some() || s.in_prefill()))
        {
            self.preempt.store(false, Ordering::Release);
        }
        match self.ctx.decode(&self.batch) {
            Ok(()) => {}
            Err(hearth_ffi::Error::Aborted) => {
                // Put the work back and go admit the interactive request first. Nothing was
                // sampled, so nothing is lost.
                self.preempt.store(false, Ordering::Release);
                self.undo_step(&taken, prefill_taken);
                tracing::debug!(tokens = self.batch.len(), "decode step preempted by an interactive request");
                return (0, false);
            }
            Err(e) if members.len() > 1 => {
                // Which sequence the step failed for is not known: each goes again alone,
                // and only one whose own step fails ends with an error.
                tracing::warn!(error = %e, sequences = members.len(), "decode failed: retrying its sequences one by one");
                self.undo_step(&taken, prefill_taken);
                return self.step_alone(&members);
            }
            Err(e) => {
                tracing::error!(error = %e, tokens = self.batch.len(), "decode failed");
                self.undo_step(&taken, prefill_taken);
                self.fail(&members, &Error::Internal(e.to_string()));
                return (0, false);
            }
        }
        if let Some((i, n)) = prefill_taken {
            let app = self.running[i].caller.app.clone();
            self.scheduler.charge(&app, n as u64 * COST_PER_PROMPT);
        }
        (self.sample_step(), prefill_taken.is_some())
    }

    /// Samples every sequence the last decode computed logits for; returns how many tokens.
    fn sample_step(&mut self) -> usize {
        let mut generated = 0;
        for s in self.running.iter_mut() {
            let Some(i) = s.logits_index.take() else { continue };
            match s.sampler.sample(&mut self.ctx, i) {
                Ok(token) => {
                    s.accept(&self.model, token);
                    self.scheduler.charge(&s.caller.app, COST_PER_GENERATED);
                    generated += 1;
                }
                Err(hearth_ffi::Error::GrammarDeadEnd) => {
                    // This sequence's grammar allows nothing here; the others go on.
                    s.finished = Some((
                        FinishReason::Error,
                        Some(Error::InvalidArgs(
                            "the grammar allows no token this model can produce here; generation stopped".into(),
                        )),
                    ))
                }
                Err(e) => s.finished = Some((FinishReason::Error, Some(Error::Internal(e.to_string())))),
            }
        }
        generated
    }

    /// Takes back what a step that did not complete took from its sequences, and brings
    /// their KV back to match: llama.cpp removes the KV of the micro-batch it failed or was
    /// aborted in, but keeps that of the micro-batches before it (a batch of several
    /// sequences is split into several), so each sequence is cut back to the positions it
    /// had committed before the step. Without the cut, the next step would put tokens at
    /// positions the KV already holds and llama.cpp would refuse the whole batch.
    fn undo_step(&mut self, taken: &[(usize, hearth_ffi::Token)], prefill: Option<(usize, usize)>) {
        for &(i, token) in taken {
            let s = &mut self.running[i];
            s.next_token = Some(token);
            s.pos -= 1;
            s.logits_index = None;
        }
        if let Some((i, n)) = prefill {
            self.running[i].prefilled -= n;
            self.running[i].logits_index = None;
        }
        for i in taken.iter().map(|(i, _)| *i).chain(prefill.map(|(i, _)| i)) {
            let s = &mut self.running[i];
            let committed = s.kv_used() as hearth_ffi::Pos;
            if self.ctx.sequence_max_pos(s.seq) >= committed && !self.ctx.truncate_sequence(s.seq, committed) {
                s.finished = Some((FinishReason::Error, Some(Error::Internal("cannot roll back its KV cache".into()))));
            }
        }
    }

    /// After a failed step of several sequences: decodes each of `members` in a step of its
    /// own (its next token, or its prompt chunk), so that only a sequence whose own step
    /// fails is failed. Stops at a preemption, putting the rest back untouched.
    fn step_alone(&mut self, members: &[usize]) -> (usize, bool) {
        let (mut generated, mut prefilled) = (0, false);
        for &i in members {
            if self.running[i].finished.is_some() {
                continue;
            }
            self.batch.clear();
            let s = &mut self.running[i];
            let (mut taken, mut chunk) = (Vec::new(), None);
            if let Some(token) = s.next_token {
                if let Ok(j) = self.batch.push(token, s.pos, &[s.seq], true) {
                    s.next_token = None;
                    s.logits_index = Some(j);
                    s.pos += 1;
                    taken.push((i, token));
                }
            } else if s.in_prefill() {
                let n = (s.prompt.len() - s.prefilled).min(self.batch.remaining());
                for k in s.prefilled..s.prefilled + n {
                    let last = k + 1 == s.prompt.len();
                    if let Ok(j) = self.batch.push(s.prompt[k], k as i32, &[s.seq], last) {
                        if last {
                            s.logits_index = Some(j);
                        }
                    }
                }
                s.prefilled += n;
                chunk = Some((i, n));
            }
            match self.ctx.decode(&self.batch) {
                Ok(()) => {
                    if let Some((i, n)) = chunk {
                        let app = self.running[i].caller.app.clone();
                        self.scheduler.charge(&app, n as u64 * COST_PER_PROMPT);
                        prefilled = true;
                    }
                    generated += self.sample_step();
                }
                Err(hearth_ffi::Error::Aborted) => {
                    self.preempt.store(false, Ordering::Release);
                    self.undo_step(&taken, chunk);
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "decode of one sequence failed");
                    self.undo_step(&taken, chunk);
                    self.fail(&[i], &Error::Internal(e.to_string()));
                }
            }
        }
        (generated, prefilled)
    }

    fn fail(&mut self, members: &[usize], error: &Error) {
        for &i in members {
            let s = &mut self.running[i];
            if s.finished.is_none() {
                s.finished = Some((FinishReason::Error, Some(error.clone())));
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
                Some(id) if ended_well && self.sessions.owns(id, &s.caller.app, &self.model_name) => {
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
                reason = outcome.reason.as_str(),
                tokens = outcome.token_ids.len(),
                "request finished"
            );
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
                Error::Cancelled(CancelReason::Shutdown),
            );
            let _ = w.events.send(Event::Finished(outcome));
        }
        self.rx.close();
        while let Ok(cmd) = self.rx.try_recv() {
            if let Command::Submit { reply, .. } = cmd {
                let _ = reply.send(Err(Error::Cancelled(CancelReason::Shutdown)));
            }
        }
        self.publish_status();
    }
}
