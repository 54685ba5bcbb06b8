//! Memory facts from the kernel: the service's memory limit (cgroup v2 `memory.max`, else
//! MemTotal), pressure stall information (PSI) from the service cgroup's
//! `memory.pressure` or `/proc/pressure/memory`, and hearthd's own anonymous memory
//! (`RssAnon` of /proc/self/status) for the ceiling it enforces itself, read with the
//! `procfs` crate.

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

/// The anonymous-memory ceiling in bytes: the configured one, else 60% of the service's
/// limit (so that the exit point, 5/4 of it, stays below systemd's MemoryHigh=80%).
pub fn ceiling(config: &MemoryConfig) -> u64 {
    if config.ceiling_mib > 0 { config.ceiling_mib.saturating_mul(1 << 20) } else { memory_limit() / 5 * 3 }
}

/// Anonymous memory in use, in bytes: `RssAnon` of `file` (a `/proc/PID/status`), else of
/// this process. The mapped model weights are file-backed and the kernel can drop them;
/// what grows without bound when something goes wrong (KV, buffers, grammar state) is here.
pub fn anon_bytes(file: Option<&Path>) -> Result<u64, String> {
    let status = match file {
        Some(path) => procfs::process::Status::from_file(path).map_err(|e| e.to_string())?,
        None => procfs::process::Process::myself().and_then(|p| p.status()).map_err(|e| e.to_string())?,
    };
    status.rssanon.map(|kib| kib.saturating_mul(1024)).ok_or_else(|| "no RssAnon line".to_owned())
}

/// Anonymous memory of one engine process (0 for one that just exited), from `/proc`, or
/// from `tree`, laid out like it.
fn engine_anon_bytes(pid: u32, tree: Option<&Path>) -> u64 {
    let status = match tree {
        Some(tree) => procfs::process::Status::from_file(tree.join(pid.to_string()).join("status")).ok(),
        None => procfs::process::Process::new(pid as i32).and_then(|p| p.status()).ok(),
    };
    status.and_then(|s| s.rssanon).map_or(0, |kib| kib.saturating_mul(1024))
}

/// One reading of the anonymous memory the ceiling applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// hearthd's own.
    pub own: u64,
    /// Each engine process's, by pid.
    pub engines: Vec<(u32, u64)>,
}

impl Usage {
    /// Reads hearthd's and its engines' (`pids`) anonymous memory. `source` empty: from
    /// `/proc`; a file in `/proc/PID/status` format: its `RssAnon` stands for the whole; a
    /// directory: read instead of `/proc` (`PID/status`, hearthd's own pid included; where
    /// that one is missing, hearthd's own is read from `/proc`).
    pub fn read(source: &Path, pids: &[u32]) -> Result<Self, String> {
        let tree = source.is_dir().then_some(source);
        if tree.is_none() && !source.as_os_str().is_empty() {
            return Ok(Self { own: anon_bytes(Some(source))?, engines: Vec::new() });
        }
        let mine = tree.map(|t| t.join(std::process::id().to_string()).join("status")).filter(|p| p.exists());
        let own = anon_bytes(mine.as_deref())?;
        Ok(Self { own, engines: pids.iter().map(|&p| (p, engine_anon_bytes(p, tree))).collect() })
    }

    pub fn total(&self) -> u64 {
        self.engines.iter().fold(self.own, |sum, &(_, b)| sum.saturating_add(b))
    }

    /// The engines to kill at 5/4 of the ceiling: the largest first, as many as it takes to
    /// bring the whole back under that. None when hearthd's own heap alone is over the
    /// ceiling: killing engines could not bring use back under it (each would be restarted
    /// and killed again), so only hearthd's exit helps.
    pub fn engines_to_kill(&self, watch: &CeilingWatch) -> Option<Vec<(u32, u64)>> {
        let exit_at = watch.exit_at();
        if self.own >= watch.ceiling() {
            return None;
        }
        let mut by_size = self.engines.clone();
        by_size.sort_by_key(|&(_, b)| std::cmp::Reverse(b));
        let mut left = self.total();
        let mut victims = Vec::new();
        for (pid, bytes) in by_size {
            if left < exit_at {
                break;
            }
            left = left.saturating_sub(bytes);
            victims.push((pid, bytes));
        }
        (!victims.is_empty()).then_some(victims)
    }
}

/// Where anonymous memory stands against the ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CeilingVerdict {
    /// Below it (or back below 90% of it after being over).
    Under,
    /// Over it: device work ends and new work is refused until use is back under.
    Over,
    /// At 5/4 of it: the heap grows inside a call that cannot be interrupted. The engine
    /// that grew is killed (and restarted); when hearthd itself grew, it exits (and is
    /// restarted): either beats the kernel's OOM killer choosing a victim on the phone.
    Exit,
}

/// The ceiling with hysteresis: over at the ceiling, under again below 90% of it.
#[derive(Debug, Clone)]
pub struct CeilingWatch {
    ceiling: u64,
    over: bool,
}

impl CeilingWatch {
    pub fn new(ceiling: u64) -> Self {
        Self { ceiling, over: false }
    }

    pub fn ceiling(&self) -> u64 {
        self.ceiling
    }

    /// The point at which hearthd exits.
    pub fn exit_at(&self) -> u64 {
        self.ceiling.saturating_add(self.ceiling / 4)
    }

    /// Feeds one reading of anonymous memory in bytes. Exit is over it too: work stays
    /// refused until use is back under 90% of the ceiling.
    pub fn update(&mut self, used: u64) -> CeilingVerdict {
        if used >= self.exit_at() {
            self.over = true;
            return CeilingVerdict::Exit;
        }
        if used >= self.ceiling {
            self.over = true;
        } else if used < self.ceiling / 10 * 9 {
            self.over = false;
        }
        if self.over { CeilingVerdict::Over } else { CeilingVerdict::Under }
    }
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
    fn the_ceiling_has_hysteresis_and_an_exit_point() {
        let mut w = CeilingWatch::new(1000);
        assert_eq!(w.update(999), CeilingVerdict::Under);
        assert_eq!(w.update(1000), CeilingVerdict::Over);
        assert_eq!(w.update(950), CeilingVerdict::Over, "between 90% and the ceiling holds the state");
        assert_eq!(w.update(899), CeilingVerdict::Under);
        assert_eq!(w.update(950), CeilingVerdict::Under);
        assert_eq!(w.update(1250), CeilingVerdict::Exit);
        // Straight from under to far over, then back between 90% and the ceiling: still over.
        assert_eq!(w.update(950), CeilingVerdict::Over, "an exit reading is over the ceiling too");
    }

    #[test]
    fn anonymous_memory_is_read_from_a_status_file() {
        let own = anon_bytes(None).unwrap();
        assert!(own > 0);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status");
        let real = std::fs::read_to_string("/proc/self/status").unwrap();
        let edited: String = real
            .lines()
            .map(|l| if l.starts_with("RssAnon:") { "RssAnon:\t  2048 kB".to_owned() } else { l.to_owned() })
            .map(|l| l + "\n")
            .collect();
        std::fs::write(&p, edited).unwrap();
        assert_eq!(anon_bytes(Some(&p)).unwrap(), 2048 * 1024);
        std::fs::write(&p, "garbage\n").unwrap();
        assert!(anon_bytes(Some(&p)).is_err());
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

    #[test]
    fn far_over_the_ceiling_the_engine_that_grew_is_killed_unless_hearthd_itself_grew() {
        let mib = |n: u64| n << 20;
        let exit_at = &CeilingWatch::new(mib(1000));
        let usage = |own, engines: &[(u32, u64)]| Usage {
            own: mib(own),
            engines: engines.iter().map(|&(p, b)| (p, mib(b))).collect(),
        };
        // One engine grew: it goes, and the rest stays.
        assert_eq!(usage(100, &[(7, 50), (8, 1200)]).engines_to_kill(exit_at), Some(vec![(8, mib(1200))]));
        // Only as many as it takes: the largest is enough here.
        assert_eq!(usage(100, &[(7, 600), (8, 700), (9, 10)]).engines_to_kill(exit_at), Some(vec![(8, mib(700))]));
        // Two grew together: both go, the larger first; hearthd and its sessions stay.
        let both = usage(200, &[(7, 1100), (8, 1200), (9, 10)]);
        assert_eq!(both.total(), mib(2510));
        assert_eq!(both.engines_to_kill(exit_at), Some(vec![(8, mib(1200)), (7, mib(1100))]));
        // hearthd's own heap grew over the ceiling: killing engines would not help.
        assert_eq!(usage(1000, &[(7, 260)]).engines_to_kill(exit_at), None);
        // Below it, it is the engines that must go.
        assert_eq!(usage(990, &[(7, 260)]).engines_to_kill(exit_at), Some(vec![(7, mib(260))]));
        // Readings do not overflow.
        assert_eq!(Usage { own: u64::MAX, engines: vec![(7, 1)] }.total(), u64::MAX);
        // hearthd alone over it.
        assert_eq!(usage(1300, &[]).engines_to_kill(exit_at), None);
    }
}
