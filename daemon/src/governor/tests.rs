use super::*;

fn zone(root: &Path, n: u32, kind: &str, milli: Option<&str>, trips: &[(&str, i64)]) {
    let z = root.join(format!("class/thermal/thermal_zone{n}"));
    std::fs::create_dir_all(&z).unwrap();
    std::fs::write(z.join("type"), format!("{kind}\n")).unwrap();
    if let Some(m) = milli {
        std::fs::write(z.join("temp"), format!("{m}\n")).unwrap();
    }
    for (i, (t, c)) in trips.iter().enumerate() {
        std::fs::write(z.join(format!("trip_point_{i}_type")), format!("{t}\n")).unwrap();
        std::fs::write(z.join(format!("trip_point_{i}_temp")), format!("{c}\n")).unwrap();
    }
}

fn supply(root: &Path, name: &str, files: &[(&str, &str)]) {
    let d = root.join("class/power_supply").join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (f, v) in files {
        std::fs::write(d.join(f), format!("{v}\n")).unwrap();
    }
}

#[test]
fn reads_real_format_thermal_zones_and_skips_odd_ones() {
    let root = tempfile::tempdir().unwrap();
    let mut problems = Vec::new();
    assert_eq!(read_thermal(root.path(), &[], &mut problems), None, "no thermal class at all");
    zone(root.path(), 0, "cpu-thermal", Some("61500"), &[("passive", 70000), ("critical", 95000)]);
    zone(root.path(), 1, "gpu-thermal", Some("48000"), &[("passive", 75000)]);
    zone(root.path(), 2, "battery", None, &[]);
    zone(root.path(), 3, "modem", Some("garbage"), &[]);
    let r = read_thermal(root.path(), &[], &mut problems).unwrap();
    assert_eq!(r, ThermalReading { temp_c: 61.5, passive_trip_c: Some(70.0), zones: 2 });
    assert_eq!(problems.len(), 2, "{problems:?}");
    let gpu = read_thermal(root.path(), &["gpu-thermal".into()], &mut Vec::new()).unwrap();
    assert_eq!((gpu.temp_c, gpu.passive_trip_c), (48.0, Some(75.0)));
}

#[test]
fn power_states_from_real_format_supplies() {
    let c = GovernorConfig::default();
    let root = tempfile::tempdir().unwrap();
    assert_eq!(power_state(&read_power(root.path()), &c), PowerState::Charging, "no battery: on mains");
    supply(root.path(), "battery", &[("type", "Battery"), ("capacity", "55"), ("status", "Discharging")]);
    supply(root.path(), "ac", &[("type", "Mains"), ("online", "0")]);
    assert_eq!(power_state(&read_power(root.path()), &c), PowerState::Battery);
    supply(root.path(), "battery", &[("capacity", "15")]);
    assert_eq!(power_state(&read_power(root.path()), &c), PowerState::Low);
    supply(root.path(), "battery", &[("capacity", "4")]);
    assert_eq!(power_state(&read_power(root.path()), &c), PowerState::Critical);
    supply(root.path(), "ac", &[("online", "1")]);
    assert_eq!(power_state(&read_power(root.path()), &c), PowerState::Charging);
    supply(root.path(), "ac", &[("online", "0")]);
    supply(root.path(), "battery", &[("status", "Charging")]);
    assert_eq!(power_state(&read_power(root.path()), &c), PowerState::Charging);
    supply(root.path(), "battery", &[("capacity", "n/a")]);
    assert_eq!(read_power(root.path()).battery, None, "an unreadable capacity is no battery reading");
}

#[test]
fn the_background_share_shrinks_first_as_the_battery_runs_down() {
    let c = GovernorConfig::default();
    let root = tempfile::tempdir().unwrap();
    let share = |pct: &str| {
        supply(root.path(), "battery", &[("type", "Battery"), ("capacity", pct), ("status", "Discharging")]);
        let p = read_power(root.path());
        background_share(&p, power_state(&p, &c), &c)
    };
    assert_eq!(share("100"), 1.0);
    assert_eq!(share("50"), 1.0, "whole down to background_share_full_pct");
    assert_eq!(share("35"), 0.5, "then in proportion to the charge above the low state");
    assert_eq!(share("21"), 1.0 / 30.0);
    assert_eq!(share("20"), 0.0, "nothing at the low state");
    assert_eq!(share("3"), 0.0);
    supply(root.path(), "battery", &[("status", "Charging")]);
    let p = read_power(root.path());
    assert_eq!(background_share(&p, power_state(&p, &c), &c), 1.0, "charging: all of it");
    let odd = GovernorConfig { background_share_full_pct: 10, ..GovernorConfig::default() };
    assert_eq!(background_share(&read_power(root.path()), PowerState::Battery, &odd), 1.0, "full at or under low");
}

#[test]
fn thermal_states_have_hysteresis() {
    let c = GovernorConfig::default(); // fair at trip-15, serious at trip-5, hysteresis 2
    let trip = 70.0;
    let walk = [
        (50.0, ThermalState::Nominal),
        (56.0, ThermalState::Fair),
        (54.5, ThermalState::Fair),
        (52.9, ThermalState::Nominal),
        (66.0, ThermalState::Serious),
        (71.0, ThermalState::Critical),
        (69.0, ThermalState::Critical),
        (67.5, ThermalState::Serious),
        (50.0, ThermalState::Nominal),
    ];
    let mut s = ThermalState::Nominal;
    for (t, want) in walk {
        s = thermal_state(s, t, trip, &c);
        assert_eq!(s, want, "at {t} °C");
    }
}

#[test]
fn the_pi_output_stays_in_bounds_and_moves_with_the_error() {
    let c = GovernorConfig { kp: 0.1, ki: 0.05, ..GovernorConfig::default() };
    let mut pi = Pi::default();
    for _ in 0..100 {
        assert_eq!(pi.update(10.0, 0.5, &c), 1.0, "cool: no cap, and no windup");
    }
    let first = pi.update(-4.0, 0.5, &c);
    assert!(first < 1.0);
    let mut last = first;
    for _ in 0..200 {
        last = pi.update(-4.0, 0.5, &c);
    }
    assert_eq!(last, 0.0, "hot for long: down to the floor");
    assert!(pi.update(5.0, 0.5, &c) > 0.0, "and back up at once when it cools");
}

#[test]
fn the_governor_keeps_working_without_sensors() {
    let root = tempfile::tempdir().unwrap();
    let throttle = Arc::new(Throttle::default());
    let config = GovernorConfig { sysfs_root: root.path().to_owned(), ..GovernorConfig::default() };
    let mut g = Governor::new(config, Arc::clone(&throttle), 4);
    g.tick(false);
    g.tick(true);
    let s = g.status().borrow().clone();
    assert_eq!((s.thermal, s.power, s.rate_cap_tps), (ThermalState::Nominal, PowerState::Charging, None));
    assert_eq!(s.threads, 2, "power-saver halves the threads");
    assert!(s.prefer_cloud);
}

#[test]
fn the_controller_limits_the_duty_cycle_and_a_fixed_cap_the_rate() {
    let root = tempfile::tempdir().unwrap();
    zone(root.path(), 0, "cpu-thermal", Some("50000"), &[("passive", 65000)]);
    let throttle = Arc::new(Throttle::default());
    throttle.potential_mtps.store(100_000, Ordering::Relaxed);
    let config = GovernorConfig { sysfs_root: root.path().to_owned(), ..GovernorConfig::default() };
    let mut g = Governor::new(config.clone(), Arc::clone(&throttle), 4);
    g.tick(false);
    assert_eq!((throttle.duty(), throttle.rate_cap()), (None, None), "cool: no limit");
    // Hotter than the setpoint: the duty cycle comes down, the rate cap stays unset, and
    // the published cap is the duty cycle's worth of the uncapped rate.
    zone(root.path(), 0, "cpu-thermal", Some("64500"), &[("passive", 65000)]);
    std::thread::sleep(Duration::from_millis(20));
    g.tick(false);
    let duty = throttle.duty().expect("a duty cycle under the setpoint's heat");
    assert!(duty < 1.0 && throttle.rate_cap().is_none());
    let s = g.status().borrow().clone();
    assert_eq!(s.duty, Some(duty));
    assert!((s.rate_cap_tps.unwrap() - 100.0 * duty).abs() < 1e-9);
    // Past the trip: the floor at once (min_rate_tps of the uncapped rate).
    zone(root.path(), 0, "cpu-thermal", Some("66000"), &[("passive", 65000)]);
    g.tick(false);
    assert_eq!(throttle.duty(), Some(0.01));
    // A fixed cap limits the rate, not the duty cycle.
    let fixed = GovernorConfig { static_rate_tps: 42.0, ..config };
    let mut g = Governor::new(fixed, Arc::clone(&throttle), 4);
    g.tick(false);
    assert_eq!((throttle.duty(), throttle.rate_cap()), (None, Some(42.0)));
}
