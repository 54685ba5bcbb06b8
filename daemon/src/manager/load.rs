//! Loading: verifying a model file and its adapters, reading them into memory with progress,
//! starting the model's engine, and putting it in the table.

use super::*;
use crate::engine::EngineSettings;
use crate::engine::protocol::ModelLoad;

impl ModelManager {
    /// Loads `name` (or regrows its shrunk KV), one load at a time.
    pub async fn ensure_loaded(&self, name: &str) -> Result<(), Error> {
        let _serial = self.inner.load_lock.lock().await;
        let pressure = self.inner.status.borrow().memory.pressure;
        let regrow = {
            let state = self.state();
            match state.loaded.get(name) {
                Some(l) if l.shrunk && !pressure && l.idle() => true,
                Some(_) => return Ok(()),
                None => false,
            }
        };
        if regrow {
            return self.restart(name, false).await;
        }
        let result = self.load(name, pressure).await;
        let mut state = self.state();
        match &result {
            Ok(()) => {
                state.errors.remove(name);
            }
            Err(e) => {
                state.errors.insert(name.to_owned(), e.to_string());
            }
        }
        drop(state);
        self.inner.status.send_modify(|s| {
            s.loading.remove(name);
        });
        result
    }

    pub(super) fn set_progress(&self, name: &str, phase: LoadPhase, fraction: f64) {
        let fraction = fraction.clamp(0.0, 1.0);
        self.inner.status.send_if_modified(|s| {
            let p = LoadProgress { phase, fraction };
            // Publish whole percent steps only: a load reports thousands of fractions.
            let changed = s
                .loading
                .get(name)
                .is_none_or(|old| old.phase != phase || (old.fraction * 100.0).floor() != (fraction * 100.0).floor());
            if changed {
                s.loading.insert(name.to_owned(), p);
            }
            changed
        });
    }

    pub(super) async fn load(&self, name: &str, shrunk: bool) -> Result<(), Error> {
        let entry = self.catalog().get(name).ok_or_else(|| Error::ModelNotFound(name.to_owned()))?.clone();
        let config = self.config();
        let started = Instant::now();
        self.set_progress(name, LoadPhase::Verifying, 0.0);
        // Room for the weights first, so reading them does not push others out of memory.
        // The projector's weights are loaded beside the model's.
        let file_size = [Some(entry.path.clone()), entry.mmproj_path()]
            .into_iter()
            .flatten()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        self.make_room(name, file_size).await?;

        let this = self.clone();
        let entry2 = entry.clone();
        let (files, header) = tokio::task::spawn_blocking(move || this.verify_files(&entry2))
            .await
            .map_err(|e| Error::Internal(format!("model verifier: {e}")))??;
        let verified_at = started.elapsed();

        let context_length = entry.manifest.context_length.unwrap_or(config.engine.context_length);
        let spec = SpawnSpec {
            launch: self.launch(&config),
            model: name.to_owned(),
            files,
            load: ModelLoad {
                gpu_layers: config.engine.gpu_layers,
                devices: config.engine.devices.clone(),
                adapters: entry.manifest.adapters.iter().map(|a| (a.name(), a.scale())).collect(),
                mmproj: entry.manifest.mmproj.as_ref().map(|p| p.sha256.clone()),
            },
            settings: EngineSettings {
                context_length,
                batch_size: config.engine.batch_size,
                max_sequences: config.engine.max_sequences,
                interactive_sequences: config.engine.interactive_sequences,
                threads: config.threads(),
                flash_attn: config.engine.flash_attn,
                kv_cache: config.engine.kv_cache,
                prefix_cache: config.engine.prefix_cache,
                queue_capacity: config.limits.queue_capacity,
                queue_per_app: config.limits.queue_per_app,
            },
            probes: forbidden_paths(&config.daemon.state_dir),
            hang_limit: Duration::from_millis(config.engine.hang_timeout_ms),
            env: engine_env(),
        };
        let device_bytes = self.device_bytes(name, &header, &config, &spec.settings)?;
        self.set_progress(name, LoadPhase::Loading, 0.0);
        let engine = self.spawn_engine(&spec, shrunk).await?;
        let (weights, kv) = engine.memory();
        // The KV cache is allocated by now; if the budget cannot make room for it, the model
        // does not stay.
        if let Err(e) = self.make_room(name, weights.saturating_add(kv)).await {
            stop_engine(&engine).await;
            return Err(e);
        }

        let (pinned, keep_alive) = {
            let state = self.state();
            let keep_alive = entry.manifest.keep_alive_s.unwrap_or(config.models.keep_alive_s);
            (self.pinned(&state, &entry), Duration::from_secs(keep_alive))
        };
        let activity = Arc::new(Activity { active: AtomicU32::new(0), last_used_ms: AtomicU64::new(self.now_ms()) });
        let pid = engine.pid();
        let loaded =
            Loaded { generation: 0, engine, spec, shrunk, activity, pinned, keep_alive, weights, kv, device_bytes };
        self.install(name, loaded);
        tracing::info!(
            model = %name, weights = %mib(weights), kv = %mib(kv), shrunk, pinned, engine_pid = pid,
            verify_ms = verified_at.as_millis() as u64, load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(())
    }

    /// Starts an engine process for `spec` (its KV cache `shrunk` or at full size),
    /// reporting its load progress.
    pub(super) async fn spawn_engine(&self, spec: &SpawnSpec, shrunk: bool) -> Result<EngineHandle, Error> {
        let name = spec.model.clone();
        let mut spec = spec.clone();
        if shrunk {
            spec.settings = spec.settings.shrunk();
        }
        let this = self.clone();
        let mut progress = move |f: f32| this.set_progress(&name, LoadPhase::Loading, f64::from(f));
        let vault: Arc<dyn crate::engine::SessionVault> = self.inner.sessions.clone();
        EngineHandle::spawn(&spec, &self.inner.throttle, &self.inner.compute, &vault, &mut progress).await.map_err(
            |reason| {
                let reason = format!("its engine did not start: {reason}");
                tracing::error!(model = %spec.model, reason = %reason, "model refused");
                unavailable(&spec.model, reason)
            },
        )
    }

    /// Verifies the model file, its adapters and its projector (blocking): the open files, in
    /// that order.
    fn verify_files(&self, entry: &ModelEntry) -> Result<(Vec<Arc<std::fs::File>>, hearth_ffi::gguf::Header), Error> {
        let name = entry.manifest.name.as_str();
        let refuse = |e: crate::models::CatalogError| {
            tracing::error!(model = %name, error = %e, "model refused");
            unavailable(name, e.to_string())
        };
        let file = open_verified(&entry.path, &entry.manifest.sha256, &self.inner.hashes, &mut |f| {
            self.set_progress(name, LoadPhase::Verifying, f);
        })
        .map_err(refuse)?;
        // hearthd's own header walk (memory-safe Rust) before llama.cpp sees the file, so a
        // file llama.cpp would abort on is refused with a reason.
        let header = std::io::Seek::seek(&mut file.file(), std::io::SeekFrom::Start(0))
            .map_err(|e| format!("cannot read it: {e}"))
            .and_then(|_| hearth_ffi::gguf::check_reader(std::io::BufReader::new(file.file()), file.size));
        let header = header.map_err(|reason| {
            let reason = format!("{} passed its checks but llama.cpp cannot load it: {reason}", file.origin.display());
            tracing::error!(model = %name, reason = %reason, "model refused");
            unavailable(name, reason)
        })?;
        tracing::info!(model = %name, bytes = file.size, cached = file.cached, "model file verified");
        let mut files = vec![Arc::new(file.into_file())];
        for (path, a) in entry.adapter_paths().iter().zip(&entry.manifest.adapters) {
            let adapter = open_verified(path, &a.sha256, &self.inner.hashes, &mut |_| {}).map_err(refuse)?;
            files.push(Arc::new(adapter.into_file()));
        }
        if let (Some(path), Some(p)) = (entry.mmproj_path(), &entry.manifest.mmproj) {
            let projector = open_verified(&path, &p.sha256, &self.inner.hashes, &mut |_| {}).map_err(refuse)?;
            tracing::info!(model = %name, bytes = projector.size, "vision projector verified");
            files.push(Arc::new(projector.into_file()));
        }
        Ok((files, header))
    }

    /// The device memory loading `name` with `header` under `config` takes: None where no
    /// layer goes to a GPU; an error (ModelUnavailable, with the numbers and the layer count
    /// that would fit) where it would take more than the device budget leaves free.
    fn device_bytes(
        &self,
        name: &str,
        header: &hearth_ffi::gguf::Header,
        config: &Config,
        settings: &EngineSettings,
    ) -> Result<u64, Error> {
        let Some(device) = self.offload_device(config) else { return Ok(0) };
        let n_layer = header.layer_bytes.len();
        let (kv_tokens, kv_type) = (settings.kv_tokens(), settings.kv_cache.ffi());
        // llama.cpp's count (llama-model.cpp: i_gpu_start = n_layer + 1 - n): the output
        // layer first, then the last n - 1 repeating layers.
        let bytes =
            |n: usize| header.device_bytes(n.saturating_sub(1), n >= 1, kv_tokens, kv_type, settings.batch_size);
        let asked = usize::try_from(config.engine.gpu_layers).unwrap_or(n_layer + 1).min(n_layer + 1);
        let needed = bytes(asked);
        let budget = Self::device_budget(config, device);
        let others: u64 =
            self.state().loaded.iter().filter(|(n, _)| n.as_str() != name).map(|(_, l)| l.device_bytes).sum();
        let free = budget.saturating_sub(others);
        if needed <= free {
            return Ok(needed);
        }
        let fits = (0..=asked).rev().find(|n| bytes(*n) <= free).unwrap_or(0);
        let reason = format!(
            "offloading {asked} of its {} layers to {} takes {} of device memory (weights, KV cache, logits), \
             and {} of the device budget of {} is free; gpu_layers = {fits} would fit",
            n_layer + 1,
            device.name,
            mib(needed),
            mib(free),
            mib(budget),
        );
        tracing::error!(model = %name, reason = %reason, "model refused");
        Err(unavailable(name, reason))
    }

    /// Puts a started engine in the table under a new generation, publishes it, and starts
    /// forwarding its queue status.
    pub(super) fn install(&self, name: &str, mut loaded: Loaded) {
        let mut state = self.state();
        state.next_generation += 1;
        loaded.generation = state.next_generation;
        let (generation, status_rx) = (loaded.generation, loaded.engine.status());
        state.verified.insert(name.to_owned());
        state.loaded.insert(name.to_owned(), loaded);
        self.publish_loaded(&state);
        drop(state);
        tokio::spawn(forward_engine_status(self.inner.status.clone(), name.to_owned(), generation, status_rx));
        tokio::spawn(self.clone().watch_engine(name.to_owned(), generation));
    }

    /// Waits for the engine of `name`'s `generation` to end; an end nobody asked for is a
    /// failure: the model leaves the table and is loaded again after a backoff.
    async fn watch_engine(self, name: String, generation: u64) {
        let Some(engine) = self.state().loaded.get(&name).map(|l| l.engine.clone()) else { return };
        let mut exited = engine.exited();
        let Ok(why) = exited.wait_for(Option::is_some).await.map(|w| w.clone().unwrap_or_default()) else { return };
        if engine.stopping() {
            return;
        }
        let failures = {
            let mut state = self.state();
            if state.loaded.get(&name).is_none_or(|l| l.generation != generation) {
                return;
            }
            state.loaded.remove(&name);
            let now = Instant::now();
            let recent = state.failures.entry(name.clone()).or_default();
            recent.retain(|t| now.duration_since(*t) < FAILURE_WINDOW);
            recent.push(now);
            let n = recent.len() as u32;
            state.errors.insert(name.clone(), format!("its engine failed ({why})"));
            self.publish_loaded(&state);
            n
        };
        self.inner.status.send_modify(|s| s.memory.engine_failures += 1);
        if failures > MAX_RESTARTS {
            tracing::error!(
                model = %name, failures, "engine failed too often: not restarting it until a request needs it"
            );
            return;
        }
        let backoff = RESTART_BACKOFF.saturating_mul(1 << (failures - 1).min(8)).min(MAX_BACKOFF);
        tracing::warn!(model = %name, failures, backoff_ms = backoff.as_millis() as u64, "restarting the engine");
        tokio::time::sleep(backoff).await;
        if let Err(e) = self.ensure_loaded(&name).await {
            tracing::error!(model = %name, error = %e, "cannot restart the engine");
        }
    }
}

/// Engine deaths within this window count towards the restart backoff.
const FAILURE_WINDOW: Duration = Duration::from_secs(600);
/// Restarts after this many deaths in the window wait for a request instead.
const MAX_RESTARTS: u32 = 5;
const RESTART_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the engine must not be able to open (it tries, and says what happened): the state
/// directory, the sealing key there, and the key's systemd credential.
fn forbidden_paths(state_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut paths = vec![state_dir.to_owned(), crate::seal::key_path(state_dir)];
    paths.extend(crate::seal::credential_path());
    paths
}

/// The engine's environment: its log filter, and in debug builds the test hooks (the stall
/// hook for the first engine only, so its restart serves).
/// What of hearthd's environment its engines see (they start with an empty one): the log
/// filter, and the variables that choose GPU devices and drivers.
const ENGINE_ENV: [&str; 6] = [
    "HEARTH_LOG",
    // Which Vulkan devices ggml uses (by default only discrete and integrated GPUs, so a
    // CPU implementation such as lavapipe needs it), and which drivers the loader reads.
    "GGML_VK_VISIBLE_DEVICES",
    "VK_ICD_FILENAMES",
    "VK_DRIVER_FILES",
    // lavapipe's worker threads.
    "LP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
];

/// The environment of an engine process, and of the device listing.
pub(super) fn engine_base_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> =
        ENGINE_ENV.iter().filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v))).collect();
    // ggml-vulkan's tuning switches (GGML_VK_DISABLE_F16, GGML_VK_FORCE_MMVQ...): hearthd's
    // environment is the integrator's (the unit's Environment=), never an app's.
    env.extend(std::env::vars().filter(|(k, _)| k.starts_with("GGML_VK_") && k != "GGML_VK_VISIBLE_DEVICES"));
    env
}

fn engine_env() -> Vec<(String, String)> {
    static STALL_GIVEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let mut env = engine_base_env();
    if cfg!(debug_assertions)
        && let Some(v) = std::env::var_os("HEARTH_DEBUG_STALL_ENGINE")
        && !STALL_GIVEN.swap(true, Ordering::Relaxed)
    {
        env.push(("HEARTH_DEBUG_STALL_ENGINE".into(), v.to_string_lossy().into_owned()));
    }
    env
}

/// Copies one engine's status into the manager's until the engine stops.
async fn forward_engine_status(
    status: watch::Sender<ManagerStatus>,
    name: String,
    generation: u64,
    mut rx: watch::Receiver<EngineStatus>,
) {
    loop {
        let now = rx.borrow_and_update().clone();
        status.send_if_modified(|s| {
            if !s.loaded.contains(&name) {
                return false;
            }
            match s.engines.get(&name) {
                Some((g, old)) if *g > generation || (*g == generation && *old == now) => false,
                _ => {
                    s.engines.insert(name.clone(), (generation, now));
                    true
                }
            }
        });
        if rx.changed().await.is_err() {
            break;
        }
    }
}
