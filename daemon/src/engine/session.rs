//! Sessions inside the engine process: which sessions it may keep KV for, the parked KV
//! hearthd handed back with a turn, and the way out for KV that leaves its slot.
//!
//! hearthd owns the session registry (and checks that a turn's session is the caller's on
//! this model before submitting it); the engine only learns of a session from the turns it
//! is given, and forgets it when hearthd says it closed.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::mpsc;

use super::protocol::{FromEngine, SessionKv};

#[derive(Debug, Default)]
struct Known {
    open: HashSet<u64>,
    /// KV delivered with a turn, taken when the turn starts.
    delivered: HashMap<u64, SessionKv>,
}

/// The engine's view of the sessions (shared by its I/O thread and its worker).
#[derive(Debug)]
pub struct SessionLink {
    known: Mutex<Known>,
    out: mpsc::UnboundedSender<FromEngine>,
}

impl SessionLink {
    pub fn new(out: mpsc::UnboundedSender<FromEngine>) -> Self {
        Self { known: Mutex::new(Known::default()), out }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A turn of session `id` arrived, with its parked KV if it had any.
    pub fn turn(&self, id: u64, kv: Option<SessionKv>) {
        let mut known = self.known();
        known.open.insert(id);
        if let Some(kv) = kv {
            known.delivered.insert(id, kv);
        }
    }

    /// Session `id` closed: nothing of it is kept.
    pub fn close(&self, id: u64) {
        let mut known = self.known();
        known.open.remove(&id);
        known.delivered.remove(&id);
    }

    /// hearthd is stopping: sessions end with it, and nothing of them is handed over.
    pub fn close_all(&self) {
        let mut known = self.known();
        known.open.clear();
        known.delivered.clear();
    }

    pub fn is_open(&self, id: u64) -> bool {
        self.known().open.contains(&id)
    }

    /// Takes the KV delivered for session `id`'s turn.
    pub fn take(&self, id: u64) -> Option<SessionKv> {
        self.known().delivered.remove(&id)
    }

    /// Hands an idle session's KV to hearthd to seal and store. False when hearthd is gone,
    /// or the KV is too large for one frame (the session's next turn recomputes it).
    pub fn park(&self, session: u64, kv: SessionKv) -> bool {
        if kv.state.len() + 4 * kv.tokens.len() + (1 << 20) > super::protocol::MAX_FRAME {
            tracing::warn!(
                session,
                bytes = kv.state.len(),
                "session KV too large to park: its next turn recomputes it"
            );
            return false;
        }
        self.out.send(FromEngine::Parked { session, kv }).is_ok()
    }
}
