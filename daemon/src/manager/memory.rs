//! Memory: making room for a load under the budget, unloading idle models after their
//! keep-alive, what sustained memory pressure does (idle models unloaded, pinned ones
//! restarted with a smaller KV cache; sessions' KV is parked when an engine stops), and the
//! anonymous-memory ceiling hearthd enforces on itself.

use std::collections::HashMap;

use super::*;

impl ModelManager {
    /// Unloads idle, unpinned models (least recently used first) until `need` more bytes fit
    /// the budget. Unloads nothing when even that would not be enough.
    pub(super) async fn make_room(&self, name: &str, need: u64) -> Result<(), Error> {
        let budget = self.inner.status.borrow().memory.budget;
        let victims = {
            let state = self.state();
            let used: u64 = state.loaded.values().map(Loaded::bytes).sum();
            if used + need <= budget {
                return Ok(());
            }
            let mut idle: Vec<(&String, &Loaded)> =
                state.loaded.iter().filter(|(n, l)| n.as_str() != name && !l.pinned && l.idle()).collect();
            idle.sort_by_key(|(_, l)| l.last_used_ms());
            let mut freed = 0;
            let mut victims = Vec::new();
            for (n, l) in idle {
                if used - freed + need <= budget {
                    break;
                }
                freed += l.bytes();
                victims.push(n.clone());
            }
            if used - freed + need > budget {
                let held: Vec<String> = state
                    .loaded
                    .iter()
                    .map(|(n, l)| {
                        let why = if l.pinned {
                            "pinned"
                        } else if l.idle() {
                            "idle"
                        } else {
                            "in use"
                        };
                        format!("{n} {} ({why})", mib(l.bytes()))
                    })
                    .collect();
                return Err(unavailable(
                    name,
                    format!(
                        "it needs {} but the memory budget is {} with {} in use by models that cannot be unloaded: [{}]",
                        mib(need),
                        mib(budget),
                        mib(used),
                        held.join(", ")
                    ),
                ));
            }
            victims
        };
        for victim in victims {
            tracing::info!(model = %victim, for_model = %name, "unloading an idle model to make room");
            self.unload_if_idle(&victim, Unload::Evicted).await;
        }
        Ok(())
    }

    /// Removes `name` if it is loaded and idle, counts why, and stops its engine. Returns
    /// whether it did.
    pub(super) async fn unload_if_idle(&self, name: &str, why: Unload) -> bool {
        let removed = {
            let mut state = self.state();
            let idle = state.loaded.get(name).is_some_and(Loaded::idle);
            let removed = if idle { state.loaded.remove(name) } else { None };
            if removed.is_some() {
                self.inner.status.send_modify(|s| match why {
                    Unload::Evicted => s.memory.evicted += 1,
                    Unload::Expired => s.memory.expired += 1,
                    Unload::Pressure => s.memory.pressure_unloads += 1,
                    Unload::Admin => {}
                });
                self.publish_loaded(&state);
            }
            removed
        };
        match removed {
            Some(l) => {
                stop(l).await;
                tracing::info!(model = %name, "model unloaded");
                true
            }
            None => false,
        }
    }

    /// Restarts `name`'s engine with its KV cache shrunk or back at full size (model idle):
    /// the old process parks its sessions' KV and exits, a new one maps the same verified file.
    pub(super) async fn restart(&self, name: &str, shrink: bool) -> Result<(), Error> {
        let old = {
            let mut state = self.state();
            match state.loaded.get(name) {
                Some(l) if l.idle() && l.shrunk != shrink => state.loaded.remove(name),
                _ => None,
            }
        };
        let Some(mut l) = old else { return Ok(()) };
        stop_engine(&l.engine).await;
        let engine = match self.spawn_engine(&l.spec, shrink).await {
            Ok(engine) => engine,
            Err(e) => {
                self.publish_loaded(&self.state());
                return Err(e);
            }
        };
        let kv = engine.memory().1;
        (l.engine, l.shrunk, l.kv) = (engine, shrink, kv);
        self.install(name, l);
        tracing::info!(model = %name, kv = %mib(kv), shrunk = shrink, "model KV cache resized");
        Ok(())
    }

    /// Unloads unpinned models idle for longer than their keep-alive.
    pub async fn expire_idle(&self) {
        let now = self.now_ms();
        let expired: Vec<String> = self
            .state()
            .loaded
            .iter()
            .filter(|(_, l)| {
                !l.pinned && l.idle() && now.saturating_sub(l.last_used_ms()) >= l.keep_alive.as_millis() as u64
            })
            .map(|(n, _)| n.clone())
            .collect();
        for name in expired {
            let _serial = self.inner.load_lock.lock().await;
            if self.unload_if_idle(&name, Unload::Expired).await {
                tracing::info!(model = %name, "keep-alive ran out");
            }
        }
    }

    /// Feeds a pressure reading. Under sustained pressure, idle unpinned models are unloaded
    /// and idle pinned ones shrink their KV cache; a caller that finds the pressure gone
    /// regrows it.
    pub async fn on_pressure(&self, reading: PressureReading, sustained: bool) {
        let was = self.inner.status.borrow().memory.pressure;
        self.inner.status.send_if_modified(|s| {
            let changed = s.memory.pressure != sustained;
            s.memory.reading = reading;
            s.memory.pressure = sustained;
            changed
        });
        if sustained != was {
            if sustained {
                tracing::warn!(
                    some_avg10 = reading.some_avg10,
                    full_avg10 = reading.full_avg10,
                    "memory pressure: releasing idle models"
                );
            } else {
                tracing::info!(some_avg10 = reading.some_avg10, "memory pressure over");
            }
        }
        if !sustained {
            return;
        }
        let (unload, shrink): (Vec<String>, Vec<String>) = {
            let state = self.state();
            let idle = state.loaded.iter().filter(|(_, l)| l.idle());
            let unload = idle.clone().filter(|(_, l)| !l.pinned).map(|(n, _)| n.clone()).collect();
            let shrink = idle.filter(|(_, l)| l.pinned && !l.shrunk).map(|(n, _)| n.clone()).collect();
            (unload, shrink)
        };
        for name in unload {
            let _serial = self.inner.load_lock.lock().await;
            self.unload_if_idle(&name, Unload::Pressure).await;
        }
        for name in shrink {
            let _serial = self.inner.load_lock.lock().await;
            match self.restart(&name, true).await {
                Ok(()) => self.inner.status.send_modify(|s| s.memory.pressure_shrinks += 1),
                Err(e) => tracing::error!(model = %name, error = %e, "cannot shrink the KV cache"),
            }
        }
    }

    /// Starts the memory ceiling's watch on a thread of its own (it must act even while the
    /// runtime or an engine is stuck in a call): every 100 ms it reads hearthd's anonymous
    /// memory and its engines'; over the ceiling, every engine ends its device work and
    /// refuses new work with Busy until use is below 90% of it; at 5/4 of the ceiling the
    /// engines that grew are killed (their callers get EngineFailed, they restart), or, when
    /// hearthd itself grew, hearthd exits with status 3: before the kernel's OOM killer picks
    /// a victim among the phone's apps.
    pub fn watch_ceiling(&self, config: &crate::config::MemoryConfig) -> std::io::Result<()> {
        let mut watch = crate::memory::CeilingWatch::new(crate::memory::ceiling(config));
        let source = config.usage_file.clone();
        let manager = self.clone();
        manager.inner.throttle.ceiling_mib.store(watch.ceiling() >> 20, Ordering::Relaxed);
        manager.inner.throttle.changed();
        manager.inner.status.send_modify(|s| s.memory.ceiling = watch.ceiling());
        tracing::info!(ceiling_mib = watch.ceiling() >> 20, exit_mib = watch.exit_at() >> 20, "memory ceiling");
        std::thread::Builder::new().name("memory-ceiling".into()).spawn(move || {
            let mut failing = false;
            let mut over_readings = 0u32;
            // Engines told to die for the ceiling, and when.
            let mut culled = HashMap::new();
            loop {
                std::thread::sleep(CEILING_INTERVAL);
                // hearthd's own and its engine processes': the weights' pages are file-backed
                // and shared, the KV caches and compute buffers are the engines' anonymous
                // memory.
                match crate::memory::Usage::read(&source, &manager.engine_pids()) {
                    Ok(usage) => {
                        failing = false;
                        let used = usage.total();
                        let verdict = watch.update(used);
                        // Freed heap that glibc keeps in its arenas (work that ended on its
                        // own, an idle engine with nothing to shed) counts until it is handed
                        // back: trim at once and then once a second while over, or the
                        // ceiling could hold every request off with nothing left to end.
                        over_readings =
                            if verdict == crate::memory::CeilingVerdict::Under { 0 } else { over_readings + 1 };
                        if over_readings % TRIM_EVERY == 1 {
                            hearth_ffi::release_free_heap();
                        }
                        manager.on_ceiling_reading(&usage, verdict, &watch, &mut culled);
                    }
                    Err(e) => {
                        if !failing {
                            failing = true;
                            tracing::warn!(error = %e, "cannot read hearthd's memory use: the ceiling is not enforced");
                        }
                        // Not enforced means not refusing either: a stale "over" would hold
                        // every request off for as long as the reading fails.
                        manager.clear_ceiling();
                    }
                }
            }
        })?;
        Ok(())
    }

    fn clear_ceiling(&self) {
        if self.inner.throttle.over_ceiling.swap(false, Ordering::AcqRel) {
            self.inner.throttle.changed();
            self.inner.status.send_modify(|s| s.memory.over_ceiling = false);
        }
    }

    /// Kills the engine process `pid`, which holds `bytes` of the `used` that went far over
    /// the ceiling.
    fn kill_engine(&self, pid: u32, bytes: u64, used: u64, watch: &crate::memory::CeilingWatch) {
        let state = self.state();
        let Some((name, loaded)) = state.loaded.iter().find(|(_, l)| l.engine.pid() == pid) else { return };
        tracing::error!(
            model = %name, pid, engine_mib = bytes >> 20, anon_mib = used >> 20, exit_mib = watch.exit_at() >> 20,
            "memory ceiling far exceeded by an engine: killing it"
        );
        loaded.engine.kill("it went far over the memory ceiling");
    }

    /// The process ids of the running engines.
    pub fn engine_pids(&self) -> Vec<u32> {
        self.state().loaded.values().map(|l| l.engine.pid()).collect()
    }

    fn on_ceiling_reading(
        &self,
        usage: &crate::memory::Usage,
        verdict: crate::memory::CeilingVerdict,
        watch: &crate::memory::CeilingWatch,
        culled: &mut HashMap<u32, Instant>,
    ) {
        use crate::memory::CeilingVerdict;
        let used = usage.total();
        culled.retain(|pid, _| usage.engines.iter().any(|(p, _)| p == pid));
        if verdict == CeilingVerdict::Exit {
            let exit = |why: &str| {
                tracing::error!(
                    anon_mib = used >> 20,
                    own_mib = usage.own >> 20,
                    exit_mib = watch.exit_at() >> 20,
                    "memory ceiling far exceeded ({why}): exiting (status 3) before the kernel's OOM killer acts"
                );
                hearth_ffi::exit_now(3);
            };
            match usage.engines_to_kill(watch) {
                Some(victims) => {
                    for (pid, bytes) in victims {
                        match culled.get(&pid) {
                            None => {
                                self.kill_engine(pid, bytes, used, watch);
                                culled.insert(pid, Instant::now());
                            }
                            // The supervisor kills on the runtime; if it cannot, nothing else will.
                            Some(at) if at.elapsed() > CULL_LIMIT => exit("an engine told to die is still there"),
                            Some(_) => {}
                        }
                    }
                }
                None => exit("by hearthd's own heap, inside a call that cannot be stopped"),
            }
        }
        let over = verdict != CeilingVerdict::Under;
        let was = self.inner.throttle.over_ceiling.swap(over, Ordering::AcqRel);
        if over != was {
            self.inner.throttle.changed();
            if over {
                tracing::warn!(
                    anon_mib = used >> 20,
                    ceiling_mib = watch.ceiling() >> 20,
                    "over the memory ceiling: device work is ended and refused"
                );
            } else {
                tracing::info!(anon_mib = used >> 20, "memory back under the ceiling: device work resumes");
            }
        }
        self.inner.status.send_if_modified(|s| {
            let changed = s.memory.over_ceiling != over;
            s.memory.anon = used;
            s.memory.over_ceiling = over;
            if over && !was {
                s.memory.ceiling_hits += 1;
            }
            changed
        });
    }
}

/// How often the ceiling's watch reads memory use.
const CEILING_INTERVAL: Duration = Duration::from_millis(100);
/// How long an engine killed for the ceiling may take to go before hearthd exits instead.
const CULL_LIMIT: Duration = Duration::from_secs(2);
/// While over the ceiling, free heap is handed back every this many readings.
const TRIM_EVERY: u32 = 10;
