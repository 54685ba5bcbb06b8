//! The governors in a closed loop: the real daemon decoding on a simulated phone whose
//! temperature follows the daemon's own CPU use (tests/src/soc.rs).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_dbus::{Generation, StreamEvent};
use hearth_tests::soc::{Soc, SocParams, SocSample};
use hearth_tests::{Bus, Daemon, Settings, chat_request, hearth, with_priority};

const PARAMS: SocParams = SocParams {
    ambient_c: 35.0,
    start_c: 50.0,
    c_per_core: 20.0,
    tau_s: 2.0,
    passive_trip_c: 65.0,
    critical_trip_c: 90.0,
    battery_pct: 80.0,
    drain_pct_per_core_s: 0.05,
    idle_w: 0.0,
    w_per_core: 0.0,
    energy_full_wh: 0.0,
};
const RUN: Duration = Duration::from_secs(12);
const STREAMS: usize = 2;

struct RunResult {
    label: String,
    samples: Vec<SocSample>,
    /// Arrival times of tokens, seconds since the workload started.
    tokens: Vec<f64>,
    /// The governor's published (time, rate cap, potential rate), tokens/s.
    caps: Vec<(f64, f64, f64)>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.tokens.len() as f64 / RUN.as_secs_f64()
    }
    fn max_temp(&self) -> f64 {
        self.samples.iter().map(|s| s.temp_c).fold(f64::MIN, f64::max)
    }
    fn above_trip(&self) -> f64 {
        let above = self.samples.iter().filter(|s| s.temp_c > PARAMS.passive_trip_c).count();
        above as f64 / self.samples.len().max(1) as f64
    }
}

/// Runs STREAMS generations back to back for RUN with `governor` settings.
async fn run(label: &str, governor: &str) -> RunResult {
    let mut soc = Soc::new(PARAMS);
    let bus = Bus::start();
    let settings = Settings { governor: format!("{}{governor}", soc.governor_settings(200)), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    hearth(&conn).await.complete(chat_request("Hi", 1)).await.unwrap(); // load the model
    soc.run(daemon.pid().as_raw() as u32);
    let start = Instant::now();
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let caps = Arc::new(Mutex::new(Vec::new()));
    let watcher = {
        let (proxy, caps) = (hearth(&conn).await, Arc::clone(&caps));
        tokio::spawn(async move {
            while start.elapsed() < RUN {
                let t = proxy.throttle().await.unwrap();
                caps.lock().unwrap().push((start.elapsed().as_secs_f64(), t.rate_cap_tps, t.potential_tps));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for s in 0..STREAMS {
        let (conn, tokens) = (conn.clone(), Arc::clone(&tokens));
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while start.elapsed() < RUN {
                let prompt = "Write a long story about a lighthouse keeper and the sea.";
                let mut g = Generation::start(&conn, chat_request(prompt, 160), &format!("s{s}_{n}")).await.unwrap();
                n += 1;
                while let Some(ev) = g.next().await {
                    match ev.unwrap() {
                        StreamEvent::Token { .. } if start.elapsed() < RUN => {
                            tokens.lock().unwrap().push(start.elapsed().as_secs_f64());
                        }
                        StreamEvent::Token { .. } => {
                            let _ = g.cancel().await;
                        }
                        StreamEvent::Migrated { .. } => {}
                        StreamEvent::Finished(_) => break,
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    watcher.await.unwrap();
    let caps = caps.lock().unwrap().clone();
    let samples = soc.samples();
    drop(soc);
    let mut tokens = tokens.lock().unwrap().clone();
    tokens.sort_by(f64::total_cmp);
    RunResult { label: label.to_owned(), samples, tokens, caps }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_governor_holds_the_trip_with_most_of_the_best_static_throughput() {
    let off = run("governor off", "enabled = false\n").await;
    let full = off.rate();
    let mut statics = Vec::new();
    for fraction in [0.55, 0.7, 0.85, 0.95] {
        let cap = full * fraction;
        statics.push(run(&format!("static cap {cap:.0} tok/s"), &format!("static_rate_tps = {cap}\n")).await);
    }
    // This phone's sensor is clean and its trip sharp, so the controller may hold 1.5 °C under
    // it (with 1 °C, a CI run's oscillation once reached 65.3 °C).
    // Gains for its 2 s thermal time constant: integral time ≈ τ; kp ≈ 1.6 / (the ~40 °C a full
    // duty cycle adds), so the rise from 50 °C meets the setpoint without crossing the trip.
    let pi = run("PI controller", "kp = 0.04\nki = 0.03\nsetpoint_margin_c = 1.5\n").await;

    let mut table = String::from("run                      tok/s   max °C   time above trip\n");
    for r in std::iter::once(&off).chain(&statics).chain(std::iter::once(&pi)) {
        let _ = writeln!(
            table,
            "{:<24} {:>6.1} {:>8.1} {:>12.1}%",
            r.label,
            r.rate(),
            r.max_temp(),
            100.0 * r.above_trip()
        );
    }
    let best =
        statics.iter().filter(|r| r.max_temp() <= PARAMS.passive_trip_c).max_by(|a, b| a.rate().total_cmp(&b.rate()));
    let plot = plot_svg(&[&off, best.unwrap_or(&statics[0]), &pi]);
    let dir = hearth_tests::workspace_root().join("target/governor");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("closed-loop.svg"), plot).unwrap();
    let mut series = String::from("per second: tok/s @ °C at the second's end\n");
    for r in std::iter::once(&off).chain(&statics).chain(std::iter::once(&pi)) {
        let _ = write!(series, "{:<24}", r.label);
        for (t, rate) in rate_series(r) {
            let temp = r.samples.iter().take_while(|s| s.t_s <= t + 0.5).last().map_or(f64::NAN, |s| s.temp_c);
            let _ = write!(series, " {rate:>4.0}@{temp:.1}");
        }
        series.push('\n');
    }
    series.push_str("PI cap / potential tok/s, 1 s means:\n");
    for sec in 0..RUN.as_secs() {
        let window: Vec<_> = pi.caps.iter().filter(|c| c.0 as u64 == sec).collect();
        let mean =
            |f: fn(&(f64, f64, f64)) -> f64| window.iter().map(|c| f(c)).sum::<f64>() / window.len().max(1) as f64;
        let _ = write!(series, " {:.0}/{:.0}", mean(|c| c.1), mean(|c| c.2));
    }
    series.push('\n');
    table.push_str(&series);
    std::fs::write(dir.join("closed-loop.txt"), &table).unwrap();
    eprintln!("{table}plot: {}", dir.join("closed-loop.svg").display());

    assert!(off.max_temp() > PARAMS.passive_trip_c, "without the governor the trip is exceeded\n{table}");
    let best = best.unwrap_or_else(|| panic!("no static cap stayed under the trip\n{table}"));
    assert!(pi.above_trip() <= 0.02, "with the governor, time above the trip ≈ 0\n{table}");
    assert!(pi.rate() >= 0.9 * best.rate(), "the governor keeps ≥ 90% of the best safe static cap\n{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_waits_for_the_charger_on_a_low_battery() {
    let soc = Soc::new(SocParams { battery_pct: 15.0, ..PARAMS });
    let bus = Bus::start();
    let settings = Settings { governor: soc.governor_settings(100), ..Settings::default() };
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    hearth_tests::wait_for(Duration::from_secs(10), "the low power state", || async {
        (proxy.power_state().await.unwrap() == "low").then_some(())
    })
    .await;
    let throttle = proxy.throttle().await.unwrap();
    assert!(throttle.defer_background);
    assert!(throttle.prefer_cloud);

    let mut background =
        Generation::start(&conn, with_priority("Summarise my day.", 4, "background"), "bg").await.unwrap();
    // Normal work still runs; the background request waits in the queue, not failed.
    proxy.complete(chat_request("Hi", 2)).await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(1500), background.next()).await;
    assert!(waited.is_err(), "a background request ran on a low battery: {waited:?}");
    assert_eq!(proxy.queue_depth().await.unwrap(), 1);

    soc.set_charging(true);
    let mut tokens = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), background.next()).await.expect("runs once charging") {
            Some(Ok(StreamEvent::Token { .. })) => tokens += 1,
            Some(Ok(StreamEvent::Finished(r))) => {
                assert_eq!(r.finish_reason.clone(), "length");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(tokens, 4);
    assert_eq!(proxy.power_state().await.unwrap(), "charging");
}

/// Temperature (top) and tokens/s (bottom) over time for each run, as an SVG.
fn plot_svg(runs: &[&RunResult]) -> String {
    let (w, h, pad) = (720.0, 220.0, 40.0);
    let colors = ["#d62728", "#1f77b4", "#2ca02c"];
    let t_max = RUN.as_secs_f64();
    let x = |t: f64| pad + (w - 2.0 * pad) * t / t_max;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        2.0 * h + 30.0
    );
    let (t_lo, t_hi) = (PARAMS.ambient_c, PARAMS.passive_trip_c + 15.0);
    let y_temp = |c: f64| h - pad / 2.0 - (h - pad) * (c - t_lo) / (t_hi - t_lo);
    let peak = runs.iter().map(|r| rate_series(r).into_iter().map(|p| p.1).fold(0.0, f64::max)).fold(1.0, f64::max);
    let y_rate = |r: f64| 2.0 * h - pad / 2.0 - (h - pad) * r / (peak * 1.1);
    let _ = writeln!(
        svg,
        "<text x=\"{pad}\" y=\"14\">temperature °C (trip {:.0} °C, dashed)</text>",
        PARAMS.passive_trip_c
    );
    let trip_y = y_temp(PARAMS.passive_trip_c);
    let _ = writeln!(
        svg,
        "<line x1=\"{pad}\" x2=\"{}\" y1=\"{trip_y}\" y2=\"{trip_y}\" stroke=\"black\" stroke-dasharray=\"4\"/>",
        w - pad
    );
    let _ = writeln!(
        svg,
        "<text x=\"{pad}\" y=\"{}\">tokens/s (1 s windows; dotted: the published cap) over {t_max:.0} s</text>",
        h + 24.0
    );
    for c in (t_lo as i64..=t_hi as i64).step_by(10) {
        let _ = writeln!(svg, "<text x=\"4\" y=\"{:.1}\">{c}</text>", y_temp(c as f64) + 4.0);
    }
    let step = (peak / 4.0).ceil().max(1.0);
    for k in 0..5 {
        let v = step * f64::from(k);
        if v <= peak * 1.1 {
            let _ = writeln!(svg, "<text x=\"4\" y=\"{:.1}\">{v:.0}</text>", y_rate(v) + 4.0);
        }
    }
    for t in (0..=t_max as u64).step_by(2) {
        let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"{:.1}\">{t}s</text>", x(t as f64) - 6.0, 2.0 * h + 10.0);
    }
    for (i, r) in runs.iter().enumerate() {
        let temp: Vec<String> = r.samples.iter().map(|s| format!("{:.1},{:.1}", x(s.t_s), y_temp(s.temp_c))).collect();
        let rate: Vec<String> = rate_series(r).iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y_rate(*v))).collect();
        for points in [temp, rate] {
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
                colors[i % 3],
                points.join(" ")
            );
        }
        // The cap the governor published (the controller's duty cycle in tokens/s), dotted.
        let caps: Vec<String> =
            r.caps.iter().filter(|c| c.1 > 0.0).map(|c| format!("{:.1},{:.1}", x(c.0), y_rate(c.1))).collect();
        if !caps.is_empty() {
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1\" stroke-dasharray=\"2 3\" points=\"{}\"/>",
                colors[i % 3],
                caps.join(" ")
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"{}\">{}</text>",
            w - 220.0,
            14.0 + 14.0 * i as f64,
            colors[i % 3],
            r.label
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Tokens per second in 1 s windows.
fn rate_series(r: &RunResult) -> Vec<(f64, f64)> {
    let secs = RUN.as_secs() as usize;
    let mut bins = vec![0usize; secs];
    for t in &r.tokens {
        if let Some(b) = bins.get_mut(*t as usize) {
            *b += 1;
        }
    }
    bins.iter().enumerate().map(|(i, n)| (i as f64 + 0.5, *n as f64)).collect()
}

/// power-profiles-daemon's interface, as much of it as hearthd reads.
struct PowerProfiles(String);

#[zbus::interface(name = "net.hadess.PowerProfiles")]
impl PowerProfiles {
    #[zbus(property)]
    fn active_profile(&self) -> String {
        self.0.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_power_saver_profile_halves_the_threads() {
    let soc = Soc::new(PARAMS);
    let bus = Bus::start();
    let _ppd = zbus::connection::Builder::address(bus.address())
        .serve_at("/net/hadess/PowerProfiles", PowerProfiles("power-saver".into()))
        .name("net.hadess.PowerProfiles")
        .build()
        .await
        .unwrap();
    let settings = Settings { governor: soc.governor_settings(100), ..Settings::default() };
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let throttle = hearth_tests::wait_for(Duration::from_secs(10), "power-saver to be seen", || async {
        let t = proxy.throttle().await.unwrap();
        t.power_saver.then_some(t)
    })
    .await;
    let threads = throttle.threads;
    let configured = hearth_tests::threads() as u32;
    assert_eq!(threads, if configured > 1 { configured / 2 } else { 0 });
    assert!(throttle.prefer_cloud);
    // Generation still works with the governor's thread count.
    proxy.complete(chat_request("Hi", 2)).await.unwrap();
}
