//! Admission policy: which waiting request gets the next sequence slot, and when a caller must
//! hear `Busy` instead of waiting.
//!
//! - Priorities: `interactive` > `normal` > `background`. A few sequence slots (each with its
//!   own KV stream) are reserved for interactive requests, so a flood of lower-priority work
//!   can never keep the keyboard waiting for a slot.
//! - Fair share: among waiting requests of the same priority, the app that has been served
//!   the fewest tokens goes first (weighted fair queuing by tokens; all weights 1 for now).
//!   An app that becomes active starts at the least-served active app's count, so idle time
//!   is not banked into a later burst.
//! - Bounds: a waiting queue per app and overall; a request's prompt + max_tokens never
//!   exceeds its sequence's KV stream.
//!
//! - Prefix reuse: a finished request's KV is kept (parked in the highest free slot), tagged
//!   with its app and tokens. A new request of the *same app* whose prompt shares a prefix
//!   with it gets that KV (copied down to the lowest cold slot) and skips prefilling the shared
//!   part. Never across apps: that would leak one app's prompt to another through timing.
//!   Cold slots are used before kept KV is evicted. KV is reused only under the adapter set
//!   it was computed with.
//! - Sessions: an idle session's KV stays in its slot, pinned: only the session's next turn
//!   takes that slot. When a waiting request finds no free slot but pinned ones, the least
//!   recently used session's KV is parked (by the engine, see `session`) to free its slot.
//!
//! This module holds no llama state; it is plain data, tested on its own.

use std::collections::HashMap;

use hearth_ffi::{SeqId, Token};

use super::EngineError;
use super::sequence::Waiting;
use super::{AdapterSet, Priority};

/// Cost units charged to an app: per generated token, and per prompt token (prefill is
/// batched and about four times cheaper per token than decoding).
pub(super) const COST_PER_GENERATED: u64 = 4;
pub(super) const COST_PER_PROMPT: u64 = 1;

/// Scheduling limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Sequences that normal and background requests may hold together.
    pub shared_sequences: usize,
    /// Extra sequences only interactive requests may use.
    pub interactive_sequences: usize,
    /// Most waiting requests overall.
    pub queue_capacity: usize,
    /// Most waiting requests per app.
    pub queue_per_app: usize,
}

#[derive(Debug, Default)]
struct AppState {
    /// Cost units served so far (the app's virtual time).
    served: u64,
    /// Requests waiting.
    waiting: usize,
    /// Requests waiting or running.
    active: usize,
}

/// Shortest shared prefix worth reusing.
const MIN_REUSE: usize = 4;
/// Most slots that keep a finished request's KV: a kept prefix serves one app talking in
/// turns, and a kept slot is one fewer cold slot for everyone else.
const MAX_WARM: usize = 1;

/// KV left in a free slot by a finished request.
#[derive(Debug)]
struct Warm {
    app: String,
    /// The tokens the slot's KV holds, in position order.
    tokens: Vec<Token>,
    adapters: AdapterSet,
    /// When it was freed (the scheduler's release counter), for least-recently-used eviction.
    freed_at: u64,
}

/// An idle session's KV, resident in a slot that only the session's next turn takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Pinned {
    pub session: u64,
    /// The tokens the slot's KV holds, in position order.
    pub tokens: Vec<Token>,
    pub adapters: AdapterSet,
    /// When its last turn ended (the release counter), for least-recently-used parking.
    used_at: u64,
}

/// What a finished sequence leaves in its slot.
#[derive(Debug)]
pub(super) enum Keep {
    /// Nothing: the KV was dropped.
    Nothing,
    /// Its KV over these tokens, for the same app's next prompt.
    Prefix(Vec<Token>, AdapterSet),
    /// Its KV over these tokens, for this session's next turn only.
    Session(u64, Vec<Token>, AdapterSet),
}

/// The slot a starting request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub seq: SeqId,
    /// Prompt tokens already in the slot's KV (drop everything after them).
    pub reuse: usize,
    /// The slot holds another request's KV that must be dropped first.
    pub evict: bool,
    /// Copy this slot's kept KV into `seq` first (then drop it there): reuse runs in the
    /// lowest slot, as every running request should.
    pub copy_from: Option<SeqId>,
}

/// What the engine must do with KV after a release.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Released {
    /// Slots whose kept KV must be dropped.
    pub dropped: Vec<SeqId>,
    /// Kept KV to move (copy, then drop the source) to a higher slot, out of the way of the
    /// low slots running requests take.
    pub moved: Option<(SeqId, SeqId)>,
}

#[derive(Debug)]
pub(super) struct Scheduler {
    limits: Limits,
    waiting: Vec<Waiting>,
    apps: HashMap<String, AppState>,
    free_seqs: Vec<SeqId>,
    warm: HashMap<SeqId, Warm>,
    /// Slots held by idle sessions (not in `free_seqs`).
    pinned: HashMap<SeqId, Pinned>,
    releases: u64,
    /// Running non-interactive sequences.
    shared_running: usize,
    kv_reserved: u32,
    /// Background requests stay queued (governors: hot or low on battery).
    defer_background: bool,
    /// These apps' background requests stay queued (past their energy budgets).
    deferred_apps: std::collections::HashSet<String>,
}

impl Scheduler {
    pub fn new(limits: Limits) -> Self {
        let total = (limits.shared_sequences + limits.interactive_sequences) as SeqId;
        Self {
            limits,
            waiting: Vec::new(),
            apps: HashMap::new(),
            free_seqs: (0..total).collect(),
            warm: HashMap::new(),
            pinned: HashMap::new(),
            releases: 0,
            shared_running: 0,
            kv_reserved: 0,
            defer_background: false,
            deferred_apps: std::collections::HashSet::new(),
        }
    }

    /// Holds the background requests of `apps` in the queue; others' start again.
    pub fn set_deferred_apps(&mut self, apps: Vec<String>) {
        self.deferred_apps = apps.into_iter().collect();
    }

    /// Whether `w` is held back by a deferral.
    fn deferred(&self, w: &Waiting) -> bool {
        w.priority == Priority::Background && (self.defer_background || self.deferred_apps.contains(&w.caller.app))
    }

    /// Whether `app` is past its energy budget (its background work waits).
    pub fn app_deferred(&self, app: &str) -> bool {
        self.deferred_apps.contains(app)
    }

    /// Holds background requests in the queue (true) or lets them start again.
    pub fn set_defer_background(&mut self, defer: bool) {
        self.defer_background = defer;
    }

    /// Whether every waiting request is held back by the deferral.
    pub fn only_deferred_waiting(&self) -> bool {
        (self.defer_background || !self.deferred_apps.is_empty()) && self.waiting.iter().all(|w| self.deferred(w))
    }

    pub fn kv_reserved(&self) -> u32 {
        self.kv_reserved
    }

    pub fn waiting(&self) -> &[Waiting] {
        &self.waiting
    }

    /// The limits it was made with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether a request of `priority` is within the running limits.
    fn within_limits(&self, priority: Priority) -> bool {
        priority == Priority::Interactive || self.shared_running < self.limits.shared_sequences
    }

    /// Whether a new request of `priority` could start now (a pinned slot counts: its session
    /// is parked to make room).
    fn fits(&self, priority: Priority) -> bool {
        (!self.free_seqs.is_empty() || !self.pinned.is_empty()) && self.within_limits(priority)
    }

    /// The slot session `id`'s KV is resident in, if it is.
    pub fn resident(&self, id: u64) -> Option<SeqId> {
        self.pinned.iter().find(|(_, p)| p.session == id).map(|(seq, _)| *seq)
    }

    /// Refuses a new request with `Busy` when it would have to wait and the queues are full.
    pub fn check_admission(&self, app: &str, priority: Priority) -> Result<(), EngineError> {
        let nothing_ahead = self.waiting.iter().all(|w| w.priority < priority);
        if nothing_ahead && self.fits(priority) {
            return Ok(());
        }
        let app_waiting = self.apps.get(app).map_or(0, |a| a.waiting);
        let busy = |waiting: usize, limit: usize, scope: &str| EngineError::Busy {
            scope: scope.to_owned(),
            waiting,
            limit,
            retry_after_ms: 200 * (1 + waiting as u64),
        };
        if self.waiting.len() >= self.limits.queue_capacity {
            return Err(busy(self.waiting.len(), self.limits.queue_capacity, "in the queue"));
        }
        if app_waiting >= self.limits.queue_per_app {
            return Err(busy(app_waiting, self.limits.queue_per_app, "from this app"));
        }
        Ok(())
    }

    /// Queues an accepted request.
    pub fn push(&mut self, w: Waiting) {
        let floor = self.apps.values().filter(|a| a.active > 0).map(|a| a.served).min();
        let app = self.apps.entry(w.caller.app.clone()).or_default();
        if app.active == 0 {
            // Returning from idle: start level with the least-served active app.
            app.served = app.served.max(floor.unwrap_or(0));
        }
        app.active += 1;
        app.waiting += 1;
        self.waiting.push(w);
    }

    /// Tokens held by warm (free, reusable) slots and idle sessions.
    pub fn cached_tokens(&self) -> u32 {
        let warm: u32 = self.warm.values().map(|w| w.tokens.len() as u32).sum();
        warm + self.pinned.values().map(|p| p.tokens.len() as u32).sum::<u32>()
    }

    /// The slot whose session should be parked so the best waiting request can start: when
    /// that request is within its limits but every slot is free of nothing but pins. The
    /// least recently used session goes.
    pub fn slot_to_unpin(&self) -> Option<SeqId> {
        if !self.free_seqs.is_empty() || self.pinned.is_empty() {
            return None;
        }
        let w = &self.waiting[self.best()?];
        if !self.within_limits(w.priority) || w.session.is_some_and(|id| self.resident(id).is_some()) {
            return None;
        }
        self.pinned.iter().min_by_key(|(_, p)| p.used_at).map(|(seq, _)| *seq)
    }

    /// Takes the pin off `seq` (its KV was parked or dropped); the slot is free again.
    pub fn unpin(&mut self, seq: SeqId) -> Option<Pinned> {
        let p = self.pinned.remove(&seq)?;
        self.free_seqs.push(seq);
        Some(p)
    }

    /// Every pinned slot, unpinned (the engine is stopping: their KV is parked).
    pub fn unpin_all(&mut self) -> Vec<(SeqId, Pinned)> {
        let seqs: Vec<SeqId> = self.pinned.keys().copied().collect();
        seqs.into_iter().filter_map(|seq| Some((seq, self.unpin(seq)?))).collect()
    }

    /// Forgets every warm slot and returns their ids, so the caller can drop their KV.
    pub fn drain_warm(&mut self) -> Vec<SeqId> {
        self.warm.drain().map(|(seq, _)| seq).collect()
    }

    /// Picks a slot for `w`: its session's pinned slot; else its app's own warm slot with the
    /// longest shared prefix under the same adapters; else a cold slot; else the least
    /// recently freed warm slot.
    fn pick_slot(&mut self, w: &Waiting) -> Option<Slot> {
        let (app, prompt, adapters) = (w.caller.app.as_str(), w.prompt.as_slice(), &w.adapters);
        let longest = prompt.len().saturating_sub(1); // the last prompt token must be decoded
        if let Some(seq) = w.session.and_then(|id| self.resident(id)) {
            let pin = self.pinned.remove(&seq)?;
            let reuse = if pin.adapters == *adapters { shared_prefix(&pin.tokens, prompt).min(longest) } else { 0 };
            return Some(Slot { seq, reuse, evict: false, copy_from: None });
        }
        let own = self
            .free_seqs
            .iter()
            .filter(|_| w.session.is_none())
            .filter_map(|seq| {
                let w = self.warm.get(seq).filter(|w| w.app == app && w.adapters == *adapters)?;
                let shared = shared_prefix(&w.tokens, prompt).min(longest);
                (shared >= MIN_REUSE).then_some((*seq, shared))
            })
            .max_by_key(|&(_, shared)| shared);
        let lowest_cold =
            |except: SeqId| self.free_seqs.iter().copied().filter(|s| *s != except && !self.warm.contains_key(s)).min();
        let (seq, reuse, evict, copy_from) = if let Some((warm_seq, shared)) = own {
            match lowest_cold(warm_seq) {
                Some(cold) if cold < warm_seq => (cold, shared, false, Some(warm_seq)),
                _ => (warm_seq, shared, false, None),
            }
        } else if let Some(seq) = lowest_cold(SeqId::MAX) {
            // The lowest cold slot: running sequences stay packed at low ids. Measured with
            // hearth-bench: 8 streams in slots 2..9 decode at 0.65 of a static batch, in slots
            // 0..7 at 1.0 (llama.cpp attends over the stream range of a batch).
            (seq, 0, false, None)
        } else {
            let (&seq, _) =
                self.warm.iter().filter(|(s, _)| self.free_seqs.contains(s)).min_by_key(|(_, w)| w.freed_at)?;
            (seq, 0, true, None)
        };
        self.free_seqs.retain(|&s| s != seq);
        self.warm.remove(&seq);
        if let Some(src) = copy_from {
            // Its KV moves to `seq`; the source slot is cold from now on.
            self.warm.remove(&src);
        }
        Some(Slot { seq, reuse, evict, copy_from })
    }

    /// The waiting request that goes next: highest priority, then least served app, then
    /// oldest (deferred background requests not at all).
    fn best(&self) -> Option<usize> {
        let served = |app: &str| self.apps.get(app).map_or(0, |a| a.served);
        self.waiting
            .iter()
            .enumerate()
            .filter(|(_, w)| !self.deferred(w))
            .max_by(|(_, a), (_, b)| {
                a.priority
                    .cmp(&b.priority)
                    .then(served(&b.caller.app).cmp(&served(&a.caller.app)))
                    .then(b.id.cmp(&a.id))
            })
            .map(|(i, _)| i)
    }

    /// The next request to start, with its slot, if the best candidate fits now.
    pub fn pop_next(&mut self) -> Option<(Waiting, Slot)> {
        let best = self.best()?;
        let w = &self.waiting[best];
        let (priority, need) = (w.priority, w.kv_need());
        let resident = w.session.is_some_and(|id| self.resident(id).is_some());
        if !self.within_limits(priority) || (self.free_seqs.is_empty() && !resident) {
            return None;
        }
        let w = self.waiting.swap_remove(best);
        let Some(slot) = self.pick_slot(&w) else {
            self.waiting.push(w);
            return None;
        };
        if priority != Priority::Interactive {
            self.shared_running += 1;
        }
        self.kv_reserved += need;
        if let Some(app) = self.apps.get_mut(&w.caller.app) {
            app.waiting -= 1;
        }
        Some((w, slot))
    }

    /// Takes a waiting request out of the queue (cancelled before it started).
    pub fn remove_waiting(&mut self, index: usize) -> Waiting {
        let w = self.waiting.swap_remove(index);
        self.forget(&w.caller.app, true);
        w
    }

    /// Returns a finished sequence's slot and KV reservation; `keep` says what its KV is kept
    /// for. Returns the slots whose kept KV must now be dropped (at most `MAX_WARM` are kept).
    pub fn release(&mut self, app: &str, priority: Priority, seq: SeqId, kv_reserved: u32, keep: Keep) -> Released {
        self.releases += 1;
        let mut released = Released::default();
        match keep {
            Keep::Session(session, tokens, adapters) => {
                self.pinned.insert(seq, Pinned { session, tokens, adapters, used_at: self.releases });
            }
            Keep::Nothing => self.free_seqs.push(seq),
            Keep::Prefix(tokens, _) if tokens.is_empty() => self.free_seqs.push(seq),
            Keep::Prefix(tokens, adapters) => {
                self.free_seqs.push(seq);
                self.keep_warm(app, seq, tokens, adapters, &mut released);
            }
        }
        if priority != Priority::Interactive {
            self.shared_running -= 1;
        }
        self.kv_reserved -= kv_reserved;
        self.forget(app, false);
        released
    }

    /// Keeps a released slot's KV for its app's next prompt (dropping the oldest beyond
    /// `MAX_WARM`), moved to the highest cold slot so new requests keep the low ones.
    fn keep_warm(&mut self, app: &str, seq: SeqId, tokens: Vec<Token>, adapters: AdapterSet, released: &mut Released) {
        self.warm.insert(seq, Warm { app: app.to_owned(), tokens, adapters, freed_at: self.releases });
        while self.warm.len() > MAX_WARM {
            let Some((&oldest, _)) = self.warm.iter().min_by_key(|(_, w)| w.freed_at) else { break };
            self.warm.remove(&oldest);
            released.dropped.push(oldest);
        }
        let highest = self.free_seqs.iter().copied().filter(|s| !self.warm.contains_key(s)).max();
        if let Some(to) = highest.filter(|&h| h > seq)
            && let Some(w) = self.warm.remove(&seq)
        {
            self.warm.insert(to, w);
            released.moved = Some((seq, to));
        }
    }

    fn forget(&mut self, app: &str, was_waiting: bool) {
        if let Some(a) = self.apps.get_mut(app) {
            a.active -= 1;
            if was_waiting {
                a.waiting -= 1;
            }
            if a.active == 0 {
                // Idle apps keep no state: on return they start level with the active ones.
                self.apps.remove(app);
            }
        }
    }

    /// Charges served work to an app.
    pub fn charge(&mut self, app: &str, units: u64) {
        if let Some(a) = self.apps.get_mut(app) {
            a.served += units;
        }
    }
}

/// How many leading tokens `a` and `b` share.
pub(super) fn shared_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests;
