//! The model manager, the engine handle and its supervisor on the fake engine: streams,
//! an engine that dies or hangs mid-stream, restarts, leases, and session KV that is parked
//! and handed back. No model, no llama.cpp, no bus.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::engine::FinishReason;
use hearth_ffi::SamplerParams;
use sha2::Digest;

use super::*;
use crate::engine::fake::{FakeEngine, Script, Seen};
use crate::engine::{Caller, CancelToken, EngineError, Event, GenerateRequest, Outcome, Priority, Throttle};
use crate::seal::Sealer;

/// The smallest GGUF file hearthd's header walk accepts: magic, version 3, no tensors, no
/// metadata. Only the fake engine "loads" it.
const EMPTY_GGUF: [u8; 24] = *b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

pub(crate) struct Harness {
    pub models: ModelManager,
    pub fake: Arc<FakeEngine>,
    pub sessions: Arc<SessionStore>,
    _dir: tempfile::TempDir,
}

/// A manager over models `names` (the first is the default), whose engines are one fake.
pub(crate) fn harness(names: &[&str], script: Script) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let models_dir = dir.path().join("models");
    std::fs::create_dir(&models_dir).unwrap();
    let sha256 = hex::encode(sha2::Sha256::digest(EMPTY_GGUF));
    for name in names {
        std::fs::write(models_dir.join(format!("{name}.gguf")), EMPTY_GGUF).unwrap();
        let manifest = format!("name = \"{name}\"\nfile = \"{name}.gguf\"\nsha256 = \"{sha256}\"\n");
        std::fs::write(models_dir.join(format!("{name}.toml")), manifest).unwrap();
    }
    let mut config = Config::default();
    config.daemon.state_dir = dir.path().join("state");
    config.models.dirs = vec![models_dir.clone()];
    config.models.default = names[0].to_owned();
    config.engine.hang_timeout_ms = 300;
    let catalog = Arc::new(Catalog::scan(&[models_dir]));
    assert_eq!(catalog.len(), names.len(), "{:?}", catalog.rejected());
    std::fs::create_dir_all(&config.daemon.state_dir).unwrap();
    let sealer = Arc::new(Sealer::open(&config.daemon.state_dir).unwrap());
    let sessions = Arc::new(SessionStore::new(&config.daemon.state_dir, sealer, 1 << 20).unwrap());
    let fake = FakeEngine::new(script);
    let throttle = Arc::new(Throttle::default());
    let models = ModelManager::new(config, catalog, 1 << 30, throttle, Arc::clone(&sessions), cpu_only())
        .unwrap()
        .with_fake_engine(Arc::clone(&fake));
    Harness { models, fake, sessions, _dir: dir }
}

/// The devices of a machine without a GPU, as the engine lists them.
pub(crate) fn cpu_only() -> Vec<hearth_ffi::DeviceInfo> {
    vec![hearth_ffi::DeviceInfo {
        name: "CPU".into(),
        description: "test CPU".into(),
        kind: hearth_ffi::DeviceKind::Cpu,
        memory_free: 8 << 30,
        memory_total: 16 << 30,
    }]
}

pub(crate) fn caller(app: &str) -> Caller {
    Caller { connection: format!(":1.{app}"), app: app.to_owned(), uid: 1000 }
}

pub(crate) fn request(model: Option<&str>, prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        messages: vec![crate::engine::Message::new("user", prompt)],
        model: model.map(str::to_owned),
        max_tokens,
        sampling: SamplerParams::default(),
        priority: Priority::Normal,
        deadline: None,
        assistant_prefix: None,
        grammar: None,
        tools: None,
        adapters: None,
        session: None,
        speculative: true,
        images: Vec::new(),
        stop: Vec::new(),
        logprobs: None,
    }
}

/// Runs `request` to its end on the model's engine: its tokens' texts and its outcome.
async fn run(models: &ModelManager, request: GenerateRequest, who: Caller) -> Result<(Vec<String>, Outcome), Error> {
    let lease = models.acquire(request.model.as_deref()).await?;
    let mut submission = lease.engine.submit(request, who, CancelToken::default()).await?;
    let mut tokens = Vec::new();
    while let Some(event) = submission.events.recv().await {
        match event {
            Event::Token { text, .. } => tokens.push(text),
            Event::Finished(outcome) => {
                // The queue without this request reached hearthd before its result did.
                assert_eq!(lease.engine.status().borrow().queue_depth(), 0);
                return Ok((tokens, outcome));
            }
        }
    }
    panic!("the stream ended without Finished");
}

async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn requests_stream_through_the_manager_and_the_engine_handle() {
    let h = harness(&["a"], Script::default());
    let (tokens, outcome) = run(&h.models, request(None, "hello there", 5), caller("app.x")).await.unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!((outcome.reason, outcome.model.as_str(), outcome.error), (FinishReason::Length, "a", None));
    assert_eq!(outcome.text, tokens.concat());
    // Same prompt, same tokens; another prompt, others.
    let (again, _) = run(&h.models, request(None, "hello there", 5), caller("app.y")).await.unwrap();
    assert_eq!(again, tokens);
    let (other, _) = run(&h.models, request(None, "something else", 5), caller("app.x")).await.unwrap();
    assert_ne!(other, tokens);
    // A refusal of the engine comes back as its error, and the engine goes on serving.
    let long = "x".repeat(4 * 4096);
    let refused = run(&h.models, request(None, &long, 5), caller("app.x")).await.unwrap_err();
    assert!(matches!(refused, Error::Engine(EngineError::ContextLengthExceeded { .. })), "{refused:?}");
    assert!(run(&h.models, request(None, "hi", 1), caller("app.x")).await.is_ok());
    assert_eq!(h.fake.starts.load(Ordering::Relaxed), 1, "one engine serves them all");
    assert_eq!(h.models.engine_pids().len(), 1);
}

#[tokio::test]
async fn an_engine_that_dies_mid_stream_fails_its_requests_only_and_comes_back() {
    let slow = Script { token_delay: Duration::from_millis(20), ..Script::default() };
    let h = harness(&["a", "b"], slow.clone());
    h.fake.set_script("a", Some(Script { abort_after: Some(3), ..slow.clone() }));
    let (m1, m2) = (h.models.clone(), h.models.clone());
    let on_a = tokio::spawn(async move { run(&m1, request(Some("a"), "one", 40), caller("app.x")).await });
    let on_b = tokio::spawn(async move { run(&m2, request(Some("b"), "two", 40), caller("app.y")).await });
    let (a, b) = (on_a.await.unwrap(), on_b.await.unwrap());

    // The stream on the dead engine ends with EngineFailed, naming the model and the signal.
    let (tokens, outcome) = a.unwrap();
    assert_eq!(tokens.len(), 3);
    assert_eq!(outcome.reason, FinishReason::Error);
    match outcome.error {
        Some(EngineError::Failed { model, reason }) => {
            assert_eq!(model, "a");
            assert!(reason.contains("signal 6"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The other model's stream is untouched.
    let (tokens, outcome) = b.unwrap();
    assert_eq!((tokens.len(), outcome.reason), (40, FinishReason::Length));

    // The failure is counted, and the engine is back (after its backoff) without a request.
    until("the failure is counted", Duration::from_secs(1), || h.models.status().borrow().memory.engine_failures == 1)
        .await;
    h.fake.set_script("a", None);
    until("model a restarted", Duration::from_secs(2), || h.fake.starts.load(Ordering::Relaxed) == 3).await;
    let (tokens, outcome) = run(&h.models, request(Some("a"), "one", 4), caller("app.x")).await.unwrap();
    assert_eq!((tokens.len(), outcome.error), (4, None));
}

#[tokio::test]
async fn a_hung_engine_is_killed_after_the_hang_limit_and_its_callers_hear_why() {
    let h = harness(&["a"], Script { hang_after: Some(2), ..Script::default() });
    let started = tokio::time::Instant::now();
    let (tokens, outcome) = run(&h.models, request(None, "stuck", 50), caller("app.x")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(tokens.len(), 2);
    match outcome.error {
        Some(EngineError::Failed { reason, .. }) => assert!(reason.contains("no progress"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // hang limit 300 ms, checked every 150 ms.
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn a_failed_load_is_model_unavailable_with_the_engines_reason() {
    let h = harness(&["a"], Script { fail_load: Some("the tensors are wrong".into()), ..Script::default() });
    let e = h.models.acquire(None).await.unwrap_err();
    match &e {
        Error::ModelUnavailable { name, reason } => {
            assert_eq!(name, "a");
            assert!(reason.contains("the tensors are wrong"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(h.models.engine_pids().is_empty());
}

#[tokio::test]
async fn a_leased_model_is_not_unloaded() {
    let h = harness(&["a"], Script::default());
    let lease = h.models.acquire(None).await.unwrap();
    assert!(matches!(h.models.unload_model("a").await, Err(Error::InUse { requests: 1, .. })));
    drop(lease);
    h.models.unload_model("a").await.unwrap();
    assert!(h.models.engine_pids().is_empty());
    assert!(matches!(h.models.unload_model("a").await, Err(Error::ModelUnavailable { .. })));
}

#[tokio::test]
async fn session_kv_is_parked_on_unload_handed_back_to_its_next_turn_and_only_to_its_app() {
    let h = harness(&["a"], Script::default());
    let id = h.sessions.open("app.x", "a", ":1.app.x", 8).unwrap();
    let turn = |prompt: &str| GenerateRequest { session: Some(id), ..request(None, prompt, 3) };

    // Another app cannot use the session.
    let e = run(&h.models, turn("hello"), caller("app.other")).await.unwrap_err();
    assert_eq!(e.kind(), "NotAuthorized", "{e:?}");

    let (_, first) = run(&h.models, turn("hello"), caller("app.x")).await.unwrap();
    assert_eq!(first.cached_tokens, 0);
    // Unloading parks the session's KV (sealed, in the store), and the next turn gets it.
    h.models.unload_model("a").await.unwrap();
    assert_eq!(h.sessions.parked().0, 1);
    let (_, second) = run(&h.models, turn("hello again"), caller("app.x")).await.unwrap();
    let covered = (first.prompt_tokens + 3) as usize;
    let seen: Vec<Seen> = h.fake.seen().into_iter().filter(|s| s.app == "app.x").collect();
    assert_eq!(seen.iter().map(|s| s.kv_tokens).collect::<Vec<_>>(), [None, Some(covered)]);
    assert!(second.cached_tokens > 0, "the turn reused the handed-back KV");
    assert_eq!(h.sessions.parked().0, 0, "taken out of the store");

    // Once closed, the session is nobody's.
    h.sessions.close(id);
    h.models.close_session("a", id).await;
    let e = run(&h.models, turn("more"), caller("app.x")).await.unwrap_err();
    assert_eq!(e.kind(), "NotAuthorized", "{e:?}");
}
