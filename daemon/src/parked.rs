//! Sessions' KV cache between turns, on hearthd's side.
//!
//! While a session is idle its KV stays in its sequence slot in the engine process (the
//! scheduler pins the slot), so the next turn prefills only what is new. When the slot is
//! wanted by another request, or the engine stops (model unloaded or its KV cache shrunk
//! under memory pressure), the engine saves the KV with llama.cpp's sequence state API and
//! hands it to hearthd, which *parks* it: sealed with the device key for the session's app
//! (XChaCha20-Poly1305, the app id as associated data, the session id and model inside) and
//! written to the state directory. The engine never sees the key or the directory. The next
//! turn's Submit carries it back opened; the engine restores it into whichever slot it gets,
//! and decodes exactly as if it had never left.
//!
//! The store outlives engines: it is *the* registry of open sessions — whose they are (app
//! and connection), which model they run, the turn running now, and their parked KV. The
//! D-Bus session objects (service/session.rs) hold only their transcripts and ask it the
//! rest. Parked
//! KV has a disk budget (`limits.parked_sessions_mib`): past it, the KV parked longest ago is
//! dropped, and that session's next turn recomputes it from the transcript (slower, never
//! wrong).

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hearth_ffi::Token;

use crate::engine::protocol::SessionKv;
use crate::engine::{AdapterSet, CancelReason, CancelToken, SessionVault};
use crate::seal::{Purpose, Sealer};

/// Why a session's turn may not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnRefused {
    Closed,
    Busy,
}

/// What a parked session's KV covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedKv {
    /// The tokens the saved KV holds, in position order.
    pub tokens: Vec<Token>,
    /// The adapter set the KV was computed under.
    pub adapters: AdapterSet,
    /// Size of the sealed file.
    pub bytes: u64,
    file: PathBuf,
}

#[derive(Debug)]
struct Entry {
    app: String,
    model: String,
    /// The bus connection that opened it (the only one that may use it).
    owner: String,
    /// The running turn's switch: one turn at a time, cancelled when the session closes.
    turn: Option<CancelToken>,
    parked: Option<ParkedKv>,
    /// When it was parked, in park order (the oldest is dropped first).
    parked_seq: u64,
}

/// The open sessions, and where their parked KV is.
#[derive(Debug)]
pub struct SessionStore {
    dir: PathBuf,
    sealer: Arc<Sealer>,
    open: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    next_park: AtomicU64,
    /// Bytes parked KV may take on disk.
    budget: AtomicU64,
    /// Parked KV dropped for the budget since start.
    dropped: AtomicU64,
}

impl SessionStore {
    /// A store parking into `<state_dir>/sessions` (made 0700), at most `budget` bytes. Files
    /// left by an earlier run are removed: sessions do not outlive the daemon.
    pub fn new(state_dir: &Path, sealer: Arc<Sealer>, budget: u64) -> std::io::Result<Self> {
        let dir = state_dir.join("sessions");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        crate::state_file::sweep(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "kv") {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Self {
            dir,
            sealer,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            next_park: AtomicU64::new(1),
            budget: AtomicU64::new(budget),
            dropped: AtomicU64::new(0),
        })
    }

    /// A new disk budget (SIGHUP); it applies from the next park.
    pub fn set_budget(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::Relaxed);
    }

    /// Parked KV dropped for the disk budget since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a new session of `app` on `model`, opened by bus connection `owner`;
    /// returns its id, or how many the app holds when that is already `max_per_app`.
    pub fn open(&self, app: &str, model: &str, owner: &str, max_per_app: usize) -> Result<u64, usize> {
        let mut entries = self.entries();
        let held = entries.values().filter(|e| e.app == app).count();
        if held >= max_per_app {
            return Err(held);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            app: app.to_owned(),
            model: model.to_owned(),
            owner: owner.to_owned(),
            turn: None,
            parked: None,
            parked_seq: 0,
        };
        entries.insert(id, entry);
        Ok(id)
    }

    /// Forgets a session: cancels its running turn and deletes its parked KV. Returns its
    /// app and model (None: it was not open). Engines drop its resident KV on their own
    /// (`EngineHandle::close_session`).
    pub fn close(&self, id: u64) -> Option<(String, String)> {
        let entry = self.entries().remove(&id)?;
        Some(Self::end(entry))
    }

    fn end(entry: Entry) -> (String, String) {
        if let Some(turn) = &entry.turn {
            turn.cancel(CancelReason::Caller);
        }
        if let Some(p) = &entry.parked {
            remove_quietly(&p.file);
        }
        (entry.app, entry.model)
    }

    /// Forgets every session and deletes all parked KV: the daemon is stopping, and sessions
    /// do not outlive it. Engines stopped after this drop their sessions' KV instead of
    /// writing it to disk.
    pub fn close_all(&self) {
        let all: Vec<Entry> = self.entries().drain().map(|(_, e)| e).collect();
        for e in all {
            Self::end(e);
        }
    }

    /// The sessions bus connection `owner` opened.
    pub fn of_owner(&self, owner: &str) -> Vec<u64> {
        self.entries().iter().filter(|(_, e)| e.owner == owner).map(|(id, _)| *id).collect()
    }

    /// Starts a turn of session `id` under `cancel`: refused while another runs, or once
    /// the session is closed.
    pub fn begin_turn(&self, id: u64, cancel: CancelToken) -> Result<(), TurnRefused> {
        let mut entries = self.entries();
        let entry = entries.get_mut(&id).ok_or(TurnRefused::Closed)?;
        if entry.turn.is_some() {
            return Err(TurnRefused::Busy);
        }
        entry.turn = Some(cancel);
        Ok(())
    }

    /// Ends session `id`'s turn; whether the session is still open (its transcript may grow).
    pub fn end_turn(&self, id: u64) -> bool {
        self.entries().get_mut(&id).map(|e| e.turn = None).is_some()
    }

    /// Whether session `id` is open.
    pub fn is_open(&self, id: u64) -> bool {
        self.entries().contains_key(&id)
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// Sessions whose KV is parked, and the bytes their files take.
    pub fn parked(&self) -> (usize, u64) {
        let entries = self.entries();
        let parked: Vec<&ParkedKv> = entries.values().filter_map(|e| e.parked.as_ref()).collect();
        (parked.len(), parked.iter().map(|p| p.bytes).sum())
    }

    /// Whether session `id` is open and runs `model` (so `model`'s engine may park its KV).
    pub fn runs(&self, id: u64, model: &str) -> bool {
        self.entries().get(&id).is_some_and(|e| e.model == model)
    }

    /// Whether session `id` is open, belongs to `app` and runs `model`.
    pub fn owns(&self, id: u64, app: &str, model: &str) -> bool {
        self.entries().get(&id).is_some_and(|e| e.app == app && e.model == model)
    }

    /// Parks `state` (the session's KV over `tokens`). Returns Ok(false), keeping nothing,
    /// when the session is closed. Sealing and writing run outside the lock, so a close or a
    /// `KvCache` read never waits for the disk. To stay in the budget, the KV parked longest
    /// ago is dropped; KV larger than the whole budget is refused.
    pub fn park(&self, id: u64, tokens: Vec<Token>, adapters: AdapterSet, state: &[u8]) -> Result<bool, String> {
        let Some((app, model)) = self.entries().get(&id).map(|e| (e.app.clone(), e.model.clone())) else {
            return Ok(false);
        };
        let plain = [header(id, &model).as_slice(), state].concat();
        let sealed = self
            .sealer
            .seal_for(Purpose::SessionKv, &app, &plain)
            .map_err(|e| format!("cannot seal session KV: {e}"))?;
        let budget = self.budget.load(Ordering::Relaxed);
        if sealed.len() as u64 > budget {
            return Err(format!(
                "{} KiB of KV is more than the parked-session budget ({} KiB, limits.parked_sessions_mib)",
                sealed.len() / 1024,
                budget / 1024
            ));
        }
        let file = self.dir.join(format!("{id}.kv"));
        crate::state_file::replace(&file, &sealed).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(&id) else {
            // Closed while the file was written: the close found nothing parked to delete.
            drop(entries);
            remove_quietly(&file);
            return Ok(false);
        };
        entry.parked = Some(ParkedKv { tokens, adapters, bytes: sealed.len() as u64, file });
        entry.parked_seq = self.next_park.fetch_add(1, Ordering::Relaxed);
        let mut used: u64 = entries.values().filter_map(|e| e.parked.as_ref()).map(|p| p.bytes).sum();
        let mut evicted = Vec::new();
        while used > budget {
            let Some((&oldest, _)) =
                entries.iter().filter(|(k, e)| **k != id && e.parked.is_some()).min_by_key(|(_, e)| e.parked_seq)
            else {
                break;
            };
            let p = entries.get_mut(&oldest).and_then(|e| e.parked.take()).expect("chosen for its parked KV");
            used -= p.bytes;
            evicted.push((oldest, p));
        }
        drop(entries);
        for (session, p) in evicted {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            remove_quietly(&p.file);
            tracing::info!(
                session,
                bytes = p.bytes,
                budget,
                "parked session KV dropped for the disk budget: its next turn recomputes it"
            );
        }
        Ok(true)
    }

    /// Takes session `id`'s parked KV, if it has any: reads the file, checks that it was
    /// sealed by this device for the session's app, session and model, and deletes it.
    /// Returns the KV's description and the llama.cpp state bytes.
    pub fn unpark(&self, id: u64) -> Option<Result<(ParkedKv, Vec<u8>), String>> {
        let (parked, app, model) = {
            let mut entries = self.entries();
            let entry = entries.get_mut(&id)?;
            (entry.parked.take()?, entry.app.clone(), entry.model.clone())
        };
        let read = std::fs::read(&parked.file);
        remove_quietly(&parked.file);
        let sealed = match read {
            Ok(b) => b,
            Err(e) => return Some(Err(format!("cannot read {}: {e}", parked.file.display()))),
        };
        let opened = match self.sealer.open_for(Purpose::SessionKv, &sealed) {
            Ok(o) => o,
            Err(e) => return Some(Err(format!("parked KV does not open: {e}"))),
        };
        let (sealed_for, plain) = opened;
        if sealed_for != app {
            return Some(Err("parked KV was sealed for another app".into()));
        }
        let Some(state) = plain.strip_prefix(header(id, &model).as_slice()) else {
            return Some(Err("parked KV belongs to another session or model".into()));
        };
        Some(Ok((parked, state.to_vec())))
    }
}

impl SessionVault for SessionStore {
    fn owns(&self, id: u64, app: &str, model: &str) -> bool {
        SessionStore::owns(self, id, app, model)
    }

    fn runs(&self, id: u64, model: &str) -> bool {
        SessionStore::runs(self, id, model)
    }

    fn take(&self, id: u64) -> Option<Result<SessionKv, String>> {
        self.unpark(id)
            .map(|r| r.map(|(parked, state)| SessionKv { tokens: parked.tokens, adapters: parked.adapters, state }))
    }

    fn keep(&self, id: u64, kv: SessionKv) -> Result<bool, String> {
        self.park(id, kv.tokens, kv.adapters, &kv.state)
    }
}

/// What the sealed plaintext starts with: binds the KV to its session and model (the app is
/// bound by the seal's associated data).
fn header(id: u64, model: &str) -> Vec<u8> {
    [b"hearth-session-kv\0".as_slice(), &id.to_be_bytes(), model.as_bytes(), b"\0"].concat()
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(file = %path.display(), error = %e, "cannot remove parked session KV");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> SessionStore {
        let sealer = Arc::new(Sealer::open(dir).unwrap());
        SessionStore::new(dir, sealer, 1 << 20).unwrap()
    }

    #[test]
    fn parked_kv_round_trips_sealed_and_bound_to_its_session() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = s.open("app.a", "m", ":1.1", 8).unwrap();
        let b = s.open("app.a", "m", ":1.1", 8).unwrap();
        let set = AdapterSet::default();
        assert!(s.park(a, vec![1, 2, 3], set.clone(), b"the kv bytes").unwrap());
        let file = dir.path().join(format!("sessions/{a}.kv"));
        let on_disk = std::fs::read(&file).unwrap();
        assert!(!on_disk.windows(12).any(|w| w == b"the kv bytes"), "parked KV is encrypted");
        assert_eq!(s.parked(), (1, on_disk.len() as u64));
        // Another session's file swapped in does not open as this one's.
        assert!(s.park(b, vec![9], set.clone(), b"other").unwrap());
        std::fs::copy(dir.path().join(format!("sessions/{b}.kv")), &file).unwrap();
        let err = s.unpark(a).unwrap().unwrap_err();
        assert!(err.contains("another session"), "{err}");
        assert!(!file.exists(), "taken files are deleted");
        // Parked KV never opens as a message an app sealed, nor the other way round.
        let sealer = Sealer::open(dir.path()).unwrap();
        assert!(sealer.open_blob(&on_disk).is_err());
        let (kv, state) = s.unpark(b).unwrap().unwrap();
        assert_eq!((kv.tokens, state.as_slice()), (vec![9], b"other".as_slice()));
        assert!(s.unpark(b).is_none(), "taken once");
        // A closed session parks nothing.
        s.close(a);
        assert!(!s.park(a, vec![1], set.clone(), b"x").unwrap());
        assert_eq!(s.len(), 1);
        // At daemon stop every session goes, with its parked KV.
        assert!(s.park(b, vec![9], set, b"other").unwrap());
        s.close_all();
        assert_eq!((s.len(), s.parked(), s.is_open(b)), (0, (0, 0), false));
        assert_eq!(std::fs::read_dir(dir.path().join("sessions")).unwrap().count(), 0);
    }

    #[test]
    fn parked_kv_stays_in_its_disk_budget_dropping_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let set = AdapterSet::default();
        let kv = vec![7u8; 1000];
        let ids: Vec<u64> = (0..3).map(|_| s.open("app.a", "m", ":1.1", 8).unwrap()).collect();
        assert!(s.park(ids[0], vec![1], set.clone(), &kv).unwrap());
        let one = s.parked().1;
        s.set_budget(2 * one + one / 2);
        assert!(s.park(ids[1], vec![1], set.clone(), &kv).unwrap());
        assert_eq!((s.parked().0, s.dropped()), (2, 0));
        // A third does not fit: the one parked longest ago goes, file and all.
        assert!(s.park(ids[2], vec![1], set.clone(), &kv).unwrap());
        assert_eq!((s.parked(), s.dropped()), ((2, 2 * one), 1));
        assert!(s.unpark(ids[0]).is_none(), "dropped: the next turn recomputes it");
        assert!(!dir.path().join(format!("sessions/{}.kv", ids[0])).exists());
        assert!(s.unpark(ids[1]).unwrap().is_ok() && s.unpark(ids[2]).unwrap().is_ok());
        // KV larger than the whole budget is refused, and nothing else is dropped for it.
        assert!(s.park(ids[1], vec![1], set.clone(), &kv).unwrap());
        s.set_budget(one / 2);
        let err = s.park(ids[2], vec![1], set, &kv).unwrap_err();
        assert!(err.contains("parked-session budget"), "{err}");
        assert_eq!(s.parked(), (1, one));
    }

    #[test]
    fn the_registry_bounds_sessions_per_app_runs_one_turn_and_a_close_cancels_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let ids: Vec<u64> = (0..2).map(|_| s.open("app.a", "m", ":1.7", 2).unwrap()).collect();
        assert_eq!(s.open("app.a", "m", ":1.8", 2), Err(2), "the app's limit, whatever the connection");
        let other = s.open("app.b", "m", ":1.9", 2).unwrap();
        let mut mine = s.of_owner(":1.7");
        mine.sort_unstable();
        assert_eq!(mine, ids);
        assert_eq!(s.of_owner(":1.9"), [other]);
        assert!(s.owns(other, "app.b", "m") && !s.owns(other, "app.a", "m") && !s.owns(other, "app.b", "n"));

        // One turn at a time; a close cancels the running one, and nothing starts after it.
        let turn = CancelToken::default();
        s.begin_turn(ids[0], turn.clone()).unwrap();
        assert_eq!(s.begin_turn(ids[0], CancelToken::default()), Err(TurnRefused::Busy));
        assert!(s.end_turn(ids[0]));
        s.begin_turn(ids[0], turn.clone()).unwrap();
        assert_eq!(s.close(ids[0]), Some(("app.a".to_owned(), "m".to_owned())));
        assert_eq!(turn.reason(), Some(CancelReason::Caller));
        assert_eq!(s.begin_turn(ids[0], CancelToken::default()), Err(TurnRefused::Closed));
        assert!(!s.end_turn(ids[0]), "a turn ending after the close finds the session gone");
        assert_eq!(s.close(ids[0]), None, "closed once");
        // A slot is free again for the app.
        assert!(s.open("app.a", "m", ":1.8", 2).is_ok());
    }
}
