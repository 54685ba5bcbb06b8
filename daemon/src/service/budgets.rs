//! The apps' energy budgets, judged on the ledger: the background requests of an app past
//! one stay queued in the engines until it is back under (the hour window slides).
//!
//! Judged every ledger interval, and at once when one of a budgeted app's requests ends:
//! the deferral reaches the engines before the app hears its request ended, so the request
//! it sends next already waits. An app is judged with its next request too, at what its
//! requests cost lately ([`Ledger::note_request`]): it is held ("over") when that request
//! would take it past its budget, so it stops at the budget, give or take a request dearer
//! than its recent ones and those it has running at once.
//!
//! The device-wide background share is judged with them: `energy.background_per_hour_j`
//! scaled by the power governor's [`GovernorStatus::background_share`] (it shrinks as the
//! battery runs down). Past it, every app's background requests wait.

use std::sync::{Arc, Weak};

use crate::energy::Ledger;
use crate::engine::Throttle;
use crate::gate::Gate;
use crate::governor::GovernorStatus;
use crate::manager::ModelManager;

#[derive(Debug)]
pub struct Budgets {
    ledger: Weak<Ledger>,
    gate: Arc<Gate>,
    throttle: Arc<Throttle>,
    /// For the configuration in force (the background share follows a reload).
    models: ModelManager,
    governor: tokio::sync::watch::Receiver<GovernorStatus>,
    /// Held across a judgement and the deferral it sets: judgements run from the ledger's
    /// tick and from every request's end, and an older verdict must not overwrite a newer
    /// one (nor an audit line be written twice for one crossing).
    judging: std::sync::Mutex<()>,
}

impl Budgets {
    pub fn new(
        ledger: &Arc<Ledger>,
        gate: Arc<Gate>,
        models: ModelManager,
        governor: tokio::sync::watch::Receiver<GovernorStatus>,
    ) -> Self {
        let throttle = models.throttle();
        Self { ledger: Arc::downgrade(ledger), gate, throttle, models, governor, judging: std::sync::Mutex::new(()) }
    }

    /// Judges every app's budget now, and tells the engines whose background work waits.
    pub fn judge(&self) {
        let Some(ledger) = self.ledger.upgrade() else { return };
        let _one_at_a_time = self.judging.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let over = ledger.judge_budgets(|app, hour_j, day_j| {
            let policy = self.gate.policy(app);
            policy.has_energy_budget().then(|| policy.over_energy_budget(hour_j, day_j))
        });
        let per_hour = self.models.config().energy.background_per_hour_j;
        // (At the low battery state the share is nothing, and the governors defer every
        // background request themselves.)
        let share = (per_hour > 0.0).then(|| per_hour * self.governor.borrow().background_share);
        let spent = ledger.judge_background(share);
        let mut changed = false;
        if self.throttle.background_spent.swap(spent, std::sync::atomic::Ordering::Relaxed) != spent {
            let share = share.unwrap_or(0.0);
            if spent {
                tracing::info!(target: "hearth::audit", share_j = share, "background work past the device's background energy share: it waits");
            } else {
                tracing::info!(target: "hearth::audit", share_j = share, "background work back under the device's background energy share");
            }
            changed = true;
        }
        let before = self.throttle.deferred_apps();
        if self.throttle.set_deferred_apps(over.clone()) {
            for app in over.iter().filter(|a| !before.contains(a)) {
                tracing::info!(target: "hearth::audit", app = %app, "past its energy budget: its background work waits");
            }
            for app in before.iter().filter(|a| !over.contains(a)) {
                tracing::info!(target: "hearth::audit", app = %app, "back under its energy budget");
            }
            changed = true;
        }
        if changed {
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
