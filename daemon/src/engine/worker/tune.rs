//! Compute threads that fit the cores the phone leaves the engine.
//!
//! ggml splits every step's matrix work evenly over its threads and waits at a barrier for
//! the slowest. On a quiet phone that is what the cores are for; beside other busy apps, a
//! thread that shares its core with another process runs half the time and the whole step
//! waits for it: on this 2-core machine beside two spinning processes, llama-bench decodes
//! the default model at 36 tok/s on one thread and 23 (± 12) on two.
//!
//! So the engine measures. While its threads get less CPU time than the wall time they are
//! given (`cpu / (wall × threads)` under [`CONTENDED`]: something else runs on our cores),
//! or while it runs fewer threads than the governors allow, it tries one thread fewer or one
//! more for a short window of decode steps, and keeps whichever count steps faster. The
//! threads come from the engine's persistent pool, so a change costs nothing but the window.
//! On a quiet machine at its full count nothing is probed and nothing is lost.

use std::time::{Duration, Instant};

/// Decode steps of one kind in a window: the median of this many is compared.
const WINDOW: usize = 12;
/// CPU share below which other work is taken to be running on the engine's cores.
const CONTENDED: f64 = 0.85;
/// How much faster the other count must step to be taken.
const MARGIN: f64 = 0.05;
/// Time between probes.
const PROBE_EVERY: Duration = Duration::from_millis(1500);

/// What the tuner is doing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Stepping at the chosen count; a finished window may start a probe.
    Settled,
    /// Trying `threads` against the chosen count's median step time.
    Probe { threads: i32, baseline: Duration },
}

/// One window of decode steps of one shape, timed.
#[derive(Debug, Default)]
struct Window {
    shape: usize,
    steps: Vec<Duration>,
    started: Option<(Instant, Duration)>,
}

impl Window {
    fn reset(&mut self) {
        self.steps.clear();
        self.started = None;
    }

    fn median(&self) -> Duration {
        let mut v = self.steps.clone();
        v.sort_unstable();
        v[v.len() / 2]
    }
}

/// Picks the compute thread count between 1 and the governors' limit.
#[derive(Debug)]
pub(super) struct ThreadTuner {
    limit: i32,
    chosen: i32,
    phase: Phase,
    window: Window,
    /// The last probe went down (so the next, where both are open, goes up).
    went_down: bool,
    next_probe: Option<Instant>,
    /// The first step after a change is not counted (the pool's threads wake up).
    skip: bool,
}

impl ThreadTuner {
    pub(super) fn new(limit: i32) -> Self {
        Self {
            limit: limit.max(1),
            chosen: limit.max(1),
            phase: Phase::Settled,
            window: Window::default(),
            went_down: false,
            next_probe: None,
            skip: false,
        }
    }

    /// The threads to run the next step on.
    pub(super) fn threads(&self) -> i32 {
        match self.phase {
            Phase::Settled => self.chosen,
            Phase::Probe { threads, .. } => threads,
        }
    }

    /// The threads a step carrying a prompt chunk runs on: the governors' limit. Prefill is
    /// compute-bound, so every thread the governors allow shortens it even beside other
    /// work, and an interactive request's first token waits on it; the tuned count is for
    /// the short, barrier-bound decode steps it was measured on.
    pub(super) fn prefill_threads(&self) -> i32 {
        self.limit
    }

    /// The governors' limit (the configured count, or fewer to save power). A new limit
    /// starts over from it.
    pub(super) fn set_limit(&mut self, limit: i32) {
        let limit = limit.max(1);
        if limit != self.limit {
            *self = Self::new(limit);
        }
    }

    /// A step that took `took` and was not a decode-only step of `shape` sequences
    /// (`decode_only` false: a prompt chunk rode in it) breaks the window; `cpu` is the
    /// process's CPU time read after it, at `now`.
    pub(super) fn record(&mut self, took: Duration, decode_only: bool, shape: usize, cpu: Duration, now: Instant) {
        if self.limit == 1 {
            return;
        }
        if std::mem::take(&mut self.skip) && decode_only && shape == self.window.shape {
            // The first step on a new count: timed from its end.
            self.window.reset();
            self.window.started = Some((now, cpu));
            return;
        }
        if !decode_only || shape != self.window.shape {
            self.abandon_probe(now);
            self.window.reset();
            self.window.shape = shape;
            if decode_only {
                self.window.started = Some((now, cpu));
            }
            return;
        }
        let Some((wall0, cpu0)) = self.window.started else {
            self.window.started = Some((now, cpu));
            return;
        };
        self.window.steps.push(took);
        if self.window.steps.len() < WINDOW {
            return;
        }
        let wall = now.saturating_duration_since(wall0).as_secs_f64();
        let share = cpu.saturating_sub(cpu0).as_secs_f64() / (wall * f64::from(self.threads())).max(1e-9);
        let median = self.window.median();
        self.window.reset();
        self.window.started = Some((now, cpu));
        match self.phase {
            Phase::Probe { threads, baseline } => {
                if median.as_secs_f64() < baseline.as_secs_f64() * (1.0 - MARGIN) {
                    tracing::debug!(threads, was = self.chosen, "compute threads: the probed count steps faster");
                    self.chosen = threads;
                }
                self.settle(now);
            }
            Phase::Settled => {
                if self.next_probe.is_some_and(|t| now < t) {
                    return;
                }
                let down = (share < CONTENDED && self.chosen > 1).then_some(self.chosen - 1);
                let up = (self.chosen < self.limit).then_some(self.chosen + 1);
                let threads = match (down, up) {
                    (Some(d), Some(u)) => {
                        if self.went_down {
                            u
                        } else {
                            d
                        }
                    }
                    (Some(d), None) => d,
                    (None, Some(u)) => u,
                    (None, None) => return,
                };
                tracing::debug!(threads, share, "compute threads: probing");
                self.went_down = threads < self.chosen;
                self.phase = Phase::Probe { threads, baseline: median };
                self.skip = true;
            }
        }
    }

    fn settle(&mut self, now: Instant) {
        if self.phase != Phase::Settled {
            self.skip = true;
        }
        self.phase = Phase::Settled;
        self.next_probe = Some(now + PROBE_EVERY);
    }

    /// A probe whose window was broken (the batch changed) is given up; the next is due later.
    fn abandon_probe(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Probe { .. }) {
            self.settle(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a tuner with steps whose time depends on the thread count, and CPU time at
    /// `share` of wall × threads.
    fn drive(tuner: &mut ThreadTuner, steps: usize, share: f64, time: impl Fn(i32) -> Duration) -> Instant {
        let mut now = Instant::now();
        let mut cpu = Duration::ZERO;
        for _ in 0..steps {
            let t = tuner.threads();
            let took = time(t);
            now += took;
            cpu += took.mul_f64(share * f64::from(t));
            tuner.record(took, true, 1, cpu, now);
        }
        now
    }

    fn ms(x: f64) -> Duration {
        Duration::from_secs_f64(x / 1000.0)
    }

    #[test]
    fn quiet_machine_keeps_the_full_count_and_never_probes() {
        let mut tuner = ThreadTuner::new(2);
        let mut seen = std::collections::BTreeSet::new();
        let mut now = Instant::now();
        let mut cpu = Duration::ZERO;
        for _ in 0..2000 {
            seen.insert(tuner.threads());
            now += ms(5.0);
            cpu += ms(5.0).mul_f64(0.97 * 2.0);
            tuner.record(ms(5.0), true, 1, cpu, now);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn contended_cores_take_the_faster_fewer_threads() {
        let mut tuner = ThreadTuner::new(2);
        // Beside two busy processes: two threads step at 40 ms, one at 28 ms.
        drive(&mut tuner, 200, 0.5, |t| if t == 2 { ms(40.0) } else { ms(28.0) });
        assert_eq!(tuner.chosen, 1);
        assert_eq!(tuner.prefill_threads(), 2, "a prompt chunk still gets every thread allowed");
    }

    #[test]
    fn contention_where_more_threads_still_win_keeps_them() {
        let mut tuner = ThreadTuner::new(2);
        drive(&mut tuner, 400, 0.6, |t| if t == 2 { ms(20.0) } else { ms(30.0) });
        assert_eq!(tuner.chosen, 2);
    }

    #[test]
    fn fewer_threads_go_back_up_once_the_cores_are_free() {
        let mut tuner = ThreadTuner::new(4);
        drive(&mut tuner, 800, 0.5, |t| ms(10.0 + 10.0 * f64::from(t)));
        assert_eq!(tuner.chosen, 1);
        // The others stopped: more threads are faster again, found by probing up (the
        // probes are PROBE_EVERY apart, so give it a few seconds of steps).
        drive(&mut tuner, 3000, 0.97, |t| ms(40.0 / f64::from(t)));
        assert_eq!(tuner.chosen, 4);
    }

    #[test]
    fn prompt_chunks_and_changing_batches_break_windows_and_probes() {
        let mut tuner = ThreadTuner::new(2);
        let mut now = Instant::now();
        let mut cpu = Duration::ZERO;
        // Every other step has a prompt chunk, or the batch changes: no window completes.
        for i in 0..500 {
            let took = if tuner.threads() == 2 { ms(40.0) } else { ms(10.0) };
            now += took;
            cpu += took.mul_f64(0.5 * f64::from(tuner.threads()));
            tuner.record(took, i % 2 == 0, 1 + i % 3, cpu, now);
        }
        assert_eq!(tuner.chosen, 2);
    }

    #[test]
    fn a_new_governor_limit_starts_from_it() {
        let mut tuner = ThreadTuner::new(2);
        drive(&mut tuner, 200, 0.5, |t| if t == 2 { ms(40.0) } else { ms(28.0) });
        assert_eq!(tuner.threads(), 1);
        tuner.set_limit(4);
        assert_eq!(tuner.threads(), 4);
        tuner.set_limit(1);
        drive(&mut tuner, 200, 0.1, |_| ms(5.0));
        assert_eq!(tuner.threads(), 1);
    }
}
