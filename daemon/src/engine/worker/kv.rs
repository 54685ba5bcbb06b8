//! Where a sequence's KV comes from and which adapters it runs under: slot preparation
//! (prefix reuse, a session's parked KV), parking idle sessions, the adapter set of a request
//! and of a decode step.

use std::time::Instant;

use super::super::protocol::SessionKv;
use super::super::scheduler::{Pinned, Slot, shared_prefix};
use super::super::sequence::{Sequence, Waiting};
use super::super::{AdapterSet, Priority};
use super::Worker;

impl Worker {
    /// Keeps the first `keep` KV entries of `seq` and drops the rest; where llama.cpp cannot
    /// cut there, empties the sequence. Returns how many entries are kept.
    fn keep_prefix(&mut self, seq: hearth_ffi::SeqId, keep: usize) -> usize {
        if self.ctx.truncate_sequence(seq, keep as i32) {
            keep
        } else {
            self.ctx.remove_sequence(seq);
            0
        }
    }

    /// Prepares `slot`'s KV for `w` (prefix reuse, or a session's parked KV) and runs it.
    pub(super) fn start(&mut self, w: Waiting, slot: Slot) {
        if let Some(src) = slot.copy_from {
            self.ctx.copy_sequence(src, slot.seq);
            self.ctx.remove_sequence(src);
        }
        let mut reuse = if slot.evict {
            self.ctx.remove_sequence(slot.seq);
            0
        } else {
            self.keep_prefix(slot.seq, slot.reuse)
        };
        if let Some(id) = w.session
            && let Some(restored) = self.restore(id, slot.seq, &w)
        {
            reuse = restored;
        }
        // KV kept up to the middle of an image is an image whose placeholders matched only in
        // part: its rows start again from the image's first.
        if let Some(image) = w.images.iter().find(|i| i.start < reuse && reuse < i.end()) {
            reuse = self.keep_prefix(slot.seq, image.start);
        }
        tracing::debug!(id = w.id, seq = slot.seq, reuse, priority = w.priority.as_str(), "request started");
        self.running.push(Sequence::start(w, slot.seq, reuse));
    }

    /// Saves an idle session's KV from `seq`, hands it to hearthd (which seals and stores
    /// it), and empties the slot.
    pub(super) fn park(&mut self, seq: hearth_ffi::SeqId, pin: Pinned) {
        if !self.sessions.is_open(pin.session) {
            // Closed meanwhile, or the daemon is stopping: nothing to keep.
            self.ctx.remove_sequence(seq);
            return;
        }
        let started = Instant::now();
        let state = self.ctx.save_sequence(seq);
        self.ctx.remove_sequence(seq);
        let (tokens, bytes) = (pin.tokens.len(), state.len());
        let kv = SessionKv { tokens: pin.tokens, adapters: pin.adapters, state };
        if self.sessions.park(pin.session, kv) {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            tracing::debug!(session = pin.session, tokens, bytes, ms, "session KV saved for parking");
        }
    }

    /// Restores session `id`'s parked KV (delivered with its turn) into the empty slot `seq`,
    /// if it has any; returns the prompt tokens of `w` it covers. A state that does not load
    /// is dropped (the turn then prefills the whole transcript: slower, never wrong).
    fn restore(&mut self, id: u64, seq: hearth_ffi::SeqId, w: &Waiting) -> Option<usize> {
        let started = Instant::now();
        let kv = self.sessions.take(id)?;
        self.ctx.remove_sequence(seq);
        let bytes = kv.state.len();
        match self.ctx.restore_sequence(seq, &kv.state) {
            Ok(()) => {
                let longest = w.prompt.len().saturating_sub(1);
                let shared =
                    if kv.adapters == w.adapters { shared_prefix(&kv.tokens, &w.prompt).min(longest) } else { 0 };
                let reuse = self.keep_prefix(seq, shared);
                tracing::info!(
                    session = id,
                    tokens = kv.tokens.len(),
                    reuse,
                    bytes,
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    "session KV restored"
                );
                Some(reuse)
            }
            Err(e) => {
                self.ctx.remove_sequence(seq);
                tracing::warn!(session = id, error = %e, "parked session KV refused: the turn recomputes it");
                Some(0)
            }
        }
    }

    /// The adapter set this step serves: None when the model has no adapters; else, of the
    /// sets the sequences with work want, the one after the set served last (round robin).
    pub(super) fn step_group(&self, prefill_priority: Option<Priority>) -> Option<AdapterSet> {
        if self.model.lora_count() == 0 {
            return None;
        }
        let mut sets: Vec<&AdapterSet> = Vec::new();
        let with_work = self.running.iter().filter(|s| {
            s.finished.is_none()
                && prefill_priority.is_none_or(|p| p <= s.priority)
                && (s.next_token.is_some() || s.in_prefill())
        });
        for s in with_work {
            if !sets.contains(&&s.adapters) {
                sets.push(&s.adapters);
            }
        }
        let after_last = match &self.last_group {
            Some(last) if sets.len() > 1 => sets.iter().position(|s| *s == last).map_or(0, |i| (i + 1) % sets.len()),
            _ => 0,
        };
        sets.get(after_last).map(|s| (*s).clone())
    }
}
