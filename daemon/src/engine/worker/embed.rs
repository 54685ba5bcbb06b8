//! Embed jobs: scheduled like decoding, not run in one go. A job embeds one text per loop
//! iteration, between decode steps (one text is at most [`EMBED_TOKENS`] tokens, the size of
//! one prompt chunk), jobs of different apps take turns, the tokens are charged to the app's
//! fair share, and a job ends at once when its caller cancels or leaves. Embedding never
//! delays interactive work: it waits while an interactive request runs, and an interactive
//! arrival aborts a text in progress (the generation context's preemption flag is shared),
//! which is embedded again later. An app past its energy budget is slowed to one text every
//! [`OVER_BUDGET_WAIT`], behind everyone else's: slowed, not stopped, since a caller's D-Bus
//! timeout does not reach the engine and a job left waiting would hold its app's slots, and
//! not let run freely on an idle engine either, which would leave its budget unbounded.

use std::collections::VecDeque;
use std::sync::Arc;

use hearth_ffi::Context;
use tokio::sync::oneshot;

use super::super::scheduler::COST_PER_PROMPT;
use super::super::{Caller, CancelReason, CancelToken};
use super::Worker;
use crate::engine::EngineError;

/// Most tokens of one text to embed (the embedding context's size).
pub(super) const EMBED_TOKENS: u32 = 512;
/// Embed jobs one app may have queued or running at once.
const JOBS_PER_APP: usize = 2;
/// An over-budget app's Embed job embeds one text at most this often.
pub(super) const OVER_BUDGET_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One Embed call in progress.
pub(in super::super) struct EmbedJob {
    pub caller: Caller,
    pub texts: Vec<String>,
    pub cancel: CancelToken,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
    /// The vectors of the texts done so far, in order.
    pub out: Vec<Vec<f32>>,
    /// When it was queued or last embedded a text (an over-budget app's pace).
    last_turn: std::time::Instant,
}

impl EmbedJob {
    pub fn new(
        caller: Caller,
        texts: Vec<String>,
        cancel: CancelToken,
        reply: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
    ) -> Self {
        Self { caller, texts, cancel, reply, out: Vec::new(), last_turn: std::time::Instant::now() }
    }
}

impl std::fmt::Debug for EmbedJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbedJob").field("app", &self.caller.app).field("texts", &self.texts.len()).finish()
    }
}

/// The queue of Embed jobs, oldest first; the front job runs next.
pub(super) type EmbedQueue = VecDeque<EmbedJob>;

impl Worker {
    /// Queues `job`, or refuses it with Busy when the queue or the app's share of it is full.
    pub(super) fn queue_embed(&mut self, job: EmbedJob) {
        if let Some(e) = self.throttle.ceiling_refusal() {
            let _ = job.reply.send(Err(e));
            return;
        }
        let capacity = self.scheduler.limits().queue_capacity;
        let mine = self.embeds.iter().filter(|j| j.caller.app == job.caller.app).count();
        let (scope, waiting, limit) = if self.embeds.len() >= capacity {
            ("for the engine's embedding queue", self.embeds.len(), capacity)
        } else if mine >= JOBS_PER_APP {
            ("for this app's Embed calls", mine, JOBS_PER_APP)
        } else {
            self.embeds.push_back(job);
            return;
        };
        let _ = job.reply.send(Err(EngineError::Busy { scope: scope.into(), waiting, limit, retry_after_ms: 500 }));
    }

    /// Ends the jobs whose caller cancelled, left, or stopped waiting for the answer.
    pub(super) fn reap_embeds(&mut self) {
        let mut i = 0;
        while i < self.embeds.len() {
            let job = &self.embeds[i];
            let reason = job.cancel.reason().or_else(|| job.reply.is_closed().then_some(CancelReason::Disconnected));
            match reason {
                Some(reason) => {
                    let job = self.embeds.remove(i).expect("index checked");
                    tracing::debug!(texts_done = job.out.len(), "embed job ended early");
                    let _ = job.reply.send(Err(EngineError::Cancelled(reason)));
                }
                None => i += 1,
            }
        }
    }

    /// Whether an Embed job may run now: none while interactive work runs or waits.
    fn embed_may_run(&self) -> bool {
        !self.interactive_present()
    }

    /// The job to embed a text of next: the front one of an app within its energy budget, or
    /// with none, the front one of an over-budget app whose turn has come.
    fn next_embed(&self) -> Option<usize> {
        let within = self.embeds.iter().position(|j| !self.scheduler.app_deferred(&j.caller.app));
        within.or_else(|| self.embeds.iter().position(|j| j.last_turn.elapsed() >= OVER_BUDGET_WAIT))
    }

    /// When the next over-budget job's turn comes, if only such jobs wait.
    pub(super) fn next_embed_turn(&self) -> Option<std::time::Instant> {
        if self.embeds.iter().any(|j| !self.scheduler.app_deferred(&j.caller.app)) {
            return None;
        }
        self.embeds.iter().map(|j| j.last_turn + OVER_BUDGET_WAIT).min()
    }

    /// Embeds the next text of the next job; a job with texts left goes to the back, so the
    /// jobs (and apps) take turns. Returns whether a text was embedded.
    pub(super) fn embed_step(&mut self) -> bool {
        if self.embeds.is_empty() || !self.embed_may_run() {
            return false;
        }
        let Some(next) = self.next_embed() else { return false };
        let mut job = self.embeds.remove(next).expect("an index of the queue");
        job.last_turn = std::time::Instant::now();
        let i = job.out.len();
        let started = std::time::Instant::now();
        let embedded = self.embed_text(&job.texts[i]);
        // The text's time is its app's, aborted or not (an aborted one is done again).
        // (Embed has no priority: it is never background work.)
        self.compute.add(&job.caller.app, started.elapsed().as_micros() as u64, false);
        match embedded {
            Ok(Some((vector, tokens))) => {
                job.out.push(vector);
                self.scheduler.charge(&job.caller.app, tokens as u64 * COST_PER_PROMPT);
                if job.out.len() == job.texts.len() {
                    let _ = job.reply.send(Ok(std::mem::take(&mut job.out)));
                } else {
                    self.embeds.push_back(job);
                }
            }
            Ok(None) => {
                // Aborted for an interactive request (the handle throws the switch after its
                // Submit is queued, so the next intake admits it): this text again, after it.
                // A request that was refused is noticed at the next admission, which then
                // holds preemption off for a while.
                self.preempt.clear();
                self.preempted = true;
                self.embeds.push_front(job);
            }
            Err(EngineError::InvalidArgs(msg)) => {
                let _ = job.reply.send(Err(EngineError::InvalidArgs(format!("texts[{i}] {msg}"))));
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
        true
    }

    /// The embedding of one text and its token count; None when an interactive request
    /// aborted it.
    fn embed_text(&mut self, text: &str) -> Result<Option<(Vec<f32>, usize)>, EngineError> {
        if self.embedder.is_none() {
            let params = hearth_ffi::ContextParams {
                n_ctx: EMBED_TOKENS,
                n_batch: EMBED_TOKENS,
                n_seq_max: 1,
                // The pool is sized for the most threads the governors may give back.
                n_threads: self.threads.0,
                n_threads_batch: self.threads.0,
                flash_attn: Some(true),
                kv_unified: false,
                embeddings: true,
                kv_type: hearth_ffi::KvType::default(),
            };
            let ctx = Context::with_abort_switch(Arc::clone(&self.model), params, Arc::clone(&self.preempt))
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            tracing::info!(model = %self.model_name, tokens = EMBED_TOKENS, "embedding context created");
            self.embedder = Some(ctx);
        }
        let tokens = self.model.tokenize(text, true, false)?;
        if tokens.len() > EMBED_TOKENS as usize {
            return Err(EngineError::InvalidArgs(format!(
                "is {} tokens; embeddings take at most {EMBED_TOKENS}",
                tokens.len()
            )));
        }
        if tokens.is_empty() {
            return Err(EngineError::InvalidArgs("has no tokens".into()));
        }
        self.hold_preemption(false);
        let ctx = self.embedder.as_mut().expect("created above");
        let embedded = ctx.set_threads(self.threads.1, self.threads.1).and_then(|()| ctx.embed(&tokens));
        self.preempt.hold(false);
        match embedded {
            Ok(v) => Ok(Some((v, tokens.len()))),
            Err(hearth_ffi::Error::Aborted) => Ok(None),
            Err(e) => Err(EngineError::Internal(e.to_string())),
        }
    }

    /// At shutdown: every job ends with Cancelled.
    pub(super) fn cancel_embeds(&mut self) {
        self.end_embeds(&EngineError::Cancelled(CancelReason::Shutdown));
    }

    /// Every job ends with `error`; returns how many there were.
    pub(super) fn end_embeds(&mut self, error: &EngineError) -> usize {
        let n = self.embeds.len();
        for job in self.embeds.drain(..) {
            let _ = job.reply.send(Err(error.clone()));
        }
        n
    }
}
