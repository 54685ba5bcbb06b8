//! Loading: verifying a model file and its adapters, reading them into memory with progress,
//! starting the model's engine, and putting it in the table.

use super::*;

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
        let file_size = std::fs::metadata(&entry.path).map(|m| m.len()).unwrap_or(0);
        self.make_room(name, file_size).await?;

        let this = self.clone();
        let params = ModelParams {
            n_gpu_layers: config.engine.gpu_layers,
            use_mmap: true,
            devices: config.engine.devices.clone(),
        };
        let entry2 = entry.clone();
        let model = tokio::task::spawn_blocking(move || this.read_model(&entry2, &params))
            .await
            .map_err(|e| Error::Internal(format!("model loader: {e}")))??;
        let verified_at = started.elapsed();

        let context_length = entry.manifest.context_length.unwrap_or(config.engine.context_length);
        let full = EngineSettings {
            context_length,
            batch_size: config.engine.batch_size,
            max_sequences: config.engine.max_sequences,
            interactive_sequences: config.engine.interactive_sequences,
            threads: config.threads(),
            flash_attn: config.engine.flash_attn,
            prefix_cache: config.engine.prefix_cache,
            queue_capacity: config.limits.queue_capacity,
            queue_per_app: config.limits.queue_per_app,
            throttle: Arc::clone(&self.inner.throttle),
            sessions: Arc::clone(&self.inner.sessions),
        };
        let settings = if shrunk { full.shrunk() } else { full.clone() };
        let weights = model.size_bytes();
        let kv = model.kv_geometry().bytes(settings.kv_tokens());
        self.make_room(name, weights + kv).await?;

        self.set_progress(name, LoadPhase::Starting, 0.0);
        let m = Arc::clone(&model);
        let (n, s) = (name.to_owned(), settings.clone());
        let (engine, thread) = tokio::task::spawn_blocking(move || EngineHandle::start(&m, &n, &s))
            .await
            .map_err(|e| Error::Internal(format!("engine start: {e}")))?
            .map_err(|e| unavailable(name, e.to_string()))?;

        let (pinned, keep_alive) = {
            let state = self.state();
            let keep_alive = entry.manifest.keep_alive_s.unwrap_or(config.models.keep_alive_s);
            (self.pinned(&state, &entry), Duration::from_secs(keep_alive))
        };
        let activity = Arc::new(Activity { active: AtomicU32::new(0), last_used_ms: AtomicU64::new(self.now_ms()) });
        self.install(
            name,
            Loaded {
                generation: 0,
                model,
                engine,
                thread: Some(thread),
                settings: full,
                shrunk,
                activity,
                pinned,
                keep_alive,
                weights,
                kv,
            },
        );
        tracing::info!(
            model = %name, weights = %mib(weights), kv = %mib(kv), shrunk, pinned,
            verify_ms = verified_at.as_millis() as u64, load_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(())
    }

    /// Verifies and loads the model file and its adapters (blocking).
    fn read_model(&self, entry: &ModelEntry, params: &ModelParams) -> Result<Arc<Model>, Error> {
        let name = entry.manifest.name.as_str();
        let refuse = |e: crate::models::CatalogError| {
            tracing::error!(model = %name, error = %e, "model refused");
            unavailable(name, e.to_string())
        };
        let file = open_verified(&entry.path, &entry.manifest.sha256, &self.inner.hashes, &mut |f| {
            self.set_progress(name, LoadPhase::Verifying, f);
        })
        .map_err(refuse)?;
        let mut adapters = Vec::new();
        for (path, a) in entry.adapter_paths().iter().zip(&entry.manifest.adapters) {
            adapters.push((open_verified(path, &a.sha256, &self.inner.hashes, &mut |_| {}).map_err(refuse)?, a));
        }
        tracing::info!(model = %name, bytes = file.size, cached = file.cached, "model file verified");
        self.set_progress(name, LoadPhase::Loading, 0.0);
        let mut model = Model::load_with_progress(self.inner.backend, &file.path(), params, &mut |f| {
            self.set_progress(name, LoadPhase::Loading, f64::from(f));
        })
        .map_err(|e| {
            // The header walk's reason says what is wrong with the file (no content of it).
            let reason = format!("{} passed its checks but llama.cpp cannot load it: {e}", file.origin.display());
            tracing::error!(model = %name, reason = %reason, "model refused");
            unavailable(name, reason)
        })?;
        for (adapter, a) in &adapters {
            model.attach_lora(&adapter.path(), &a.name(), a.scale).map_err(|e| unavailable(name, e.to_string()))?;
        }
        Ok(Arc::new(model))
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
    }
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
