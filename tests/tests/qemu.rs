//! Hearth as a phone image runs it: cross-built for aarch64 and booted in an emulated arm64
//! machine (`qemu-system-aarch64 -M virt`, TCG). `tests/qemu/build.sh` makes the images and
//! `tests/qemu/run.sh` runs these tests (they are ignored in a plain `cargo test`: each boots
//! a VM for minutes).
//!
//! - Tier 1: busybox init from an initramfs starts the system bus with the project's policy
//!   and hearthd as the `hearth` user; hearthctl, as uid 1000 in an app scope, runs the
//!   scenario (`tests/qemu/scenario.sh`).
//! - Tier 2: systemd boots a Debian root file system with Hearth installed by
//!   `scripts/install.sh`; the scenario's first call D-Bus-activates `hearthd.service`.
//!
//! Results come back on the serial console as `@@hearth <step> <line>`; a VM that hangs is
//! killed at its deadline and the test fails with the tail of its serial log.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hearth_tests::soc::{SocParams, write_tree};
use hearth_tests::{Bus, Daemon, workspace_bin, workspace_root};
use serde_json::Value as Json;

fn artifacts() -> PathBuf {
    let dir = workspace_root().join("target/qemu");
    for f in ["vmlinuz", "tier1.cpio", "tier2.img", "tier2-initrd.cpio"] {
        assert!(dir.join(f).is_file(), "{} is missing: run tests/qemu/run.sh (it builds the images)", f);
    }
    dir
}

/// What a VM printed: every `@@hearth` line by step, when the host read it, and the whole log.
#[derive(Debug, Default)]
struct Serial {
    steps: BTreeMap<String, Vec<String>>,
    /// Host time from the VM's start to each step's first line.
    first_seen: BTreeMap<String, Duration>,
    log: Vec<String>,
}

impl Serial {
    fn lines(&self, step: &str) -> &[String] {
        self.steps.get(step).map_or(&[], Vec::as_slice)
    }

    fn one(&self, step: &str) -> &str {
        self.lines(step).first().map_or_else(|| panic!("no `{step}` line\n{}", self.tail(80)), String::as_str)
    }

    /// The exit status a `step` ended with (its last line is `rc=N`, after the guest's uptime
    /// for a streamed step).
    fn rc(&self, step: &str) -> i32 {
        let last = self.lines(step).last().unwrap_or_else(|| panic!("no `{step}` lines\n{}", self.tail(80)));
        let last = last.split_once(' ').map_or(last.as_str(), |(_, rest)| rest);
        last.strip_prefix("rc=").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("`{step}` did not finish"))
    }

    /// A step's output without its `rc=` line.
    fn output(&self, step: &str) -> String {
        let lines = self.lines(step);
        lines[..lines.len().saturating_sub(1)].join("\n")
    }

    fn json(&self, step: &str) -> Json {
        assert_eq!(self.rc(step), 0, "`{step}` failed:\n{}", self.output(step));
        serde_json::from_str(&self.output(step)).unwrap_or_else(|e| panic!("`{step}`: {e}\n{}", self.output(step)))
    }

    fn tail(&self, n: usize) -> String {
        format!("--- serial log, last {n} lines ---\n{}", self.log[self.log.len().saturating_sub(n)..].join("\n"))
    }
}

/// Boots `qemu-system-aarch64` with `args`, collecting the serial console until the VM powers
/// off; kills it and fails with the log's tail if it runs past `limit`.
fn boot(name: &str, args: &[String], limit: Duration) -> Serial {
    let qemu = "qemu-system-aarch64";
    let mut child = Command::new(qemu)
        .args(["-M", "virt", "-cpu", "max,pauth-impdef=on", "-smp", "2", "-no-reboot", "-nic", "none"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {qemu} (scripts/setup-deps.sh installs qemu-system-arm): {e}"));
    let start = Instant::now();
    let (tx, rx) = mpsc::channel::<(Duration, String)>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut serial = Serial::default();
    let deadline = start + limit;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((at, line)) => {
                if let Some(rest) = line.find("@@hearth ").map(|i| &line[i + "@@hearth ".len()..]) {
                    let (step, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    serial.first_seen.entry(step.to_owned()).or_insert(at);
                    serial.steps.entry(step.to_owned()).or_default().push(text.to_owned());
                }
                serial.log.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: the VM ran past its {} s limit and was killed\n{}", limit.as_secs(), serial.tail(120));
        }
    }
    let status = child.wait().expect("wait for qemu");
    let _ = reader.join();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    assert!(status.success(), "{name}: qemu exited with {status}: {stderr}\n{}", serial.tail(120));
    if let Some(fatal) = serial.steps.get("fatal") {
        panic!("{name}: the VM reported {fatal:?}\n{}", serial.tail(120));
    }
    assert!(serial.steps.contains_key("done"), "{name}: the VM powered off before the end\n{}", serial.tail(120));
    eprintln!("{name}: VM finished in {:.1} s", start.elapsed().as_secs_f64());
    serial
}

fn token_ids(lines: &[Json]) -> Vec<u64> {
    lines.iter().filter_map(|l| l["token_id"].as_u64()).collect()
}

/// The `generate` step's JSON lines (each prefixed with the guest's uptime).
fn streamed(serial: &Serial, step: &str) -> Vec<Json> {
    serial
        .lines(step)
        .iter()
        .filter_map(|l| {
            let json = l.split_once(' ').map_or(l.as_str(), |(_, j)| j);
            serde_json::from_str(json).ok()
        })
        .collect()
}

/// The same greedy request on this machine's x86-64 build, with the image's configuration.
async fn host_greedy_tokens(prompt: &str, max_tokens: &str) -> Vec<u64> {
    let bus = Bus::start();
    let dir = tempfile::tempdir().unwrap();
    let sysfs = dir.path().join("sysfs");
    // The image's phone (hearth-soc-tree's defaults).
    write_tree(&sysfs, &SocParams::at_rest(41.0, 80.0));
    let overlay = dir.path().join("host.toml");
    std::fs::write(
        &overlay,
        format!(
            "[daemon]\nstate_dir = {:?}\n[models]\ndirs = [{:?}]\n[governor]\nsysfs_root = {:?}\n",
            dir.path().join("state").display().to_string(),
            hearth_tests::models_dir().display().to_string(),
            sysfs.display().to_string(),
        ),
    )
    .unwrap();
    let vendor = workspace_root().join("daemon/data/hearthd.toml");
    let _daemon = Daemon::spawn(&bus, &workspace_bin("hearthd"), &[vendor, overlay], &[], dir).await;
    let out = Command::new(workspace_bin("hearthctl"))
        .args(["--bus-address", bus.address(), "--json", "generate", prompt, "--temperature", "0"])
        .args(["--max-tokens", max_tokens])
        .output()
        .expect("run hearthctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Json> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    token_ids(&lines)
}

/// The scenario's assertions, the same in both tiers.
async fn check_scenario(serial: &Serial) {
    assert!(serial.one("serving").starts_with("ok=1"), "hearthd never answered\n{}", serial.tail(120));

    let status = serial.json("status");
    assert!(status["version"].as_str().is_some_and(|v| !v.is_empty()), "{status}");
    assert!(status["backends"].as_array().unwrap().iter().any(|b| b["kind"] == "cpu"), "{status}");
    assert_eq!(status["thermal_state"], "nominal", "the VM's simulated phone is at 41 °C: {status}");
    let whoami = serial.json("whoami");
    assert_eq!(whoami["app_id"], "org.hearth.QemuCheck", "{whoami}");
    assert_eq!(whoami["uid"], 1000, "{whoami}");
    let models = serial.json("models");
    assert_eq!(models[0]["name"], "smollm2-135m-instruct", "{models}");
    assert_eq!(models[0]["loaded"], false, "models load on first use: {models}");

    // The greedy generation: streamed tokens, then Finished; the same tokens as x86-64.
    assert_eq!(serial.rc("generate"), 0, "{}", serial.output("generate"));
    let lines = streamed(serial, "generate");
    let vm_tokens = token_ids(&lines);
    let finished = lines.iter().find_map(|l| l.get("finished")).expect("a finished line");
    let max_tokens = serial.one("max-tokens").to_owned();
    assert_eq!(finished["tokens"].as_u64(), Some(vm_tokens.len() as u64), "{finished}");
    assert!(!vm_tokens.is_empty());
    let host_tokens = host_greedy_tokens(serial.one("prompt"), &max_tokens).await;
    assert_eq!(vm_tokens, host_tokens, "aarch64 and x86-64 greedy tokens differ");

    // Cancelled mid-stream: some tokens, then Finished with the Cancelled error.
    let cancel = serial.lines("cancel").join("\n");
    let tokens = cancel.lines().filter(|l| l.contains("\"token_id\"")).count();
    assert!(tokens >= 2, "{cancel}");
    assert!(cancel.contains("org.hearth.Hearth1.Error.Cancelled"), "{cancel}");
    assert!(tokens < 400, "{cancel}");

    // Bad requests: clear named errors, and the daemon still serves.
    assert_ne!(serial.rc("bad-temperature"), 0);
    assert!(serial.output("bad-temperature").contains("org.hearth.Hearth1.Error.InvalidArgs"), "{serial:?}");
    assert_ne!(serial.rc("bad-model"), 0);
    assert!(serial.output("bad-model").contains("org.hearth.Hearth1.Error.ModelNotFound"), "{serial:?}");
    let after = serial.json("status-after");
    assert_eq!(after["queue_depth"], 0, "{after}");
    let models = serial.json("models-after");
    assert_eq!((&models[0]["loaded"], &models[0]["verified"]), (&Json::Bool(true), &Json::Bool(true)), "{models}");
}

/// Reports boot-to-first-token: host time from starting QEMU to the first streamed token.
fn report_first_token(name: &str, serial: &Serial) {
    let first = serial.lines("generate").iter().position(|l| l.contains("\"token_id\"")).expect("a streamed token");
    let guest = serial.lines("generate")[first].split_once(' ').map_or("?", |(t, _)| t);
    let host = serial.first_seen.get("generate").copied().unwrap_or_default();
    eprintln!(
        "{name}: boot to first token {:.1} s on the host clock (first generate line), guest uptime {guest} s",
        host.as_secs_f64()
    );
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots an arm64 VM for minutes: run by tests/qemu/run.sh"]
async fn tier1_busybox_initramfs_runs_the_scenario() {
    let dir = artifacts();
    let args = vec![
        "-m".into(),
        "1536".into(),
        "-kernel".into(),
        path_arg(&dir.join("vmlinuz")),
        "-initrd".into(),
        path_arg(&dir.join("tier1.cpio")),
        "-append".into(),
        "console=ttyAMA0 rdinit=/init quiet loglevel=3 panic=-1".into(),
    ];
    let serial = boot("tier 1", &args, Duration::from_secs(420));
    report_first_token("tier 1", &serial);
    check_scenario(&serial).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots an arm64 VM for minutes: run by tests/qemu/run.sh"]
async fn tier2_systemd_activates_hearthd() {
    let dir = artifacts();
    // Boot from a copy: the guest writes to its disk, and the built image stays pristine.
    let disk = dir.join("tier2-run.img");
    std::fs::copy(dir.join("tier2.img"), &disk).expect("copy the tier 2 disk");
    let args = vec![
        "-m".into(),
        "2048".into(),
        "-kernel".into(),
        path_arg(&dir.join("vmlinuz")),
        "-initrd".into(),
        path_arg(&dir.join("tier2-initrd.cpio")),
        "-drive".into(),
        format!("file={},format=raw,if=none,id=root", disk.display()),
        "-device".into(),
        "virtio-blk-pci,drive=root".into(),
        "-append".into(),
        "console=ttyAMA0 rdinit=/init quiet loglevel=3 systemd.show_status=false panic=-1".into(),
    ];
    let serial = boot("tier 2", &args, Duration::from_secs(600));
    let _ = std::fs::remove_file(&disk);
    assert_eq!(serial.one("before"), "inactive", "hearthd ran before anyone called it\n{}", serial.tail(80));
    report_first_token("tier 2", &serial);
    check_scenario(&serial).await;

    let show: BTreeMap<&str, &str> = serial.lines("show").iter().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(show.get("ActiveState"), Some(&"active"), "{show:?}");
    assert_eq!(show.get("SubState"), Some(&"running"), "{show:?}");
    assert_eq!(show.get("Type"), Some(&"notify"), "{show:?}");
    assert_eq!(show.get("User"), Some(&"hearth"), "{show:?}");
    assert_eq!(show.get("NRestarts"), Some(&"0"), "{show:?}");
    assert_eq!(show.get("WatchdogUSec"), Some(&"30s"), "{show:?}");
    assert_ne!(show.get("WatchdogTimestampMonotonic"), Some(&"0"), "no watchdog ping: {show:?}");
    assert_eq!(show.get("StatusText"), Some(&"serving"), "{show:?}");
    let status = serial.output("systemctl-status");
    assert!(status.contains("Active: active (running)"), "{status}");

    let creds = serial.output("uid");
    let uid = creds.lines().find_map(|l| l.strip_prefix("Uid:")).expect("Uid line");
    assert!(uid.split_whitespace().all(|u| u != "0"), "hearthd runs as root: {creds}");
    assert!(creds.contains("NoNewPrivs:\t1"), "{creds}");
    assert!(creds.contains("CapEff:\t0000000000000000"), "{creds}");
    // The engine under systemd: hearthd's child, same unprivileged user, more seccomp filters
    // than hearthd (its own allowlist), landlock in force, no network, no state directory.
    let engine = serial.output("engine");
    let field = |text: &str, key: &str| -> String {
        text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned()).unwrap_or_default()
    };
    assert_eq!(field(&engine, "Name:"), "hearth-engine", "{engine}");
    assert_eq!(field(&engine, "Uid:"), uid.trim(), "{engine}");
    assert_eq!(field(&engine, "NoNewPrivs:"), "1", "{engine}");
    assert_eq!(field(&engine, "Seccomp:"), "2", "{engine}");
    assert_eq!(field(&engine, "CapEff:"), "0000000000000000", "{engine}");
    let filters = |t: &str| field(t, "Seccomp_filters:").parse::<u32>().unwrap_or(0);
    assert!(filters(&engine) >= filters(&creds) + 2, "engine {engine} vs hearthd {creds}");
    let models = serial.json("engine-sandbox");
    let m = &models[0];
    assert_eq!(m["sandbox_seccomp"], true, "{m}");
    assert_eq!(m["sandbox_socket"], "EPERM", "{m}");
    // Enforced wherever the kernel has landlock: "full" on ABI ≥ 6, "partial" below (Debian
    // 12's 6.1 kernel is ABI 2: file rules, no TCP rules or scopes).
    assert!(m["sandbox_landlock"] != "none" || m["sandbox_landlock_abi"] == 0, "{m}");
    // Whatever landlock the image's kernel enforces, the allowlist leaves nothing to open.
    let landlock = m["sandbox_landlock"] != "none";
    for probe in m["sandbox_probes"].as_array().expect("probes") {
        let r = probe[1].as_str().unwrap_or_default();
        assert!(r.ends_with("then EPERM") && (!landlock || !r.contains("opened")), "{probe}");
    }
    println!("tier 2: engine {engine:?} sandbox landlock={} abi={}", m["sandbox_landlock"], m["sandbox_landlock_abi"]);
    let dev = serial.output("private-dev");
    assert!(dev.lines().any(|l| l == "null") && dev.lines().any(|l| l == "urandom"), "{dev}");
    assert!(!dev.lines().any(|l| l.starts_with("vda") || l.starts_with("ttyAMA")), "PrivateDevices: {dev}");
    let journal = serial.output("journal");
    for line in ["Started hearthd.service", "serving", "pinging the systemd watchdog", "model loaded"] {
        assert!(journal.lines().any(|l| l.starts_with(line)), "no {line:?} in hearthd's journal:\n{journal}");
    }
}
