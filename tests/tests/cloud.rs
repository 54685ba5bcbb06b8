//! The cloud leg against an OpenAI-compatible stand-in with fault injection: streaming,
//! fallback to the device, live migration mid-stream, the circuit breaker, privacy, and the
//! API key that never shows.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hearth_dbus::{Generation, StreamEvent};
use hearth_tests::cloud_standin::{CloudStandIn, Fault, WORDS};
use hearth_tests::{Bus, Daemon, Settings, hearth, workspace_bin};
use zbus::Variant;

const QUESTION: &str = "What is the capital of France?";

struct Setup {
    standin: CloudStandIn,
    bus: Bus,
    daemon: Daemon,
    key: String,
    _dirs: Vec<tempfile::TempDir>,
}

/// hearthd with the stand-in as its cloud, an API key in a 0600 file, and this test process
/// allowed to send public data to the cloud.
async fn setup(endpoint: Option<String>, breaker_failures: u32) -> Setup {
    setup_with(endpoint, breaker_failures, String::new()).await
}

async fn setup_with(endpoint: Option<String>, breaker_failures: u32, governor: String) -> Setup {
    setup_knobs(endpoint, breaker_failures, governor, 800, 30).await
}

/// [`setup_with`], with the cloud's first-byte and idle timeouts and the breaker's cooldown.
async fn setup_knobs(
    endpoint: Option<String>,
    breaker_failures: u32,
    governor: String,
    timeout_ms: u64,
    cooldown_s: u64,
) -> Setup {
    use std::os::unix::fs::PermissionsExt;
    let standin = CloudStandIn::start().await;
    let secrets = tempfile::tempdir().unwrap();
    let key = format!("sk-hearth-test-{:x}", u64::from(std::process::id()) * 7919 + 17);
    let key_file = secrets.path().join("cloud.key");
    std::fs::write(&key_file, &key).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let apps = tempfile::tempdir().unwrap();
    std::fs::set_permissions(apps.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let me = format!("uid:0:{}", std::fs::read_link("/proc/self/exe").unwrap().display());
    let hearthctl = format!("uid:0:{}", workspace_bin("hearthctl").display());
    for (i, app) in [me, hearthctl].iter().enumerate() {
        std::fs::write(
            apps.path().join(format!("{i}.toml")),
            format!("app = {app:?}\ncloud = true\ncloud_scopes = [\"public\"]\n"),
        )
        .unwrap();
    }
    let bus = Bus::start();
    let settings = Settings {
        apps: format!("dirs = [{:?}]\n", apps.path().display().to_string()),
        cloud: format!(
            "enabled = true\nendpoint = {:?}\nmodel = \"standin-1\"\napi_key_file = {:?}\nretries = 1\nfirst_byte_timeout_ms = {timeout_ms}\nidle_timeout_ms = {timeout_ms}\nbreaker_failures = {breaker_failures}\nbreaker_cooldown_s = {cooldown_s}\n",
            endpoint.unwrap_or_else(|| standin.endpoint()),
            key_file.display().to_string()
        ),
        governor,
        ..Settings::default()
    };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    Setup { standin, bus, daemon, key, _dirs: vec![secrets, apps] }
}

fn public_request(text: &str, route: &str, max_tokens: u32) -> HashMap<&'static str, Variant<'static>> {
    let part = HashMap::from([
        ("role".to_owned(), Variant::from("user")),
        ("content".to_owned(), Variant::from(text.to_owned())),
        ("scope".to_owned(), Variant::from("public")),
    ]);
    HashMap::from([
        ("messages", Variant::from(vec![part])),
        ("route", Variant::from(route.to_owned())),
        ("max_tokens", Variant::from(max_tokens)),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_requests_stream_from_the_cloud_and_the_key_never_shows() {
    let s = setup(None, 2).await;
    let conn = s.bus.connect().await;
    let proxy = hearth(&conn).await;
    assert!(proxy.cloud_available().await.unwrap());
    let r = proxy.complete(public_request(QUESTION, "cloud", 64)).await.unwrap();
    assert_eq!(r.route.clone(), "cloud");
    assert_eq!(r.text.clone(), WORDS.concat());
    assert_eq!(r.model.clone(), "standin-1");
    // Counted as streamed (one per chunk); no local token ids for cloud text.
    assert_eq!(r.tokens as usize, WORDS.len(), "the cloud's chunks count as tokens");
    assert!(r.token_ids.clone().is_empty(), "no local token ids for cloud text");
    let recorded = s.standin.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].authorization.as_deref(), Some(format!("Bearer {}", s.key).as_str()));
    let body: serde_json::Value = serde_json::from_str(&recorded[0].body).unwrap();
    assert_eq!(body["messages"][0]["content"], QUESTION, "public data does reach the cloud");
    assert_eq!((body["model"].as_str(), body["stream"].as_bool()), (Some("standin-1"), Some(true)));

    // Stop sequences and the OpenAI penalties go to the cloud, and hearthd applies the stops
    // itself too (the stand-in, like some endpoints, ignores them): the text ends exactly
    // before the first, which here spans two chunks, and the pieces add up to it.
    let mut r = public_request(QUESTION, "cloud", 64);
    r.insert("stop", Variant::from(vec!["tal of", "Seine"]));
    r.insert("frequency_penalty", Variant::from(0.5f64));
    let (pieces, result) =
        hearth_tests::collect(Generation::start(&conn, r, "stopped").await.unwrap(), Duration::from_secs(30)).await;
    assert_eq!(result.text, "Paris is the capi");
    assert_eq!((result.finish_reason.as_str(), result.route.as_str()), ("stop", "cloud"));
    assert_eq!(pieces.iter().map(|p| p.2.as_str()).collect::<String>(), result.text);
    let body: serde_json::Value = serde_json::from_str(&s.standin.requests().last().unwrap().body).unwrap();
    assert_eq!(body["stop"], serde_json::json!(["tal of", "Seine"]));
    assert_eq!(body["frequency_penalty"], 0.5);
    assert!(body.get("presence_penalty").is_none(), "only what was asked for");

    // hearthctl status says the cloud is there.
    let status = std::process::Command::new(workspace_bin("hearthctl"))
        .args(["--bus-address", s.bus.address(), "--json", "status"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["cloud_available"], true, "{status}");
    // Streamed as Token signals (token_id -1) through hearthctl; no key anywhere.
    let out = std::process::Command::new(workspace_bin("hearthctl"))
        .args([
            "--bus-address",
            s.bus.address(),
            "--json",
            "generate",
            "--route",
            "cloud",
            "--scope",
            "public",
            QUESTION,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.contains("\"token_id\":-1")).count(), WORDS.len());
    for text in [stdout, String::from_utf8_lossy(&out.stderr).into_owned(), s.daemon.log()] {
        assert!(!text.contains(&s.key), "the API key leaked");
    }

    // Added latency of the cloud leg: time to first token through hearthd vs straight from
    // the stand-in, with a 100 ms first byte as a real endpoint would have.
    s.standin.set_fault(Fault::DelayFirstByte(Duration::from_millis(100)));
    let mut via = Vec::new();
    let mut direct = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let mut g = Generation::start(&conn, public_request(QUESTION, "cloud", 64), &format!("lat{i}")).await.unwrap();
        while let Some(ev) = g.next().await {
            if matches!(ev.unwrap(), StreamEvent::Token { .. }) {
                via.push(t.elapsed().as_secs_f64() * 1e3);
                break;
            }
        }
        while let Some(ev) = g.next().await {
            if matches!(ev.unwrap(), StreamEvent::Finished(_)) {
                break;
            }
        }
        direct.push(direct_first_chunk_ms(&s.standin.endpoint()).await);
    }
    via.sort_by(f64::total_cmp);
    direct.sort_by(f64::total_cmp);
    eprintln!(
        "cloud TTFT: via hearthd {:.1} ms, straight from the stand-in {:.1} ms (medians), ratio {:.3}",
        via[2],
        direct[2],
        via[2] / direct[2]
    );
}

/// Milliseconds to the first SSE chunk when asking the stand-in directly over plain HTTP.
async fn direct_first_chunk_ms(endpoint: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = endpoint.trim_start_matches("http://").trim_end_matches("/v1").to_owned();
    let body = serde_json::json!({"model": "standin-1", "stream": true,
        "messages": [{"role": "user", "content": QUESTION}]})
    .to_string();
    let t = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    loop {
        let n = tcp.read(&mut buf).await.unwrap();
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(6).any(|w| w == b"data: ") || n == 0 {
            return t.elapsed().as_secs_f64() * 1e3;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_stream_that_breaks_off_continues_on_the_device() {
    let s = setup(None, 2).await;
    s.standin.set_fault(Fault::DropAfter(4));
    let conn = s.bus.connect().await;
    // The device model loaded, as on a phone that uses it (the gap then is the switch itself).
    hearth(&conn).await.complete(hearth_tests::chat_request("Hi", 1)).await.unwrap();
    let mut g = Generation::start(&conn, public_request(QUESTION, "cloud", 24), "mig").await.unwrap();
    let (mut cloud, mut local, mut migrated_at) = (Vec::new(), Vec::new(), None);
    let (mut last_cloud, mut first_local) = (None, None);
    let result = loop {
        match g.next().await.unwrap().unwrap() {
            StreamEvent::Token { index, token_id, text } if migrated_at.is_none() => {
                assert_eq!((index as usize, token_id), (cloud.len(), -1));
                cloud.push(text);
                last_cloud = Some(Instant::now());
            }
            StreamEvent::Token { index, token_id, text } => {
                assert_eq!(index as usize, cloud.len() + local.len(), "indices continue without a gap");
                assert!(token_id >= 0);
                first_local.get_or_insert_with(Instant::now);
                local.push(text);
            }
            StreamEvent::Migrated { from, to, index } => {
                assert_eq!((from.as_str(), to.as_str(), index), ("cloud", "local", 4));
                migrated_at = Some(index);
            }
            StreamEvent::Finished(r) => break r,
        }
    };
    assert_eq!(cloud.concat(), WORDS[..4].concat(), "the cloud's tokens, once each");
    assert!(!local.is_empty());
    assert_eq!(result.route.clone(), "cloud+local");
    assert_eq!(result.text.clone(), format!("{}{}", cloud.concat(), local.concat()));
    // The device was given exactly the prompt and the text so far.
    let direct = hearth_tests::direct_run_continuing(
        &[("user", QUESTION)],
        &cloud.concat(),
        hearth_tests::greedy(),
        local.len(),
    );
    assert_eq!(local.concat(), direct.text);
    let gap = first_local.unwrap().duration_since(last_cloud.unwrap());
    eprintln!(
        "migration gap: {:.1} ms between the last cloud token and the first device token",
        gap.as_secs_f64() * 1e3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_the_first_token_fall_back_to_the_device() {
    let s = setup(None, 100).await;
    let conn = s.bus.connect().await;
    let proxy = hearth(&conn).await;
    let local = hearth_tests::direct_run(&[("user", QUESTION)], hearth_tests::greedy(), 8);
    for fault in
        [Fault::Status(500), Fault::Status(429), Fault::Malformed, Fault::DelayFirstByte(Duration::from_millis(1500))]
    {
        s.standin.set_fault(fault.clone());
        let r = proxy.complete(public_request(QUESTION, "cloud", 8)).await.unwrap();
        assert_eq!(r.route.clone(), "local", "{fault:?}");
        assert!(r.route_reason.clone().contains("the cloud failed before the first token"), "{fault:?}");
        assert_eq!(r.text.clone(), local.text, "{fault:?}");
    }
    // A slow drip within the idle timeout is still a stream.
    s.standin.set_fault(Fault::SlowDrip(Duration::from_millis(100)));
    let r = proxy.complete(public_request(QUESTION, "cloud", 64)).await.unwrap();
    assert_eq!((r.route.clone().as_str(), r.text.clone()), ("cloud", WORDS.concat()));
    // 500, 429 and the first-byte timeout were retried once each (retries = 1); a malformed
    // stream is not retried: 2 + 2 + 1 + 2 + 1 requests.
    assert_eq!(s.standin.requests().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_opens_the_breaker_with_one_log_line() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let s = setup(Some(endpoint), 2).await;
    let conn = s.bus.connect().await;
    let proxy = hearth(&conn).await;
    for _ in 0..4 {
        let r = proxy.complete(public_request(QUESTION, "cloud", 4)).await.unwrap();
        assert_eq!(r.route.clone(), "local");
    }
    assert!(!proxy.cloud_available().await.unwrap(), "the breaker is open");
    let log = s.daemon.log();
    assert_eq!(log.matches("cloud unreachable").count(), 1, "one line, not a storm:\n{log}");
    // auto never picks an unavailable cloud.
    let r = proxy.complete(public_request(QUESTION, "auto", 4)).await.unwrap();
    assert_eq!(r.route.clone(), "local");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_never_reach_the_real_forwarder_and_public_data_does() {
    let s = setup(None, 2).await;
    let conn = s.bus.connect().await;
    let proxy = hearth(&conn).await;
    let canary =
        format!("CANARY{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    for (scope, route) in [("local", "cloud"), ("personal", "cloud"), ("local", "auto"), ("personal", "auto")] {
        let part = HashMap::from([
            ("role".to_owned(), Variant::from("user")),
            ("content".to_owned(), Variant::from(format!("Send this to the cloud: {canary}"))),
            ("scope".to_owned(), Variant::from(scope)),
        ]);
        let public = HashMap::from([
            ("role".to_owned(), Variant::from("user")),
            ("content".to_owned(), Variant::from("Public question for the cloud.")),
            ("scope".to_owned(), Variant::from("public")),
        ]);
        let req = HashMap::from([
            ("messages", Variant::from(vec![public, part])),
            ("route", Variant::from(route)),
            ("max_tokens", Variant::from(4u32)),
        ]);
        match proxy.complete(req).await {
            Ok(r) => assert_eq!((route, r.route.clone().as_str()), ("auto", "local")),
            Err(e) => {
                assert_eq!((route, e.dbus_name().as_str()), ("cloud", "org.hearth.Hearth1.Error.PrivacyViolation"));
                assert!(!e.message().contains(&canary));
            }
        }
    }
    proxy.complete(public_request("Only public words here.", "cloud", 4)).await.unwrap();
    let bodies: Vec<String> = s.standin.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies.len(), 1, "only the public request went out");
    assert!(bodies[0].contains("Only public words here."));
    assert!(!bodies.iter().any(|b| b.contains(&canary)));
    assert!(!s.daemon.log().contains(&canary));
}

fn phone(start_c: f64) -> hearth_tests::soc::Soc {
    hearth_tests::soc::Soc::new(hearth_tests::soc::SocParams {
        ambient_c: 35.0,
        start_c,
        c_per_core: 20.0,
        tau_s: 2.0,
        passive_trip_c: 65.0,
        critical_trip_c: 90.0,
        battery_pct: 80.0,
        drain_pct_per_core_s: 0.0,
        idle_w: 0.0,
        w_per_core: 0.0,
        energy_full_wh: 0.0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_stream_moves_to_the_cloud_when_the_device_turns_critical() {
    let soc = phone(45.0);
    let governor = soc.governor_settings(100);
    let s = setup_with(None, 2, governor).await;
    let conn = s.bus.connect().await;
    let mut g =
        Generation::start(&conn, public_request("List the numbers from 1 to 300, one per line.", "auto", 300), "up")
            .await
            .unwrap();
    let (mut local, mut cloud, mut moved) = (Vec::new(), Vec::new(), None);
    let result = loop {
        match g.next().await.unwrap().unwrap() {
            StreamEvent::Token { index, token_id, text } if moved.is_none() => {
                assert!(token_id >= 0 && index as usize == local.len());
                local.push(text);
                if local.len() == 5 {
                    soc.set_temp(70.0); // past the 65 °C trip: critical
                }
            }
            StreamEvent::Token { index, token_id, text } => {
                assert_eq!((index as usize, token_id), (local.len() + cloud.len(), -1));
                cloud.push(text);
            }
            StreamEvent::Migrated { from, to, index } => {
                assert_eq!((from.as_str(), to.as_str(), index as usize), ("local", "cloud", local.len()));
                moved = Some(index);
            }
            StreamEvent::Finished(r) => break r,
        }
    };
    assert!(moved.is_some(), "the stream moved to the cloud");
    assert_eq!(cloud.concat(), WORDS.concat());
    assert_eq!(result.route.clone(), "local+cloud");
    assert_eq!(result.text.clone(), format!("{}{}", local.concat(), cloud.concat()));
    // The cloud was asked to continue the assistant's turn from exactly the device's text.
    let body: serde_json::Value = serde_json::from_str(&s.standin.requests()[0].body).unwrap();
    let turns = body["messages"].as_array().unwrap();
    assert_eq!(turns.last().unwrap()["role"], "assistant");
    assert_eq!(turns.last().unwrap()["content"], local.concat().as_str());
    assert_eq!(body["continue_final_message"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sends_public_work_to_the_cloud_when_the_device_is_hot() {
    let soc = phone(66.0);
    let governor = soc.governor_settings(100);
    let s = setup_with(None, 2, governor).await;
    let conn = s.bus.connect().await;
    let proxy = hearth(&conn).await;
    hearth_tests::wait_for(Duration::from_secs(10), "the hot state", || async {
        (proxy.thermal_state().await.unwrap() == "critical").then_some(())
    })
    .await;
    let r = proxy.complete(public_request(QUESTION, "auto", 32)).await.unwrap();
    assert_eq!(r.route.clone(), "cloud");
    assert!(r.route_reason.clone().contains("hot"), "{}", r.route_reason.clone());
    // Personal data stays, however hot the device.
    let personal = HashMap::from([
        ("messages", hearth_dbus::messages_value(&[("user", QUESTION)])),
        ("route", Variant::from("auto")),
        ("max_tokens", Variant::from(2u32)),
    ]);
    assert_eq!(proxy.complete(personal).await.unwrap().route.clone(), "local");
}

/// `route: local`, structured output and tool calls are device-only: when the device turns
/// critical mid-answer, none of them moves, and not one byte of their prompts reaches the
/// endpoint. A plain `auto` request beside them moves (so the device really was critical
/// while they ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_only_requests_never_move_to_the_cloud() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let soc = phone(45.0);
    let governor = soc.governor_settings(100);
    let s = setup_with(None, 2, governor).await;
    let conn = s.bus.connect().await;
    let numbers = r#"{"type": "object", "properties": {"numbers": {"type": "array", "items": {"type": "integer"},
        "minItems": 30}}, "required": ["numbers"]}"#;
    let tools = format!(
        r#"[{{"type": "function", "function": {{"name": "record", "description": "Records numbers",
        "parameters": {numbers}}}}}]"#
    );
    let ask = |canary: &str, route: &str| public_request(&format!("{canary}: list the numbers 1 to 300."), route, 80);
    let local = ask("canary-local-4711", "local");
    let mut schema = ask("canary-schema-4712", "auto");
    schema.insert("json_schema", Variant::from(numbers.to_owned()));
    let mut tool = ask("canary-tools-4713", "auto");
    tool.insert("tools", Variant::from(tools));
    tool.insert("tool_choice", Variant::from("required".to_owned()));
    let control = ask("control-4714", "auto");
    let counts: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut tasks = Vec::new();
    for (i, (req, token)) in [(local, "l"), (schema, "s"), (tool, "t"), (control, "c")].into_iter().enumerate() {
        let g = Generation::start(&conn, req, token).await.unwrap();
        tasks.push(hearth_tests::watch_stream(g, Arc::clone(&counts[i])));
    }
    hearth_tests::wait_for(Duration::from_secs(60), "every stream under way", || async {
        counts.iter().all(|c| c.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    soc.set_temp(70.0); // past the 65 °C trip: critical
    let control = tasks.pop().unwrap();
    let control = tokio::time::timeout(Duration::from_secs(60), control).await.unwrap().unwrap();
    assert!(control.migrated, "the plain auto request moved: the device was critical");
    soc.set_temp(40.0);
    for (task, what) in tasks.into_iter().zip(["route local", "json_schema", "tools"]) {
        let seen = tokio::time::timeout(Duration::from_secs(120), task).await.unwrap().unwrap();
        let r = seen.result.unwrap();
        assert!(!seen.migrated, "{what} moved");
        assert!(seen.tokens > 0);
        assert_eq!(r.route.clone(), "local", "{what}");
        if what == "json_schema" && r.finish_reason.clone() == "stop" {
            assert_eq!(r.schema_valid, Some(true), "{what}: schema_valid");
        }
    }
    let bodies: Vec<String> = s.standin.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies.len(), 1, "only the control request reached the endpoint");
    assert!(bodies[0].contains("control-4714"));
    for canary in ["canary-local-4711", "canary-schema-4712", "canary-tools-4713"] {
        assert!(!bodies.iter().any(|b| b.contains(canary)), "{canary} reached the endpoint");
        assert!(!s.daemon.log().contains(canary), "{canary} reached the log");
    }
}

/// Cancel and deadline_ms hold whatever the endpoint does: stalled before its first byte, or
/// trickling words slower than anyone wants but faster than its timeouts. Each is honoured
/// within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_deadline_hold_against_a_stalled_and_a_trickling_cloud() {
    let s = setup_knobs(None, 5, String::new(), 30_000, 30).await;
    let conn = s.bus.connect().await;
    let proxy = hearth(&conn).await;
    for (fault, what) in [
        (Fault::DelayFirstByte(Duration::from_secs(60)), "stalled"),
        (Fault::SlowDrip(Duration::from_millis(700)), "trickling"),
    ] {
        s.standin.set_fault(fault);
        // Cancel, 1 s in.
        let g = Generation::start(&conn, public_request(QUESTION, "cloud", 64), &format!("c_{what}")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cancelled = Instant::now();
        g.cancel().await.unwrap();
        let (_, r) = hearth_tests::collect(g, Duration::from_secs(5)).await;
        let cancel_took = cancelled.elapsed();
        assert_eq!(r.finish_reason.clone(), "cancelled", "{what}");
        assert!(cancel_took < Duration::from_secs(1), "{what}: Cancel took {cancel_took:?}");
        // A 3 s deadline, for the whole request.
        let mut req = public_request(QUESTION, "cloud", 64);
        req.insert("deadline_ms", Variant::from(3000u32));
        let started = Instant::now();
        let e = proxy.complete(req).await.expect_err(what);
        let took = started.elapsed();
        assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.Cancelled", "{what}: {e}");
        assert!(e.to_string().contains("deadline"), "{what}: {e}");
        assert!(took < Duration::from_secs(4), "{what}: a 3 s deadline took {took:?}");
        eprintln!(
            "{what}: Cancel honoured in {:.0} ms; a 3 s deadline ended the request at {:.0} ms",
            cancel_took.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e3
        );
    }
}

/// When the device turns critical mid-answer and the cloud it moves to cannot be reached,
/// the device carries on from the text so far: the answer ends well, not in an error, and
/// the breaker counts the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_to_an_unreachable_cloud_lets_the_device_carry_on() {
    let soc = phone(45.0);
    let governor = soc.governor_settings(100);
    // A loopback port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let s = setup_with(Some(endpoint), 1, governor).await;
    let conn = s.bus.connect().await;
    let mut g = Generation::start(&conn, public_request("Count from 1 to 40.", "auto", 40), "carry").await.unwrap();
    let (mut tokens, mut moves) = (Vec::new(), Vec::new());
    let result = loop {
        match g.next().await.unwrap().unwrap() {
            StreamEvent::Token { index, text, .. } => {
                assert_eq!(index as usize, tokens.len(), "indices go on without a gap");
                tokens.push(text);
                if tokens.len() == 5 {
                    soc.set_temp(70.0);
                }
            }
            StreamEvent::Migrated { from, to, index } => {
                moves.push((from, to, index));
                soc.set_temp(40.0); // let the device finish quickly
            }
            StreamEvent::Finished(r) => break r,
        }
    };
    assert_eq!(moves.first().map(|m| (m.0.as_str(), m.1.as_str())), Some(("local", "cloud")), "{moves:?}");
    assert_eq!(moves.last().map(|m| (m.0.as_str(), m.1.as_str())), Some(("cloud", "local")), "{moves:?}");
    assert!(!result.failed(), "the answer ended in an error: {result:?}");
    assert!(matches!(result.finish_reason.clone().as_str(), "length" | "stop"));
    assert!(tokens.len() > 5, "the device carried on after the move");
    assert_eq!(result.text.clone(), tokens.concat());
    assert!(result.route_reason.clone().contains("carried on"), "{}", result.route_reason.clone());
    let proxy = hearth(&conn).await;
    assert!(!proxy.cloud_available().await.unwrap(), "the breaker learnt of the failure");
}

/// CloudAvailable announces the breaker's half-open time with PropertiesChanged, without a
/// request to notice it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_available_is_announced_when_the_breaker_half_opens() {
    use futures_util::StreamExt;
    let s = setup_knobs(None, 1, String::new(), 800, 2).await;
    s.standin.set_fault(Fault::Status(503));
    let conn = s.bus.connect().await;
    let proxy = hearth_dbus::Hearth1Proxy::new(&conn).await.unwrap();
    let mut changes = proxy.receive_cloud_available_changed().await;
    let r = proxy.complete(public_request(QUESTION, "cloud", 4)).await.unwrap();
    assert_eq!(r.route.clone(), "local", "the failed cloud fell back to the device");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    while let Ok(Some(change)) = tokio::time::timeout_at(deadline, changes.next()).await {
        seen.push((Instant::now(), change.get().await.unwrap()));
        if seen.last().is_some_and(|(_, v)| *v) && seen.iter().any(|(_, v)| !*v) {
            break;
        }
    }
    let values: Vec<bool> = seen.iter().map(|(_, v)| *v).collect();
    assert!(values.ends_with(&[false, true]), "CloudAvailable changes: {values:?}");
}
