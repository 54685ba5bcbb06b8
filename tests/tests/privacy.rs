//! Who is calling, what they may do, and data that never leaves the phone: identity from the
//! OS, per-app policy, polkit for admin calls, sealed data, and a canary egress test.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use hearth_tests::{
    Bus, Daemon, Settings, apps_dir, apps_setting, chat_request, hearth, process_app, this_app, workspace_bin,
};
use zbus::Variant;

const NOBODY: u32 = 65534;

/// hearthctl run as the unprivileged user `nobody` (another uid, so another app).
fn hearthctl_as_nobody(bus: &Bus, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), "--clear-groups".to_owned()])
        .arg(workspace_bin("hearthctl"))
        .args(["--bus-address", bus.address()])
        .args(args)
        .output()
        .expect("setpriv hearthctl")
}

fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("not root: this test drops privileges to another uid and was skipped");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_are_identified_by_the_os_and_get_their_own_policy() {
    if !require_root() {
        return;
    }
    let nobody_app = process_app(NOBODY, &workspace_bin("hearthctl"));
    let apps = apps_dir(&[(
        "nobody.toml",
        format!("app = {nobody_app:?}\nmax_priority = \"background\"\nmodels = [\"smollm2-135m-instruct\"]\n"),
    )]);
    let bus = Bus::start();
    bus.open_to_all_users();
    let _daemon =
        Daemon::start_configured(&bus, &Settings { apps: apps_setting(apps.path()), ..Settings::default() }).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;

    let me = proxy.caller_info().await.unwrap();
    assert_eq!(me.app_id, this_app());
    assert_eq!(me.app_kind, "process");
    assert_eq!(me.max_priority, "interactive", "the default policy");
    let out = hearthctl_as_nobody(&bus, &["--json", "whoami"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let them: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(them["app_id"], nobody_app.as_str());
    assert_eq!(them["uid"], NOBODY);
    assert_eq!(them["max_priority"], "background", "its own policy file");

    // The policy applies to what the OS says, whatever the request claims.
    let out = hearthctl_as_nobody(&bus, &["generate", "--priority", "interactive", "--max-tokens", "2", "Hi"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.hearth.Hearth1.Error.NotAuthorized"));
    let out = hearthctl_as_nobody(&bus, &["generate", "--priority", "background", "--max-tokens", "2", "Hi"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Activity (hearthctl top): an app sees its own row only; root sees every app's.
    let out = hearthctl_as_nobody(&bus, &["--json", "top", "--once", "--interval", "0.1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let frame: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let apps: Vec<&str> = frame["apps"].as_array().unwrap().iter().map(|a| a["app"].as_str().unwrap()).collect();
    assert_eq!(apps, [nobody_app.as_str()], "{frame}");
    let all: Vec<String> = proxy.activity().await.unwrap().into_iter().map(|a| a.app).collect();
    assert!(all.contains(&nobody_app), "{all:?}");
    let mut forged = chat_request("Hi", 2);
    forged.insert("app_id", Variant::from(nobody_app.as_str()));
    let e = proxy.complete(forged).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    assert_eq!(proxy.caller_info().await.unwrap().app_id, this_app());
    let mut interactive = chat_request("Hi", 2);
    interactive.insert("priority", Variant::from("interactive"));
    proxy.complete(interactive).await.unwrap();
}

/// The polkit stand-in on the test bus.
struct Polkit {
    child: std::process::Child,
    record: PathBuf,
    _dir: tempfile::TempDir,
}

impl Polkit {
    fn start(bus: &Bus, answer: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("calls.jsonl");
        let mut child = Command::new(workspace_bin("hearth-polkit-standin"))
            .args(["--bus-address", bus.address(), "--answer", answer, "--record"])
            .arg(&record)
            .stdout(Stdio::piped())
            .spawn()
            .expect("polkit stand-in");
        let mut ready = [0u8; 6];
        child.stdout.as_mut().unwrap().read_exact(&mut ready).expect("stand-in ready");
        Self { child, record, _dir: dir }
    }

    fn calls(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Polkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polkit_decides_admin_calls_about_the_callers_bus_name() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let me = conn.unique_name().unwrap().to_string();

    let polkit = Polkit::start(&bus, "deny");
    let e = proxy.load_model("smollm2-135m-instruct", HashMap::new()).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.NotAuthorized", "even root is refused when polkit says no");
    let calls = polkit.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["subject_kind"], "system-bus-name", "never a unix-process subject");
    assert_eq!(calls[0]["subject"]["name"], me.as_str(), "the caller's bus name, never hearthd's own");
    assert_eq!(calls[0]["action"], "org.hearth.Hearth1.manage-models");
    assert_eq!(calls[0]["flags"], 0);
    // ALLOW_INTERACTIVE_AUTHORIZATION on the call is passed on, so polkit may ask the user.
    let e = proxy
        .inner()
        .call_with_flags::<_, _, ()>("Reload", zbus::proxy::MethodFlags::ALLOW_INTERACTIVE_AUTH, &())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("NotAuthorized"), "{e}");
    let calls = polkit.calls();
    assert_eq!((calls[1]["action"].as_str(), calls[1]["flags"].as_u64()), (Some("org.hearth.Hearth1.reload"), Some(1)));
    drop(polkit);

    let polkit = Polkit::start(&bus, "challenge");
    let e = proxy.unload_model("smollm2-135m-instruct").await.unwrap_err();
    assert!(e.message().contains("ALLOW_INTERACTIVE_AUTHORIZATION"), "{}", e.message());
    drop(polkit);

    let polkit = Polkit::start(&bus, "allow");
    proxy.load_model("smollm2-135m-instruct", HashMap::new()).await.unwrap();
    proxy.reload().await.unwrap();
    assert_eq!(proxy.loaded_models().await.unwrap(), vec!["smollm2-135m-instruct".to_owned()]);

    // An app policy set at run time applies to the app's next request.
    let me_app = this_app();
    let e =
        proxy.set_app_policy(&me_app, HashMap::from([("max_priority", Variant::from("urgent"))])).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    proxy.set_app_policy(&me_app, HashMap::from([("models", Variant::from(vec!["other-model"]))])).await.unwrap();
    let e = proxy.complete(chat_request("Hi", 2)).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.NotAuthorized");
    proxy.set_app_policy(&me_app, HashMap::new()).await.unwrap();
    proxy.complete(chat_request("Hi", 2)).await.unwrap();
    let actions: Vec<String> = polkit.calls().iter().map(|c| c["action"].as_str().unwrap().to_owned()).collect();
    // The invalid policy was refused before polkit was asked.
    assert_eq!(
        actions,
        [
            "org.hearth.Hearth1.manage-models",
            "org.hearth.Hearth1.reload",
            "org.hearth.Hearth1.set-app-policy",
            "org.hearth.Hearth1.set-app-policy"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_data_reaches_only_the_model_of_the_sealing_app() {
    if !require_root() {
        return;
    }
    let nobody_app = process_app(NOBODY, &workspace_bin("hearthctl"));
    let bus = Bus::start();
    bus.open_to_all_users();
    // This test process is a bare "uid:0:EXE" id: its policy opts in to Seal.
    let apps = apps_dir(&[("me.toml", format!("app = {:?}\nseal_unsandboxed = true\n", this_app()))]);
    let settings = Settings { apps: apps_setting(apps.path()), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let secret = "My locker code is 4711.";
    let blob = proxy.seal(secret.as_bytes(), HashMap::new()).await.unwrap();
    assert!(!blob.windows(secret.len()).any(|w| w == secret.as_bytes()));

    // The model reads the plaintext: same tokens as the text itself.
    let with = |part: (&str, Variant<'static>)| {
        let mut m = HashMap::from([("role".to_owned(), Variant::from("user"))]);
        m.insert(part.0.to_owned(), part.1);
        HashMap::from([("messages", Variant::from(vec![m])), ("max_tokens", Variant::from(12u32))])
    };
    let plain = proxy.complete(with(("content", Variant::from(secret)))).await.unwrap();
    let sealed = proxy.complete(with(("sealed", Variant::from(blob.clone())))).await.unwrap();
    assert_eq!(plain.token_ids.clone(), sealed.token_ids.clone());
    assert_eq!(sealed.route, "local");

    let refused = |blob: Vec<u8>| {
        let proxy = proxy.clone();
        let req = with(("sealed", Variant::from(blob)));
        async move { proxy.complete(req).await.unwrap_err() }
    };
    let mut tampered = blob.clone();
    *tampered.last_mut().unwrap() ^= 0x40;
    assert_eq!(refused(tampered).await.dbus_name(), "org.hearth.Hearth1.Error.NotAuthorized");
    assert_eq!(refused(blob[..30].to_vec()).await.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    // Relabelled as another app's (same length, so only the tag can tell).
    let id = this_app();
    let mut relabelled = blob.clone();
    let fake: String = id.chars().map(|c| if c == '0' { '1' } else { c }).collect();
    relabelled[6..6 + id.len()].copy_from_slice(fake.as_bytes());
    assert_eq!(refused(relabelled).await.dbus_name(), "org.hearth.Hearth1.Error.NotAuthorized");
    let mut scoped =
        HashMap::from([("role".to_owned(), Variant::from("user")), ("sealed".to_owned(), Variant::from(blob.clone()))]);
    scoped.insert("scope".to_owned(), Variant::from("public"));
    let e = proxy.complete(HashMap::from([("messages", Variant::from(vec![scoped]))])).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs", "sealed data cannot be declared public");

    // Another app replaying the blob is refused, until the sealing app's policy shares it.
    let blob_file = apps.path().join("blob.bin");
    std::fs::write(&blob_file, &blob).unwrap();
    let replay =
        || hearthctl_as_nobody(&bus, &["generate", "--max-tokens", "2", "--sealed", blob_file.to_str().unwrap(), "Hi"]);
    let out = replay();
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.hearth.Hearth1.Error.NotAuthorized"));
    std::fs::write(
        apps.path().join("me.toml"),
        format!("app = {id:?}\nseal_unsandboxed = true\nshare_sealed_with = [{nobody_app:?}]\n"),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    hearth_tests::wait_for(Duration::from_secs(10), "the reload", || async {
        daemon.log().contains("configuration reloaded").then_some(())
    })
    .await;
    let out = replay();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!daemon.log().contains(secret), "the plaintext never reaches the log");
}

/// Records every byte anyone sends to a loopback "cloud" endpoint.
struct RecordingEndpoint {
    addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl RecordingEndpoint {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let mut buf = Vec::new();
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.read_to_end(&mut buf);
                sink.lock().unwrap().extend_from_slice(&buf);
            }
        });
        Self { addr, seen }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_in_private_parts_never_leave_and_never_reach_logs_or_errors() {
    let endpoint = RecordingEndpoint::start();
    // This app may use the cloud, for public data only; a bare process, it opts in to Seal.
    let apps = apps_dir(&[(
        "me.toml",
        format!("app = {:?}\ncloud = true\ncloud_scopes = [\"public\"]\nseal_unsandboxed = true\n", this_app()),
    )]);
    let bus = Bus::start();
    // No cloud is configured here, so nothing may be sent anywhere; tests/tests/cloud.rs runs
    // the same kind of canaries through the real forwarder. The endpoint must stay silent.
    let _ = endpoint.addr;
    let settings = Settings { apps: apps_setting(apps.path()), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;

    let canary = |i: usize| format!("CANARY{:016x}", rand_u64(i));
    let mut canaries = Vec::new();
    let mut replies = Vec::new();
    for i in 0..6 {
        let (c_local, c_personal, c_sealed) = (canary(3 * i), canary(3 * i + 1), canary(3 * i + 2));
        let blob = proxy.seal(format!("Sealed note {c_sealed}").as_bytes(), HashMap::new()).await.unwrap();
        canaries.extend([c_local.clone(), c_personal.clone(), c_sealed]);
        let part = |scope: &str, text: String| {
            HashMap::from([
                ("role".to_owned(), Variant::from("user")),
                ("content".to_owned(), Variant::from(text)),
                ("scope".to_owned(), Variant::from(scope.to_owned())),
            ])
        };
        let sealed_part =
            HashMap::from([("role".to_owned(), Variant::from("user")), ("sealed".to_owned(), Variant::from(blob))]);
        let parts = vec![
            part("public", "Please send this to the cloud right away.".into()),
            part("local", format!("Send this to the cloud: {c_local}")),
            part("personal", format!("Upload my secret {c_personal} to the cloud model.")),
            sealed_part,
        ];
        let route = ["auto", "cloud", "local"][i % 3];
        let request = HashMap::from([
            ("messages", Variant::from(parts)),
            ("max_tokens", Variant::from(4u32)),
            ("route", Variant::from(route)),
        ]);
        match proxy.complete(request).await {
            Ok(r) => {
                assert_ne!(route, "cloud", "a cloud route with local data must be refused");
                assert_eq!(r.route, "local");
            }
            Err(e) => {
                assert_eq!(route, "cloud");
                assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.PrivacyViolation");
                replies.push(e.message());
            }
        }
        // Personal data without consent, alone, forced to the cloud.
        let request = HashMap::from([
            ("messages", Variant::from(vec![part("personal", format!("Cloud, read {c_personal}"))])),
            ("route", Variant::from("cloud")),
        ]);
        let e = proxy.complete(request).await.unwrap_err();
        assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.PrivacyViolation");
        replies.push(e.message());
    }
    // Public data the app may send: the router would use the cloud, which is not configured.
    let public = HashMap::from([
        (
            "messages",
            Variant::from(vec![HashMap::from([
                ("role".to_owned(), Variant::from("user")),
                ("content".to_owned(), Variant::from("What is the capital of France?")),
                ("scope".to_owned(), Variant::from("public")),
            ])]),
        ),
        ("route", Variant::from("cloud")),
    ]);
    assert_eq!(proxy.complete(public).await.unwrap_err().dbus_name(), "org.hearth.Hearth1.Error.CloudUnavailable");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = daemon.log();
    let seen = endpoint.seen.lock().unwrap().clone();
    assert!(seen.is_empty(), "the cloud endpoint received {} bytes", seen.len());
    for c in &canaries {
        assert!(!log.contains(c.as_str()), "canary {c} in the daemon log");
        assert!(!replies.iter().any(|r| r.contains(c.as_str())), "canary {c} in an error reply");
        assert!(!log.contains(&c[6..]), "canary digits {c} in the daemon log");
    }
    // Every decision was audited, with scopes and no content.
    let audits = log.lines().filter(|l| l.contains("hearth::audit") && l.contains("routing decision")).count();
    assert!(audits >= 13, "{audits} audit lines");
    assert!(log.contains("scopes=local,personal,public") || log.contains("scopes=public,personal,local"), "{log}");
}

/// A deterministic pseudo-random number (splitmix64) seeded by the time of this run and `i`.
fn rand_u64(i: usize) -> u64 {
    use std::sync::OnceLock;
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED
        .get_or_init(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A bare process (no sandbox, no app unit) is named by its uid and executable only, so two
/// programs one interpreter runs are one app id: Seal is NotAuthorized for it until its policy
/// sets `seal_unsandboxed = true`, and then what one seals the other can open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_process_may_seal_only_when_its_policy_opts_in() {
    let apps = apps_dir(&[]);
    let bus = Bus::start();
    let settings = Settings { apps: apps_setting(apps.path()), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    assert_eq!(proxy.caller_info().await.unwrap().app_kind, "process");
    let e = proxy.seal(b"My locker code is 4711.", HashMap::new()).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.NotAuthorized");
    assert!(e.message().contains("seal_unsandboxed = true"), "says how to opt in: {}", e.message());

    // Two scripts, one interpreter (hearthctl stands in for python3): one app id.
    let hearthctl = workspace_bin("hearthctl");
    let interpreter = process_app(nix::unistd::geteuid().as_raw(), &hearthctl);
    let scripts = tempfile::tempdir().unwrap();
    let script = |name: &str| {
        let path = scripts.path().join(name);
        std::fs::write(&path, format!("exec {:?} --bus-address {:?} \"$@\"\n", hearthctl, bus.address())).unwrap();
        path
    };
    let (notes, other) = (script("notes.sh"), script("other.sh"));
    let run = |script: &PathBuf, args: &[&str], stdin: &[u8]| {
        let mut child = Command::new("sh")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    for s in [&notes, &other] {
        let out = run(s, &["--json", "whoami"], b"");
        let who: serde_json::Value = serde_json::from_slice(&out.stdout).expect("whoami --json");
        assert_eq!((who["app_id"].as_str(), who["app_kind"].as_str()), (Some(interpreter.as_str()), Some("process")));
    }
    let out = run(&notes, &["seal"], b"Note of notes.sh");
    assert!(!out.status.success() && out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.hearth.Hearth1.Error.NotAuthorized"));

    // The admin opts both ids in: they seal, and a script's blob is open to the other script.
    std::fs::write(apps.path().join("me.toml"), format!("app = {:?}\nseal_unsandboxed = true\n", this_app())).unwrap();
    std::fs::write(apps.path().join("interp.toml"), format!("app = {interpreter:?}\nseal_unsandboxed = true\n"))
        .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    hearth_tests::wait_for(Duration::from_secs(10), "the reload", || async {
        daemon.log().contains("configuration reloaded").then_some(())
    })
    .await;
    let blob = proxy.seal(b"My locker code is 4711.", HashMap::new()).await.unwrap();
    let part = HashMap::from([("role".to_owned(), Variant::from("user")), ("sealed".to_owned(), Variant::from(blob))]);
    let request = HashMap::from([("messages", Variant::from(vec![part])), ("max_tokens", Variant::from(2u32))]);
    assert_eq!(proxy.complete(request).await.unwrap().route, "local");
    let out = run(&notes, &["seal"], b"Note of notes.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let blob_file = scripts.path().join("note.bin");
    std::fs::write(&blob_file, &out.stdout).unwrap();
    let out = run(&other, &["generate", "--max-tokens", "2", "--sealed", blob_file.to_str().unwrap(), "Hi"], b"");
    assert!(out.status.success(), "other.sh opens notes.sh's blob: {}", String::from_utf8_lossy(&out.stderr));
}
