//! Routing on the fake engine and a scripted OpenAI-compatible endpoint: retries and the
//! circuit breaker, the fallback to the device, a cloud stream that breaks off and continues
//! on the device, and a device stream that moves to the cloud when the device turns
//! critical — only where the request may leave. No bus, no model.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::FinishReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::driver::{self, StreamEvent};
use crate::cloud::{Cloud, CloudConfig};
use crate::engine::CancelToken;
use crate::engine::fake::Script;
use crate::governor::{GovernorStatus, ThermalState};
use crate::manager::tests::{Harness, caller, harness, request};
use crate::privacy::{Decision, Route, Scope};

/// What the endpoint answers, request by request (the last one repeats).
#[derive(Debug, Clone)]
enum Reply {
    Status(u16),
    /// These text chunks as server-sent events, then `[DONE]` when `done`, else the
    /// connection just ends.
    Chunks(Vec<&'static str>, bool),
}

/// An OpenAI-compatible chat-completions endpoint on localhost that answers from a script
/// and keeps the request bodies.
struct Endpoint {
    url: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn endpoint(script: Vec<Reply>) -> Endpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut conn, _)) = listener.accept().await {
            let reply = script[n.min(script.len() - 1)].clone();
            n += 1;
            let Some(body) = read_request(&mut conn).await else { continue };
            seen.lock().unwrap().push(body);
            let response = match reply {
                Reply::Status(code) => {
                    format!("HTTP/1.1 {code} Nope\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                }
                Reply::Chunks(chunks, done) => {
                    let mut r =
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n".to_owned();
                    for c in chunks {
                        let event = serde_json::json!({"model": "remote", "choices": [{"delta": {"content": c}}]});
                        r.push_str(&format!("data: {event}\n\n"));
                    }
                    if done {
                        r.push_str("data: [DONE]\n\n");
                    }
                    r
                }
            };
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    });
    Endpoint { url, bodies }
}

/// One HTTP/1.1 request's JSON body.
async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<serde_json::Value> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some(end) = text.find("\r\n\r\n") else { continue };
        let length = text[..end]
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().ok()))
            .flatten()
            .unwrap_or(0usize);
        if buf.len() >= end + 4 + length {
            return serde_json::from_slice(&buf[end + 4..end + 4 + length]).ok();
        }
    }
}

fn cloud(url: &str) -> Arc<Cloud> {
    let config = CloudConfig {
        enabled: true,
        endpoint: url.to_owned(),
        model: "remote".into(),
        retries: 1,
        breaker_failures: 2,
        ..CloudConfig::default()
    };
    Arc::new(Cloud::new(&config).unwrap().unwrap())
}

fn decision(route: Route, may_leave: bool) -> Decision {
    Decision { route, reason: "test", taint: Scope::Public, may_leave }
}

/// A request's events, to the end.
async fn events(mut running: driver::Running) -> Vec<StreamEvent> {
    let mut all = Vec::new();
    while let Some(e) = running.events.recv().await {
        let last = matches!(e, StreamEvent::Finished(_));
        all.push(e);
        if last {
            return all;
        }
    }
    panic!("no Finished: {all:?}");
}

fn finish(events: &[StreamEvent]) -> &driver::Finish {
    match events.last() {
        Some(StreamEvent::Finished(f)) => f,
        other => panic!("{other:?}"),
    }
}

fn texts(events: &[StreamEvent]) -> String {
    events
        .iter()
        .filter_map(|e| if let StreamEvent::Token { text, .. } = e { Some(text.as_str()) } else { None })
        .collect()
}

fn governor() -> (watch::Sender<GovernorStatus>, watch::Receiver<GovernorStatus>) {
    watch::channel(GovernorStatus::default())
}

async fn start(
    h: &Harness,
    cloud: &Arc<Cloud>,
    gov: &watch::Receiver<GovernorStatus>,
    d: Decision,
    max: u32,
) -> Vec<StreamEvent> {
    let running = driver::start(
        &h.models,
        Some(cloud),
        gov,
        request(None, "question", max),
        caller("app.x"),
        CancelToken::default(),
        &d,
    )
    .await
    .unwrap();
    events(running).await
}

#[tokio::test]
async fn failures_before_the_first_token_are_retried_fall_back_to_the_device_and_open_the_breaker() {
    let h = harness(&["a"], Script::default());
    let server = endpoint(vec![Reply::Status(503)]).await;
    let cloud = cloud(&server.url);
    let (_gov_tx, gov) = governor();
    for attempt in 1..=2 {
        let all = start(&h, &cloud, &gov, decision(Route::Cloud, true), 4).await;
        let f = finish(&all);
        assert_eq!((f.outcome.reason, f.outcome.error.as_ref()), (FinishReason::Length, None), "{f:?}");
        let (route, why) = f.route.clone().unwrap();
        assert_eq!(route, "local");
        assert!(why.contains("HTTP 503"), "{why}");
        assert_eq!(texts(&all), f.outcome.text);
        // One retry per request.
        assert_eq!(server.bodies.lock().unwrap().len(), 2 * attempt);
    }
    // Two failed requests in a row open the breaker: the next goes straight to the device.
    assert!(!cloud.available());
    let all = start(&h, &cloud, &gov, decision(Route::Cloud, true), 4).await;
    assert!(finish(&all).route.as_ref().unwrap().1.contains("breaker is open"));
    assert_eq!(server.bodies.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn a_cloud_stream_that_breaks_off_is_continued_on_the_device_from_exactly_its_text() {
    let h = harness(&["a"], Script::default());
    let server = endpoint(vec![Reply::Chunks(vec!["Hel", "lo"], false)]).await;
    let cloud = cloud(&server.url);
    let (_gov_tx, gov) = governor();
    let all = start(&h, &cloud, &gov, decision(Route::Cloud, true), 10).await;
    assert!(matches!(all[2], StreamEvent::Migrated { from: "cloud", to: "local", index: 2 }), "{all:?}");
    let f = finish(&all);
    assert_eq!(f.route.as_ref().unwrap().0, "cloud+local");
    assert!(f.outcome.text.starts_with("Hello"), "{}", f.outcome.text);
    assert_eq!(texts(&all), f.outcome.text);
    // Indices run on across the move; the device continued the assistant's turn.
    let indices: Vec<u32> =
        all.iter().filter_map(|e| if let StreamEvent::Token { index, .. } = e { Some(*index) } else { None }).collect();
    assert_eq!(indices, (0..10).collect::<Vec<_>>());
    let seen = h.fake.seen();
    assert_eq!((seen[0].prefix.as_deref(), seen[0].max_tokens), (Some("Hello"), 8));
}

#[tokio::test]
async fn a_device_stream_moves_to_the_cloud_when_the_device_turns_critical_only_if_it_may_leave() {
    let h = harness(&["a"], Script { token_delay: Duration::from_millis(30), ..Script::default() });
    let server = endpoint(vec![Reply::Chunks(vec![" and", " the rest"], true)]).await;
    let cloud = cloud(&server.url);
    for may_leave in [true, false] {
        let (gov_tx, gov) = governor();
        let running = driver::start(
            &h.models,
            Some(&cloud),
            &gov,
            request(None, "question", 40),
            caller("app.x"),
            CancelToken::default(),
            &decision(Route::Local, may_leave),
        )
        .await
        .unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            gov_tx.send_modify(|g| g.thermal = ThermalState::Critical);
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(gov_tx);
        });
        let all = events(running).await;
        let f = finish(&all);
        if may_leave {
            let at = all.iter().position(|e| matches!(e, StreamEvent::Migrated { from: "local", to: "cloud", .. }));
            let at = at.unwrap_or_else(|| panic!("no move: {all:?}"));
            assert!(at > 0 && at < 40);
            assert_eq!(f.route.as_ref().unwrap().0, "local+cloud");
            let device: String = texts(&all[..at]);
            assert_eq!(f.outcome.text, format!("{device} and the rest"));
            // The cloud continued from exactly the device's text.
            let body = server.bodies.lock().unwrap()[0].clone();
            assert_eq!(body["messages"].as_array().unwrap().last().unwrap()["content"], device.as_str());
        } else {
            assert!(!all.iter().any(|e| matches!(e, StreamEvent::Migrated { .. })), "{all:?}");
            assert_eq!((f.outcome.token_ids.len(), f.route.as_ref()), (40, None));
            assert_eq!(server.bodies.lock().unwrap().len(), 1, "a route-local request never reached the cloud");
        }
    }
}

#[tokio::test]
async fn availability_says_whether_a_model_can_serve_and_why_not() {
    let state = |h: &Harness, name: &str, allowed: bool| {
        let report = h.models.report().into_iter().find(|r| r.entry.manifest.name == name);
        let loading = h.models.status().borrow().loading.get(name).cloned();
        let a = super::availability(name, report.as_ref(), loading.as_ref(), allowed);
        (a.state, a.reason)
    };
    let h = harness(&["a", "b"], Script::default());
    assert_eq!(state(&h, "a", true).0, "installed");
    assert_eq!(state(&h, "zzz", true).0, "not-installed");
    let (s, why) = state(&h, "a", false);
    assert_eq!(s, "unavailable");
    assert!(why.contains("policy"), "{why}");
    let _lease = h.models.acquire(Some("a")).await.unwrap();
    assert_eq!(state(&h, "a", true), ("ready".to_owned(), String::new()));
    assert_eq!(state(&h, "a", false).0, "unavailable", "the policy wins over a loaded model");
    let h = harness(&["a"], Script { fail_load: Some("the GPU is gone".into()), ..Script::default() });
    assert!(h.models.acquire(None).await.is_err());
    let (s, why) = state(&h, "a", true);
    assert_eq!(s, "unavailable");
    assert!(why.contains("last load failed") && why.contains("the GPU is gone"), "{why}");
}
