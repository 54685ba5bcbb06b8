//! Deployment: the installed tree (scripts/install.sh) serving with its own config and bus
//! policy, the systemd watchdog protocol, and SIGHUP reloads that keep streams alive.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use hearth_dbus::{Generation, StreamEvent};
use hearth_tests::{Bus, Daemon, ModelDir, NotifySocket, Settings, chat_request, hearth, wait_for};
use nix::sys::signal::Signal;
use zbus::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installed_tree_serves_with_its_own_config_and_bus_policy() {
    let stage = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(hearth_tests::workspace_root().join("scripts/install.sh"))
        .args(["--destdir"])
        .arg(stage.path())
        .args(["--profile", "debug", "--with-model"])
        .output()
        .expect("run install.sh");
    assert!(out.status.success(), "install.sh: {}", String::from_utf8_lossy(&out.stderr));
    let root = |p: &str| stage.path().join(p.trim_start_matches('/'));
    for (path, mode) in [
        ("/usr/libexec/hearthd", 0o755),
        ("/usr/bin/hearthctl", 0o755),
        ("/usr/share/hearth/hearthd.toml", 0o644),
        ("/usr/share/dbus-1/system.d/org.hearth.Hearth1.conf", 0o644),
        ("/usr/share/dbus-1/system-services/org.hearth.Hearth1.service", 0o644),
        ("/usr/share/polkit-1/actions/org.hearth.Hearth1.policy", 0o644),
        ("/usr/lib/systemd/system/hearthd.service", 0o644),
        ("/usr/lib/sysusers.d/hearth.conf", 0o644),
        ("/usr/lib/tmpfiles.d/hearth.conf", 0o644),
    ] {
        let meta = std::fs::metadata(root(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777, mode, "{path}");
    }

    // The installed bus policy on a system-like bus; the installed vendor config, with only
    // the paths re-rooted into the stage.
    let bus = Bus::start_with_policy(&root("/usr/share/dbus-1/system.d/org.hearth.Hearth1.conf"));
    let dir = tempfile::tempdir().unwrap();
    let reroot = dir.path().join("reroot.toml");
    std::fs::write(
        &reroot,
        format!(
            "[daemon]\nstate_dir = {:?}\n[models]\ndirs = [{:?}]\n[engine]\nthreads = {}\ncontext_length = 1024\nmax_sequences = 2\n",
            dir.path().join("state").display().to_string(),
            root("/usr/share/hearth/models").display().to_string(),
            hearth_tests::threads(),
        ),
    )
    .unwrap();
    let configs: Vec<PathBuf> = vec![root("/usr/share/hearth/hearthd.toml"), reroot];
    let _daemon = Daemon::spawn(&bus, &root("/usr/libexec/hearthd"), &configs, &[], dir).await;
    let out = std::process::Command::new(root("/usr/bin/hearthctl"))
        .args(["--bus-address", bus.address(), "generate", "--max-tokens", "16"])
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let direct = hearth_tests::direct_run(&[("user", "What is the capital of France?")], hearth_tests::greedy(), 16);
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim_end(), direct.text.trim_end());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_engine_is_killed_and_restarted_while_the_watchdog_goes_on() {
    let notify = NotifySocket::new();
    let env = vec![
        ("NOTIFY_SOCKET".to_owned(), notify.path.display().to_string()),
        ("WATCHDOG_USEC".to_owned(), "400000".to_owned()),
        ("HEARTH_DEBUG_STALL_ENGINE".to_owned(), "1".to_owned()),
    ];
    let bus = Bus::start();
    let settings = Settings { env, engine: "hang_timeout_ms = 1000\n".into(), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let healthy = notify.drain(Duration::from_millis(1200));
    assert!(healthy.iter().any(|(_, m)| m.contains("READY=1")), "{healthy:?}");
    let pings = healthy.iter().filter(|(_, m)| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "a healthy daemon pings every 200 ms: {healthy:?}");

    // The first engine's first decode step hangs (debug-build test switch): its supervisor
    // kills it after the hang timeout, the request ends with EngineFailed, and hearthd, which
    // is not hung, keeps pinging the watchdog throughout.
    let conn = bus.connect().await;
    let stuck = Generation::start(&conn, chat_request("Hi", 4), "stuck").await.unwrap();
    let started = std::time::Instant::now();
    let (_, result) = hearth_tests::collect(stuck, Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert_eq!(result.error_name.clone().unwrap_or_default(), "org.hearth.Hearth1.Error.EngineFailed", "{result:?}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "ended after {took:?}");
    let during = notify.drain(Duration::from_millis(600));
    assert!(during.iter().filter(|(_, m)| m.contains("WATCHDOG=1")).count() >= 2, "pings stopped: {during:?}");
    assert!(daemon.log().contains("engine loop makes no progress: killing it"), "{}", daemon.log());
    // The restarted engine serves.
    let proxy = hearth(&conn).await;
    let r = wait_for(Duration::from_secs(20), "a request served after the restart", || async {
        proxy.complete(chat_request("Hi", 4)).await.ok()
    })
    .await;
    assert!(!r.token_ids.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_config_and_models_without_dropping_streams() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest("smollm2-135m-instruct", "m.gguf", None, "");
    let settings = Settings { models_dirs: Some(vec![dir.path().to_owned()]), ..Settings::default() };
    let bus = Bus::start();
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;

    let mut long = chat_request("List the numbers from 1 to 300, one per line.", 300);
    long.insert("model", Variant::from("smollm2-135m-instruct"));
    let mut stream = Generation::start(&conn, long, "long").await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(first, StreamEvent::Token { index: 0, .. }));

    // A new default for max_tokens and a second model, put in force with SIGHUP mid-stream.
    dir.manifest("second", "m.gguf", None, "");
    daemon.write_config(&Settings { limits: "default_max_tokens = 3\n".into(), ..settings.clone() });
    daemon.signal(Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "the reload", || async {
        daemon.log().contains("configuration reloaded").then_some(())
    })
    .await;
    let mut tokens = 1;
    let result = loop {
        match stream.next().await.expect("stream").expect("event") {
            StreamEvent::Token { .. } => tokens += 1,
            StreamEvent::Migrated { .. } => {}
            StreamEvent::Finished(r) => break r,
        }
    };
    let reason = result.finish_reason.clone();
    assert!(reason == "stop" || reason == "length", "the stream survived the reload: {reason}");
    assert_eq!(result.tokens, tokens);

    let mut no_max = HashMap::from([("messages", hearth_dbus::messages_value(&[("user", "Hi")]))]);
    assert_eq!(proxy.complete(no_max.clone()).await.unwrap().tokens, 3);
    no_max.insert("model", Variant::from("second"));
    assert_eq!(proxy.complete(no_max).await.unwrap().model.clone(), "second");

    // A broken configuration is refused; the running one stays.
    std::fs::write(daemon.config_path(), "[engine]\ncontext_length = 8\n").unwrap();
    daemon.signal(Signal::SIGHUP);
    wait_for(Duration::from_secs(10), "the refused reload", || async {
        daemon.log().contains("configuration not reloaded").then_some(())
    })
    .await;
    let no_max = HashMap::from([("messages", hearth_dbus::messages_value(&[("user", "Hi")]))]);
    assert_eq!(proxy.complete(no_max).await.unwrap().tokens, 3);
}
