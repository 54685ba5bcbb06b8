//! The state of one generation inside the engine thread.

use std::time::{Duration, Instant};

use super::FinishReason;
use hearth_ffi::{Detokenizer, Model, Pos, Sampler, SeqId, Token};
use tokio::sync::mpsc;

use super::EngineError;
use super::image::ImageSpan;
use super::speculate::Drafter;
use super::stop::{Released, StopFilter};
use super::{AdapterSet, Caller, CancelReason, CancelToken, Event, Outcome, Priority};
use crate::structured::ToolFormat;

/// A request accepted by the engine and waiting for a sequence slot.
#[derive(Debug)]
pub(super) struct Waiting {
    pub id: u64,
    pub caller: Caller,
    pub priority: Priority,
    /// When the request is cancelled unless finished.
    pub deadline: Option<Instant>,
    pub prompt: Vec<Token>,
    pub max_tokens: u32,
    pub sampler: Sampler,
    pub adapters: AdapterSet,
    /// The session whose turn this is.
    pub session: Option<u64>,
    /// Speculative decoding (prompt lookup) on.
    pub speculative: bool,
    /// Where its images' embedding rows stand in `prompt`, and what encoding them took.
    pub images: Vec<ImageSpan>,
    pub image_encode: Duration,
    pub stop: StopFilter,
    /// Some(n): log-probabilities with the n likeliest alternatives.
    pub logprobs: Option<u8>,
    /// How its tools were shown.
    pub tool_format: ToolFormat,
    pub cancel: CancelToken,
    pub events: mpsc::UnboundedSender<Event>,
}

impl Waiting {
    /// KV cells this request may need at most.
    pub fn kv_need(&self) -> u32 {
        self.prompt.len() as u32 + self.max_tokens
    }
}

/// A request that owns a sequence id (and its KV cells) and is being prefilled or decoded.
#[derive(Debug)]
pub(super) struct Sequence {
    pub id: u64,
    pub caller: Caller,
    pub priority: Priority,
    pub deadline: Option<Instant>,
    pub seq: SeqId,
    pub prompt: Vec<Token>,
    /// Where its images' embedding rows stand in `prompt`, and what encoding them took.
    pub images: Vec<ImageSpan>,
    pub image_encode: Duration,
    /// Prompt tokens already in the KV cache.
    pub prefilled: usize,
    /// Prompt tokens that were already in the slot's KV (prefix reuse).
    pub cached: usize,
    /// The token to feed next (the last sampled one), once prefill is done.
    pub next_token: Option<Token>,
    /// Position of `next_token`.
    pub pos: Pos,
    /// Index in the current batch whose logits belong to this sequence, if any (its next
    /// token's; its draft's follow at the next indices).
    pub logits_index: Option<i32>,
    /// Its drafter, with speculative decoding on, and the draft in the current batch.
    pub drafter: Option<Drafter>,
    pub draft: Vec<Token>,
    pub max_tokens: u32,
    pub kv_reserved: u32,
    pub sampler: Sampler,
    pub adapters: AdapterSet,
    pub session: Option<u64>,
    pub detok: Detokenizer,
    pub generated: Vec<Token>,
    pub text: String,
    /// Holds back text that may begin a stop sequence.
    pub stop: StopFilter,
    /// Some(n): log-probabilities with the n likeliest alternatives, one per generated token.
    pub want_logprobs: Option<u8>,
    pub logprobs: Vec<super::TokenLogprob>,
    pub tool_format: ToolFormat,
    /// Compute time attributed to it so far (its share of each step), microseconds.
    pub compute_us: u64,
    pub cancel: CancelToken,
    pub events: mpsc::UnboundedSender<Event>,
    pub started: Instant,
    pub first_token_at: Option<Instant>,
    pub last_token_at: Option<Instant>,
    /// Set once the sequence is done; it is retired after the step.
    pub finished: Option<(FinishReason, Option<EngineError>)>,
}

impl Sequence {
    /// Starts `w` in slot `seq`, whose KV already holds the first `reuse` prompt tokens.
    pub fn start(w: Waiting, seq: SeqId, reuse: usize) -> Self {
        let kv_reserved = w.kv_need();
        Self {
            id: w.id,
            caller: w.caller,
            priority: w.priority,
            deadline: w.deadline,
            seq,
            pos: w.prompt.len() as Pos,
            prompt: w.prompt,
            images: w.images,
            image_encode: w.image_encode,
            prefilled: reuse,
            cached: reuse,
            next_token: None,
            logits_index: None,
            // Not under adapters: ggml computes their F32 weights with one kernel for a
            // one-row micro-batch and another for more rows, which round differently, so a
            // verified draft's logits would not be a one-token step's to the bit.
            drafter: (w.speculative && w.adapters.is_base()).then(Drafter::default),
            draft: Vec::new(),
            max_tokens: w.max_tokens,
            kv_reserved,
            sampler: w.sampler,
            adapters: w.adapters,
            session: w.session,
            detok: Detokenizer::new(),
            generated: Vec::new(),
            text: String::new(),
            stop: w.stop,
            want_logprobs: w.logprobs,
            logprobs: Vec::new(),
            tool_format: w.tool_format,
            compute_us: w.image_encode.as_micros() as u64,
            cancel: w.cancel,
            events: w.events,
            started: Instant::now(),
            first_token_at: None,
            last_token_at: None,
            finished: None,
        }
    }

    /// Tokens it may still generate.
    pub fn remaining(&self) -> usize {
        (self.max_tokens as usize).saturating_sub(self.generated.len())
    }

    pub fn in_prefill(&self) -> bool {
        self.prefilled < self.prompt.len()
    }

    /// The image whose rows the next prompt position is in, if it is one's.
    pub fn image_next(&self) -> Option<&ImageSpan> {
        self.images.iter().find(|i| i.start <= self.prefilled && self.prefilled < i.end())
    }

    /// Prompt tokens from the next position to the next image (or the prompt's end); none
    /// while the next position is an image's.
    pub fn text_run(&self) -> usize {
        if self.image_next().is_some() {
            return 0;
        }
        let end = self.images.iter().map(|i| i.start).filter(|&s| s >= self.prefilled).min();
        end.unwrap_or(self.prompt.len()).saturating_sub(self.prefilled)
    }

    /// The tokens its KV holds, in position order: the prompt and the generated tokens that
    /// were fed back (the last sampled one never is).
    pub fn kv_tokens(&self) -> Vec<hearth_ffi::Token> {
        self.prompt.iter().chain(&self.generated).take(self.kv_used() as usize).copied().collect()
    }

    /// Tokens this sequence holds in the KV cache.
    pub fn kv_used(&self) -> u32 {
        if self.in_prefill() { self.prefilled as u32 } else { self.pos as u32 }
    }

    /// Why it must stop now, if it must (cancelled, caller gone, deadline passed).
    pub fn stop_reason(&self, now: Instant) -> Option<CancelReason> {
        stop_reason(&self.cancel, &self.events, self.deadline, now)
    }

    /// Takes a sampled token (with the logits of its step, when it reports
    /// log-probabilities): streams it, or ends the sequence. A stop sequence ends it too,
    /// and text that may begin one is streamed only once it cannot.
    pub fn accept(&mut self, model: &Model, token: Token, logits: Option<&[f32]>) {
        let now = Instant::now();
        self.first_token_at.get_or_insert(now);
        if model.is_eog(token) {
            self.finished = Some((FinishReason::Stop, None));
            return;
        }
        self.last_token_at = Some(now);
        let piece = self.detok.push(&model.token_to_piece(token, false));
        self.text.push_str(&piece);
        let index = self.generated.len() as u32;
        self.generated.push(token);
        if let (Some(n), Some(logits)) = (self.want_logprobs, logits) {
            self.logprobs.push(token_logprob(model, logits, token, n));
        }
        let mut out = Vec::new();
        let stopped = self.stop.push(&mut self.text, index, token, piece, &mut out);
        let full = self.generated.len() >= self.max_tokens as usize;
        if full {
            self.stop.flush(&mut out);
        }
        if !self.stream(out) {
            self.finish_cancelled(CancelReason::Disconnected);
        } else if stopped {
            self.finished = Some((FinishReason::Stop, None));
        } else if full {
            self.finished = Some((FinishReason::Length, None));
        } else {
            self.next_token = Some(token);
        }
    }

    /// Sends released tokens' events; false when the caller is gone.
    fn stream(&self, released: Vec<Released>) -> bool {
        released
            .into_iter()
            .all(|Released { index, id, text }| self.events.send(Event::Token { index, id, text }).is_ok())
    }

    pub fn finish_cancelled(&mut self, reason: CancelReason) {
        self.finished = Some((FinishReason::Cancelled, Some(EngineError::Cancelled(reason))));
    }

    /// The final event. An incomplete UTF-8 sequence left at the very end can never become a
    /// character and is dropped, so the streamed pieces always add up to `text`.
    pub fn outcome(&mut self, model_name: &str) -> Outcome {
        // What a stop sequence held back goes out before the end, if it was not one.
        let mut held = Vec::new();
        self.stop.flush(&mut held);
        self.stream(held);
        let (reason, error) = self
            .finished
            .clone()
            .unwrap_or((FinishReason::Error, Some(EngineError::Internal("sequence retired unfinished".into()))));
        let first = self.first_token_at.unwrap_or_else(Instant::now);
        Outcome {
            reason,
            text: std::mem::take(&mut self.text),
            token_ids: std::mem::take(&mut self.generated),
            prompt_tokens: self.prompt.len() as u32,
            cached_tokens: self.cached as u32,
            draft_tokens: self.drafter.as_ref().map_or(0, |d| d.drafted),
            draft_accepted: self.drafter.as_ref().map_or(0, |d| d.accepted),
            image_tokens: self.images.iter().map(|i| i.n_tokens as u32).sum(),
            image_encode: self.image_encode,
            model: model_name.to_owned(),
            prefill: first.saturating_duration_since(self.started),
            decode: self.last_token_at.map_or(Duration::ZERO, |l| l.saturating_duration_since(first)),
            logprobs: std::mem::take(&mut self.logprobs),
            tool_format: self.tool_format,
            compute: Duration::from_micros(self.compute_us),
            error,
        }
    }
}

/// `token`'s log-probability and the `n` likeliest tokens of its step, with their texts.
fn token_logprob(model: &Model, logits: &[f32], token: Token, n: u8) -> super::TokenLogprob {
    let text = |t: Token| String::from_utf8_lossy(&model.token_to_piece(t, false)).into_owned();
    let l = hearth_ffi::logprobs(logits, token, n.into());
    let (logprob, top) = l.map_or((f32::NEG_INFINITY, Vec::new()), |l| (l.logprob, l.top));
    super::TokenLogprob {
        id: token,
        text: text(token),
        logprob,
        top: top.into_iter().map(|(t, p)| (t, text(t), p)).collect(),
    }
}

/// Why a request must stop now, if it must.
pub(super) fn stop_reason(
    cancel: &CancelToken,
    events: &mpsc::UnboundedSender<Event>,
    deadline: Option<Instant>,
    now: Instant,
) -> Option<CancelReason> {
    cancel
        .reason()
        .or_else(|| events.is_closed().then_some(CancelReason::Disconnected))
        .or_else(|| deadline.is_some_and(|d| now >= d).then_some(CancelReason::Deadline))
}

/// The outcome of a request that never got a sequence.
pub(super) fn unstarted_outcome(w: &Waiting, model_name: &str, reason: FinishReason, error: EngineError) -> Outcome {
    Outcome {
        prompt_tokens: w.prompt.len() as u32,
        image_tokens: w.images.iter().map(|i| i.n_tokens as u32).sum(),
        image_encode: w.image_encode,
        ..Outcome::empty(reason, model_name, Some(error))
    }
}
