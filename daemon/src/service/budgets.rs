//! The apps' energy budgets, judged on the ledger: the background requests of an app past
//! one stay queued in the engines until it is back under (the hour window slides).
//!
//! Judged every ledger interval, and at once when one of a budgeted app's requests ends:
//! the deferral reaches the engines before the app hears its request ended, so the request
//! it sends next already waits; an app goes past its budget by the request that took it
//! over, not by what it could start in the ledger's interval.

use std::sync::{Arc, Weak};

use crate::energy::Ledger;
use crate::engine::Throttle;
use crate::gate::Gate;

#[derive(Debug)]
pub struct Budgets {
    ledger: Weak<Ledger>,
    gate: Arc<Gate>,
    throttle: Arc<Throttle>,
}

impl Budgets {
    pub fn new(ledger: &Arc<Ledger>, gate: Arc<Gate>, throttle: Arc<Throttle>) -> Self {
        Self { ledger: Arc::downgrade(ledger), gate, throttle }
    }

    /// Judges every app's budget now, and tells the engines whose background work waits.
    pub fn judge(&self) {
        let Some(ledger) = self.ledger.upgrade() else { return };
        let over = ledger.judge_budgets(|app, hour_j, day_j| {
            let policy = self.gate.policy(app);
            policy.has_energy_budget().then(|| policy.over_energy_budget(hour_j, day_j))
        });
        let before = self.throttle.deferred_apps();
        if self.throttle.set_deferred_apps(over.clone()) {
            for app in over.iter().filter(|a| !before.contains(a)) {
                tracing::info!(target: "hearth::audit", app = %app, "past its energy budget: its background work waits");
            }
            for app in before.iter().filter(|a| !over.contains(a)) {
                tracing::info!(target: "hearth::audit", app = %app, "back under its energy budget");
            }
            self.throttle.changed();
        }
    }

    /// Judges every ledger interval, for as long as the ledger lives.
    pub async fn watch(self: Arc<Self>) {
        let every = self.ledger.upgrade().map_or(1000, |l| l.config().interval_ms);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.ledger.strong_count() == 0 {
                return;
            }
            self.judge();
        }
    }
}
