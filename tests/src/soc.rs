//! A simulated phone SoC for closed-loop governor tests: a real-format sysfs tree
//! (`class/thermal/thermal_zone0`, `class/power_supply/{battery,ac}`) that a background thread
//! updates every 100 ms from a first-order RC thermal model driven by the daemon's actual CPU
//! use, its engine processes' included (utime + stime from `/proc/<pid>/stat` of the daemon
//! and its children, and cutime + cstime of those it reaped), and a battery that drains with it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Parameters of the simulated phone.
#[derive(Debug, Clone, Copy)]
pub struct SocParams {
    pub ambient_c: f64,
    pub start_c: f64,
    /// Steady-state rise per core the daemon keeps busy, °C.
    pub c_per_core: f64,
    /// Thermal time constant, seconds.
    pub tau_s: f64,
    /// The zone's passive and critical trips, °C.
    pub passive_trip_c: f64,
    pub critical_trip_c: f64,
    /// Battery at start, percent, and how fast a busy core drains it, percent per second.
    pub battery_pct: f64,
    pub drain_pct_per_core_s: f64,
    /// A battery that drains by power instead (when `w_per_core` > 0): the device draws
    /// `idle_w` plus `w_per_core` per core the daemon keeps busy, from a battery of
    /// `energy_full_wh`, and reports `energy_now`, `power_now`, `voltage_now` and
    /// `current_now` as a fuel gauge does.
    pub idle_w: f64,
    pub w_per_core: f64,
    pub energy_full_wh: f64,
}

impl SocParams {
    /// A phone at rest: `temp_c` and `battery_pct` held still (no heating, no drain), with
    /// trips at 65 °C (passive) and 90 °C (critical). What the QEMU images carry.
    pub fn at_rest(temp_c: f64, battery_pct: f64) -> Self {
        Self {
            ambient_c: temp_c,
            start_c: temp_c,
            c_per_core: 0.0,
            tau_s: 1.0,
            passive_trip_c: 65.0,
            critical_trip_c: 90.0,
            battery_pct,
            drain_pct_per_core_s: 0.0,
            idle_w: 0.0,
            w_per_core: 0.0,
            energy_full_wh: 0.0,
        }
    }
}

/// One sample of the simulation.
#[derive(Debug, Clone, Copy)]
pub struct SocSample {
    pub t_s: f64,
    pub temp_c: f64,
    pub cores: f64,
    /// The power drawn over the sample's interval, W, and the energy drawn since the
    /// simulation started, J (with a battery that drains by power).
    pub power_w: f64,
    pub drawn_j: f64,
}

/// The simulation; stops when dropped.
#[derive(Debug)]
pub struct Soc {
    root: tempfile::TempDir,
    params: SocParams,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<SocSample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The simulated battery's voltage, µV.
const VOLTAGE_UV: u64 = 3_850_000;

fn write(p: &Path, v: impl std::fmt::Display) {
    // Write-then-rename, as sysfs reads are atomic: a reader never sees half a number.
    let tmp = p.with_extension("new");
    std::fs::write(&tmp, format!("{v}\n")).expect("write sysfs file");
    std::fs::rename(&tmp, p).expect("rename sysfs file");
}

/// Writes the phone's sysfs tree at its state at start (`class/thermal/thermal_zone0` with a
/// passive and a critical trip, `class/power_supply/{battery,ac}`) under `root`: what the
/// simulation starts from, and what the QEMU images carry (the `virt` machine has no sensors).
pub fn write_tree(root: &Path, params: &SocParams) {
    let zone = root.join("class/thermal/thermal_zone0");
    std::fs::create_dir_all(&zone).unwrap();
    write(&zone.join("type"), "cpu-thermal");
    write(&zone.join("temp"), (params.start_c * 1000.0) as i64);
    write(&zone.join("trip_point_0_type"), "passive");
    write(&zone.join("trip_point_0_temp"), (params.passive_trip_c * 1000.0) as i64);
    write(&zone.join("trip_point_1_type"), "critical");
    write(&zone.join("trip_point_1_temp"), (params.critical_trip_c * 1000.0) as i64);
    let battery = root.join("class/power_supply/battery");
    std::fs::create_dir_all(&battery).unwrap();
    write(&battery.join("type"), "Battery");
    write(&battery.join("capacity"), params.battery_pct.round() as u32);
    write(&battery.join("status"), "Discharging");
    if params.w_per_core > 0.0 {
        let uwh = params.energy_full_wh * params.battery_pct / 100.0 * 1e6;
        write(&battery.join("energy_full"), (params.energy_full_wh * 1e6) as u64);
        write(&battery.join("energy_now"), uwh as u64);
        write(&battery.join("voltage_now"), VOLTAGE_UV);
        write(&battery.join("power_now"), (params.idle_w * 1e6) as u64);
        write(&battery.join("current_now"), (params.idle_w / VOLTAGE_UV as f64 * 1e12) as u64);
    }
    let ac = root.join("class/power_supply/ac");
    std::fs::create_dir_all(&ac).unwrap();
    write(&ac.join("type"), "Mains");
    write(&ac.join("online"), 0);
}

impl Soc {
    /// Creates the sysfs tree (before the daemon starts, so it finds its sensors).
    pub fn new(params: SocParams) -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        write_tree(root.path(), &params);
        Self { root, params, stop: Arc::default(), samples: Arc::default(), thread: None }
    }

    /// The sysfs root to give the daemon (`governor.sysfs_root`).
    pub fn sysfs_root(&self) -> PathBuf {
        self.root.path().to_owned()
    }

    /// `[governor]` lines that point hearthd at this phone, sampling every `interval_ms`.
    pub fn governor_settings(&self, interval_ms: u64) -> String {
        format!("sysfs_root = {:?}\ninterval_ms = {interval_ms}\n", self.sysfs_root().display().to_string())
    }

    /// Sets the zone's temperature by hand (for a simulation that is not running).
    pub fn set_temp(&self, celsius: f64) {
        write(&self.root.path().join("class/thermal/thermal_zone0/temp"), (celsius * 1000.0) as i64);
    }

    /// Plugs the charger in or out.
    pub fn set_charging(&self, charging: bool) {
        let ps = self.root.path().join("class/power_supply");
        write(&ps.join("ac/online"), u8::from(charging));
        write(&ps.join("battery/status"), if charging { "Charging" } else { "Discharging" });
    }

    /// Starts heating with the CPU use of process `pid` and its children.
    pub fn run(&mut self, pid: u32) {
        let (stop, samples, params, root) =
            (Arc::clone(&self.stop), Arc::clone(&self.samples), self.params, self.root.path().to_owned());
        self.thread = Some(std::thread::spawn(move || {
            let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
            // (ppid, own CPU ticks, reaped children's CPU ticks) of a process.
            let stat = |p: &str| -> Option<(u32, f64, f64)> {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                let num = |i: usize| -> Option<f64> { fields.get(i)?.parse().ok() };
                Some((fields.get(1)?.parse().ok()?, num(11)? + num(12)?, num(13)? + num(14)?))
            };
            let cpu = || -> Option<f64> {
                let (_, own, reaped) = stat(&pid.to_string())?;
                let children: f64 = std::fs::read_dir("/proc")
                    .ok()?
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    .filter_map(|n| stat(&n))
                    .filter(|(ppid, _, _)| *ppid == pid)
                    .map(|(_, own, _)| own)
                    .sum();
                Some((own + reaped + children) / tick)
            };
            let temp_file = root.join("class/thermal/thermal_zone0/temp");
            let bat = root.join("class/power_supply/battery");
            let cap_file = bat.join("capacity");
            let start = Instant::now();
            let (mut temp, mut battery) = (params.start_c, params.battery_pct);
            let full_j = params.energy_full_wh * 3600.0;
            let (mut stored_j, mut drawn_j) = (full_j * params.battery_pct / 100.0, 0.0);
            let (mut last_cpu, mut last_t) = (cpu().unwrap_or(0.0), Instant::now());
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let now = Instant::now();
                let dt = now.duration_since(last_t).as_secs_f64();
                let Some(c) = cpu() else { break };
                let cores = ((c - last_cpu) / dt).max(0.0);
                (last_cpu, last_t) = (c, now);
                let target = params.ambient_c + params.c_per_core * cores;
                temp += (target - temp) * (1.0 - (-dt / params.tau_s).exp());
                let mut power_w = 0.0;
                if params.w_per_core > 0.0 {
                    power_w = params.idle_w + params.w_per_core * cores;
                    let charging = std::fs::read_to_string(bat.join("status")).is_ok_and(|s| s.trim() == "Charging");
                    if !charging {
                        stored_j = (stored_j - power_w * dt).max(0.0);
                        drawn_j += power_w * dt;
                    }
                    battery = 100.0 * stored_j / full_j;
                    write(&bat.join("energy_now"), (stored_j / 3.6e-3) as u64);
                    write(&bat.join("power_now"), (power_w * 1e6) as u64);
                    write(&bat.join("current_now"), (power_w / VOLTAGE_UV as f64 * 1e12) as u64);
                } else {
                    battery = (battery - params.drain_pct_per_core_s * cores * dt).max(0.0);
                }
                write(&temp_file, (temp * 1000.0) as i64);
                write(&cap_file, battery.round() as u32);
                samples.lock().unwrap().push(SocSample {
                    t_s: now.duration_since(start).as_secs_f64(),
                    temp_c: temp,
                    cores,
                    power_w,
                    drawn_j,
                });
            }
        }));
    }

    /// The energy drawn since the simulation started, J.
    pub fn drawn_j(&self) -> f64 {
        self.samples.lock().unwrap().last().map_or(0.0, |s| s.drawn_j)
    }

    /// Samples so far.
    pub fn samples(&self) -> Vec<SocSample> {
        self.samples.lock().unwrap().clone()
    }
}

impl Drop for Soc {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
