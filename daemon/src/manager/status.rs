//! What the model manager publishes: load progress, memory, queues, and ListModels' report.

use std::collections::BTreeMap;

use crate::engine::{EngineStatus, LoadedModelInfo, Priority};
use crate::memory::PressureReading;
use crate::models::ModelEntry;

use super::Loaded;

/// Where a model load is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadProgress {
    pub phase: LoadPhase,
    /// 0..=1 within the phase.
    pub fraction: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPhase {
    /// Hashing the file against its manifest.
    Verifying,
    /// llama.cpp mapping the weights.
    Loading,
    /// Creating the context (KV cache).
    Starting,
}

impl LoadPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verifying => "verifying",
            Self::Loading => "loading",
            Self::Starting => "starting",
        }
    }
}

/// Memory accounting and pressure, as published.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryStatus {
    pub budget: u64,
    /// Weights + KV of the loaded models.
    pub used: u64,
    /// Sustained pressure now.
    pub pressure: bool,
    pub reading: PressureReading,
    /// Models unloaded since start: to make room, for idleness, for pressure.
    pub evicted: u32,
    pub expired: u32,
    pub pressure_unloads: u32,
    /// KV caches shrunk for pressure.
    pub pressure_shrinks: u32,
    /// The anonymous-memory ceiling, the latest reading, whether use is over it, and how
    /// often it went over since start.
    pub ceiling: u64,
    pub anon: u64,
    pub over_ceiling: bool,
    pub ceiling_hits: u32,
    /// Engine processes that died or hung (and were restarted) since start.
    pub engine_failures: u32,
}

/// Everything the D-Bus layer publishes about models and queues.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ManagerStatus {
    /// Queue state of each loaded model's engine.
    pub engines: BTreeMap<String, (u64, EngineStatus)>,
    /// Loaded model names.
    pub loaded: Vec<String>,
    /// Loads in progress.
    pub loading: BTreeMap<String, LoadProgress>,
    pub memory: MemoryStatus,
}

impl ManagerStatus {
    pub fn queue_depth(&self) -> u32 {
        self.engines.values().map(|(_, s)| s.queue_depth()).sum()
    }

    pub fn count(&self, priority: Priority) -> u32 {
        self.engines.values().map(|(_, s)| s.count(priority)).sum()
    }
}

/// What ListModels reports of one model.
#[derive(Debug, Clone)]
pub struct ModelReport {
    pub entry: ModelEntry,
    pub info: Option<LoadedModelInfo>,
    /// The engine process of a loaded model, and its sandbox.
    pub engine: Option<(u32, crate::engine::SandboxReport)>,
    pub pinned: bool,
    pub verified: bool,
    pub shrunk: bool,
    pub memory: u64,
    /// What its offloaded layers take of the GPU's memory.
    pub device_bytes: u64,
    pub last_error: Option<String>,
}

impl super::ModelManager {
    /// Queue state summed over the loaded engines, read from them now (the published status
    /// follows a moment later).
    pub fn queue(&self) -> EngineStatus {
        let state = self.state();
        let mut total = EngineStatus::default();
        for l in state.loaded.values() {
            let s = l.engine.status().borrow().clone();
            total.running += s.running;
            total.waiting += s.waiting;
            for (t, n) in total.by_priority.iter_mut().zip(s.by_priority) {
                *t += n;
            }
        }
        total
    }

    /// KV gauges summed over the loaded models: (size, reserved, used, cached).
    pub fn kv_totals(&self) -> crate::engine::KvSnapshot {
        let mut t = Default::default();
        for l in self.state().loaded.values() {
            l.engine.kv().add_to(&mut t);
        }
        t
    }

    /// Every installed model, as ListModels reports it.
    pub fn report(&self) -> Vec<ModelReport> {
        let state = self.state();
        self.catalog()
            .iter()
            .map(|entry| {
                let l = state.loaded.get(&entry.manifest.name);
                ModelReport {
                    entry: entry.clone(),
                    info: l.map(|l| l.engine.model().clone()),
                    engine: l.map(|l| (l.engine.pid(), l.engine.sandbox().clone())),
                    pinned: self.pinned(&state, entry),
                    verified: state.verified.contains(&entry.manifest.name),
                    shrunk: l.is_some_and(|l| l.shrunk),
                    memory: l.map_or(0, Loaded::bytes),
                    device_bytes: l.map_or(0, |l| l.device_bytes),
                    last_error: state.errors.get(&entry.manifest.name).cloned(),
                }
            })
            .collect()
    }
}
