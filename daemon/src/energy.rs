//! The energy ledger: what each app's on-device AI costs the battery.
//!
//! Every interval hearthd reads how much energy the device drew, from the best source it
//! has, and shares what it drew above idle among the apps by the compute time their work
//! took in that interval ([`crate::engine::Compute`]: each decode step's time split by the
//! rows each sequence put in its batch; an image's encoding and decoding and an embedded
//! text's time wholly its app's). Sources, best first:
//!
//! - `rapl`: powercap's energy counters (`class/powercap/intel-rapl:N/energy_uj`, one per
//!   package, wrapping at `max_energy_range_uj`);
//! - `battery-energy`: a discharging battery's `energy_now` (µWh), or `charge_now` (µAh)
//!   times `voltage_now` (µV);
//! - `battery-power`: a discharging battery's `power_now` (µW), or `current_now` (µA) times
//!   `voltage_now` (µV), integrated over the interval;
//! - `model`: the configured power model, as Android's power profile does it: watts while an
//!   engine computes (`busy_w`), and idle (`idle_w`). Also used for the intervals a battery
//!   charges, when its readings say nothing of what the device draws.
//!
//! A measured source's idle power is learned from intervals without compute, and the energy
//! above it in a busy interval is the apps'. A request's `energy_mj` is its own compute time
//! priced at the latest joules per compute-second. Apps are kept per app (at most
//! [`MAX_APPS`]), and the device as a whole, since hearthd started, over the last hour and
//! the last 24 (the `hour_s` windows, which tests shorten; budgets are judged on these
//! sliding windows, so no budget resets for everyone at once at midnight), and today (since
//! the local midnight, in the system's time zone).
//!
//! Background requests' energy is also kept device-wide over the hour, for the background
//! share (`background_per_hour_j`): the joules all apps' background work may draw in an
//! hour, which the power governor shrinks as the battery runs down
//! ([`crate::governor::background_share`]) before a low battery defers background work
//! altogether. Past it, every app's background requests wait.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::engine::Compute;

/// Apps the ledger keeps at most; past it the one idle longest is forgotten.
pub const MAX_APPS: usize = 256;
/// Weight of the newest interval in the learned idle power and price.
const EWMA: f64 = 0.3;
/// Seconds of idle after which energy no compute report claimed is dropped.
const POOL_LIFE_S: f64 = 2.0;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EnergyConfig {
    pub enabled: bool,
    /// "auto" (the best source present), "rapl", "battery" or "model".
    pub source: String,
    pub interval_ms: u64,
    /// The power model: what an engine draws while it computes, and the device at rest, W.
    pub busy_w: f64,
    pub idle_w: f64,
    /// The length of an "hour" in seconds (the windows and budgets; tests shorten it).
    pub hour_s: u64,
    /// Where sysfs is for the sources (default: the governors' `sysfs_root`).
    pub sysfs_root: Option<PathBuf>,
    /// Joules all apps' background requests may draw in an hour, on a full enough battery
    /// or on external power (0: no share).
    pub background_per_hour_j: f64,
}

impl Default for EnergyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            source: "auto".into(),
            interval_ms: 1000,
            busy_w: 4.0,
            idle_w: 0.5,
            hour_s: 3600,
            sysfs_root: None,
            background_per_hour_j: 0.0,
        }
    }
}

impl EnergyConfig {
    pub fn check(&self) -> Result<(), String> {
        if !matches!(self.source.as_str(), "auto" | "rapl" | "battery" | "model") {
            return Err(format!("energy.source {:?} is not one of auto, rapl, battery, model", self.source));
        }
        if !(self.busy_w.is_finite() && self.busy_w > 0.0 && self.idle_w.is_finite() && self.idle_w >= 0.0) {
            return Err("energy.busy_w must be > 0 and energy.idle_w >= 0".into());
        }
        if !(self.background_per_hour_j.is_finite() && self.background_per_hour_j >= 0.0) {
            return Err("energy.background_per_hour_j must be >= 0".into());
        }
        if self.interval_ms == 0 || self.hour_s == 0 {
            return Err("energy.interval_ms and energy.hour_s must be > 0".into());
        }
        Ok(())
    }
}

/// Where the device's energy is read.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// The packages' counters: (energy_uj, its wrap-around range).
    Rapl(Vec<(PathBuf, u64)>),
    /// A battery's directory under class/power_supply, read as a stored energy.
    BatteryEnergy(PathBuf),
    /// A battery's directory, read as an instantaneous power.
    BatteryPower(PathBuf),
    Model,
}

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Self::Rapl(_) => "rapl",
            Self::BatteryEnergy(_) => "battery-energy",
            Self::BatteryPower(_) => "battery-power",
            Self::Model => "model",
        }
    }

    /// What the source says now (sysfs reads).
    fn read(&self) -> Reading {
        match self {
            Self::Rapl(zones) => Reading::Counters(zones.iter().map(|(p, _)| read_u64(p)).collect()),
            Self::BatteryEnergy(dir) => Reading::Stored(battery_energy_j(dir).filter(|_| discharging(dir))),
            Self::BatteryPower(dir) => Reading::Power(battery_power_w(dir).filter(|_| discharging(dir))),
            Self::Model => Reading::None,
        }
    }
}

/// One reading of a [`Source`] (None inside: unreadable, or a battery not discharging).
#[derive(Debug)]
enum Reading {
    Counters(Option<Vec<u64>>),
    Stored(Option<f64>),
    Power(Option<f64>),
    None,
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn read_f64(p: &Path) -> Option<f64> {
    std::fs::read_to_string(p).ok()?.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// The packages' RAPL counters under `root` (top-level `intel-rapl:N` zones only: their
/// subzones are parts of them).
fn rapl_zones(root: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(dir) = std::fs::read_dir(root.join("class/powercap")) else { return Vec::new() };
    let mut zones: Vec<(PathBuf, u64)> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with("intel-rapl:") && n.matches(':').count() == 1))
        .filter_map(|e| {
            let energy = e.path().join("energy_uj");
            read_u64(&energy)?;
            Some((energy, read_u64(&e.path().join("max_energy_range_uj")).unwrap_or(u64::MAX)))
        })
        .collect();
    zones.sort();
    zones
}

/// The first battery under `root` (class/power_supply/*/type "Battery").
fn battery(root: &Path) -> Option<PathBuf> {
    let dir = std::fs::read_dir(root.join("class/power_supply")).ok()?;
    let mut found: Vec<PathBuf> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| std::fs::read_to_string(p.join("type")).is_ok_and(|t| t.trim() == "Battery"))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// A battery's stored energy, J.
fn battery_energy_j(dir: &Path) -> Option<f64> {
    if let Some(uwh) = read_f64(&dir.join("energy_now")) {
        return Some(uwh * 3.6e-3);
    }
    let (uah, uv) = (read_f64(&dir.join("charge_now"))?, read_f64(&dir.join("voltage_now"))?);
    Some(uah * uv / 1e6 * 3.6e-3)
}

/// A battery's power draw, W.
fn battery_power_w(dir: &Path) -> Option<f64> {
    if let Some(uw) = read_f64(&dir.join("power_now")) {
        return Some(uw.abs() / 1e6);
    }
    let (ua, uv) = (read_f64(&dir.join("current_now"))?, read_f64(&dir.join("voltage_now"))?);
    Some((ua * uv).abs() / 1e12)
}

fn discharging(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("status")).is_ok_and(|s| s.trim() == "Discharging")
}

fn detect(root: &Path, wanted: &str) -> Source {
    if matches!(wanted, "auto" | "rapl") {
        let zones = rapl_zones(root);
        if !zones.is_empty() {
            return Source::Rapl(zones);
        }
    }
    if matches!(wanted, "auto" | "battery")
        && let Some(dir) = battery(root)
    {
        if battery_energy_j(&dir).is_some() {
            return Source::BatteryEnergy(dir);
        }
        if battery_power_w(&dir).is_some() {
            return Source::BatteryPower(dir);
        }
    }
    Source::Model
}

/// Sums over a sliding window of `n` buckets of `bucket_s` seconds.
#[derive(Debug, Clone)]
struct Window {
    bucket_s: f64,
    n: u64,
    buckets: VecDeque<(u64, f64)>,
}

impl Window {
    fn new(bucket_s: f64, n: u64) -> Self {
        Self { bucket_s, n, buckets: VecDeque::new() }
    }

    fn index(&self, t_s: f64) -> u64 {
        (t_s / self.bucket_s) as u64
    }

    fn add(&mut self, t_s: f64, v: f64) {
        let i = self.index(t_s);
        match self.buckets.back_mut() {
            Some((j, sum)) if *j == i => *sum += v,
            _ => self.buckets.push_back((i, v)),
        }
        while self.buckets.front().is_some_and(|(j, _)| j + self.n <= i) {
            self.buckets.pop_front();
        }
    }

    fn sum(&self, t_s: f64) -> f64 {
        let i = self.index(t_s);
        self.buckets.iter().filter(|(j, _)| j + self.n > i).map(|(_, v)| v).sum()
    }
}

/// Joules since the local midnight: (the day, as [`local_day`] numbers it; joules).
#[derive(Debug, Clone, Copy, Default)]
struct Today(i32, f64);

impl Today {
    fn add(&mut self, day: i32, j: f64) {
        *self = if self.0 == day { Self(day, self.1 + j) } else { Self(day, j) };
    }

    fn get(self, day: i32) -> f64 {
        if self.0 == day { self.1 } else { 0.0 }
    }
}

/// Today's date in the system's time zone (UTC where none can be read), as yyyymmdd.
pub fn local_day() -> i32 {
    let date = jiff::ZonedDateTime::now().date();
    i32::from(date.year()) * 10_000 + i32::from(date.month()) * 100 + i32::from(date.day())
}

#[derive(Debug, Clone)]
struct AppEnergy {
    total_j: f64,
    compute_s: f64,
    hour: Window,
    day: Window,
    today: Today,
    /// When it last drew (seconds since the ledger started), for eviction.
    last_s: f64,
}

#[derive(Debug)]
struct State {
    /// The last counter reading (J), for counter sources.
    last_counter: Option<Vec<u64>>,
    last_stored_j: Option<f64>,
    last_tick: Option<Instant>,
    /// Active energy not yet shared out (waiting for the compute report), J.
    pool_j: f64,
    /// Idle intervals in a row.
    idle_ticks: u32,
    idle_w: f64,
    j_per_compute_s: f64,
    device_j: f64,
    device_hour: Window,
    device_today: Today,
    apps_j: f64,
    device_w: f64,
    apps: HashMap<String, AppEnergy>,
    /// The apps with a budget, and whether each is past it (the last judgement).
    budgets: HashMap<String, bool>,
    /// What an app's requests cost lately, J (a decaying maximum of their priced energy): a
    /// budget holds an app whose next request would take it past.
    request_j: HashMap<String, f64>,
    /// Background requests' energy, all apps together, over the hour.
    background: Window,
    /// The background share's joules now, and whether background work is past it (the
    /// last judgement; None: no share).
    background_share: Option<(f64, bool)>,
}

/// The ledger; ticked by [`Ledger::run`].
#[derive(Debug)]
pub struct Ledger {
    config: EnergyConfig,
    source: Source,
    compute: Arc<Compute>,
    epoch: Instant,
    /// Today's date (tests set another clock).
    today: fn() -> i32,
    state: Mutex<State>,
}

impl Ledger {
    /// A ledger of the sources under sysfs `root`, pricing the compute `compute` counts.
    pub fn new(config: EnergyConfig, root: &Path, compute: Arc<Compute>) -> Self {
        let source = detect(root, &config.source);
        tracing::info!(source = source.name(), "energy ledger");
        let state = State {
            last_counter: None,
            last_stored_j: None,
            last_tick: None,
            pool_j: 0.0,
            idle_ticks: 0,
            idle_w: config.idle_w,
            j_per_compute_s: config.busy_w,
            device_j: 0.0,
            device_hour: Window::new(config.hour_s as f64 / 60.0, 60),
            device_today: Today::default(),
            apps_j: 0.0,
            device_w: 0.0,
            apps: HashMap::new(),
            budgets: HashMap::new(),
            request_j: HashMap::new(),
            background: Window::new(config.hour_s as f64 / 60.0, 60),
            background_share: None,
        };
        Self { config, source, compute, epoch: Instant::now(), today: local_day, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ticks every interval for as long as the ledger has other owners; `active` says
    /// whether any engine is running a request.
    pub async fn run(self: Arc<Self>, active: impl Fn() -> bool + Send + 'static) {
        let mut every = tokio::time::interval(Duration::from_millis(self.config.interval_ms));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if Arc::strong_count(&self) == 1 {
                return;
            }
            let (ledger, active) = (Arc::clone(&self), active());
            // Reading sysfs blocks; it is a few small files.
            let _ = tokio::task::spawn_blocking(move || ledger.tick(Instant::now(), active)).await;
        }
    }

    /// Reads the source and shares the energy drawn among the apps. `active`: an engine is
    /// running a request.
    ///
    /// The engines report compute with their heartbeats, a little after it happened, so the
    /// energy of active intervals gathers in a pool that the next compute report shares out
    /// by each app's compute in it; the idle power is learned only from intervals with
    /// neither a request running nor compute reported, after one such interval.
    pub fn tick(&self, now: Instant, active: bool) {
        // The source's reading (sysfs, read before the lock: Energy readers do not wait on
        // it), then the compute the engines reported since the last tick, per app, taken
        // under the lock: a budget judgement (which holds it) sees that compute either as
        // pending or as booked, never as neither.
        let reading = self.source.read();
        let today = (self.today)();
        let mut st = self.lock();
        let gathered = self.compute.take();
        let busy: Vec<(String, f64)> = gathered.apps.into_iter().map(|(app, us)| (app, us as f64 / 1e6)).collect();
        let dt = st.last_tick.map(|t| now.saturating_duration_since(t).as_secs_f64());
        st.last_tick = Some(now);
        let busy_s: f64 = busy.iter().map(|(_, s)| s).sum();
        let measured = self.measure(&mut st, reading, dt);
        let Some(dt) = dt.filter(|dt| *dt > 0.0) else { return };
        let model_j = self.config.idle_w * dt + self.config.busy_w * busy_s;
        let (energy_j, is_measured) = match measured {
            Some(j) => (j, true),
            None => (model_j, false),
        };
        let t_s = now.saturating_duration_since(self.epoch).as_secs_f64();
        st.device_j += energy_j;
        st.device_hour.add(t_s, energy_j);
        st.device_today.add(today, energy_j);
        st.device_w = energy_j / dt;
        if !active && busy_s <= 0.0 {
            st.idle_ticks += 1;
            if is_measured && st.idle_ticks >= 2 {
                st.idle_w += EWMA * (energy_j / dt - st.idle_w);
            }
            // Energy no compute report ever claimed (an engine that died) is dropped.
            if f64::from(st.idle_ticks) * dt > POOL_LIFE_S {
                st.pool_j = 0.0;
            }
            return;
        }
        st.idle_ticks = 0;
        st.pool_j += if is_measured { (energy_j - st.idle_w * dt).max(0.0) } else { self.config.busy_w * busy_s };
        if busy_s <= 0.0 {
            return;
        }
        let pool = std::mem::take(&mut st.pool_j);
        if is_measured {
            st.j_per_compute_s += EWMA * (pool / busy_s - st.j_per_compute_s);
        }
        st.apps_j += pool;
        let hour_s = self.config.hour_s as f64;
        let background_s = (gathered.background_us as f64 / 1e6).min(busy_s);
        if background_s > 0.0 {
            st.background.add(t_s, pool * background_s / busy_s);
        }
        for (app, s) in busy {
            let j = pool * s / busy_s;
            if !st.apps.contains_key(&app) && st.apps.len() >= MAX_APPS {
                // The row that drew longest ago goes; an app with a budget only when every
                // row has one (its day's joules are what its budget and cap are judged on).
                let budgeted = |k: &String| st.budgets.contains_key(k);
                let idle = st
                    .apps
                    .iter()
                    .min_by(|a, b| budgeted(a.0).cmp(&budgeted(b.0)).then(a.1.last_s.total_cmp(&b.1.last_s)))
                    .map(|(k, _)| k.clone());
                if let Some(k) = idle {
                    st.apps.remove(&k);
                    st.request_j.remove(&k);
                }
            }
            let e = st.apps.entry(app).or_insert_with(|| AppEnergy {
                total_j: 0.0,
                compute_s: 0.0,
                hour: Window::new(hour_s / 60.0, 60),
                day: Window::new(hour_s, 24),
                today: Today::default(),
                last_s: t_s,
            });
            e.total_j += j;
            e.compute_s += s;
            e.hour.add(t_s, j);
            e.day.add(t_s, j);
            e.today.add(today, j);
            e.last_s = t_s;
        }
    }

    /// The energy drawn since the last reading, J, if the source measures it now.
    fn measure(&self, st: &mut State, reading: Reading, dt: Option<f64>) -> Option<f64> {
        match (&self.source, reading) {
            (Source::Rapl(zones), Reading::Counters(now)) => {
                let last = std::mem::replace(&mut st.last_counter, now.clone());
                let (now, last) = (now?, last?);
                // A counter below its last reading wrapped, if its range is known and the last
                // reading was within it; otherwise (a reset, a suspend) the interval is not
                // measured rather than booked as a counter's whole range.
                let mut uj = 0u64;
                for ((_, range), (n, l)) in zones.iter().zip(now.iter().zip(&last)) {
                    let drawn = match n.checked_sub(*l) {
                        Some(d) => d,
                        None if *range != u64::MAX => range.checked_sub(*l)?.checked_add(*n)?,
                        None => return None,
                    };
                    uj = uj.saturating_add(drawn);
                }
                Some(uj as f64 / 1e6)
            }
            (_, Reading::Stored(now)) => {
                let last = std::mem::replace(&mut st.last_stored_j, now);
                Some((last? - now?).max(0.0))
            }
            (_, Reading::Power(w)) => Some(w? * dt?),
            _ => None,
        }
    }

    /// What `compute` of one request costs, mJ, and the source.
    pub fn price(&self, compute: Duration) -> (f64, &'static str) {
        let st = self.lock();
        (compute.as_secs_f64() * st.j_per_compute_s * 1000.0, self.source.name())
    }

    /// The ledger now (the Energy property): every app's row if `all`, else only `app`'s.
    pub fn snapshot(&self, app: &str, all: bool) -> hearth_dbus::Energy {
        let today = (self.today)();
        let st = self.lock();
        let t_s = self.epoch.elapsed().as_secs_f64();
        let mut apps: Vec<hearth_dbus::AppEnergy> = st
            .apps
            .iter()
            .filter(|(k, _)| all || k.as_str() == app)
            .map(|(k, e)| hearth_dbus::AppEnergy {
                app: k.clone(),
                total_j: e.total_j,
                hour_j: e.hour.sum(t_s),
                day_j: e.day.sum(t_s),
                today_j: e.today.get(today),
                compute_s: e.compute_s,
                over_budget: st.budgets.get(k).copied(),
            })
            .collect();
        apps.sort_by(|a, b| b.hour_j.total_cmp(&a.hour_j).then(a.app.cmp(&b.app)));
        hearth_dbus::Energy {
            source: self.source.name().to_owned(),
            device_j: st.device_j,
            device_hour_j: st.device_hour.sum(t_s),
            device_today_j: st.device_today.get(today),
            apps_j: st.apps_j,
            device_w: st.device_w,
            idle_w: st.idle_w,
            j_per_compute_s: st.j_per_compute_s,
            hour_s: self.config.hour_s,
            background_hour_j: st.background.sum(t_s),
            background_share_j: st.background_share.map(|s| s.0),
            background_deferred: st.background_share.map(|s| s.1),
            apps,
        }
    }

    /// An app's energy over the last day window, J.
    pub fn day_j(&self, app: &str) -> f64 {
        let st = self.lock();
        let t_s = self.epoch.elapsed().as_secs_f64();
        st.apps.get(app).map_or(0.0, |e| e.day.sum(t_s))
    }

    /// Which apps with a budget are past it (`over(app, hour_j, day_j)` says, None: no
    /// budget); the ledger keeps the answer for results and the Energy rows, and returns the
    /// apps that are over. Each app's windows count the compute the engines reported that
    /// the next tick books, at the learned price: a request that just ended counts at once.
    pub fn judge_budgets(&self, over: impl Fn(&str, f64, f64) -> Option<bool>) -> Vec<String> {
        let mut st = self.lock();
        let t_s = self.epoch.elapsed().as_secs_f64();
        let price = st.j_per_compute_s;
        // Compute reported and not yet booked counts at the learned price, for apps with a
        // row and for apps whose first compute is not booked yet.
        // ("(other apps)" is no app: it has no policy to judge.)
        let mut coming: HashMap<String, f64> = self
            .compute
            .snapshot()
            .apps
            .into_iter()
            .filter(|(app, _)| app != Compute::OTHERS)
            .map(|(app, us)| (app, us as f64 / 1e6 * price))
            .collect();
        // An app that drew in the window is judged with its next request too, at what its
        // requests cost lately, so it stops at its budget rather than one request past it
        // (one whose window is empty may always run one: a budget smaller than any request
        // slows the app to one an hour, it does not stop it).
        let next =
            |app: &str, drawn: f64| if drawn > 0.0 { st.request_j.get(app).copied().unwrap_or(0.0) } else { 0.0 };
        let mut judged: HashMap<String, bool> = st
            .apps
            .iter()
            .filter(|(app, _)| app.as_str() != Compute::OTHERS)
            .filter_map(|(app, e)| {
                let coming = coming.remove(app).unwrap_or(0.0);
                let (hour, day) = (e.hour.sum(t_s) + coming, e.day.sum(t_s) + coming);
                over(app, hour + next(app, hour), day + next(app, day)).map(|o| (app.clone(), o))
            })
            .collect();
        judged.extend(coming.into_iter().filter_map(|(app, j)| {
            let j = j + next(&app, j);
            over(&app, j, j).map(|o| (app, o))
        }));
        let out = judged.iter().filter(|(_, o)| **o).map(|(a, _)| a.clone()).collect();
        st.budgets = judged;
        out
    }

    /// Whether background work, all apps' together, is past the background share of
    /// `share_j` joules an hour now (None: no share): its hour window and, as for the apps'
    /// budgets, the background compute reported and not yet booked, at the learned price.
    pub fn judge_background(&self, share_j: Option<f64>) -> bool {
        let mut st = self.lock();
        let t_s = self.epoch.elapsed().as_secs_f64();
        let coming = self.compute.snapshot().background_us as f64 / 1e6 * st.j_per_compute_s;
        // (A share of nothing is the low battery state's, where the governors defer every
        // background request themselves.)
        let spent = share_j.is_some_and(|share| share > 0.0 && st.background.sum(t_s) + coming >= share);
        st.background_share = share_j.map(|share| (share, spent));
        spent
    }

    /// Notes what one of `app`'s requests cost, J (its priced energy), for the judgement of
    /// its budget: the dearest of its recent requests, each older one weighed 0.8 less (so
    /// a run of cheap requests does not make room for one dear one at once).
    pub fn note_request(&self, app: &str, j: f64) {
        // (A request that ran in the cloud, or was refused, cost the device nothing.)
        if !(j.is_finite() && j > 0.0) {
            return;
        }
        let mut st = self.lock();
        if st.request_j.len() >= MAX_APPS && !st.request_j.contains_key(app) && !st.apps.contains_key(app) {
            return;
        }
        let e = st.request_j.entry(app.to_owned()).or_insert(j);
        *e = j.max(*e * 0.8);
    }

    /// Whether `app` is past its energy budget (None: it has none, or has not drawn yet).
    pub fn over_budget(&self, app: &str) -> Option<bool> {
        self.lock().budgets.get(app).copied()
    }

    pub fn config(&self) -> &EnergyConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests;
