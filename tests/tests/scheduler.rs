//! The scheduler with the real daemon and model: batching changes no output, foreground
//! first, fair share between apps, bounds, deadlines, and disconnects freeing KV.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hearth_dbus::{Generation, request_key};
use hearth_tests::{Bus, Daemon, Settings, chat_request, direct_run, greedy, with_priority, workspace_bin};
use zbus::MatchRule;
use zbus::Variant;
use zbus::message::Type as MessageType;

/// Collects a generation's token ids and result.
async fn finish(g: Generation) -> (Vec<i32>, hearth_tests::ResultDict) {
    let (tokens, result) = hearth_tests::collect(g, Duration::from_secs(180)).await;
    (tokens.into_iter().map(|t| t.1).collect(), result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_exactly_their_solo_tokens() {
    let prompts = hearth_tests::SIX_PROMPTS;
    let solo: Vec<Vec<i32>> = prompts.iter().map(|p| direct_run(&[("user", p)], greedy(), 32).tokens).collect();
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let mut conns = Vec::new();
    for _ in prompts {
        conns.push(bus.connect().await);
    }
    let mut gens = Vec::new();
    for (i, (conn, p)) in conns.iter().zip(prompts).enumerate() {
        gens.push(Generation::start(conn, chat_request(p, 32), &format!("c{i}")).await.expect("Generate"));
    }
    let results = futures_util::future::join_all(gens.into_iter().map(finish)).await;
    for (i, (ids, finished)) in results.iter().enumerate() {
        assert_eq!(ids, &solo[i], "client {i} ({:?}) got different tokens when batched", prompts[i]);
        let reason = finished.finish_reason.as_str();
        assert!(reason == "stop" || reason == "length", "client {i} finished with {reason}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_request_gets_its_first_token_before_background_streams_move_on() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    // All request signals of this connection, in bus order, on one stream.
    let owner = zbus::fdo::DBusProxy::new(&conn)
        .await
        .unwrap()
        .get_name_owner(zbus::names::BusName::try_from(hearth_dbus::BUS_NAME).unwrap())
        .await
        .unwrap();
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(owner.as_str())
        .path_namespace(hearth_dbus::REQUEST_PATH_PREFIX)
        .build()
        .unwrap();
    let mut all = zbus::MessageStream::for_match_rule(rule, &conn, std::num::NonZeroUsize::new(100_000)).await.unwrap();
    let mut background = Vec::new();
    for i in 0..8 {
        let g = Generation::start(
            &conn,
            with_priority("Write a long story about the ocean.", 300, "background"),
            &format!("bg{i}"),
        )
        .await
        .unwrap();
        background.push(g.path().as_str().to_owned());
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    // Wait until every background stream is decoding.
    while background.iter().any(|p| counts.get(p).copied().unwrap_or(0) < 3) {
        let msg = tokio::time::timeout(Duration::from_secs(60), all.next()).await.expect("tokens").unwrap().unwrap();
        if msg.header().member().is_some_and(|m| m.as_str() == "Token") {
            *counts.entry(msg.header().path().unwrap().to_string()).or_default() += 1;
        }
    }
    let proxy = hearth_tests::hearth(&conn).await;
    let by_priority = proxy.queue_by_priority().await.unwrap();
    assert_eq!(by_priority.get("background"), Some(&8), "{by_priority:?}");

    let at_request = counts.clone();
    let fg = Generation::start(&conn, with_priority("What is the capital of France?", 16, "interactive"), "fg")
        .await
        .unwrap();
    let fg_path = fg.path().as_str().to_owned();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), all.next()).await.expect("tokens").unwrap().unwrap();
        let h = msg.header();
        if h.member().is_none_or(|m| m.as_str() != "Token") {
            continue;
        }
        let path = h.path().unwrap().to_string();
        if path == fg_path {
            break;
        }
        *counts.entry(path).or_default() += 1;
    }
    for p in &background {
        let further = counts[p] - at_request[p];
        assert!(further <= 3, "background stream {p} got {further} tokens before the interactive request's first");
    }
    drop(fg);
}

/// Runs `hearth-load` from `exe` as a separate app. Outside a sandbox or app unit hearthd
/// knows an app by uid and executable, so a copy of the binary elsewhere is another app.
fn load_app(bus: &Bus, exe: &std::path::Path, streams: usize, max_tokens: u32) -> std::process::Child {
    Command::new(exe)
        .args([
            "--bus-address",
            bus.address(),
            "--streams",
            &streams.to_string(),
            "--max-tokens",
            &max_tokens.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("hearth-load")
}

fn load_results(child: std::process::Child) -> Vec<serde_json::Value> {
    let out = child.wait_with_output().expect("hearth-load output");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_flooding_apps_of_the_same_priority_share_fairly() {
    let bus = Bus::start();
    let settings = Settings { max_sequences: Some(2), limits: "queue_per_app = 16".into(), ..Settings::default() };
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    // App A floods first; app B arrives a moment later with as many requests.
    let other = tempfile::tempdir().unwrap();
    let exe_b = other.path().join("hearth-load-b");
    std::fs::copy(workspace_bin("hearth-load"), &exe_b).unwrap();
    let a = load_app(&bus, &workspace_bin("hearth-load"), 12, 16);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = load_app(&bus, &exe_b, 12, 16);
    let (a, b) = (load_results(a), load_results(b));
    assert!(a.iter().chain(&b).all(|r| r["tokens"] == 16), "every request got its 16 tokens: {a:?} {b:?}");
    let ends =
        |rs: &[serde_json::Value]| -> Vec<u64> { rs.iter().map(|r| r["end_ms"].as_u64().expect("finished")).collect() };
    let (a_ends, b_ends) = (ends(&a), ends(&b));
    // The window in which both apps had requests waiting: from B's arrival until either app
    // is done. FIFO would finish A's whole backlog there before any of B's.
    let b_arrival = b.iter().map(|r| r["start_ms"].as_u64().unwrap()).min().unwrap();
    let window_end = *a_ends.iter().max().unwrap().min(b_ends.iter().max().unwrap());
    let in_window = |e: &&u64| **e > b_arrival && **e <= window_end;
    let (na, nb) = (a_ends.iter().filter(in_window).count(), b_ends.iter().filter(in_window).count());
    let share = nb as f64 / (na + nb).max(1) as f64;
    assert!(na + nb >= 8, "window too small to judge: A {na}, B {nb}");
    assert!(
        (0.35..=0.65).contains(&share),
        "B's share of completions while both waited: {share:.2} (A {na}, B {nb}); tolerance 0.35..=0.65"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_bounds_busy_comes_at_once_and_kv_stays_in_budget() {
    let bus = Bus::start();
    let settings = Settings {
        max_sequences: Some(1),
        interactive_sequences: Some(0),
        limits: "queue_per_app = 1\nqueue_capacity = 4".into(),
        ..Settings::default()
    };
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth_tests::hearth(&conn).await;
    // A prompt the model answers at length (no end of generation within 400 tokens), so the
    // running request is still running when the queue is inspected, however slow the machine.
    let mut running =
        Generation::start(&conn, chat_request("Write a long story about the ocean.", 300), "run").await.unwrap();
    // Running, not waiting, before the next one comes: a request still waiting for its
    // admission (a moment after Generate returned) counts against queue_per_app.
    while !matches!(running.next().await, Some(Ok(hearth_dbus::StreamEvent::Token { .. }))) {}
    let waiting =
        Generation::start(&conn, chat_request("Write a long story about the ocean.", 300), "wait").await.unwrap();
    let t = Instant::now();
    let err = proxy.complete(chat_request("hi", 8)).await.expect_err("third request of the app");
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.Busy");
    assert!(err.message().contains("from this app"), "{}", err.message());
    // "At once": well before the running request could finish, even on a loaded machine.
    assert!(t.elapsed() < Duration::from_secs(3), "Busy came after {:?}", t.elapsed());
    let kv = proxy.kv_cache().await.unwrap();
    assert!(kv.reserved <= kv.size && kv.used <= kv.reserved, "{kv:?}");
    assert_eq!(proxy.queue_depth().await.unwrap(), 2);
    running.cancel().await.unwrap();
    waiting.cancel().await.unwrap();
    let (_, r1) = finish(running).await;
    let (_, r2) = finish(waiting).await;
    for r in [r1, r2] {
        assert_eq!(r.finish_reason, "cancelled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_cancels_with_a_clear_reason() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth_tests::hearth(&conn).await;
    let mut r = chat_request("Write a very long story about the sea.", 900);
    r.insert(request_key::DEADLINE_MS, Variant::from(400u32));
    let t = Instant::now();
    let err = proxy.complete(r).await.expect_err("deadline");
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.Cancelled");
    assert!(err.message().contains("deadline"), "{}", err.message());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_kv() {
    let bus = Bus::start();
    let daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth_tests::hearth(&conn).await;
    let mut client = Command::new(workspace_bin("hearthctl"))
        .args([
            "--bus-address",
            bus.address(),
            "generate",
            "--max-tokens",
            "900",
            "Write a very long story about the sea.",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it is generating and holds KV.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kv = proxy.kv_cache().await.unwrap();
        if kv.used > 40 {
            break;
        }
        assert!(Instant::now() < deadline, "the client never started generating: {kv:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.kill().unwrap();
    client.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let kv = proxy.kv_cache().await.unwrap();
        if kv.used == 0 && kv.reserved == 0 && proxy.queue_depth().await.unwrap() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "KV not freed after the client died: {kv:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(daemon.log().contains("caller disconnected"), "the daemon noticed the disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_reused_within_an_app_only_and_changes_no_output() {
    let prompt = "What is the capital of France?";
    let direct = direct_run(&[("user", prompt)], greedy(), 24);
    let bus = Bus::start();
    let _daemon =
        Daemon::start_configured(&bus, &Settings { engine: "prefix_cache = true".into(), ..Settings::default() }).await;
    let conn = bus.connect().await;
    let proxy = hearth_tests::hearth(&conn).await;

    let first = proxy.complete(chat_request(prompt, 24)).await.unwrap();
    assert_eq!(first.cached_tokens, 0);
    assert_eq!(first.token_ids.clone(), direct.tokens);

    // The same app asks again: all but the last prompt token come from the cache, and the
    // answer is still exactly the solo answer.
    let again = proxy.complete(chat_request(prompt, 24)).await.unwrap();
    assert_eq!(again.cached_tokens, again.prompt_tokens - 1);
    assert_eq!(again.token_ids.clone(), direct.tokens);

    // A follow-up turn reuses the whole first exchange.
    let answer = first.text.clone();
    let mut follow_up = chat_request("", 8);
    follow_up.insert(
        request_key::MESSAGES,
        hearth_dbus::messages_value(&[("user", prompt), ("assistant", &answer), ("user", "And of Italy?")]),
    );
    let turn = proxy.complete(follow_up).await.unwrap();
    assert!(turn.cached_tokens >= first.prompt_tokens, "follow-up reused {} tokens", turn.cached_tokens);

    // Another app (its own process) with the very same prompt gets no cache hit.
    let out = Command::new(workspace_bin("hearthctl"))
        .args(["--bus-address", bus.address(), "--json", "generate", "--max-tokens", "24", prompt])
        .output()
        .unwrap();
    assert!(out.status.success());
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(last["finished"]["cached_tokens"], 0, "another app must not hit this app's cache");
    let kv = proxy.kv_cache().await.unwrap();
    assert!(kv.cached > 0, "{kv:?}");
}

/// Preemption loses nothing: 64 clients of 8 apps, background, normal and interactive mixed
/// and arriving staggered, so interactive arrivals abort steps that batch several sequences.
/// Every request gets all its tokens; none is failed by the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_priorities_under_load_fail_no_request() {
    let bus = Bus::start();
    let settings = Settings { limits: "queue_per_app = 16\nqueue_capacity = 128".into(), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let apps = tempfile::tempdir().unwrap();
    // Normal and background apps start their streams at once; the interactive app starts its
    // (short) ones one by one, so each arrival finds a step of several lower-priority
    // sequences to abort.
    let priorities = ["background", "normal", "background", "normal", "background", "normal", "normal", "interactive"];
    let mut children = Vec::new();
    for (i, priority) in priorities.iter().enumerate() {
        let exe = apps.path().join(format!("hearth-load-{i}"));
        std::fs::copy(workspace_bin("hearth-load"), &exe).unwrap();
        let (tokens, stagger) = if *priority == "interactive" { ("4", "450") } else { ("12", "0") };
        let child = Command::new(&exe)
            .args(["--bus-address", bus.address(), "--streams", "8", "--max-tokens", tokens, "--priority", priority])
            .args(["--stagger-ms", stagger])
            .stdout(Stdio::piped())
            .spawn()
            .expect("hearth-load");
        children.push((*priority, child));
        tokio::time::sleep(Duration::from_millis(if *priority == "interactive" { 100 } else { 150 })).await;
    }
    let mut by_priority: HashMap<&str, usize> = HashMap::new();
    for (priority, child) in children {
        for r in load_results(child) {
            assert!(r.get("error").is_none(), "a {priority} request failed: {r}\n{}", daemon.log());
            let want = if priority == "interactive" { 4 } else { 12 };
            assert_eq!(r["tokens"], want, "a {priority} request ended early: {r}\n{}", daemon.log());
            *by_priority.entry(priority).or_default() += 1;
        }
    }
    assert_eq!(by_priority.values().sum::<usize>(), 64);
    let log = daemon.log();
    let preempted = log.matches("decode step preempted").count();
    eprintln!("64 requests, 0 failed; {preempted} decode steps preempted");
    assert!(!log.contains("decode failed"), "{log}");
}

/// Interactive requests the engine then refuses (here: prompts longer than the context) may
/// not be used to abort every decode step: a background stream keeps making progress while
/// an app floods them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_interactive_requests_cannot_stall_the_engine() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let mut bg = Generation::start(&conn, with_priority("Write a long story about the sea.", 600, "background"), "bg")
        .await
        .unwrap();
    while !matches!(bg.next().await, Some(Ok(hearth_dbus::StreamEvent::Token { .. }))) {}
    // Its rate without the flood, on this machine as loaded now (other tests run beside).
    async fn tokens_in(bg: &mut Generation, window: Duration) -> u32 {
        let until = Instant::now() + window;
        let mut n = 0;
        while let Ok(Some(Ok(ev))) = tokio::time::timeout_at(until.into(), bg.next()).await {
            n += u32::from(matches!(ev, hearth_dbus::StreamEvent::Token { .. }));
        }
        n
    }
    let before = tokens_in(&mut bg, Duration::from_secs(2)).await;
    let flooder = bus.connect().await;
    let flood = tokio::spawn(async move {
        let proxy = hearth_tests::hearth(&flooder).await;
        let too_long = with_priority(&"word ".repeat(1100), 8, "interactive");
        let (until, mut refused) = (Instant::now() + Duration::from_secs(3), 0);
        while Instant::now() < until {
            let e = proxy.complete(too_long.clone()).await.expect_err("longer than the context");
            assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.ContextLengthExceeded");
            refused += 1;
        }
        refused
    });
    let mut during = 0;
    while !flood.is_finished() {
        if let Ok(Some(Ok(hearth_dbus::StreamEvent::Token { .. }))) =
            tokio::time::timeout(Duration::from_millis(100), bg.next()).await
        {
            during += 1;
        }
    }
    let refused = flood.await.unwrap();
    eprintln!(
        "{refused} refused interactive requests in 3 s; the background stream got {during} tokens meanwhile ({before} in 2 s before)"
    );
    assert!(refused > 20, "the flood was too slow to test anything: {refused}");
    // Each refused request costs the stream at most one aborted step per hold-off: it goes
    // on at a good part of its rate (a stall would leave it a token or two).
    assert!(
        during * 2 >= before && during >= 10,
        "the background stream got {during} tokens in 3 s of refused interactive requests, {before} in 2 s before"
    );
    bg.cancel().await.unwrap();
}
