//! The engine thread's loop: intake, admission, one batched decode step, retirement.
//!
//! Every running sequence contributes to each step: one token if it is decoding, or a chunk
//! of its prompt if it is still prefilling, so a new request joins between steps and a long
//! prompt never holds the others for more than one batch.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use hearth_dbus::FinishReason;
use hearth_ffi::{Batch, Context, Model, Sampler, SeqId};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use super::sequence::{Sequence, Waiting, unstarted_outcome};
use super::{Accepted, CancelReason, CancelToken, Command, EngineStatus, Event, GenerateRequest};
use crate::config::Config;
use crate::error::Error;

pub(super) struct Worker {
    ctx: Context,
    model: Arc<Model>,
    model_name: String,
    installed: BTreeSet<String>,
    rx: mpsc::Receiver<Command>,
    status: watch::Sender<EngineStatus>,
    batch: Batch,
    free_seqs: Vec<SeqId>,
    waiting: VecDeque<Waiting>,
    running: Vec<Sequence>,
    queue_capacity: usize,
    n_ctx: u32,
    kv_reserved: u32,
    next_id: u64,
}

impl Worker {
    pub fn new(
        ctx: Context,
        model_name: String,
        installed: BTreeSet<String>,
        rx: mpsc::Receiver<Command>,
        status: watch::Sender<EngineStatus>,
        config: &Config,
    ) -> Self {
        let n_seq = config.engine.max_sequences as usize;
        let batch = Batch::new(config.engine.batch_size as usize, 1);
        let n_ctx = ctx.n_ctx();
        Self {
            model: Arc::clone(ctx.model()),
            ctx,
            model_name,
            installed,
            rx,
            status,
            batch,
            // Popped from the end: lowest ids first.
            free_seqs: (0..n_seq as SeqId).rev().collect(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            queue_capacity: config.limits.queue_capacity as usize,
            n_ctx,
            kv_reserved: 0,
            next_id: 1,
        }
    }

    pub fn run(mut self) {
        tracing::debug!("engine thread running");
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match self.rx.blocking_recv() {
                    Some(Command::Submit { request, cancel, events, reply }) => self.submit(&request, cancel, events, reply),
                    Some(Command::Shutdown) | None => break,
                }
            }
            let mut stop = false;
            loop {
                match self.rx.try_recv() {
                    Ok(Command::Submit { request, cancel, events, reply }) => self.submit(&request, cancel, events, reply),
                    Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                        stop = true;
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            if stop {
                break;
            }
            self.reap_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.retire();
            self.publish_status();
        }
        self.shutdown();
        tracing::debug!("engine thread stopped");
    }

    fn submit(
        &mut self,
        request: &GenerateRequest,
        cancel: CancelToken,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<Accepted, Error>>,
    ) {
        let verdict = self.prepare(request).and_then(|prompt| {
            let need = prompt.len() as u32 + request.max_tokens.min(self.n_ctx - prompt.len() as u32);
            let starts_now = self.waiting.is_empty() && !self.free_seqs.is_empty() && self.kv_reserved + need <= self.n_ctx;
            if !starts_now && self.waiting.len() >= self.queue_capacity {
                return Err(Error::Busy { waiting: self.waiting.len(), limit: self.queue_capacity, retry_after_ms: self.retry_hint_ms() });
            }
            Ok(prompt)
        });
        let prompt = match verdict {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let max_tokens = request.max_tokens.min(self.n_ctx - prompt.len() as u32);
        let accepted = Accepted { id, prompt_tokens: prompt.len() as u32 };
        if reply.send(Ok(accepted)).is_err() {
            return; // the submitter is gone: nothing to serve
        }
        tracing::debug!(id, prompt_tokens = prompt.len(), max_tokens, "request queued");
        self.waiting.push_back(Waiting { id, prompt, max_tokens, sampler: Sampler::new(request.sampling), cancel, events });
    }

    /// Checks the request against the model and renders + tokenizes its prompt.
    fn prepare(&self, request: &GenerateRequest) -> Result<Vec<hearth_ffi::Token>, Error> {
        if let Some(name) = &request.model {
            if name != &self.model_name {
                return Err(if self.installed.contains(name) {
                    Error::ModelUnavailable {
                        name: name.clone(),
                        reason: format!("hearthd serves only its default model {:?} for now", self.model_name),
                    }
                } else {
                    Error::ModelNotFound(name.clone())
                });
            }
        }
        if request.max_tokens > self.n_ctx {
            return Err(Error::InvalidArgs(format!(
                "max_tokens {} exceeds the context length {} of model {:?}",
                request.max_tokens, self.n_ctx, self.model_name
            )));
        }
        let text = self.model.apply_chat_template(&request.messages, true).map_err(|e| match e {
            hearth_ffi::Error::InteriorNul { what } => Error::InvalidArgs(format!("{what} contains a NUL character")),
            e => Error::Internal(e.to_string()),
        })?;
        let prompt = self.model.tokenize(&text, true, true)?;
        if prompt.len() >= self.n_ctx as usize {
            return Err(Error::ContextLengthExceeded { prompt: prompt.len(), context: self.n_ctx });
        }
        Ok(prompt)
    }

    /// A rough wait until a slot frees: the queue ahead times a typical request.
    fn retry_hint_ms(&self) -> u64 {
        250 * (1 + self.waiting.len() as u64 / self.free_seqs.len().max(1) as u64)
    }

    fn reap_cancelled(&mut self) {
        for s in &mut self.running {
            if s.finished.is_none() {
                if let Some(reason) = s.cancel.reason() {
                    s.finish_cancelled(reason);
                } else if s.events.is_closed() {
                    s.finish_cancelled(CancelReason::Disconnected);
                }
            }
        }
        let model_name = &self.model_name;
        self.waiting.retain(|w| {
            let reason = w.cancel.reason().or_else(|| w.events.is_closed().then_some(CancelReason::Disconnected));
            match reason {
                Some(reason) => {
                    tracing::debug!(id = w.id, %reason, "waiting request cancelled");
                    let outcome = unstarted_outcome(w, model_name, FinishReason::Cancelled, Error::Cancelled(reason));
                    let _ = w.events.send(Event::Finished(outcome));
                    false
                }
                None => true,
            }
        });
    }

    /// Moves waiting requests into free sequences while their KV need fits, in order.
    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            let need = front.kv_need();
            if self.free_seqs.is_empty() || self.kv_reserved + need > self.n_ctx {
                break;
            }
            let Some(w) = self.waiting.pop_front() else { break };
            let Some(seq) = self.free_seqs.pop() else { break };
            self.kv_reserved += need;
            tracing::debug!(id = w.id, seq, "request started");
            self.running.push(Sequence::start(w, seq));
        }
    }

    /// Builds one batch from all running sequences, decodes it and samples.
    fn step(&mut self) {
        self.batch.clear();
        let mut push_failed = None;
        for s in self.running.iter_mut().filter(|s| s.finished.is_none()) {
            s.logits_index = None;
            if let Some(token) = s.next_token.take() {
                match self.batch.push(token, s.pos, &[s.seq], true) {
                    Ok(i) => {
                        s.logits_index = Some(i);
                        s.pos += 1;
                    }
                    Err(e) => push_failed = Some(e),
                }
            }
        }
        for s in self.running.iter_mut().filter(|s| s.finished.is_none() && s.in_prefill()) {
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
        }
        if let Some(e) = push_failed {
            // Cannot happen with the capacities above; fail loudly rather than decode garbage.
            self.fail_batch(&Error::Internal(format!("batch construction: {e}")));
            return;
        }
        if let Err(e) = self.ctx.decode(&self.batch) {
            tracing::error!(error = %e, tokens = self.batch.len(), "decode failed");
            self.fail_batch(&Error::Internal(e.to_string()));
            return;
        }
        for s in self.running.iter_mut() {
            let Some(i) = s.logits_index.take() else { continue };
            match s.sampler.sample(&mut self.ctx, i) {
                Ok(token) => s.accept(&self.model, token),
                Err(e) => s.finished = Some((FinishReason::Error, Some(Error::Internal(e.to_string())))),
            }
        }
    }

    fn fail_batch(&mut self, error: &Error) {
        for s in self.running.iter_mut().filter(|s| s.finished.is_none()) {
            s.finished = Some((FinishReason::Error, Some(error.clone())));
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
            self.ctx.remove_sequence(s.seq);
            self.free_seqs.push(s.seq);
            self.kv_reserved -= s.kv_reserved;
            let outcome = s.outcome(&self.model_name);
            tracing::debug!(id = s.id, reason = outcome.reason.as_str(), tokens = outcome.token_ids.len(), "request finished");
            let _ = s.events.send(Event::Finished(outcome));
        }
        // Keep admission order stable for the next step (swap_remove reorders).
        self.running.sort_by_key(|s| s.id);
    }

    fn publish_status(&self) {
        let running = self.running.len() as u32;
        let waiting = self.waiting.len() as u32;
        self.status.send_if_modified(|st| {
            let changed = st.running != running || st.waiting != waiting;
            st.running = running;
            st.waiting = waiting;
            changed
        });
    }

    /// Ends every request as Cancelled, refuses late submissions, and publishes an empty queue.
    fn shutdown(&mut self) {
        for s in &mut self.running {
            if s.finished.is_none() {
                s.finish_cancelled(CancelReason::Shutdown);
            }
        }
        self.retire();
        for w in self.waiting.drain(..) {
            let outcome = unstarted_outcome(&w, &self.model_name, FinishReason::Cancelled, Error::Cancelled(CancelReason::Shutdown));
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
