//! The live and summary views: `hearthctl top` (requests, tokens/s and energy per app, the
//! queue, thermal and power state) and `hearthctl energy` (the energy ledger).

use std::collections::HashMap;

use hearth_dbus::{Error, Hearth1Proxy};
use serde_json::{Value as Json, json};

/// Each app's energy over the ledger's hour, J (empty when the ledger is off).
fn hour_j(energy: &hearth_dbus::Energy) -> HashMap<String, f64> {
    energy.apps.iter().map(|a| (a.app.clone(), a.hour_j)).collect()
}

/// `hearthctl top`: a frame every `interval` seconds (one with `once`).
pub async fn top(proxy: &Hearth1Proxy<'_>, json_out: bool, interval: f64, once: bool) -> Result<(), Error> {
    let every = std::time::Duration::from_secs_f64(interval.clamp(0.1, 60.0));
    let mut before: HashMap<String, u64> = proxy.activity().await?.into_iter().map(|a| (a.app, a.tokens)).collect();
    loop {
        tokio::time::sleep(every).await;
        let apps = proxy.activity().await?;
        let by_priority = proxy.queue_by_priority().await?;
        let (thermal, power) = (proxy.thermal_state().await?, proxy.power_state().await?);
        let (models, cloud) = (proxy.loaded_models().await?, proxy.cloud_available().await?);
        let energy = proxy.energy().await?;
        let joules = hour_j(&energy);
        let rate = |a: &hearth_dbus::AppActivity| {
            a.tokens.saturating_sub(before.get(&a.app).copied().unwrap_or(a.tokens)) as f64 / every.as_secs_f64()
        };
        let hour = |app: &str| joules.get(app).copied().unwrap_or(0.0);
        if json_out {
            let rows: Vec<Json> = apps
                .iter()
                .map(|a| {
                    json!({"app": a.app, "running": a.running, "requests": a.requests,
                           "tokens": a.tokens, "tokens_per_s": rate(a), "energy_hour_j": hour(&a.app)})
                })
                .collect();
            println!(
                "{}",
                json!({"apps": rows, "queue_by_priority": by_priority, "thermal_state": thermal,
                       "power_state": power, "loaded_models": models, "cloud_available": cloud,
                       "energy_source": energy.source, "device_w": energy.device_w})
            );
        } else {
            if !once {
                print!("\x1b[H\x1b[2J");
            }
            let total: f64 = apps.iter().map(rate).sum();
            let queue = |p: &str| by_priority.get(p).copied().unwrap_or(0);
            println!(
                "hearth: {} | thermal {thermal} | power {power} | cloud {} | {total:.1} tok/s | {:.2} W ({})",
                if models.is_empty() { "no model loaded".to_owned() } else { models.join(", ") },
                if cloud { "available" } else { "off" },
                energy.device_w,
                energy.source,
            );
            println!(
                "queue: {} interactive, {} normal, {} background\n",
                queue("interactive"),
                queue("normal"),
                queue("background")
            );
            println!("{:>7} {:>8} {:>9} {:>10} {:>9}  APP", "RUNNING", "TOK/S", "REQUESTS", "TOKENS", "J/HOUR");
            for a in &apps {
                println!(
                    "{:>7} {:>8.1} {:>9} {:>10} {:>9.1}  {}",
                    a.running,
                    rate(a),
                    a.requests,
                    a.tokens,
                    hour(&a.app),
                    a.app
                );
            }
        }
        if once {
            return Ok(());
        }
        before = apps.into_iter().map(|a| (a.app, a.tokens)).collect();
    }
}

/// `hearthctl energy`: the device's and each app's energy.
pub async fn energy(proxy: &Hearth1Proxy<'_>, json_out: bool) -> Result<(), Error> {
    let e = proxy.energy().await?;
    if json_out {
        let apps: Vec<Json> = e
            .apps
            .iter()
            .map(|a| {
                json!({"app": a.app, "total_j": a.total_j, "hour_j": a.hour_j, "day_j": a.day_j, "today_j": a.today_j,
                       "compute_s": a.compute_s, "over_budget": a.over_budget})
            })
            .collect();
        println!(
            "{}",
            json!({"source": e.source, "device_j": e.device_j, "device_hour_j": e.device_hour_j,
                   "device_today_j": e.device_today_j, "apps_j": e.apps_j, "device_w": e.device_w,
                   "idle_w": e.idle_w, "j_per_compute_s": e.j_per_compute_s, "hour_s": e.hour_s,
                   "background_hour_j": e.background_hour_j, "background_share_j": e.background_share_j,
                   "background_deferred": e.background_deferred, "apps": apps})
        );
        return Ok(());
    }
    println!(
        "source {} | device {:.1} J since start, {:.1} J today, {:.2} W now, {:.2} W idle | apps {:.1} J | {:.2} J per compute-second",
        e.source, e.device_j, e.device_today_j, e.device_w, e.idle_w, e.apps_j, e.j_per_compute_s
    );
    let hour = if e.hour_s == 3600 { "hour".to_owned() } else { format!("{} s", e.hour_s) };
    match (e.background_share_j, e.background_deferred) {
        (Some(share), deferred) => println!(
            "background work {:.1} J in the last {hour}, share {share:.1} J{}",
            e.background_hour_j,
            if deferred == Some(true) { ": past it, background requests wait" } else { "" }
        ),
        (None, _) => println!("background work {:.1} J in the last {hour} (no share set)", e.background_hour_j),
    }
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>10}  APP",
        format!("J/{}", hour.to_uppercase()),
        "J/24H",
        "J TODAY",
        "J TOTAL",
        "COMPUTE S"
    );
    for a in &e.apps {
        let over = if a.over_budget == Some(true) { " (over budget)" } else { "" };
        println!(
            "{:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}  {}{over}",
            a.hour_j, a.day_j, a.today_j, a.total_j, a.compute_s, a.app
        );
    }
    Ok(())
}
