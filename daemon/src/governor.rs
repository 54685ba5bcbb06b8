//! Power and thermal governors.
//!
//! Reads the thermal zones (`class/thermal/thermal_zone*/{type,temp,trip_point_*}`) and power
//! supplies (`class/power_supply/*/{type,capacity,status,online}`) under a configurable sysfs
//! root, follows power-profiles-daemon's `ActiveProfile` when it is on the bus, maps them to
//! states with hysteresis, and drives the engines through a shared [`Throttle`]:
//!
//! - a PI controller on the engines' duty cycle (the share of wall time they may spend
//!   decoding) holds the hottest zone at a setpoint just under the passive trip while keeping
//!   as much throughput as it can;
//! - background requests stay queued when it is hot or the battery is low (until charging or
//!   cool), never failed;
//! - power-saver and a low battery halve the compute threads;
//! - the energy ledger's background share (`energy.background_per_hour_j`) shrinks first:
//!   whole down to `background_share_full_pct` of battery, then in proportion to nothing at
//!   the low state ([`background_share`]);
//! - `prefer_cloud` tells the router that eligible requests should leave the device.
//!
//! Missing or odd files never stop the daemon: the governor says what it cannot read, once,
//! and works with what it has.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::watch;

use crate::engine::Throttle;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GovernorConfig {
    pub enabled: bool,
    /// Where sysfs is (tests point it at a real-format tree).
    pub sysfs_root: PathBuf,
    pub interval_ms: u64,
    /// Thermal zone types to watch (e.g. "cpu-thermal"); empty: all.
    pub zones: Vec<String>,
    /// The trip to stay under, °C; 0: the lowest passive trip of the watched zones.
    pub trip_c: f64,
    /// The PI setpoint sits this far under the trip.
    pub setpoint_margin_c: f64,
    /// `fair` from this far under the trip, `serious` from this far; `critical` at the trip.
    pub fair_margin_c: f64,
    pub serious_margin_c: f64,
    /// A state is left only this far below where it was entered.
    pub hysteresis_c: f64,
    /// PI gains on the duty cycle (0..1) per °C of error, and per °C·s.
    pub kp: f64,
    pub ki: f64,
    /// The controller never slows decoding below this, tokens/s (at the uncapped rate).
    pub min_rate_tps: f64,
    /// A fixed cap in tokens/s instead of the controller (benchmarks); 0: the controller.
    pub static_rate_tps: f64,
    /// Battery percentages of the `low` and `critical` power states.
    pub low_battery_pct: u32,
    pub critical_battery_pct: u32,
    /// On battery, the background energy share is whole at or above this percentage and
    /// shrinks in proportion below it, to nothing at `low_battery_pct`.
    pub background_share_full_pct: u32,
    /// Follow power-profiles-daemon's ActiveProfile when it is on the bus.
    pub power_profiles: bool,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sysfs_root: PathBuf::from("/sys"),
            interval_ms: 500,
            zones: Vec::new(),
            trip_c: 0.0,
            setpoint_margin_c: 3.0,
            fair_margin_c: 15.0,
            serious_margin_c: 5.0,
            hysteresis_c: 2.0,
            kp: 0.02,
            ki: 0.002,
            min_rate_tps: 1.0,
            static_rate_tps: 0.0,
            low_battery_pct: 20,
            critical_battery_pct: 5,
            background_share_full_pct: 50,
            power_profiles: true,
        }
    }
}

/// Thermal state, ordered from cool to hot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThermalState {
    Nominal,
    Fair,
    Serious,
    Critical,
}

impl ThermalState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nominal => "nominal",
            Self::Fair => "fair",
            Self::Serious => "serious",
            Self::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    Charging,
    Battery,
    Low,
    Critical,
}

impl PowerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charging => "charging",
            Self::Battery => "battery",
            Self::Low => "low",
            Self::Critical => "critical",
        }
    }
}

/// The hottest watched zone and the trips that apply.
#[derive(Debug, Clone, PartialEq)]
pub struct ThermalReading {
    pub temp_c: f64,
    pub passive_trip_c: Option<f64>,
    pub zones: usize,
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn millidegrees(p: &Path) -> Option<f64> {
    read_trimmed(p)?.parse::<i64>().ok().map(|m| m as f64 / 1000.0)
}

/// Reads the thermal zones. Zones whose temp cannot be read are skipped (and named in the
/// error list); None when no zone could be read.
pub fn read_thermal(root: &Path, types: &[String], problems: &mut Vec<String>) -> Option<ThermalReading> {
    let dir = root.join("class/thermal");
    let mut zones: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("thermal_zone")))
        .collect();
    zones.sort();
    let mut hottest: Option<f64> = None;
    let mut trip: Option<f64> = None;
    let mut n = 0;
    for zone in zones {
        let kind = read_trimmed(&zone.join("type")).unwrap_or_default();
        if !types.is_empty() && !types.contains(&kind) {
            continue;
        }
        let Some(temp) = millidegrees(&zone.join("temp")) else {
            problems.push(format!("{}/temp is unreadable", zone.display()));
            continue;
        };
        n += 1;
        hottest = Some(hottest.map_or(temp, |h| h.max(temp)));
        for i in 0..32 {
            let t = zone.join(format!("trip_point_{i}_type"));
            let Some(kind) = read_trimmed(&t) else { break };
            if kind == "passive"
                && let Some(c) = millidegrees(&zone.join(format!("trip_point_{i}_temp")))
            {
                trip = Some(trip.map_or(c, |t: f64| t.min(c)));
            }
        }
    }
    hottest.map(|temp_c| ThermalReading { temp_c, passive_trip_c: trip, zones: n })
}

/// Batteries and external supplies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PowerReading {
    /// Capacity in percent and status ("Charging", "Discharging", "Full", ...) of the first
    /// battery, when there is one.
    pub battery: Option<(u32, String)>,
    /// A mains/USB supply reports online.
    pub external_online: bool,
}

pub fn read_power(root: &Path) -> PowerReading {
    let mut r = PowerReading::default();
    let Ok(entries) = std::fs::read_dir(root.join("class/power_supply")) else { return r };
    let mut supplies: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    supplies.sort();
    for s in supplies {
        match read_trimmed(&s.join("type")).as_deref() {
            Some("Battery") if r.battery.is_none() => {
                let capacity = read_trimmed(&s.join("capacity")).and_then(|c| c.parse().ok());
                let status = read_trimmed(&s.join("status")).unwrap_or_else(|| "Unknown".into());
                if let Some(c) = capacity {
                    r.battery = Some((c, status));
                }
            }
            Some("Mains" | "USB" | "USB_PD" | "Wireless") => {
                r.external_online |= read_trimmed(&s.join("online")).as_deref() == Some("1");
            }
            _ => {}
        }
    }
    r
}

/// The power state: charging when a supply feeds the phone (or there is no battery at all).
pub fn power_state(p: &PowerReading, config: &GovernorConfig) -> PowerState {
    match &p.battery {
        None => PowerState::Charging,
        Some((_, status)) if p.external_online || status == "Charging" || status == "Full" => PowerState::Charging,
        Some((c, _)) if *c <= config.critical_battery_pct => PowerState::Critical,
        Some((c, _)) if *c <= config.low_battery_pct => PowerState::Low,
        Some(_) => PowerState::Battery,
    }
}

/// What fraction of the configured background energy share the power state allows, 0..1:
/// all of it on external power (or with no battery), and on battery all of it down to
/// `background_share_full_pct`, then less in proportion to the charge left above the low
/// state, where background work waits anyway.
pub fn background_share(p: &PowerReading, state: PowerState, config: &GovernorConfig) -> f64 {
    match (state, &p.battery) {
        (PowerState::Charging, _) | (_, None) => 1.0,
        (PowerState::Low | PowerState::Critical, _) => 0.0,
        (PowerState::Battery, Some((pct, _))) => {
            let (low, full) = (f64::from(config.low_battery_pct), f64::from(config.background_share_full_pct));
            if full <= low { 1.0 } else { ((f64::from(*pct) - low) / (full - low)).clamp(0.0, 1.0) }
        }
    }
}

/// The thermal state for `temp` under `trip`, coming from `prev`: up at once, down only
/// once the temperature is `hysteresis_c` below the threshold of the state it leaves.
pub fn thermal_state(prev: ThermalState, temp: f64, trip: f64, c: &GovernorConfig) -> ThermalState {
    let threshold = |s: ThermalState| match s {
        ThermalState::Nominal => f64::NEG_INFINITY,
        ThermalState::Fair => trip - c.fair_margin_c,
        ThermalState::Serious => trip - c.serious_margin_c,
        ThermalState::Critical => trip,
    };
    let target = [ThermalState::Critical, ThermalState::Serious, ThermalState::Fair, ThermalState::Nominal]
        .into_iter()
        .find(|s| temp >= threshold(*s))
        .unwrap_or(ThermalState::Nominal);
    if target >= prev {
        return target;
    }
    // Cooling: step down as far as the hysteresis allows.
    let mut s = prev;
    while s > target && temp < threshold(s) - c.hysteresis_c {
        s = match s {
            ThermalState::Critical => ThermalState::Serious,
            ThermalState::Serious => ThermalState::Fair,
            _ => ThermalState::Nominal,
        };
    }
    s
}

/// The smallest duty cycle the controller asks for.
const MIN_DUTY: f64 = 0.01;

/// PI controller (velocity form, so the output never winds up past its limits) on the
/// engines' duty cycle.
#[derive(Debug, Clone)]
pub struct Pi {
    pub output: f64,
    prev_error: Option<f64>,
}

impl Default for Pi {
    fn default() -> Self {
        Self { output: 1.0, prev_error: None }
    }
}

impl Pi {
    /// One step: `error` = setpoint − temperature (positive: room to heat), `dt` seconds.
    pub fn update(&mut self, error: f64, dt: f64, c: &GovernorConfig) -> f64 {
        let de = error - self.prev_error.unwrap_or(error);
        self.prev_error = Some(error);
        self.output = (self.output + c.kp * de + c.ki * error * dt).clamp(0.0, 1.0);
        self.output
    }
}

/// What the governor publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct GovernorStatus {
    pub thermal: ThermalState,
    pub power: PowerState,
    pub power_saver: bool,
    pub temperature_c: Option<f64>,
    pub trip_c: Option<f64>,
    pub battery_pct: Option<u32>,
    /// Current cap, tokens/s (None: uncapped): the fixed cap, or the duty cycle's worth of
    /// the uncapped rate.
    pub rate_cap_tps: Option<f64>,
    /// Current duty cycle, 0..1 (None: no limit).
    pub duty: Option<f64>,
    pub potential_tps: f64,
    /// Compute threads asked for (0: as configured).
    pub threads: u32,
    pub defer_background: bool,
    pub prefer_cloud: bool,
    /// The fraction of the background energy share the battery allows now, 0..1.
    pub background_share: f64,
}

impl Default for GovernorStatus {
    fn default() -> Self {
        Self {
            thermal: ThermalState::Nominal,
            power: PowerState::Charging,
            power_saver: false,
            temperature_c: None,
            trip_c: None,
            battery_pct: None,
            rate_cap_tps: None,
            duty: None,
            potential_tps: 0.0,
            threads: 0,
            defer_background: false,
            prefer_cloud: false,
            background_share: 1.0,
        }
    }
}

/// The governor's state between ticks.
#[derive(Debug)]
pub struct Governor {
    config: GovernorConfig,
    throttle: Arc<Throttle>,
    status: watch::Sender<GovernorStatus>,
    pi: Pi,
    thermal: ThermalState,
    last: Option<Instant>,
    reported: std::collections::BTreeSet<String>,
    configured_threads: u32,
}

impl Governor {
    pub fn new(config: GovernorConfig, throttle: Arc<Throttle>, configured_threads: u32) -> Self {
        let (status, _) = watch::channel(GovernorStatus::default());
        Self {
            config,
            throttle,
            status,
            pi: Pi::default(),
            thermal: ThermalState::Nominal,
            last: None,
            reported: Default::default(),
            configured_threads,
        }
    }

    pub fn status(&self) -> watch::Receiver<GovernorStatus> {
        self.status.subscribe()
    }

    /// Logs a problem once (until it goes away and comes back).
    fn note(&mut self, problems: Vec<String>) {
        let now: std::collections::BTreeSet<String> = problems.into_iter().collect();
        for p in now.difference(&self.reported) {
            tracing::warn!(problem = %p, "governor: sensor problem; carrying on with what can be read");
        }
        self.reported = now;
    }

    /// One control step with the sensors as they are now and `power_saver` from
    /// power-profiles-daemon.
    pub fn tick(&mut self, power_saver: bool) {
        let now = Instant::now();
        let dt = self.last.map_or(0.0, |l| now.duration_since(l).as_secs_f64());
        self.last = Some(now);
        let c = self.config.clone();
        let mut problems = Vec::new();
        let thermal = read_thermal(&c.sysfs_root, &c.zones, &mut problems);
        if thermal.is_none() {
            problems.push(format!("no readable thermal zone under {}", c.sysfs_root.join("class/thermal").display()));
        }
        let power = read_power(&c.sysfs_root);
        if power.battery.is_none() {
            problems.push("no battery: treated as on external power".into());
        }
        self.note(problems);
        let power_state = power_state(&power, &c);
        let trip = thermal.as_ref().and_then(|t| if c.trip_c > 0.0 { Some(c.trip_c) } else { t.passive_trip_c });
        let potential = self.throttle.potential_mtps.load(Ordering::Relaxed) as f64 / 1000.0;
        // The controller's output is a duty cycle in the engines' unit, thousandths, so what
        // is published is what is applied.
        let (static_cap, duty_milli) = match (&thermal, trip) {
            _ if c.static_rate_tps > 0.0 => (Some(c.static_rate_tps), None),
            (Some(t), Some(trip)) => {
                self.thermal = thermal_state(self.thermal, t.temp_c, trip, &c);
                let fraction = if t.temp_c >= trip {
                    // Past the trip: floor the duty cycle at once, the integrator follows.
                    self.pi.output = 0.0;
                    0.0
                } else {
                    self.pi.update(trip - c.setpoint_margin_c - t.temp_c, dt, &c)
                };
                let floor = if potential > 0.0 { c.min_rate_tps / potential } else { 0.0 };
                let duty_milli =
                    (fraction < 0.999).then(|| (fraction.max(floor).clamp(MIN_DUTY, 0.999) * 1000.0).round() as u32);
                (None, duty_milli)
            }
            _ => {
                self.thermal = ThermalState::Nominal;
                (None, None)
            }
        };
        let duty = duty_milli.map(|m| f64::from(m) / 1000.0);
        let cap = static_cap.or_else(|| duty.filter(|_| potential > 0.0).map(|d| d * potential));
        let hot = self.thermal >= ThermalState::Serious;
        let low = matches!(power_state, PowerState::Low | PowerState::Critical);
        let defer_background = hot || low;
        let threads = if (power_saver || low) && self.configured_threads > 1 { self.configured_threads / 2 } else { 0 };
        self.throttle.rate_cap_mtps.store(static_cap.map_or(0, |r| (r * 1000.0) as u64), Ordering::Relaxed);
        self.throttle.duty_milli.store(duty_milli.unwrap_or(0), Ordering::Relaxed);
        self.throttle.threads.store(threads, Ordering::Relaxed);
        self.throttle.defer_background.store(defer_background, Ordering::Relaxed);
        self.throttle.changed();
        let status = GovernorStatus {
            thermal: self.thermal,
            power: power_state,
            power_saver,
            temperature_c: thermal.as_ref().map(|t| t.temp_c),
            trip_c: trip,
            battery_pct: power.battery.as_ref().map(|b| b.0),
            rate_cap_tps: cap,
            duty,
            potential_tps: potential,
            threads,
            defer_background,
            prefer_cloud: hot || low || power_saver,
            background_share: background_share(&power, power_state, &c),
        };
        let before = self.status.borrow().clone();
        if before.thermal != status.thermal || before.power != status.power {
            tracing::info!(thermal = status.thermal.as_str(), power = status.power.as_str(), temperature_c = ?status.temperature_c, "governor state");
        }
        self.status.send_replace(status);
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.config.interval_ms.max(20))
    }

    pub fn follows_power_profiles(&self) -> bool {
        self.config.power_profiles
    }
}

/// power-profiles-daemon's active profile, when it is on the bus (either of its names).
pub async fn active_power_profile(conn: &zbus::Connection) -> Option<String> {
    for (dest, path, iface) in [
        (
            "org.freedesktop.UPower.PowerProfiles",
            "/org/freedesktop/UPower/PowerProfiles",
            "org.freedesktop.UPower.PowerProfiles",
        ),
        ("net.hadess.PowerProfiles", "/net/hadess/PowerProfiles", "net.hadess.PowerProfiles"),
    ] {
        let Ok(proxy) = zbus::fdo::PropertiesProxy::builder(conn).destination(dest).path(path).build().await else {
            continue;
        };
        let iface = zbus::names::InterfaceName::try_from(iface).ok()?;
        let call = proxy.get(iface, "ActiveProfile");
        if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(1), call).await
            && let Ok(s) = <&str>::try_from(&*v)
        {
            return Some(s.to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests;
