//! The model manager: which models are in memory, under what budget, for how long.
//!
//! Each loaded model has its own engine (a `hearth-engine` process). Requests take a [`Lease`] on the
//! model they need; a model with leases is never unloaded. Loads are serialised (one at a
//! time: a phone's storage and memory bandwidth are the limit) and make room first by
//! unloading idle, unpinned models, least recently used first. Idle models go after their
//! keep-alive; under sustained memory pressure idle models are unloaded and pinned ones keep
//! their weights but shrink their KV cache.
//!
//! Locking: `state` is a plain mutex, never held across an await; `load_lock` (async)
//! serialises loads and restarts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hearth_ffi::DeviceInfo;
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::{EngineHandle, EngineStatus, SpawnSpec};
use crate::error::Error;
use crate::memory::PressureReading;
use crate::models::{Capability, Catalog, HashCache, ModelEntry, open_verified};
use crate::parked::SessionStore;

mod load;
mod memory;
mod status;
#[cfg(test)]
pub(crate) mod tests;

pub use status::{LoadPhase, LoadProgress, ManagerStatus, MemoryStatus, ModelReport};

const MIB: u64 = 1 << 20;

/// Why a model is unloaded (counted in [`MemoryStatus`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unload {
    Evicted,
    Expired,
    Pressure,
    Admin,
}

/// Requests using a model, and when it was last used.
#[derive(Debug)]
struct Activity {
    active: AtomicU32,
    last_used_ms: AtomicU64,
}

/// A request's hold on a loaded model: while it lives, the model stays.
#[derive(Debug)]
pub struct Lease {
    pub engine: EngineHandle,
    activity: Arc<Activity>,
    epoch: Instant,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.activity.last_used_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        self.activity.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct Loaded {
    generation: u64,
    engine: EngineHandle,
    /// How its engine is started, with full-size settings (the KV cache may run shrunk).
    spec: SpawnSpec,
    shrunk: bool,
    activity: Arc<Activity>,
    pinned: bool,
    keep_alive: Duration,
    weights: u64,
    kv: u64,
    /// What its offloaded layers take of the GPU's memory (0: none offloaded).
    device_bytes: u64,
}

impl Loaded {
    fn bytes(&self) -> u64 {
        self.weights + self.kv
    }

    fn idle(&self) -> bool {
        self.activity.active.load(Ordering::Acquire) == 0
    }

    fn last_used_ms(&self) -> u64 {
        self.activity.last_used_ms.load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
struct State {
    loaded: BTreeMap<String, Loaded>,
    /// Pinned by LoadModel at run time.
    pinned: std::collections::BTreeSet<String>,
    /// Why the last load of a model failed.
    errors: BTreeMap<String, String>,
    /// Models whose file was verified in this run.
    verified: std::collections::BTreeSet<String>,
    /// When each model's engine died lately (restarts back off).
    failures: BTreeMap<String, Vec<Instant>>,
    next_generation: u64,
}

#[derive(Debug)]
struct Inner {
    /// Replaced as a whole on reload (SIGHUP); engines already running keep their settings.
    config: RwLock<Arc<Config>>,
    catalog: RwLock<Arc<Catalog>>,
    /// The devices the engine program listed at start-up.
    devices: Vec<DeviceInfo>,
    hashes: HashCache,
    state: Mutex<State>,
    load_lock: tokio::sync::Mutex<()>,
    status: watch::Sender<ManagerStatus>,
    epoch: Instant,
    throttle: Arc<crate::engine::Throttle>,
    /// Every engine's compute time per app, for the energy ledger.
    compute: Arc<crate::engine::Compute>,
    sessions: Arc<SessionStore>,
    /// Unit tests run their engines as the protocol-speaking fake.
    #[cfg(test)]
    fake: Option<Arc<crate::engine::fake::FakeEngine>>,
}

/// The handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct ModelManager {
    inner: Arc<Inner>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("default model {0:?} is not installed in any models directory")]
    DefaultModelMissing(String),
    #[error("pinned model {0:?} is not installed in any models directory")]
    PinnedModelMissing(String),
    #[error("engine.devices names {missing:?}, but the devices present are {present:?}")]
    NoSuchDevice { missing: String, present: Vec<String> },
    #[error("engine.devices cannot change while hearthd runs (restart it)")]
    DevicesChanged,
    #[error("cannot list the compute devices: {0}")]
    Devices(String),
}

/// The compute devices, as the engine program of `config` lists them (hearthd itself never
/// initialises a GPU backend).
pub fn probe_devices(config: &Config) -> Result<Vec<DeviceInfo>, ManagerError> {
    crate::engine::probe::devices(&config.engine_program(), &load::engine_base_env()).map_err(ManagerError::Devices)
}

/// One compute device as the Backends property shows it.
#[derive(Debug, Clone)]
pub struct BackendReport {
    pub device: DeviceInfo,
    /// Whether the configuration lets the engines offload to it.
    pub owned: bool,
    /// Of the GPU the models' layers go to: its budget and what they take of it (bytes).
    pub budget: Option<(u64, u64)>,
}

/// The checks a configuration must pass against the installed models and present devices.
fn check(config: &Config, catalog: &Catalog, devices: &[DeviceInfo]) -> Result<(), ManagerError> {
    if catalog.get(&config.models.default).is_none() {
        return Err(ManagerError::DefaultModelMissing(config.models.default.clone()));
    }
    if let Some(p) = config.models.pinned.iter().find(|p| catalog.get(p).is_none()) {
        return Err(ManagerError::PinnedModelMissing(p.clone()));
    }
    if let Some(missing) = config.engine.devices.iter().find(|d| !devices.iter().any(|x| &&x.name == d)) {
        return Err(ManagerError::NoSuchDevice {
            missing: missing.clone(),
            present: devices.iter().map(|d| d.name.clone()).collect(),
        });
    }
    Ok(())
}

fn unavailable(name: &str, reason: impl Into<String>) -> Error {
    Error::ModelUnavailable { name: name.to_owned(), reason: reason.into() }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

impl ModelManager {
    pub fn new(
        config: Config,
        catalog: Arc<Catalog>,
        budget: u64,
        throttle: Arc<crate::engine::Throttle>,
        sessions: Arc<SessionStore>,
        devices: Vec<DeviceInfo>,
    ) -> Result<Self, ManagerError> {
        // No llama_backend_init here: it builds ggml's backend registry, and ggml-vulkan's
        // registration starts the Vulkan loader and driver in whichever process calls it.
        check(&config, &catalog, &devices)?;
        let cache_path = prepare_state_dir(&config.daemon.state_dir).map(|d| d.join("model-hashes.toml"));
        let status =
            ManagerStatus { memory: MemoryStatus { budget, ..MemoryStatus::default() }, ..ManagerStatus::default() };
        let (status, _) = watch::channel(status);
        Ok(Self {
            inner: Arc::new(Inner {
                config: RwLock::new(Arc::new(config)),
                catalog: RwLock::new(catalog),
                devices,
                hashes: HashCache::open(cache_path),
                state: Mutex::new(State::default()),
                load_lock: tokio::sync::Mutex::new(()),
                status,
                epoch: Instant::now(),
                throttle,
                compute: Arc::default(),
                sessions,
                #[cfg(test)]
                fake: None,
            }),
        })
    }

    /// The governors' demands on the engines (and the apps past their energy budgets).
    pub fn throttle(&self) -> Arc<crate::engine::Throttle> {
        Arc::clone(&self.inner.throttle)
    }

    /// Every engine's compute time per app so far (engines that exited included).
    pub fn compute(&self) -> Arc<crate::engine::Compute> {
        Arc::clone(&self.inner.compute)
    }

    /// A manager whose engines are `fake` (unit tests).
    #[cfg(test)]
    pub fn with_fake_engine(mut self, fake: Arc<crate::engine::fake::FakeEngine>) -> Self {
        Arc::get_mut(&mut self.inner).expect("a new manager").fake = Some(fake);
        self
    }

    /// What runs this manager's engines.
    fn launch(&self, config: &Config) -> crate::engine::Launch {
        #[cfg(test)]
        if let Some(fake) = &self.inner.fake {
            return crate::engine::Launch::Fake(Arc::clone(fake));
        }
        crate::engine::Launch::Program(config.engine_program())
    }

    /// Open sessions and their parked KV.
    pub fn sessions(&self) -> &Arc<SessionStore> {
        &self.inner.sessions
    }

    /// Tells the engine of `model`, if it is loaded, that session `id` closed.
    pub async fn close_session(&self, model: &str, id: u64) {
        let engine = self.state().loaded.get(model).map(|l| l.engine.clone());
        if let Some(e) = engine {
            e.close_session(id).await;
        }
    }

    pub fn status(&self) -> watch::Receiver<ManagerStatus> {
        self.inner.status.subscribe()
    }

    pub fn default_model(&self) -> String {
        self.config().models.default.clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.inner.config.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Whether a model of this name is installed.
    pub fn is_installed(&self, name: &str) -> bool {
        self.catalog().get(name).is_some()
    }

    /// The adapter of model `name` (None: the default model) trained for `task`, if its
    /// manifest declares one.
    pub fn task_adapter(&self, name: Option<&str>, task: crate::models::Task) -> Option<String> {
        let name = name.map_or_else(|| self.default_model(), str::to_owned);
        let entry = self.catalog().get(&name).cloned()?;
        entry.manifest.adapters.iter().find(|a| a.task == Some(task)).map(crate::models::AdapterManifest::name)
    }

    fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.inner.catalog.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Puts a new configuration and model catalog in force (SIGHUP). Running engines and their
    /// requests are untouched; new settings apply to the next load of each model. A config
    /// that fails the start checks is refused and the old one stays.
    pub fn reload(&self, config: Config, catalog: Catalog) -> Result<(), ManagerError> {
        check(&config, &catalog, &self.inner.devices)?;
        if config.engine.devices != self.config().engine.devices {
            return Err(ManagerError::DevicesChanged);
        }
        let mut guard = self.state();
        let state = &mut *guard;
        for l in state.loaded.values_mut() {
            if let Some(entry) = catalog.get(&l.engine.model().name) {
                l.pinned = entry.manifest.pinned
                    || config.models.pinned.contains(&entry.manifest.name)
                    || state.pinned.contains(&entry.manifest.name);
                l.keep_alive = Duration::from_secs(entry.manifest.keep_alive_s.unwrap_or(config.models.keep_alive_s));
            } else {
                // Gone from the catalog: no new requests; unloaded once idle.
                l.pinned = false;
                l.keep_alive = Duration::ZERO;
            }
        }
        drop(guard);
        let budget = crate::memory::budget(&config.memory);
        self.inner.status.send_modify(|s| s.memory.budget = budget);
        self.inner.sessions.set_budget(config.limits.parked_sessions_mib << 20);
        *self.inner.catalog.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(catalog);
        *self.inner.config.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    /// The GPU an engine under `config` offloads to: the first GPU listed (of those
    /// `engine.devices` names), None where `gpu_layers` is 0 or there is none. The engine
    /// picks the same (child.rs `offload_device`).
    fn offload_device(&self, config: &Config) -> Option<&DeviceInfo> {
        crate::engine::probe::offload_device(&self.inner.devices, config.engine.gpu_layers, &config.engine.devices)
    }

    /// The GPU the engines offload their layers to, by name.
    pub fn gpu(&self) -> Option<String> {
        self.offload_device(&self.config()).map(|d| d.name.clone())
    }

    /// The device budget of `device` under `config` (memory.device_budget_mib).
    fn device_budget(config: &Config, device: &DeviceInfo) -> u64 {
        match config.memory.device_budget_mib {
            0 => device.memory_free,
            mib => mib << 20,
        }
    }

    /// The compute devices ggml found, whether hearthd owns (may offload to) each, and of
    /// the GPU models are offloaded to, its budget and what the loaded models take of it.
    pub fn backends(&self) -> Vec<BackendReport> {
        let config = self.config();
        let owned = &config.engine.devices;
        let offload = self.offload_device(&config).map(|d| d.name.clone());
        let used: u64 = self.state().loaded.values().map(|l| l.device_bytes).sum();
        self.inner
            .devices
            .iter()
            .map(|d| {
                let mine = d.kind == hearth_ffi::DeviceKind::Cpu || owned.is_empty() || owned.contains(&d.name);
                let budget = (offload.as_ref() == Some(&d.name)).then(|| (Self::device_budget(&config, d), used));
                BackendReport { device: d.clone(), owned: mine, budget }
            })
            .collect()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that matters
        // more than refusing service would, so a poisoned lock is taken over.
        self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    fn pinned(&self, state: &State, entry: &ModelEntry) -> bool {
        entry.manifest.pinned
            || self.config().models.pinned.contains(&entry.manifest.name)
            || state.pinned.contains(&entry.manifest.name)
    }

    /// A lease on the model `name` (None: the default), loading it first if needed.
    pub async fn acquire(&self, name: Option<&str>) -> Result<Lease, Error> {
        let name = name.map_or_else(|| self.default_model(), str::to_owned);
        let catalog = self.catalog();
        let entry = catalog.get(&name).ok_or_else(|| Error::ModelNotFound(name.clone()))?;
        if !entry.has(Capability::Chat) {
            let caps: Vec<_> = entry.manifest.capabilities.iter().map(|c| c.as_str()).collect();
            return Err(unavailable(&name, format!("it cannot chat (capabilities: {})", caps.join(", "))));
        }
        for _ in 0..3 {
            if let Some(lease) = self.try_lease(&name, false) {
                return Ok(lease);
            }
            // A load (or a shrunk KV cache growing back) allocates a whole context: never
            // while over the memory ceiling.
            if let Some(e) = self.inner.throttle.ceiling_refusal() {
                return Err(e.into());
            }
            self.ensure_loaded(&name).await?;
            if let Some(lease) = self.try_lease(&name, true) {
                return Ok(lease);
            }
        }
        Err(unavailable(&name, "it was unloaded again while being loaded (memory is too tight)"))
    }

    /// A lease when the model is loaded and ready as it should be; with `any`, however it is.
    fn try_lease(&self, name: &str, any: bool) -> Option<Lease> {
        let state = self.state();
        let pressure = self.inner.status.borrow().memory.pressure;
        let l = state.loaded.get(name)?;
        // A KV cache shrunk under pressure grows back at the next request that finds the
        // pressure gone and the model idle.
        if !any && l.shrunk && !pressure && l.idle() {
            return None;
        }
        l.activity.active.fetch_add(1, Ordering::AcqRel);
        Some(Lease { engine: l.engine.clone(), activity: Arc::clone(&l.activity), epoch: self.inner.epoch })
    }

    fn publish_loaded(&self, state: &State) {
        let loaded: Vec<String> = state.loaded.keys().cloned().collect();
        let used: u64 = state.loaded.values().map(Loaded::bytes).sum();
        let live: BTreeMap<&String, u64> = state.loaded.iter().map(|(n, l)| (n, l.generation)).collect();
        self.inner.status.send_if_modified(|s| {
            let before = (s.loaded.clone(), s.memory.used, s.engines.len());
            s.loaded = loaded;
            s.memory.used = used;
            s.engines.retain(|n, (g, _)| live.get(n) == Some(g));
            before != (s.loaded.clone(), s.memory.used, s.engines.len())
        });
    }

    /// Admin: loads `name` now, and pins it when `pin` is set.
    pub async fn load_model(&self, name: &str, pin: bool) -> Result<(), Error> {
        if self.catalog().get(name).is_none() {
            return Err(Error::ModelNotFound(name.to_owned()));
        }
        if pin {
            let mut state = self.state();
            state.pinned.insert(name.to_owned());
            if let Some(l) = state.loaded.get_mut(name) {
                l.pinned = true;
            }
        }
        self.ensure_loaded(name).await
    }

    /// Admin: unloads `name` (pinned or not) unless it is serving requests.
    pub async fn unload_model(&self, name: &str) -> Result<(), Error> {
        let _serial = self.inner.load_lock.lock().await;
        {
            let mut state = self.state();
            state.pinned.remove(name);
            match state.loaded.get(name) {
                None => return Err(unavailable(name, "it is not loaded")),
                Some(l) if !l.idle() => {
                    return Err(Error::InUse {
                        name: name.to_owned(),
                        requests: l.activity.active.load(Ordering::Acquire),
                    });
                }
                Some(_) => {}
            }
        }
        if self.unload_if_idle(name, Unload::Admin).await {
            Ok(())
        } else {
            Err(Error::InUse { name: name.to_owned(), requests: 1 })
        }
    }

    /// A bus connection closed: every engine cancels its requests.
    pub async fn connection_closed(&self, connection: &str) {
        let engines: Vec<EngineHandle> = self.state().loaded.values().map(|l| l.engine.clone()).collect();
        for e in engines {
            e.connection_closed(connection.to_owned()).await;
        }
    }

    /// Loads the pinned models (at start). Failures are logged and reported by ListModels.
    pub async fn preload_pinned(&self) {
        let pinned: Vec<String> = {
            let state = self.state();
            self.catalog().iter().filter(|e| self.pinned(&state, e)).map(|e| e.manifest.name.clone()).collect()
        };
        for name in pinned {
            if let Err(e) = self.ensure_loaded(&name).await {
                tracing::error!(model = %name, error = %e, "cannot load a pinned model");
            }
        }
    }

    /// Stops every engine: their requests end Cancelled. Waits for the processes.
    pub async fn shutdown(&self) {
        // Sessions end with the daemon: their KV is dropped, not parked to disk.
        self.inner.sessions.close_all();
        let all: Vec<Loaded> = {
            let mut state = self.state();
            let all = std::mem::take(&mut state.loaded).into_values().collect();
            self.publish_loaded(&state);
            all
        };
        for l in &all {
            l.engine.shutdown(false).await;
        }
        for l in &all {
            l.engine.wait().await;
        }
    }
}

/// Stops a removed model's engine and waits for its process.
async fn stop(l: Loaded) {
    stop_engine(&l.engine).await;
}

/// Ends an engine's requests (Cancelled), has it hand over its idle sessions' KV to be
/// parked (sessions that are still open keep it; those closed drop it), and waits for its
/// process to exit.
async fn stop_engine(engine: &EngineHandle) {
    engine.shutdown(true).await;
    engine.wait().await;
}

/// Creates the state directory (0700) if missing. None when it cannot be used: then the
/// hash cache lives in memory only.
fn prepare_state_dir(dir: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.is_dir()
        && let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
    {
        tracing::warn!(dir = %dir.display(), error = %e, "no state directory: model hashes are not cached across restarts");
        return None;
    }
    Some(dir.to_owned())
}
