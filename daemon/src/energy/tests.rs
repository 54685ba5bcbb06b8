use super::*;

fn write(p: &Path, v: impl std::fmt::Display) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, format!("{v}\n")).unwrap();
}

fn ledger(root: &Path, source: &str) -> (Ledger, Arc<Compute>) {
    let compute = Arc::new(Compute::default());
    let config = EnergyConfig { source: source.into(), hour_s: 60, ..EnergyConfig::default() };
    (Ledger::new(config, root, Arc::clone(&compute)), compute)
}

#[test]
fn sources_are_found_best_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    assert_eq!(ledger(root, "auto").0.snapshot("", true).source, "model");
    write(&root.join("class/power_supply/BAT0/type"), "Battery");
    write(&root.join("class/power_supply/BAT0/current_now"), 500_000);
    write(&root.join("class/power_supply/BAT0/voltage_now"), 3_800_000);
    assert_eq!(ledger(root, "auto").0.snapshot("", true).source, "battery-power");
    write(&root.join("class/power_supply/BAT0/charge_now"), 2_000_000);
    assert_eq!(ledger(root, "auto").0.snapshot("", true).source, "battery-energy");
    write(&root.join("class/powercap/intel-rapl:0/energy_uj"), 1000);
    write(&root.join("class/powercap/intel-rapl:0:0/energy_uj"), 1000);
    let (l, _) = ledger(root, "auto");
    assert_eq!(l.snapshot("", true).source, "rapl");
    // Without a known range, a counter that went down (a reset) measures nothing.
    l.tick(Instant::now(), false);
    write(&root.join("class/powercap/intel-rapl:0/energy_uj"), 10);
    l.tick(Instant::now() + Duration::from_secs(1), false);
    assert!(l.snapshot("", true).device_j < 1.0, "{:?}", l.snapshot("", true));
    assert_eq!(l.source, Source::Rapl(vec![(root.join("class/powercap/intel-rapl:0/energy_uj"), u64::MAX)]));
    assert_eq!(ledger(root, "battery").0.snapshot("", true).source, "battery-energy");
    assert_eq!(ledger(root, "model").0.snapshot("", true).source, "model");
}

#[test]
fn a_counters_energy_above_idle_is_shared_by_compute_time() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("class/powercap/intel-rapl:0/energy_uj");
    write(&dir.path().join("class/powercap/intel-rapl:0/max_energy_range_uj"), 10_000_000);
    write(&counter, 8_500_000);
    let (l, compute) = ledger(dir.path(), "auto");
    let t0 = Instant::now();
    l.tick(t0, false);
    // Idle at 1 W: the idle power is learned from the second idle interval on.
    write(&counter, 9_000_000);
    l.tick(t0 + Duration::from_millis(500), false);
    assert_eq!(l.snapshot("", true).idle_w, 0.5);
    write(&counter, 9_500_000);
    l.tick(t0 + Duration::from_secs(1), false);
    let idle = l.snapshot("", true).idle_w;
    assert!((idle - (0.5 + 0.3 * 0.5)).abs() < 1e-9, "{idle}");
    // A request runs: 1 J in half a second, pooled until its compute is reported.
    write(&counter, 9_900_000);
    l.tick(t0 + Duration::from_millis(1500), true);
    assert_eq!(l.snapshot("", true).apps_j, 0.0);
    // Then 0.75 s of a's compute and 0.25 s of b's come; 3 J drawn (the counter wraps).
    compute.add("a", 750_000, false);
    compute.add("b", 250_000, false);
    write(&counter, 2_900_000);
    l.tick(t0 + Duration::from_secs(2), false);
    let s = l.snapshot("", true);
    let active = (0.4 - idle * 0.5) + (3.0 - idle * 0.5);
    assert!((s.device_j - 4.4).abs() < 1e-6, "{s:?}");
    assert!((s.apps_j - active).abs() < 1e-6, "{s:?}");
    let a = s.apps.iter().find(|r| r.app == "a").unwrap();
    assert!((a.total_j - 0.75 * active).abs() < 1e-6 && (a.hour_j - a.total_j).abs() < 1e-9, "{a:?}");
    assert_eq!(l.snapshot("b", false).apps.len(), 1, "an app sees its own row only");
    // The hour window forgets; the total does not.
    let later = l.epoch + Duration::from_secs(3600);
    let st = l.lock();
    assert_eq!(st.apps["a"].hour.sum(later.duration_since(l.epoch).as_secs_f64()), 0.0);
}

#[test]
fn the_model_prices_compute_and_a_charging_battery_falls_back_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let bat = dir.path().join("class/power_supply/battery");
    write(&bat.join("type"), "Battery");
    write(&bat.join("status"), "Charging");
    write(&bat.join("energy_now"), 10_000_000);
    let (l, compute) = ledger(dir.path(), "auto");
    let t0 = Instant::now();
    l.tick(t0, false);
    compute.add("a", 500_000, false);
    l.tick(t0 + Duration::from_secs(2), false);
    let s = l.snapshot("a", false);
    assert_eq!(s.source, "battery-energy");
    // The model: 0.5 W idle for 2 s and 4 W for 0.5 s of compute.
    assert!((s.device_j - 3.0).abs() < 1e-9 && (s.apps[0].total_j - 2.0).abs() < 1e-9, "{s:?}");
    assert!((l.price(Duration::from_millis(250)).0 - 1000.0).abs() < 1e-6);
}

#[test]
fn the_ledger_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (l, compute) = ledger(dir.path(), "model");
    let t0 = Instant::now();
    l.tick(t0, false);
    compute.add("capped", 1000, false);
    l.tick(t0 + Duration::from_millis(5), true);
    l.judge_budgets(|app, _, _| (app == "capped").then_some(false));
    for i in 0..MAX_APPS + 20 {
        compute.add(&format!("app{i}"), 1000, false);
        l.tick(t0 + Duration::from_millis(10 * (i as u64 + 1)), true);
    }
    assert_eq!(l.snapshot("", true).apps.len(), MAX_APPS);
    assert!(l.snapshot("app0", false).apps.is_empty(), "the longest idle is forgotten");
    assert_eq!(l.snapshot("capped", false).apps.len(), 1, "but never an app with a budget");
}

#[test]
fn budgets_count_compute_reported_and_not_yet_booked() {
    let dir = tempfile::tempdir().unwrap();
    let (l, compute) = ledger(dir.path(), "model");
    let t0 = Instant::now();
    l.tick(t0, false);
    compute.add("old", 1_000_000, false);
    l.tick(t0 + Duration::from_secs(1), true);
    let judge = |l: &Ledger| {
        let seen = std::sync::Mutex::new(HashMap::new());
        let over = l.judge_budgets(|app, hour_j, _| {
            seen.lock().unwrap().insert(app.to_owned(), hour_j);
            Some(hour_j >= 5.0)
        });
        (over, seen.into_inner().unwrap())
    };
    // The model's price: 4 J per compute-second. "old" has 4 J booked, "new" no row.
    let (over, seen) = judge(&l);
    assert!(over.is_empty() && (seen["old"] - 4.0).abs() < 1e-9 && !seen.contains_key("new"), "{seen:?}");
    compute.add("old", 500_000, false);
    compute.add("new", 2_000_000, false);
    let (mut over, seen) = judge(&l);
    over.sort();
    assert_eq!(over, ["new", "old"], "{seen:?}");
    assert!((seen["old"] - 6.0).abs() < 1e-9 && (seen["new"] - 8.0).abs() < 1e-9, "{seen:?}");
    assert_eq!(l.over_budget("new"), Some(true));
    // Booked at the next tick, the same verdicts stand.
    l.tick(t0 + Duration::from_secs(2), true);
    let (over, seen) = judge(&l);
    assert_eq!(over.len(), 2, "{seen:?}");
    assert!((seen["old"] - 6.0).abs() < 1e-9 && (seen["new"] - 8.0).abs() < 1e-9, "{seen:?}");
}

#[test]
fn the_background_share_counts_background_compute_of_every_app() {
    let dir = tempfile::tempdir().unwrap();
    let (l, compute) = ledger(dir.path(), "model");
    let t0 = Instant::now();
    l.tick(t0, false);
    assert!(!l.judge_background(None) && l.snapshot("", true).background_share_j.is_none());
    // 1 s of a's background work and 1 s of b's normal work: 4 J of background booked.
    compute.add("a", 1_000_000, true);
    compute.add("b", 1_000_000, false);
    l.tick(t0 + Duration::from_secs(1), true);
    assert!((l.snapshot("", true).background_hour_j - 4.0).abs() < 1e-9);
    assert!(!l.judge_background(Some(5.0)));
    // 0.5 s more of b's background work, reported and not booked: 6 J against 5.
    compute.add("b", 500_000, true);
    assert!(l.judge_background(Some(5.0)));
    let e = l.snapshot("a", false);
    assert_eq!((e.background_share_j, e.background_deferred), (Some(5.0), Some(true)));
    assert!(!l.judge_background(Some(7.0)), "a larger share (more battery) lets it run again");
    // The hour slides past it (this ledger's hour is 60 s).
    assert_eq!(l.lock().background.sum(200.0), 0.0);
}

#[test]
fn today_starts_at_the_local_midnight_for_apps_and_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, compute) = ledger(dir.path(), "model");
    l.today = || 20261207;
    let t0 = Instant::now();
    l.tick(t0, false);
    compute.add("a", 1_000_000, false);
    l.tick(t0 + Duration::from_secs(1), true);
    let e = l.snapshot("a", false);
    // The model: 0.5 W idle for 1 s and 4 W for 1 s of compute.
    assert!((e.device_today_j - 4.5).abs() < 1e-9 && (e.device_hour_j - 4.5).abs() < 1e-9, "{e:?}");
    assert!((e.apps[0].today_j - 4.0).abs() < 1e-9, "{e:?}");
    // Past midnight, today starts from nothing; the sliding windows keep yesterday's.
    l.today = || 20261208;
    let e = l.snapshot("a", false);
    assert_eq!((e.device_today_j, e.apps[0].today_j), (0.0, 0.0));
    assert!((e.apps[0].day_j - 4.0).abs() < 1e-9 && (e.apps[0].hour_j - 4.0).abs() < 1e-9, "{e:?}");
    compute.add("a", 500_000, false);
    l.tick(t0 + Duration::from_secs(2), true);
    let e = l.snapshot("a", false);
    assert!((e.apps[0].today_j - 2.0).abs() < 1e-9 && (e.apps[0].total_j - 6.0).abs() < 1e-9, "{e:?}");
    assert!((e.device_today_j - 2.5).abs() < 1e-9, "{e:?}");
    let day = local_day();
    assert!((19_700_101..=99_991_231).contains(&day) && (1..=12).contains(&(day / 100 % 100)), "{day}");
}

#[test]
fn a_budget_holds_an_app_whose_next_request_would_take_it_past() {
    let dir = tempfile::tempdir().unwrap();
    let (l, compute) = ledger(dir.path(), "model");
    let t0 = Instant::now();
    l.tick(t0, false);
    let judge = |l: &Ledger| !l.judge_budgets(|_, hour_j, _| Some(hour_j >= 10.0)).is_empty();
    // A first request, of 1 s of compute (4 J at the model's price): 4 J drawn.
    compute.add("a", 1_000_000, true);
    l.tick(t0 + Duration::from_secs(1), true);
    assert!(!judge(&l), "nothing known of its requests yet");
    l.note_request("a", 4.0);
    assert!(!judge(&l), "4 J drawn and 4 J to come is under 10 J");
    compute.add("a", 1_000_000, true);
    l.tick(t0 + Duration::from_secs(2), true);
    l.note_request("a", 4.0);
    assert!(judge(&l), "8 J drawn: the next request would take it to 12 J");
    assert!((l.lock().request_j["a"] - 4.0).abs() < 1e-9);
    l.note_request("a", 0.0);
    l.note_request("a", f64::NAN);
    assert!((l.lock().request_j["a"] - 4.0).abs() < 1e-9, "cloud and refused requests cost nothing");
    l.note_request("a", 1.0);
    assert!(judge(&l), "one cheap request does not make room: 8 J and 3.2 J to come");
    for _ in 0..3 {
        l.note_request("a", 1.0);
    }
    assert!(!judge(&l), "smaller requests lately: 8 J and 4 x 0.8^4 = 1.64 J to come");
    l.note_request("a", 4.0);
    assert!(judge(&l), "a dear one again: 8 J and 4 J to come");
}
