//! Who is using the model now: per app, requests running, requests and tokens since start.
//! Read by the Activity method (hearthctl top); an app that is not root sees only its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::driver::{Events, StreamEvent};

/// Apps kept at most; past it the one idle longest is forgotten (an unsandboxed program can
/// make new app ids at will: `uid:UID:EXE` per executable).
const MAX_APPS: usize = 256;

#[derive(Debug, Default)]
struct Counters {
    running: AtomicU32,
    requests: AtomicU64,
    tokens: AtomicU64,
    /// When it last started a request (ms since the table was made), for eviction.
    last_ms: AtomicU64,
}

#[derive(Debug)]
pub struct Activity {
    apps: Mutex<HashMap<String, Arc<Counters>>>,
    epoch: std::time::Instant,
    /// Prices each finished request's compute.
    energy: Option<Arc<crate::energy::Ledger>>,
    /// Judged as each request ends.
    budgets: Option<Arc<super::budgets::Budgets>>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new(None, None)
    }
}

/// A running request's share of the table: counts its tokens, and it is no longer running
/// once dropped.
#[derive(Debug)]
struct Running(Arc<Counters>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn new(energy: Option<Arc<crate::energy::Ledger>>, budgets: Option<Arc<super::budgets::Budgets>>) -> Self {
        Self { apps: Mutex::default(), epoch: std::time::Instant::now(), energy, budgets }
    }

    fn start(&self, app: &str) -> Running {
        let mut apps = self.apps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !apps.contains_key(app) && apps.len() >= MAX_APPS {
            let idle = apps
                .iter()
                .filter(|(_, c)| c.running.load(Ordering::Relaxed) == 0)
                .min_by_key(|(_, c)| c.last_ms.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone());
            if let Some(k) = idle {
                apps.remove(&k);
            }
        }
        let c = Arc::clone(apps.entry(app.to_owned()).or_default());
        c.running.fetch_add(1, Ordering::Relaxed);
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        Running(c)
    }

    /// Passes `events` of a request of `app` through, counting it running until its stream
    /// ends and each of its tokens, and pricing its compute when it finishes (the audit
    /// line of its end carries the energy).
    pub fn watch(&self, app: &str, mut events: Events) -> Events {
        let running = self.start(app);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (energy, budgets, app) = (self.energy.clone(), self.budgets.clone(), app.to_owned());
        tokio::spawn(async move {
            while let Some(mut event) = events.recv().await {
                match &mut event {
                    StreamEvent::Token { .. } => {
                        running.0.tokens.fetch_add(1, Ordering::Relaxed);
                    }
                    StreamEvent::Finished(finish) => {
                        let o = &finish.outcome;
                        finish.energy = energy.as_ref().map(|l| l.price(o.compute));
                        if let (Some(l), Some((mj, _))) = (&energy, finish.energy) {
                            l.note_request(&app, mj / 1000.0);
                        }
                        if let Some(b) = &budgets {
                            // Before the app hears of the end, so its next request finds
                            // the verdict in force.
                            b.judge();
                        }
                        finish.over_budget = energy.as_ref().and_then(|l| l.over_budget(&app));
                        tracing::info!(
                            target: "hearth::audit", app = %app, model = %o.model, reason = ?o.reason,
                            prompt_tokens = o.prompt_tokens, tokens = o.token_ids.len(),
                            compute_ms = o.compute.as_millis() as u64,
                            energy_mj = finish.energy.map(|e| e.0.round() as u64),
                            energy_source = finish.energy.map(|e| e.1), "request finished"
                        );
                    }
                    _ => {}
                }
                if tx.send(event).is_err() {
                    break; // nobody listens: dropping `events` cancels the generation
                }
            }
            drop(running);
        });
        Events::Routed(rx)
    }

    /// The table (only `app`'s row unless `all`), busiest first.
    pub fn snapshot(&self, app: &str, all: bool) -> Vec<hearth_dbus::AppActivity> {
        let apps = self.apps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut rows: Vec<hearth_dbus::AppActivity> = apps
            .iter()
            .filter(|(k, _)| all || k.as_str() == app)
            .map(|(k, c)| hearth_dbus::AppActivity {
                app: k.clone(),
                running: c.running.load(Ordering::Relaxed),
                requests: c.requests.load(Ordering::Relaxed),
                tokens: c.tokens.load(Ordering::Relaxed),
            })
            .collect();
        rows.sort_by(|a, b| b.running.cmp(&a.running).then(b.tokens.cmp(&a.tokens)).then(a.app.cmp(&b.app)));
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_bounded_and_forgets_the_longest_idle_app() {
        let a = Activity::default();
        let busy = a.start("busy");
        for i in 0..MAX_APPS + 10 {
            drop(a.start(&format!("app{i}")));
        }
        let rows = a.snapshot("", true);
        assert_eq!(rows.len(), MAX_APPS);
        assert!(rows.iter().any(|r| r.app == "busy" && r.running == 1), "a running app is never forgotten");
        assert_eq!(a.snapshot("busy", false).len(), 1, "an app sees its own row only");
        drop(busy);
        assert_eq!(a.snapshot("busy", false)[0].running, 0);
    }
}
