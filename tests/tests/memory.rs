//! The memory ceiling hearthd enforces on its own heap, against the real daemon: in-flight
//! device work ends, new work and model loads are refused with Error.Busy while over, work
//! resumes below 90% of it, and at 5/4 of it hearthd exits with status 3.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hearth_dbus::Generation;
use hearth_tests::{Bus, Daemon, ModelDir, Settings, chat_request, hearth, wait_for};
use zbus::Variant;

/// A copy of a real /proc/PID/status with `RssAnon` set to `mib`, written atomically (the
/// daemon reads it every 100 ms as its own memory use).
fn write_usage(path: &std::path::Path, mib: u64) {
    let real = std::fs::read_to_string("/proc/self/status").unwrap();
    let text: String = real
        .lines()
        .map(|l| if l.starts_with("RssAnon:") { format!("RssAnon:\t{} kB", mib * 1024) } else { l.to_owned() })
        .map(|l| l + "\n")
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_ceiling_ends_device_work_refuses_new_work_and_exits_before_the_oom_killer() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest("smollm2-135m-instruct", "m.gguf", None, "");
    dir.manifest("second", "m.gguf", None, "");
    let usage = dir.path().join("status");
    write_usage(&usage, 100);
    let settings = Settings {
        memory: format!("ceiling_mib = 1000\nusage_file = {:?}\n", usage.display().to_string()),
        models_dirs: Some(vec![dir.path().to_owned()]),
        ..Settings::default()
    };
    let bus = Bus::start();
    let mut daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    proxy.complete(chat_request("Hi", 2)).await.unwrap();

    // Two streams decoding and an Embed of many texts in flight when the heap hits the ceiling.
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut streams = Vec::new();
    for i in 0..2 {
        let g = Generation::start(&conn, chat_request("Count from one to a thousand.", 400), &format!("c{i}"))
            .await
            .unwrap();
        streams.push(hearth_tests::watch_stream(g, std::sync::Arc::clone(&count)));
    }
    let embed = tokio::spawn({
        let proxy = proxy.clone();
        let texts: Vec<String> = (0..60).map(|i| format!("sentence {i} to embed. ").repeat(40)).collect();
        async move { proxy.embed(HashMap::from([("texts", Variant::from(texts))])).await }
    });
    wait_for(Duration::from_secs(30), "both streams decoding", || async {
        (count.load(std::sync::atomic::Ordering::SeqCst) >= 8).then_some(())
    })
    .await;
    write_usage(&usage, 1100);
    let over = Instant::now();
    for s in streams {
        let seen = tokio::time::timeout(Duration::from_secs(5), s).await.expect("stream ended").unwrap();
        let result = seen.result.expect("Finished");
        assert_eq!(result.finish_reason.clone(), "error");
        assert_eq!(result.error_name.clone().unwrap_or_default(), "org.hearth.Hearth1.Error.Busy");
        assert!(result.error_message.clone().unwrap_or_default().contains("memory ceiling"), "{result:?}");
    }
    let embedded = tokio::time::timeout(Duration::from_secs(5), embed).await.expect("embed ended").unwrap();
    assert_eq!(embedded.expect_err("the Embed must end").dbus_name(), "org.hearth.Hearth1.Error.Busy");
    let took = over.elapsed();
    assert!(took < Duration::from_secs(1), "in-flight work ended {took:?} after the ceiling was reached");

    // While over: new device work is refused with a named error; the daemon answers reads.
    let memory = proxy.memory().await.unwrap();
    assert!(memory.over_ceiling);
    assert_eq!(memory.ceiling_hits, 1);
    assert_eq!(memory.ceiling_bytes, 1000 << 20);
    let e = proxy.complete(chat_request("Hi", 2)).await.expect_err("refused over the ceiling");
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.Busy", "{e}");
    assert!(proxy.queue_depth().await.is_ok());
    // Nor does a model load (a whole new context) start while over.
    let mut second = chat_request("Hi", 2);
    second.insert("model", Variant::from("second"));
    let e = proxy.complete(second).await.expect_err("no load over the ceiling");
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.Busy", "{e}");
    assert_eq!(proxy.loaded_models().await.unwrap(), vec!["smollm2-135m-instruct".to_owned()]);
    // Between 90% and the ceiling it stays over (hysteresis); below 90% work resumes.
    write_usage(&usage, 950);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(proxy.complete(chat_request("Hi", 2)).await.is_err());
    write_usage(&usage, 800);
    wait_for(Duration::from_secs(5), "the ceiling to clear", || async {
        (!proxy.memory().await.unwrap().over_ceiling).then_some(())
    })
    .await;
    proxy.complete(chat_request("Hi", 2)).await.unwrap();

    // Memory use that cannot be read is a ceiling not enforced, not one that refuses forever.
    write_usage(&usage, 1100);
    wait_for(Duration::from_secs(5), "over again", || async {
        proxy.memory().await.unwrap().over_ceiling.then_some(())
    })
    .await;
    std::fs::write(&usage, "unreadable\n").unwrap();
    wait_for(Duration::from_secs(5), "the stale verdict to clear", || async {
        (!proxy.memory().await.unwrap().over_ceiling).then_some(())
    })
    .await;
    proxy.complete(chat_request("Hi", 2)).await.unwrap();

    // At 5/4 of the ceiling (growth inside a call nobody can stop) hearthd exits non-zero,
    // so the service manager restarts it, rather than the kernel killing some app.
    write_usage(&usage, 1300);
    let status = daemon.wait_exit(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(3), "{status}");
    assert!(daemon.log().contains("memory ceiling far exceeded"), "{}", daemon.log());
}

/// A `/proc`-like tree with `RssAnon` of `pid` set to `mib`.
fn write_pid_usage(tree: &std::path::Path, pid: u32, mib: u64) {
    let dir = tree.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    write_usage(&dir.join("status"), mib);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_far_over_the_ceiling_is_killed_and_restarted_while_hearthd_serves_on() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest("smollm2-135m-instruct", "m.gguf", None, "");
    let tree = dir.path().join("proc");
    std::fs::create_dir(&tree).unwrap();
    let settings = Settings {
        memory: format!("ceiling_mib = 1000\nusage_file = {:?}\n", tree.display().to_string()),
        models_dirs: Some(vec![dir.path().to_owned()]),
        ..Settings::default()
    };
    let bus = Bus::start();
    let mut daemon = Daemon::start_configured(&bus, &settings).await;
    let hearthd = daemon.pid().as_raw() as u32;
    write_pid_usage(&tree, hearthd, 100);
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    proxy.complete(chat_request("Hi", 2)).await.unwrap();
    let engine_pid = || async {
        let models = proxy.list_models().await.unwrap();
        models.iter().find(|m| m.loaded).and_then(|m| m.engine_pid)
    };
    let first = engine_pid().await.expect("a loaded engine");

    // The engine's heap runs away while it decodes for a caller.
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = Generation::start(&conn, chat_request("Count from one to a thousand.", 400), "c").await.unwrap();
    let stream = hearth_tests::watch_stream(g, std::sync::Arc::clone(&count));
    wait_for(Duration::from_secs(30), "the stream decoding", || async {
        (count.load(std::sync::atomic::Ordering::SeqCst) >= 4).then_some(())
    })
    .await;
    write_pid_usage(&tree, first, 1300);
    let seen = tokio::time::timeout(Duration::from_secs(5), stream).await.expect("stream ended").unwrap();
    let result = seen.result.expect("Finished");
    assert_eq!(result.finish_reason.clone(), "error", "{result:?}");
    wait_for(Duration::from_secs(5), "the engine to be killed", || async {
        (!std::path::Path::new(&format!("/proc/{first}")).exists()).then_some(())
    })
    .await;
    // Told once, however many readings see it go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::remove_dir_all(tree.join(first.to_string())).unwrap();
    let kills = daemon.log().matches("memory ceiling far exceeded by an engine").count();
    assert_eq!(kills, 1, "{}", daemon.log());

    // hearthd did not exit: it answers, with a new engine, and the ceiling is clear again.
    let r = proxy.complete(chat_request("Say hello.", 8)).await.expect("served after the kill");
    assert!(r.tokens > 0);
    let second = engine_pid().await.expect("a loaded engine");
    assert_ne!(first, second, "the engine was restarted");
    let memory = proxy.memory().await.unwrap();
    assert!(!memory.over_ceiling && memory.engine_failures >= 1, "{memory:?}");

    // hearthd's own heap far over the ceiling: no engine's death would help, so it exits.
    write_pid_usage(&tree, hearthd, 1300);
    let status = daemon.wait_exit(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(3), "{status}");
}
