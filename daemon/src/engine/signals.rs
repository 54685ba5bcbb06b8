//! What the engine's threads, and hearthd's mirror of each engine, share without messages:
//! the KV gauges, the loop's liveness, the worker's wake-ups (and the requests on their way
//! to it through preparation), and the governors' throttle.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::EngineError;

/// KV cache gauges, updated by the engine every step without waking anyone; read on demand.
#[derive(Debug, Default)]
pub struct KvGauges {
    /// Tokens held in the cache by live sequences.
    pub used: AtomicU32,
    /// Tokens reserved by admitted requests (prompt + max_tokens).
    pub reserved: AtomicU32,
    /// Cache size in tokens.
    pub size: AtomicU32,
    /// Tokens kept in free slots for prefix reuse by the same app.
    pub cached: AtomicU32,
    /// Speculative decoding since the engine started: draft tokens verified, and taken.
    pub drafted: AtomicU32,
    pub accepted: AtomicU32,
}

/// The gauges as the engine process reports them: (size, reserved, used, cached, drafted,
/// accepted).
pub type KvSnapshot = [u32; 6];

impl KvGauges {
    fn gauges(&self) -> [&AtomicU32; 6] {
        [&self.size, &self.reserved, &self.used, &self.cached, &self.drafted, &self.accepted]
    }

    pub fn snapshot(&self) -> KvSnapshot {
        self.gauges().map(|g| g.load(Ordering::Relaxed))
    }

    pub fn store(&self, values: KvSnapshot) {
        for (g, v) in self.gauges().into_iter().zip(values) {
            g.store(v, Ordering::Relaxed);
        }
    }

    /// Adds the engines' gauges up, into `totals`.
    pub fn add_to(&self, totals: &mut KvSnapshot) {
        for (t, v) in totals.iter_mut().zip(self.snapshot()) {
            *t = t.saturating_add(v);
        }
    }
}

/// Compute time per app not yet reported, in microseconds: each decode step's time shared
/// among the sequences in it by the rows each put in its batch (a decode token and its
/// draft, a prompt chunk), an image's decoding and encoding and an embedded text's time
/// wholly its app's. The engine reports what it gathered ([`Compute::take`]) with every
/// heartbeat and as each request ends; hearthd gathers every engine's reports, and the
/// energy ledger takes them at each of its ticks. Only the apps of one interval are held.
#[derive(Debug, Default)]
pub struct Compute {
    gathered: std::sync::Mutex<(std::collections::HashMap<String, u64>, u64)>,
}

/// Compute gathered between two takes: each app's, µs, and of all of it, background
/// requests' (the device-wide background share is judged on it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gathered {
    pub apps: Vec<(String, u64)>,
    pub background_us: u64,
}

impl Gathered {
    pub fn is_empty(&self) -> bool {
        self.apps.is_empty() && self.background_us == 0
    }
}

impl Compute {
    /// Apps counted apart between two takes at most; the rest count together as
    /// [`Compute::OTHERS`] (an interval of 100 ms never sees as many).
    pub const MAX_APPS: usize = 1024;
    pub const OTHERS: &str = "(other apps)";

    fn lock(&self) -> std::sync::MutexGuard<'_, (std::collections::HashMap<String, u64>, u64)> {
        self.gathered.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `us` of `app`'s compute, for a background request or not.
    pub fn add(&self, app: &str, us: u64, background: bool) {
        let mut g = self.lock();
        Self::count(&mut g.0, app, us);
        if background {
            g.1 = g.1.saturating_add(us);
        }
    }

    fn count(m: &mut std::collections::HashMap<String, u64>, app: &str, us: u64) {
        if us == 0 {
            return;
        }
        let app = if m.len() >= Self::MAX_APPS && !m.contains_key(app) { Self::OTHERS } else { app };
        match m.get_mut(app) {
            Some(v) => *v = v.saturating_add(us),
            None => {
                m.insert(app.to_owned(), us);
            }
        }
    }

    /// Adds what another counter gathered (an engine process's report), as bounded as
    /// [`Compute::add`] keeps it, in one go: a take sees all of a report or none of it.
    pub fn merge(&self, gathered: Gathered) {
        let mut g = self.lock();
        for (app, us) in gathered.apps.into_iter().take(Self::MAX_APPS + 1) {
            Self::count(&mut g.0, &app, us);
        }
        // Never more background time than time (a report is the engine's own counter's).
        let all: u64 = g.0.values().fold(0, |a, b| a.saturating_add(*b));
        g.1 = g.1.saturating_add(gathered.background_us).min(all);
    }

    /// Everything gathered since the last take; counting starts over.
    pub fn take(&self) -> Gathered {
        let (m, bg) = std::mem::take(&mut *self.lock());
        Gathered { apps: m.into_iter().collect(), background_us: bg }
    }

    /// Everything gathered and not yet taken; it stays to be taken.
    pub fn snapshot(&self) -> Gathered {
        let g = self.lock();
        Gathered { apps: g.0.iter().map(|(app, us)| (app.clone(), *us)).collect(), background_us: g.1 }
    }
}

/// Whether the engine loop makes progress, for its supervisor: the loop beats at every turn
/// (one decode step, one embedded text: bounded units), and says when it sleeps for want
/// of work. A long job that progresses beats; a hung loop does not. hearthd mirrors the
/// engine process's one from its heartbeats.
#[derive(Debug)]
pub struct Liveness {
    epoch: std::time::Instant,
    /// Milliseconds since `epoch` of the last beat.
    beat_ms: AtomicU64,
    idle: AtomicBool,
}

impl Default for Liveness {
    fn default() -> Self {
        Self { epoch: std::time::Instant::now(), beat_ms: AtomicU64::new(0), idle: AtomicBool::new(false) }
    }
}

impl Liveness {
    pub fn beat(&self) {
        self.beat_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    pub fn set_idle(&self, idle: bool) {
        self.beat();
        self.idle.store(idle, Ordering::Release);
    }

    /// The loop goes to sleep on purpose until `until` (pacing for the governors, deferred
    /// work): it counts as having beaten until then, and as hung only if it is not back
    /// within the hang limit after.
    pub fn beat_until(&self, until: std::time::Instant) {
        let at = until.saturating_duration_since(self.epoch);
        self.beat_ms.store(at.as_millis() as u64, Ordering::Release);
    }

    /// When the loop last beat (an opaque instant: compare for change).
    pub fn last_beat(&self) -> u64 {
        self.beat_ms.load(Ordering::Acquire)
    }

    /// How long ago the loop last beat.
    pub fn since_beat(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_millis(self.beat_ms.load(Ordering::Acquire)))
    }

    pub fn idle(&self) -> bool {
        self.idle.load(Ordering::Acquire)
    }

    /// Mirrors a remote loop's report: it beat `ago` before now, and is idle or not.
    pub fn observe(&self, ago: Duration, idle: bool) {
        let at = self.epoch.elapsed().saturating_sub(ago);
        self.beat_ms.store(at.as_millis() as u64, Ordering::Release);
        self.idle.store(idle, Ordering::Release);
    }
}

/// Wakes the worker thread out of a timed wait (pacing, deferred background work) as soon
/// as what it waits on may have changed: a command came, a request was cancelled, the
/// governors' demands changed. Waiters read [`Wake::seen`] *before* checking their
/// condition, so a notification in between is never lost. It also counts the requests on
/// their way to the worker through the preparation thread.
#[derive(Debug, Default)]
pub struct Wake {
    seq: std::sync::Mutex<u64>,
    cv: std::sync::Condvar,
    preparing: std::sync::atomic::AtomicUsize,
    /// Requests ever sent to the preparation thread.
    arrived: AtomicU64,
}

impl Wake {
    /// A request went to the preparation thread.
    pub fn preparing(&self) {
        self.preparing.fetch_add(1, Ordering::AcqRel);
        self.arrived.fetch_add(1, Ordering::AcqRel);
    }

    /// Requests sent to the preparation thread so far.
    pub fn arrived(&self) -> u64 {
        self.arrived.load(Ordering::Acquire)
    }

    /// A request left the preparation thread: handed to the worker (before this call), or
    /// refused.
    pub fn prepared(&self) {
        self.preparing.fetch_sub(1, Ordering::AcqRel);
        self.notify();
    }

    /// Waits until no request is being prepared, or until `until`. The worker calls this
    /// before admitting after new arrivals, so requests that arrived together are admitted
    /// together (one prefill, finishing together) rather than a step apart each, as they
    /// would be while the decode step's threads hold the cores the preparation thread needs.
    pub fn wait_for_preparation(&self, until: std::time::Instant) {
        loop {
            let seen = self.seen();
            if self.preparing.load(Ordering::Acquire) == 0 {
                return;
            }
            if std::time::Instant::now() >= until {
                return;
            }
            self.wait(seen, until);
        }
    }

    pub fn notify(&self) {
        let mut seq = self.seq.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *seq = seq.wrapping_add(1);
        self.cv.notify_all();
    }

    /// The notifications so far.
    pub fn seen(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Blocks until a notification after `seen`, or until `until`.
    pub fn wait(&self, seen: u64, until: std::time::Instant) {
        let mut seq = self.seq.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *seq == seen {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            seq = self.cv.wait_timeout(seq, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }
}

/// What the governors ask of every engine, read before each decode step. Writers call
/// [`Throttle::changed`] after a change, so the engine processes get the new demands.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Decode token-rate cap per engine, in milli-tokens per second (0: none). A fixed cap
    /// (`static_rate_tps`) is set here.
    pub rate_cap_mtps: AtomicU64,
    /// Share of wall time an engine may spend in decode steps, in thousandths (0: no limit).
    /// The thermal controller drives this one: heat follows compute time, and a step's time
    /// does not depend on how many sequences share it, while its token count does.
    pub duty_milli: AtomicU32,
    /// Compute threads (0: as configured).
    pub threads: AtomicU32,
    /// Keep background requests queued (the governors: hot, or a low battery).
    pub defer_background: AtomicBool,
    /// Keep background requests queued: all apps' background work is past the energy
    /// ledger's background share (set by the budget watch; the engines see the two as one).
    pub background_spent: AtomicBool,
    /// Keep these apps' background requests queued (past their energy budgets), sorted.
    deferred_apps: std::sync::Mutex<Vec<String>>,
    /// hearthd's anonymous memory is over its ceiling (set by the ceiling watch): every
    /// engine ends its device work and refuses new work until it is cleared.
    pub over_ceiling: AtomicBool,
    /// The ceiling in MiB, for the error the refused work gets.
    pub ceiling_mib: AtomicU64,
    /// What the engines could do uncapped: tokens per second of decode-step time (EWMA over
    /// steps without a prompt chunk), in milli-tokens per second. Shown as the duty cycle's
    /// equivalent rate cap.
    pub potential_mtps: AtomicU64,
    /// Bumped by [`Throttle::changed`]; every engine handle forwards the demands on a bump.
    version: watch::Sender<u64>,
}

/// The governors' demands as one value, for the engine process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleState {
    pub rate_cap_mtps: u64,
    pub duty_milli: u32,
    pub threads: u32,
    pub defer_background: bool,
    pub over_ceiling: bool,
    pub ceiling_mib: u64,
    pub deferred_apps: Vec<String>,
}

impl Throttle {
    /// Tells the engines that the demands changed.
    pub fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A receiver that sees every [`Throttle::changed`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn state(&self) -> ThrottleState {
        ThrottleState {
            rate_cap_mtps: self.rate_cap_mtps.load(Ordering::Relaxed),
            duty_milli: self.duty_milli.load(Ordering::Relaxed),
            threads: self.threads.load(Ordering::Relaxed),
            defer_background: self.defers_background(),
            over_ceiling: self.over_ceiling.load(Ordering::Acquire),
            ceiling_mib: self.ceiling_mib.load(Ordering::Relaxed),
            deferred_apps: self.deferred_apps(),
        }
    }

    /// Whether every app's background requests stay queued (the governors' demand, or the
    /// background share spent).
    pub fn defers_background(&self) -> bool {
        self.defer_background.load(Ordering::Relaxed) || self.background_spent.load(Ordering::Relaxed)
    }

    /// The apps whose background requests stay queued.
    pub fn deferred_apps(&self) -> Vec<String> {
        self.deferred_apps.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Sets the apps whose background requests stay queued; whether that changed anything
    /// (then call [`Throttle::changed`]).
    pub fn set_deferred_apps(&self, mut apps: Vec<String>) -> bool {
        apps.sort();
        apps.dedup();
        let mut now = self.deferred_apps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = *now != apps;
        *now = apps;
        changed
    }

    /// Takes `state` as the demands in force (in the engine process).
    pub fn apply(&self, state: &ThrottleState) {
        self.set_deferred_apps(state.deferred_apps.clone());
        self.rate_cap_mtps.store(state.rate_cap_mtps, Ordering::Relaxed);
        self.duty_milli.store(state.duty_milli, Ordering::Relaxed);
        self.threads.store(state.threads, Ordering::Relaxed);
        self.defer_background.store(state.defer_background, Ordering::Relaxed);
        self.ceiling_mib.store(state.ceiling_mib, Ordering::Relaxed);
        self.over_ceiling.store(state.over_ceiling, Ordering::Release);
    }

    pub fn rate_cap(&self) -> Option<f64> {
        match self.rate_cap_mtps.load(Ordering::Relaxed) {
            0 => None,
            m => Some(m as f64 / 1000.0),
        }
    }

    /// The error device work gets while memory is over the ceiling, if it is.
    pub fn ceiling_refusal(&self) -> Option<EngineError> {
        self.over_ceiling
            .load(Ordering::Acquire)
            .then(|| EngineError::MemoryCeiling { ceiling_mib: self.ceiling_mib.load(Ordering::Relaxed) })
    }

    /// The duty cycle asked for, in (0, 1); None: no limit.
    pub fn duty(&self) -> Option<f64> {
        match self.duty_milli.load(Ordering::Relaxed) {
            0 | 1000.. => None,
            m => Some(f64::from(m) / 1000.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_wake_between_looking_and_waiting_is_not_lost_and_a_wait_ends_on_time() {
        let wake = Arc::new(Wake::default());
        let seen = wake.seen();
        wake.notify();
        let t = Instant::now();
        wake.wait(seen, t + Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(1), "returned at once");
        // Nothing new: it waits until told, or until the time.
        let seen = wake.seen();
        let t = Instant::now();
        wake.wait(seen, t + Duration::from_millis(50));
        assert!(t.elapsed() >= Duration::from_millis(50));
        let other = Arc::clone(&wake);
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            other.notify();
        });
        let t = Instant::now();
        wake.wait(seen, t + Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5), "woken, not timed out");
        waker.join().unwrap();
    }

    #[test]
    fn a_loop_sleeping_on_purpose_counts_as_beating_until_it_is_due_back() {
        let l = Liveness::default();
        l.beat_until(Instant::now() + Duration::from_secs(60));
        assert_eq!(l.since_beat(), Duration::ZERO);
        l.beat_until(Instant::now() + Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(80));
        let late = l.since_beat();
        assert!(late >= Duration::from_millis(50) && late < Duration::from_secs(5), "{late:?}");
    }
}
