//! Memory facts from the kernel: the service's memory limit (cgroup v2 `memory.max`, else
//! MemTotal) and pressure stall information (PSI) from the service cgroup's
//! `memory.pressure` or `/proc/pressure/memory`, read with the `procfs` crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use procfs::FromRead;

use crate::config::MemoryConfig;

/// One PSI reading: percent of recent time some / all tasks stalled on memory.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PressureReading {
    pub some_avg10: f64,
    pub full_avg10: f64,
}

/// Reads a PSI file in the kernel's format.
pub fn read_pressure(path: &Path) -> Result<PressureReading, String> {
    let psi = procfs::MemoryPressure::from_file(path).map_err(|e| e.to_string())?;
    Ok(PressureReading { some_avg10: f64::from(psi.some.avg10), full_avg10: f64::from(psi.full.avg10) })
}

/// This process's cgroup v2 directory, when there is one.
fn own_cgroup_dir() -> Option<PathBuf> {
    let cgroups = procfs::process::Process::myself().ok()?.cgroups().ok()?;
    let unified = cgroups.0.into_iter().find(|c| c.hierarchy == 0)?;
    let dir = Path::new("/sys/fs/cgroup").join(unified.pathname.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// The PSI file to watch: the configured one, else the service cgroup's (the pressure the
/// service itself feels, which is what systemd-oomd acts on), else the system's.
pub fn pressure_file(config: &MemoryConfig) -> Option<PathBuf> {
    if !config.pressure_file.as_os_str().is_empty() {
        return Some(config.pressure_file.clone());
    }
    own_cgroup_dir()
        .map(|d| d.join("memory.pressure"))
        .filter(|p| read_pressure(p).is_ok())
        .or_else(|| Some(PathBuf::from("/proc/pressure/memory")).filter(|p| read_pressure(p).is_ok()))
}

/// Bytes the service may use: its cgroup's memory.max, capped by the RAM size (sysinfo(2),
/// which works under systemd's ProcSubset=pid where /proc/meminfo is hidden).
fn memory_limit() -> u64 {
    let total = nix::sys::sysinfo::sysinfo().map(|i| i.ram_total()).unwrap_or(u64::MAX);
    let cgroup = own_cgroup_dir()
        .and_then(|d| std::fs::read_to_string(d.join("memory.max")).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    total.min(cgroup)
}

/// The budget for model weights + KV caches in bytes.
pub fn budget(config: &MemoryConfig) -> u64 {
    if config.budget_mib > 0 { config.budget_mib.saturating_mul(1 << 20) } else { memory_limit() / 2 }
}

/// How often pressure is sampled.
pub fn interval(config: &MemoryConfig) -> Duration {
    Duration::from_millis(config.pressure_interval_ms)
}

/// Turns readings into a sustained-pressure verdict with hysteresis: `readings` in a row at or
/// above the threshold to enter, `readings` in a row below half of it to leave.
#[derive(Debug, Clone)]
pub struct PressureDetector {
    threshold: f64,
    readings: u32,
    high: u32,
    low: u32,
    active: bool,
}

impl PressureDetector {
    pub fn new(config: &MemoryConfig) -> Self {
        Self {
            threshold: config.pressure_some_avg10,
            readings: config.pressure_readings,
            high: 0,
            low: 0,
            active: false,
        }
    }

    /// Feeds one reading; returns whether memory is under sustained pressure now.
    pub fn update(&mut self, r: PressureReading) -> bool {
        if r.some_avg10 >= self.threshold {
            self.high += 1;
            self.low = 0;
        } else if r.some_avg10 < self.threshold / 2.0 {
            self.low += 1;
            self.high = 0;
        } else {
            self.high = 0;
            self.low = 0;
        }
        if !self.active && self.high >= self.readings {
            self.active = true;
        } else if self.active && self.low >= self.readings {
            self.active = false;
        }
        self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.pressure");
        std::fs::write(
            &p,
            "some avg10=12.50 avg60=3.00 avg300=1.00 total=123456\nfull avg10=4.25 avg60=1.00 avg300=0.10 total=6543\n",
        )
        .unwrap();
        assert_eq!(read_pressure(&p).unwrap(), PressureReading { some_avg10: 12.5, full_avg10: 4.25 });
        std::fs::write(&p, "garbage\n").unwrap();
        assert!(read_pressure(&p).is_err());
    }

    #[test]
    fn pressure_needs_consecutive_readings_and_has_hysteresis() {
        let config = MemoryConfig { pressure_some_avg10: 10.0, pressure_readings: 2, ..MemoryConfig::default() };
        let mut d = PressureDetector::new(&config);
        let r = |v| PressureReading { some_avg10: v, full_avg10: 0.0 };
        assert!(!d.update(r(20.0)));
        assert!(!d.update(r(1.0)), "one high reading is a blip");
        assert!(!d.update(r(20.0)));
        assert!(d.update(r(20.0)));
        assert!(d.update(r(7.0)), "between half and the threshold holds the state");
        assert!(d.update(r(1.0)));
        assert!(!d.update(r(1.0)));
    }
}
