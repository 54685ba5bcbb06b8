//! Tasks that follow the daemon's state and the bus: PropertiesChanged for what changed, and
//! the cleanup when a caller's connection leaves.

use zbus::Connection;
use zbus::object_server::SignalEmitter;

use super::{CallerCache, HearthService};
use crate::engine::Priority;
use crate::governor::GovernorStatus;
use crate::manager::{ManagerStatus, ModelManager};

/// Emits PropertiesChanged for the queue, model and memory properties whenever they move.
pub async fn publish_status_changes(conn: Connection, mut status: tokio::sync::watch::Receiver<ManagerStatus>) {
    let iface = match conn.object_server().interface::<_, HearthService>(hearth_dbus::OBJECT_PATH).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch engine status");
            return;
        }
    };
    let mut last = status.borrow().clone();
    while status.changed().await.is_ok() {
        let now = status.borrow_and_update().clone();
        let emitter: &SignalEmitter<'_> = iface.signal_emitter();
        let service = iface.get().await;
        let mut results = Vec::new();
        if now.queue_depth() != last.queue_depth() {
            results.push(("QueueDepth", service.queue_depth_changed(emitter).await));
        }
        if Priority::ALL.iter().any(|&p| now.count(p) != last.count(p)) {
            results.push(("QueueByPriority", service.queue_by_priority_changed(emitter).await));
        }
        if now.loaded != last.loaded {
            results.push(("LoadedModels", service.loaded_models_changed(emitter).await));
        }
        if now.loading != last.loading {
            results.push(("LoadProgress", service.load_progress_changed(emitter).await));
        }
        // Readings alone change every interval; they are read on demand.
        let memory_moved = |m: &crate::manager::MemoryStatus| {
            (m.used, m.pressure, m.evicted, m.expired, m.pressure_unloads, m.pressure_shrinks, m.over_ceiling)
        };
        if memory_moved(&now.memory) != memory_moved(&last.memory) {
            results.push(("Memory", service.memory_changed(emitter).await));
        }
        for (property, result) in results {
            if let Err(e) = result {
                tracing::warn!(error = %e, property, "cannot emit a property change");
            }
        }
        last = now;
    }
}

/// Emits PropertiesChanged for ThermalState, PowerState and Throttle when they move (the cap
/// only when it moves by 5% or more, the temperature alone never: read it on demand).
/// Throttle's `defer_background` also follows the energy ledger's background share, which
/// the budget watch sets on `throttle`.
pub async fn publish_governor_changes(
    conn: Connection,
    mut status: tokio::sync::watch::Receiver<GovernorStatus>,
    throttle: std::sync::Arc<crate::engine::Throttle>,
) {
    let Ok(iface) = conn.object_server().interface::<_, HearthService>(hearth_dbus::OBJECT_PATH).await else {
        return;
    };
    let mut last = status.borrow().clone();
    let moved = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() > 0.05 * a.max(b),
        (a, b) => a.is_some() != b.is_some(),
    };
    let spent = || throttle.background_spent.load(std::sync::atomic::Ordering::Relaxed);
    let (mut demands, mut last_spent) = (throttle.subscribe(), spent());
    loop {
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            changed = demands.changed() => if changed.is_err() { return },
        }
        let now = status.borrow_and_update().clone();
        demands.borrow_and_update();
        let now_spent = spent();
        let emitter: &SignalEmitter<'_> = iface.signal_emitter();
        let service = iface.get().await;
        let mut results = Vec::new();
        if now.thermal != last.thermal {
            results.push(("ThermalState", service.thermal_state_changed(emitter).await));
        }
        if now.power != last.power {
            results.push(("PowerState", service.power_state_changed(emitter).await));
        }
        let flags = |g: &GovernorStatus| (g.threads, g.defer_background, g.prefer_cloud, g.power_saver);
        if flags(&now) != flags(&last) || moved(now.rate_cap_tps, last.rate_cap_tps) || now_spent != last_spent {
            results.push(("Throttle", service.throttle_changed(emitter).await));
        }
        last_spent = now_spent;
        for (property, result) in results {
            if let Err(e) = result {
                tracing::warn!(error = %e, property, "cannot emit a property change");
            }
        }
        if flags(&now) != flags(&last)
            || moved(now.rate_cap_tps, last.rate_cap_tps)
            || now.thermal != last.thermal
            || now.power != last.power
        {
            last = now;
        }
    }
}

/// Cancels the requests and closes the sessions of every connection that leaves the bus,
/// freeing their KV at once.
pub async fn watch_disconnects(conn: Connection, models: ModelManager, callers: CallerCache) {
    let stream = async {
        let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
        dbus.receive_name_owner_changed().await
    };
    let mut changes = match stream.await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch for disconnecting callers");
            return;
        }
    };
    use futures_util::StreamExt;
    while let Some(signal) = changes.next().await {
        let Ok(args) = signal.args() else { continue };
        // A unique name losing its owner is a connection that closed.
        if args.name().starts_with(':') && args.new_owner().is_none() {
            callers.remove(args.name());
            models.connection_closed(args.name()).await;
            super::session::connection_closed(&conn, &models, args.name()).await;
        }
    }
}

/// Emits PropertiesChanged for CloudAvailable when the circuit breaker opens, closes, or
/// turns half-open (at its time, whether or not a request comes).
pub async fn publish_cloud_changes(conn: Connection, cloud: Option<std::sync::Arc<crate::cloud::Cloud>>) {
    let Some(cloud) = cloud else { return };
    let mut available = cloud.available_watch();
    let Ok(iface) = conn.object_server().interface::<_, HearthService>(hearth_dbus::OBJECT_PATH).await else {
        return;
    };
    loop {
        let half_open = cloud.half_open_at();
        tokio::select! {
            changed = available.changed() => if changed.is_err() { return },
            () = async {
                match half_open {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                cloud.refresh();
                continue; // the watch changed: the next turn emits
            }
        }
        if let Err(e) = iface.get().await.cloud_available_changed(iface.signal_emitter()).await {
            tracing::warn!(error = %e, "cannot emit CloudAvailable change");
        }
    }
}
