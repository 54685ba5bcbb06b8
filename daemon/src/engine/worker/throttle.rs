//! How the engine obeys the governors: their compute thread count and background deferral
//! (taken between steps), pacing after each step under the token-rate cap and the duty
//! cycle, which also records the uncapped rate the governor publishes, and the memory
//! ceiling (device work ends while hearthd is over it).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::engine::FinishReason;

use super::Worker;
use crate::engine::Event;
use crate::engine::sequence::unstarted_outcome;

/// The longest one step is held back by the governors' limits.
const MAX_PACE: Duration = Duration::from_secs(2);

impl Worker {
    /// Takes the governors' thread count (the most the tuner may use) and background
    /// deferral.
    pub(super) fn apply_throttle(&mut self) {
        let limit = match self.throttle.threads.load(Ordering::Relaxed) {
            0 => self.threads.0,
            n => (n as i32).min(self.threads.0),
        };
        self.tuner.set_limit(limit);
        self.set_threads(self.tuner.threads());
        self.scheduler.set_defer_background(self.throttle.defers_background());
        self.scheduler.set_deferred_apps(self.throttle.deferred_apps());
    }

    /// Times a step for the thread tuner and takes the count it picks for the next.
    pub(super) fn tune_threads(&mut self, tokens: usize, prefilled: bool, started: Instant) {
        let now = Instant::now();
        // The process's CPU time: every compute thread is ours (hearthd runs elsewhere).
        let cpu = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        let cpu = Duration::new(cpu.tv_sec.max(0) as u64, cpu.tv_nsec.clamp(0, 999_999_999) as u32);
        let decoding = self.running.iter().filter(|s| s.finished.is_none()).count();
        self.tuner.record(now - started, tokens > 0 && !prefilled, decoding, cpu, now);
        self.set_threads(self.tuner.threads());
    }

    pub(super) fn set_threads(&mut self, wanted: i32) {
        if wanted != self.threads.1 {
            // Never more than the pool was made with (threads.0), so never a new pool; were
            // one refused, the old threads go on and the count is recorded as in force, so
            // the same count is not asked for again (the tuner may still ask for another).
            if let Err(e) = self.ctx.set_threads(wanted, wanted) {
                tracing::warn!(error = %e, "compute threads not changed");
            } else {
                tracing::trace!(threads = wanted, "compute threads changed");
            }
            self.threads.1 = wanted;
        }
    }

    /// Over the memory ceiling: every running, waiting and embedding request ends with the
    /// ceiling's error (the grammar state, buffers and KV they hold are freed as they retire),
    /// and the freed heap is handed back to the kernel.
    pub(super) fn shed_over_ceiling(&mut self) {
        let Some(error) = self.throttle.ceiling_refusal() else {
            return;
        };
        let mut ended = 0;
        for s in self.running.iter_mut().filter(|s| s.finished.is_none()) {
            s.finished = Some((FinishReason::Error, Some(error.clone())));
            ended += 1;
        }
        while !self.scheduler.waiting().is_empty() {
            let w = self.scheduler.remove_waiting(0);
            let outcome = unstarted_outcome(&w, &self.model_name, FinishReason::Error, error.clone());
            let _ = w.events.send(Event::Finished(outcome));
            ended += 1;
        }
        ended += self.end_embeds(&error);
        if ended > 0 {
            self.retire();
            hearth_ffi::release_free_heap();
            tracing::warn!(model = %self.model_name, requests = ended, "over the memory ceiling: device work ended");
        }
    }

    /// Keeps decoding under the governors' limits: after a step that took from `started` and
    /// produced `tokens`, waits until the step is due under the token-rate cap and the duty
    /// cycle. Also records the uncapped rate, from steps that carried no prompt chunk.
    pub(super) fn pace(&self, tokens: usize, prefilled: bool, started: Instant) {
        let took = started.elapsed();
        if tokens > 0 && !prefilled {
            let potential = tokens as f64 / took.as_secs_f64().max(1e-6);
            let old = self.throttle.potential_mtps.load(Ordering::Relaxed) as f64 / 1000.0;
            let ewma = if old == 0.0 { potential } else { 0.9 * old + 0.1 * potential };
            self.throttle.potential_mtps.store((ewma * 1000.0) as u64, Ordering::Relaxed);
        }
        // Wait until the step is due, woken early by anything that may change that: the
        // governor lifting its limits (the phone cooled), a cancel, a command.
        loop {
            let seen = self.wake.seen();
            let mut due = Duration::ZERO;
            if let Some(cap) = self.throttle.rate_cap().filter(|_| tokens > 0) {
                due = Duration::from_secs_f64(tokens as f64 / cap.max(0.01));
            }
            if let Some(duty) = self.throttle.duty() {
                due = due.max(took.div_f64(duty.max(0.01)));
            }
            let due = due.min(took + MAX_PACE);
            if started.elapsed() >= due {
                break;
            }
            // A request that must stop (cancelled, caller gone, deadline) is not held for
            // the pace: the loop reaps it at once.
            let now = Instant::now();
            if self.throttle.over_ceiling.load(Ordering::Relaxed)
                || self.running.iter().any(|s| s.finished.is_none() && s.stop_reason(now).is_some())
            {
                break;
            }
            let mut until = started + due;
            if let Some(d) = self.running.iter().filter(|s| s.finished.is_none()).filter_map(|s| s.deadline).min() {
                until = until.min(d);
            }
            // Holding back for the governors is the loop working as meant: it has beaten
            // until it is due back.
            self.liveness.beat_until(until);
            self.wake.wait(seen, until);
        }
    }
}
