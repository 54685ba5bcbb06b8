//! The engine as a sandboxed child process, against the real daemon and model: an engine that
//! dies mid-stream fails only its own callers with Error.EngineFailed, comes back, and its
//! sessions answer as a fresh run of their transcripts; hearthd lives on. The engine's
//! sandbox is what it says, checked in /proc and by its own attempts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hearth_dbus::{Generation, SessionProxy, messages_value, request_key as key};
use hearth_tests::{Bus, Daemon, ModelDir, Settings, chat_request, direct_run, greedy, hearth, wait_for};
use zbus::Variant;

const DEFAULT: &str = "smollm2-135m-instruct";

fn turn(user: &str, max_tokens: u32) -> HashMap<&'static str, Variant<'static>> {
    HashMap::from([(key::MESSAGES, messages_value(&[("user", user)])), (key::MAX_TOKENS, Variant::from(max_tokens))])
}

/// The ListModels entry of `model`.
async fn entry(proxy: &hearth_dbus::Hearth1Proxy<'_>, model: &str) -> hearth_dbus::ModelInfo {
    let models = proxy.list_models().await.unwrap();
    models.into_iter().find(|m| m.name == model).expect("model listed")
}

/// The engine process of `model`, when it is loaded.
async fn engine_pid(proxy: &hearth_dbus::Hearth1Proxy<'_>, model: &str) -> Option<u32> {
    entry(proxy, model).await.engine_pid
}

/// `/proc/PID/status` as key → value.
fn proc_status(pid: u32) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.to_owned(), v.trim().to_owned())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_dies_mid_stream_fails_its_callers_only_and_comes_back() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest(DEFAULT, "m.gguf", None, "");
    dir.manifest("second", "m.gguf", None, "");
    let settings = Settings { models_dirs: Some(vec![dir.path().to_owned()]), ..Settings::default() };
    let bus = Bus::start();
    let mut daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;

    // A session with one turn done, its KV resident in the engine that will die.
    const FIRST: &str = "My name is Ada and I live in Lisbon. Say hello.";
    const SECOND: &str = "Where do I live?";
    let path = proxy.open_session(HashMap::new()).await.unwrap();
    let session = SessionProxy::builder(&conn).path(path.clone()).build().await.unwrap();
    let r1 = session.complete(turn(FIRST, 24)).await.expect("turn 1");

    // A stream on each model, both decoding.
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let doomed = Generation::start(&conn, chat_request("Write a long story about a lighthouse keeper.", 400), "doomed")
        .await
        .unwrap();
    let doomed = hearth_tests::watch_stream(doomed, std::sync::Arc::clone(&count));
    let mut other_request = chat_request("Count from one to twenty.", 60);
    other_request.insert(key::MODEL, Variant::from("second"));
    let other_count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let other = Generation::start(&conn, other_request, "other").await.unwrap();
    let other = hearth_tests::watch_stream(other, std::sync::Arc::clone(&other_count));
    wait_for(Duration::from_secs(60), "both streams decoding", || async {
        (count.load(std::sync::atomic::Ordering::SeqCst) >= 4
            && other_count.load(std::sync::atomic::Ordering::SeqCst) >= 2)
            .then_some(())
    })
    .await;

    // The default model's engine dies (as an abort() in llama.cpp would end it).
    let pid = engine_pid(&proxy, DEFAULT).await.expect("the default model runs in an engine process");
    let other_pid = engine_pid(&proxy, "second").await.expect("the second model runs in its own engine process");
    assert_ne!(pid, other_pid);
    assert_ne!(pid, daemon.pid().as_raw() as u32, "the engine is not hearthd");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let died = Instant::now();
    let seen = tokio::time::timeout(Duration::from_secs(5), doomed).await.expect("the doomed stream ended").unwrap();
    let failed_in = died.elapsed();
    let result = seen.result.expect("Finished");
    assert_eq!(result.finish_reason.clone(), "error", "{result:?}");
    assert_eq!(result.error_name.clone().unwrap_or_default(), "org.hearth.Hearth1.Error.EngineFailed", "{result:?}");
    assert!(failed_in < Duration::from_secs(1), "the caller heard of the failure {failed_in:?} after it");

    // The other model's stream is untouched.
    let seen = tokio::time::timeout(Duration::from_secs(60), other).await.expect("the other stream ended").unwrap();
    let result = seen.result.expect("Finished");
    assert!(["stop", "length"].contains(&result.finish_reason.as_str()), "{result:?}");
    assert_eq!(engine_pid(&proxy, "second").await, Some(other_pid));

    // The engine is back within 2 s, a new process.
    let back = wait_for(Duration::from_secs(10), "the engine restarted", || async {
        engine_pid(&proxy, DEFAULT).await.filter(|p| *p != pid)
    })
    .await;
    let back_in = died.elapsed();
    assert!(back_in < Duration::from_secs(2), "the engine was back {back_in:?} after it died");
    assert_ne!(back, pid);
    let memory = proxy.memory().await.unwrap();
    assert_eq!(memory.engine_failures, 1);

    // The session kept its transcript: its next turn recomputes the KV and answers exactly as
    // a fresh run of the whole conversation.
    let r2 = session.complete(turn(SECOND, 24)).await.expect("turn 2");
    let fresh = direct_run(&[("user", FIRST), ("assistant", &r1.text), ("user", SECOND)], greedy(), 24);
    assert_eq!(r2.token_ids, fresh.tokens);
    assert_eq!(r2.cached_tokens, 0, "the dead engine's KV is gone: {r2:?}");

    // hearthd never exited, and says what happened without app content.
    assert!(daemon.try_exit().is_none(), "hearthd exited");
    let log = daemon.log();
    assert!(log.contains("engine process died") && log.contains("restarting the engine"), "{log}");
    assert!(!log.contains("Ada") && !log.contains("Lisbon"), "app text reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_runs_sandboxed_away_from_the_state_directory_the_key_and_the_network() {
    let bus = Bus::start();
    let daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    proxy.complete(chat_request("Hi", 2)).await.unwrap();
    let e = entry(&proxy, DEFAULT).await;
    let pid = e.engine_pid.expect("a loaded model has an engine");

    // The kernel's view: a child of hearthd, same user, no new privileges, seccomp filtering
    // with two filters more than hearthd has (its own clone3 and allowlist filters), landlock.
    let status = proc_status(pid);
    let own = proc_status(daemon.pid().as_raw() as u32);
    assert_eq!(status["PPid"], daemon.pid().as_raw().to_string());
    assert_eq!(status["Uid"], own["Uid"]);
    assert_eq!(status["NoNewPrivs"], "1", "{status:?}");
    assert_eq!(status["Seccomp"], "2", "filter mode: {status:?}");
    let filters = |s: &HashMap<String, String>| s.get("Seccomp_filters").map_or(0, |v| v.parse::<u32>().unwrap());
    assert!(filters(&status) >= filters(&own) + 2, "{status:?} vs hearthd {own:?}");
    let abi = e.sandbox_landlock_abi.unwrap();
    if abi > 0 {
        assert_eq!(e.sandbox_landlock.as_deref(), Some("full"), "{e:?}");
    }
    assert_eq!(e.sandbox_seccomp, Some(true));

    // Its own attempts: the state directory, the sealing key and "/" do not open (landlock says
    // EACCES, then the allowlist EPERM), and no socket can be made.
    let probes = e.sandbox_probes.clone().unwrap();
    let state = daemon.state_dir();
    for path in ["/".to_owned(), state.display().to_string(), state.join("seal.key").display().to_string()] {
        let (_, what) = probes.iter().find(|(p, _)| *p == path).unwrap_or_else(|| panic!("{path} probed: {probes:?}"));
        let expected = if abi > 0 { "EACCES, then EPERM" } else { "EPERM" };
        assert!(what.ends_with(expected) && !what.contains("opened"), "{path}: {what}");
    }
    assert!(state.join("seal.key").exists(), "the key the engine could not open is there");
    assert_eq!(e.sandbox_socket.as_deref(), Some("EPERM"));

    // What it holds: stdio and its socket to hearthd, and nothing of the state directory.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap();
        assert!(!target.starts_with(&state), "the engine holds {}", target.display());
    }
    // And still serves.
    let r = proxy.complete(chat_request("What is the capital of France?", 8)).await.unwrap();
    assert_eq!(r.token_ids, direct_run(&[("user", "What is the capital of France?")], greedy(), 8).tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_finishes_quickly_and_idles_is_not_taken_for_a_hung_one() {
    let bus = Bus::start();
    let settings = Settings { engine: "hang_timeout_ms = 300\n".into(), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    proxy.complete(chat_request("Hi", 1)).await.unwrap();
    let pid = engine_pid(&proxy, DEFAULT).await.unwrap();
    // Work that ends between two heartbeats (one token; a refusal by the engine), then idle
    // for many times the hang timeout: the engine stays.
    for _ in 0..5 {
        proxy.complete(chat_request("Hi", 1)).await.unwrap();
        let mut bad = chat_request("Hi", 1);
        bad.insert(key::ADAPTERS, Variant::from(HashMap::from([("no-such-adapter", 1.0f64)])));
        assert!(proxy.complete(bad).await.is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(engine_pid(&proxy, DEFAULT).await, Some(pid), "{}", daemon.log());
    assert_eq!(proxy.memory().await.unwrap().engine_failures, 0);
}
