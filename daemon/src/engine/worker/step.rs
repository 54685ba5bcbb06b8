//! One decode step: the batch built from the running sequences (a token and its draft from
//! each decoding one, the prefilling ones' prompt chunks), the decode, and sampling; and
//! what happens when a step does not complete: an interactive preemption or a failed decode
//! puts the work back and cuts each sequence's KV to what it had committed, and a failed step of several sequences is
//! retried one sequence at a time, so only a sequence whose own step fails is failed.

use crate::engine::FinishReason;

use super::super::Priority;
use super::super::scheduler::{COST_PER_GENERATED, COST_PER_PROMPT};
use super::super::sequence::Sequence;
use super::super::speculate::MAX_DRAFT;
use super::Worker;
use crate::engine::EngineError;
use std::sync::atomic::Ordering;

/// Longest one token's sampling may take under a grammar. A usual grammar (JSON, a tool
/// call) costs milliseconds; one whose readings multiply with every token costs several
/// times the last each token. Sequences without a grammar are never stopped by this.
const MAX_SAMPLE_TIME: std::time::Duration = std::time::Duration::from_millis(250);

impl Worker {
    /// Builds one batch from the running sequences, decodes it and samples. Returns the
    /// number of tokens generated and whether the step carried prompt work (a prompt chunk or
    /// an image's rows).
    pub(super) fn step(&mut self) -> (usize, bool) {
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
        let mut prefill_taken: Vec<(usize, usize)> = Vec::new();
        // Sequences with a token to decode: the more share a step, the less a drafted row
        // saves (the weights are read once for all of them) against what it costs.
        let decoding = self.running.iter().filter(|s| s.finished.is_none() && s.next_token.is_some()).count();
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
                if let Err(e) = push_draft(&mut self.batch, s, self.draft_cells, decoding) {
                    push_failed = Some(e);
                }
            }
        }
        // Prompt chunks of every prefilling sequence of the step's priority, oldest first, as
        // far as the batch has room: concurrent prompts prefill together. Outputs stay what
        // each request gets alone, however llama.cpp splits the batch into micro-batches
        // (hearth-ffi's batch_exactness: several prompts in one batch, prompts in chunks).
        let in_group = |s: &Sequence| group.as_ref().is_none_or(|g| *g == s.adapters);
        let mut prefilling: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let s = &self.running[i];
                s.finished.is_none() && s.in_prefill() && in_group(s) && Some(s.priority) == prefill_priority
            })
            .collect();
        prefilling.sort_by_key(|&i| self.running[i].id);
        // A step carrying prompt work (image rows, decoded here, and prompt chunks) is
        // compute-bound and a first token waits on it: it runs on every thread the governors
        // allow, set before the first image row. Decode-only steps run on the tuned count,
        // which is what it was measured on.
        let mut prompt_work = false;
        // Image rows and prompt tokens share the step's room, so a step's time stays bounded.
        let mut budget = self.batch.remaining();
        for i in prefilling {
            if budget == 0 {
                break;
            }
            self.set_threads(self.tuner.prefill_threads());
            match self.prefill_image(i, budget) {
                Ok(rows) => {
                    budget -= rows;
                    prompt_work |= rows > 0;
                }
                Err(hearth_ffi::Error::Aborted) => {
                    self.preempt.clear();
                    self.preempted = true;
                    self.undo_step(&taken, &prefill_taken);
                    tracing::debug!("image prefill preempted by an interactive request");
                    return (0, false);
                }
                Err(e) => {
                    tracing::error!(error = %e, "decoding an image's embeddings failed");
                    self.fail(&[i], &EngineError::Internal(format!("decoding an image: {e}")));
                    continue;
                }
            }
            let s = &mut self.running[i];
            let n = s.text_run().min(budget);
            if n == 0 {
                continue;
            }
            budget -= n;
            for k in s.prefilled..s.prefilled + n {
                let last = k + 1 == s.prompt.len();
                match self.batch.push(s.prompt[k], k as i32, &[s.seq], last) {
                    Ok(i) if last => s.logits_index = Some(i),
                    Ok(_) => {}
                    Err(e) => push_failed = Some(e),
                }
            }
            s.prefilled += n;
            prefill_taken.push((i, n));
        }
        prompt_work |= !prefill_taken.is_empty();
        if !prompt_work {
            self.set_threads(self.tuner.threads());
        }
        // The sequences this step feeds: only they may be failed by what goes wrong in it
        // (a paused or waiting prefill did nothing).
        let members: Vec<usize> = taken.iter().map(|(i, _)| *i).chain(prefill_taken.iter().map(|(i, _)| *i)).collect();
        if let Some(e) = push_failed {
            // Cannot happen with the capacities checked at start; fail loudly, not silently.
            self.undo_step(&taken, &prefill_taken);
            self.fail(&members, &EngineError::Internal(format!("batch construction: {e}")));
            return (0, false);
        }
        if let Some(g) = group.as_ref().filter(|g| self.adapters_set.as_ref() != Some(*g)) {
            if let Err(e) = self.ctx.set_lora_scales(&g.scales()) {
                self.undo_step(&taken, &prefill_taken);
                self.fail(&members, &EngineError::Internal(e.to_string()));
                return (0, false);
            }
            self.adapters_set = Some(g.clone());
        }
        self.last_group = group;
        // A pending preemption may abort this step only if it holds no interactive work.
        let interactive = self
            .running
            .iter()
            .any(|s| s.priority == Priority::Interactive && (s.logits_index.is_some() || s.in_prefill()));
        self.hold_preemption(interactive);
        // Each member's rows in the batch (a token and its draft, a prompt chunk): the step's
        // time is shared by them.
        let rows: Vec<(usize, u64)> = taken
            .iter()
            .map(|&(i, _)| (i, 1 + self.running[i].draft.len() as u64))
            .chain(prefill_taken.iter().map(|&(i, n)| (i, n as u64)))
            .collect();
        let started = std::time::Instant::now();
        let decoded = self.ctx.decode(&self.batch);
        self.preempt.hold(false);
        // The step's time was spent whatever came of it: a preempted or failed step's members
        // are charged for it too (their work is done again, and draws the energy twice).
        if decoded.is_err() {
            self.account(&rows, started.elapsed());
        }
        match decoded {
            Ok(()) => {}
            Err(hearth_ffi::Error::Aborted) => {
                // Put the work back and go admit the interactive request first. Nothing was
                // sampled, so nothing is lost.
                self.preempt.clear();
                self.preempted = true;
                self.undo_step(&taken, &prefill_taken);
                tracing::debug!(tokens = self.batch.len(), "decode step preempted by an interactive request");
                return (0, false);
            }
            Err(e) if members.len() > 1 => {
                // Which sequence the step failed for is not known: each goes again alone,
                // and only one whose own step fails ends with an error.
                tracing::warn!(error = %e, sequences = members.len(), "decode failed: retrying its sequences one by one");
                self.undo_step(&taken, &prefill_taken);
                return self.step_alone(&members);
            }
            Err(e) => {
                tracing::error!(error = %e, tokens = self.batch.len(), "decode failed");
                self.undo_step(&taken, &prefill_taken);
                self.fail(&members, &EngineError::Internal(e.to_string()));
                return (0, false);
            }
        }
        for &(i, n) in &prefill_taken {
            let app = self.running[i].caller.app.clone();
            self.scheduler.charge(&app, n as u64 * COST_PER_PROMPT);
        }
        let generated = self.sample_step();
        self.account(&rows, started.elapsed());
        // A step with image rows only is no decode-only step either (the tuner's windows).
        (generated, prompt_work)
    }

    /// Shares a step's compute time `took` among its members by their rows.
    fn account(&mut self, rows: &[(usize, u64)], took: std::time::Duration) {
        let total: u64 = rows.iter().map(|(_, n)| n).sum();
        if total == 0 {
            return;
        }
        let took = took.as_micros() as u64;
        for &(i, n) in rows {
            let share = took * n / total;
            let s = &mut self.running[i];
            s.compute_us += share;
            self.compute.add(&s.caller.app, share, s.priority == Priority::Background);
        }
    }

    /// Samples every sequence the last decode computed logits for, and verifies its draft:
    /// position by position, a draft token is kept while it equals the token sampled before
    /// it, and the KV of the rest is removed. Returns how many tokens were generated.
    fn sample_step(&mut self) -> usize {
        let mut generated = 0;
        for s in self.running.iter_mut() {
            let Some(first) = s.logits_index.take() else { continue };
            let draft = std::mem::take(&mut s.draft);
            let mut accepted = 0;
            for (row, drafted) in (first..).zip(draft.iter().map(Some).chain([None])) {
                let Some(token) = sample_one(&mut self.ctx, s, row) else { break };
                let logits = if s.want_logprobs.is_some() { self.ctx.logits(row) } else { None };
                s.accept(&self.model, token, logits);
                self.scheduler.charge(&s.caller.app, COST_PER_GENERATED);
                generated += 1;
                let hit = drafted == Some(&token);
                accepted += usize::from(hit);
                if s.finished.is_some() || !hit {
                    break;
                }
                // The draft token was right: it is in the KV already (fed), and the next
                // row's logits follow it. The token sampled last is the one fed next.
                s.next_token = None;
                s.pos += 1;
            }
            if draft.is_empty() {
                continue;
            }
            let refused = draft.len() - accepted;
            self.scheduler.charge(&s.caller.app, refused as u64 * COST_PER_PROMPT);
            if let Some(d) = s.drafter.as_mut() {
                d.verified(draft.len(), accepted);
            }
            self.kv.drafted.fetch_add(draft.len() as u32, Ordering::Relaxed);
            self.kv.accepted.fetch_add(accepted as u32, Ordering::Relaxed);
            // The KV past what it committed: refused tokens', and a finished sequence's.
            if self.ctx.sequence_max_pos(s.seq) >= s.pos && !self.ctx.truncate_sequence(s.seq, s.pos) {
                s.finished =
                    Some((FinishReason::Error, Some(EngineError::Internal("cannot roll back its KV cache".into()))));
            }
            s.draft = draft;
            s.draft.clear();
        }
        generated
    }

    /// Takes back what a step that did not complete took from its sequences, and brings
    /// their KV back to match: llama.cpp removes the KV of the micro-batch it failed or was
    /// aborted in, but keeps that of the micro-batches before it (a batch of several
    /// sequences is split into several), so each sequence is cut back to the positions it
    /// had committed before the step. Without the cut, the next step would put tokens at
    /// positions the KV already holds and llama.cpp would refuse the whole batch.
    fn undo_step(&mut self, taken: &[(usize, hearth_ffi::Token)], prefill: &[(usize, usize)]) {
        for &(i, token) in taken {
            let s = &mut self.running[i];
            s.draft.clear();
            s.next_token = Some(token);
            s.pos -= 1;
            s.logits_index = None;
        }
        for &(i, n) in prefill {
            self.running[i].prefilled -= n;
            self.running[i].logits_index = None;
        }
        for i in taken.iter().map(|(i, _)| *i).chain(prefill.iter().map(|(i, _)| *i)) {
            let s = &mut self.running[i];
            let committed = s.kv_used() as hearth_ffi::Pos;
            if self.ctx.sequence_max_pos(s.seq) >= committed && !self.ctx.truncate_sequence(s.seq, committed) {
                s.finished =
                    Some((FinishReason::Error, Some(EngineError::Internal("cannot roll back its KV cache".into()))));
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
                let budget = self.batch.remaining();
                let rows = match self.prefill_image(i, budget) {
                    Ok(rows) => rows,
                    Err(hearth_ffi::Error::Aborted) => {
                        self.preempt.clear();
                        self.preempted = true;
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "decoding an image's embeddings failed");
                        self.fail(&[i], &EngineError::Internal(format!("decoding an image: {e}")));
                        continue;
                    }
                };
                let s = &mut self.running[i];
                let n = s.text_run().min(budget - rows);
                for k in s.prefilled..s.prefilled + n {
                    let last = k + 1 == s.prompt.len();
                    if let Ok(j) = self.batch.push(s.prompt[k], k as i32, &[s.seq], last)
                        && last
                    {
                        s.logits_index = Some(j);
                    }
                }
                s.prefilled += n;
                chunk = Some((i, n));
            }
            let interactive = self.running[i].priority == Priority::Interactive;
            self.hold_preemption(interactive);
            let started = std::time::Instant::now();
            let decoded = self.ctx.decode(&self.batch);
            self.preempt.hold(false);
            if decoded.is_err() {
                self.account(&[(i, 1)], started.elapsed());
            }
            match decoded {
                Ok(()) => {
                    if let Some((i, n)) = chunk {
                        let app = self.running[i].caller.app.clone();
                        self.scheduler.charge(&app, n as u64 * COST_PER_PROMPT);
                        prefilled = true;
                    }
                    generated += self.sample_step();
                    self.account(&[(i, 1)], started.elapsed());
                }
                Err(hearth_ffi::Error::Aborted) => {
                    self.preempt.clear();
                    self.preempted = true;
                    self.undo_step(&taken, chunk.as_slice());
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "decode of one sequence failed");
                    self.undo_step(&taken, chunk.as_slice());
                    self.fail(&[i], &EngineError::Internal(e.to_string()));
                }
            }
        }
        (generated, prefilled)
    }

    /// Decodes up to `budget` rows of the image sequence `i`'s prefill stands at, if it stands
    /// at one: in a decode of its own (a batch holds tokens or embeddings, not both),
    /// committed at once; an image longer than a step's budget takes several steps, as a long
    /// prompt does. Returns the rows decoded. On an error its KV is cut back to what it had
    /// committed before (a KV that cannot be cut is an error of its own, which fails it).
    fn prefill_image(&mut self, i: usize, budget: usize) -> Result<usize, hearth_ffi::Error> {
        let s = &mut self.running[i];
        let Some(span) = s.image_next().cloned() else { return Ok(0) };
        let rows = (span.end() - s.prefilled).min(budget);
        if rows == 0 {
            return Ok(0);
        }
        // The rows are decoded now, before the step sets its adapter set: under the
        // sequence's own (the step's group is it), as its tokens are.
        if self.model.lora_count() > 0 && self.adapters_set.as_ref() != Some(&s.adapters) {
            let set = s.adapters.clone();
            self.ctx.set_lora_scales(&set.scales())?;
            self.adapters_set = Some(set);
        }
        let s = &self.running[i];
        let interactive = s.priority == Priority::Interactive;
        let (seq, from) = (s.seq, s.prefilled);
        let data = &span.rows_from(from)[..rows * span.n_embd];
        self.hold_preemption(interactive);
        let started = std::time::Instant::now();
        let decoded = self.ctx.decode_embeddings(data, span.n_embd, from as hearth_ffi::Pos, seq);
        self.preempt.hold(false);
        let took = started.elapsed().as_micros() as u64;
        let s = &mut self.running[i];
        s.compute_us += took;
        self.compute.add(&s.caller.app, took, s.priority == Priority::Background);
        match decoded {
            Ok(()) => {
                s.prefilled += rows;
                let app = s.caller.app.clone();
                self.scheduler.charge(&app, rows as u64 * COST_PER_PROMPT);
                Ok(rows)
            }
            Err(e) => {
                let at = from as hearth_ffi::Pos;
                if self.ctx.sequence_max_pos(seq) >= at && !self.ctx.truncate_sequence(seq, at) {
                    return Err(hearth_ffi::Error::Image { reason: "cannot roll back its KV cache".into() });
                }
                Err(e)
            }
        }
    }

    fn fail(&mut self, members: &[usize], error: &EngineError) {
        for &i in members {
            let s = &mut self.running[i];
            if s.finished.is_none() {
                s.finished = Some((FinishReason::Error, Some(error.clone())));
            }
        }
    }
}

/// Samples `s`'s token at batch row `row`; None when the sequence ended there instead (a
/// grammar too slow to follow or with no way on, a failure), with why in `s.finished`.
fn sample_one(ctx: &mut hearth_ffi::Context, s: &mut Sequence, row: i32) -> Option<hearth_ffi::Token> {
    let started = std::time::Instant::now();
    let sampled = s.sampler.sample(ctx, row);
    if s.sampler.has_grammar() && started.elapsed() > MAX_SAMPLE_TIME {
        // Only a grammar makes sampling this slow: an ambiguous one that llama.cpp follows
        // along every reading at once, whose cost (and memory) doubles with each token.
        // Stopped here, before the next doubling.
        s.finished = Some((
            FinishReason::Error,
            Some(EngineError::InvalidArgs(format!(
                "the grammar is too ambiguous to follow: choosing one token took {} ms (limit {} ms)",
                started.elapsed().as_millis(),
                MAX_SAMPLE_TIME.as_millis()
            ))),
        ));
        return None;
    }
    match sampled {
        Ok(token) => Some(token),
        Err(hearth_ffi::Error::GrammarDeadEnd) => {
            // This sequence's grammar allows nothing here; the others go on.
            s.finished = Some((
                FinishReason::Error,
                Some(EngineError::InvalidArgs(
                    "the grammar allows no token this model can produce here; generation stopped".into(),
                )),
            ));
            None
        }
        Err(e) => {
            s.finished = Some((FinishReason::Error, Some(EngineError::Internal(e.to_string()))));
            None
        }
    }
}

/// Puts `s`'s draft into the batch after its next token (just pushed, at `s.pos - 1`), each
/// token with logits: no more than it may still generate after the next token, than the
/// batch has room for, or than keeps its KV within `cells`. `decoding` sequences share the
/// step.
fn push_draft(
    batch: &mut hearth_ffi::Batch,
    s: &mut Sequence,
    cells: usize,
    decoding: usize,
) -> hearth_ffi::Result<()> {
    let room = cells.saturating_sub(s.pos as usize);
    let max = s.remaining().saturating_sub(1).min(batch.remaining()).min(MAX_DRAFT).min(room);
    let Some(drafter) = s.drafter.as_mut() else { return Ok(()) };
    drafter.propose(&s.prompt, &s.generated, max, decoding, &mut s.draft);
    for (k, &token) in s.draft.iter().enumerate() {
        batch.push(token, s.pos + k as hearth_ffi::Pos, &[s.seq], true)?;
    }
    Ok(())
}
