//! hearth-soc-tree: writes the simulated phone's real-format sysfs tree (a thermal zone with
//! passive and critical trips, a battery, a charger) into a directory, at a fixed state. The
//! QEMU images carry it, since the `virt` machine has no sensors; the governor tests start
//! from the same tree (`hearth_tests::soc`).

#![forbid(unsafe_code)]

use clap::Parser;
use hearth_tests::soc::{SocParams, write_tree};

#[derive(Debug, Parser)]
struct Args {
    /// Where to write the tree (it becomes the daemon's `governor.sysfs_root`).
    root: std::path::PathBuf,
    #[arg(long, default_value_t = 41.0)]
    temp_c: f64,
    #[arg(long, default_value_t = 65.0)]
    passive_trip_c: f64,
    #[arg(long, default_value_t = 90.0)]
    critical_trip_c: f64,
    #[arg(long, default_value_t = 80.0)]
    battery_pct: f64,
}

fn main() {
    let a = Args::parse();
    let params = SocParams {
        passive_trip_c: a.passive_trip_c,
        critical_trip_c: a.critical_trip_c,
        ..SocParams::at_rest(a.temp_c, a.battery_pct)
    };
    write_tree(&a.root, &params);
}
