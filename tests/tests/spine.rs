//! The spine, end to end: the real hearthd on a private system-like bus, the real model.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use hearth_dbus::{Error, Generation, RequestProxy, StreamEvent, messages_value, request_key};
use hearth_tests::{Bus, Daemon, Settings, chat_request, direct_run, greedy};
use zbus::MatchRule;
use zbus::Variant;
use zbus::message::Type as MessageType;

const PROMPTS: [&str; 2] = ["What is the capital of France?", "Write a haiku about a phone that keeps secrets."];

/// Collects a generation's events until Finished.
async fn collect(g: Generation) -> (Vec<(u32, i32, String)>, hearth_tests::ResultDict) {
    hearth_tests::collect(g, Duration::from_secs(120)).await
}

fn error_name(e: &Error) -> String {
    e.dbus_name()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_and_generate_give_exactly_the_direct_ffi_tokens() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth_tests::hearth(&conn).await;
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let direct = direct_run(&[("user", prompt)], greedy(), 48);
        assert!(!direct.tokens.is_empty());

        let result = proxy.complete(chat_request(prompt, 48)).await.expect("Complete");
        assert_eq!(result.token_ids.clone(), direct.tokens, "Complete tokens for {prompt:?}");
        assert_eq!(result.text.clone(), direct.text);
        assert_eq!(result.prompt_tokens as usize, direct.prompt_tokens);
        let expect_reason = if direct.tokens.len() == 48 { "length" } else { "stop" };
        assert_eq!(result.finish_reason.clone(), expect_reason);

        let g = Generation::start(&conn, chat_request(prompt, 48), &format!("exact{i}")).await.expect("Generate");
        let (tokens, finished) = collect(g).await;
        let ids: Vec<i32> = tokens.iter().map(|t| t.1).collect();
        assert_eq!(ids, direct.tokens, "Generate tokens for {prompt:?}");
        assert_eq!(finished.token_ids.clone(), direct.tokens);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stream_in_order_to_the_caller_only() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let caller = bus.connect().await;
    let snoop = bus.connect().await;
    // The unrelated connection asks for every signal it may receive, and tries to eavesdrop.
    let all_signals = MatchRule::builder().msg_type(MessageType::Signal).build().unwrap();
    let mut snooped =
        zbus::MessageStream::for_match_rule(all_signals, &snoop, std::num::NonZeroUsize::new(10_000)).await.unwrap();
    // zbus has no eavesdrop key in its match rules; ask the bus directly. A system bus
    // refuses or ignores it, which is the point.
    let _ = snoop
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "AddMatch",
            &("type='signal',eavesdrop='true'",),
        )
        .await;

    let g = Generation::start(&caller, chat_request(PROMPTS[1], 40), "stream").await.expect("Generate");
    let (tokens, finished) = collect(g).await;
    assert!(tokens.len() > 3, "got {} tokens", tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(t.0 as usize, i, "tokens arrive in order");
    }
    let joined: String = tokens.iter().map(|t| t.2.as_str()).collect();
    assert_eq!(joined, finished.text.clone());
    assert_eq!(finished.tokens as usize, tokens.len());

    // Let anything in flight arrive, then look at what the snooper got.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut saw_queue_depth_change = false;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_millis(100), snooped.next()).await {
        let h = msg.header();
        let iface = h.interface().map(|i| i.to_string()).unwrap_or_default();
        assert_ne!(iface, hearth_dbus::REQUEST_INTERFACE, "an unrelated connection received {:?}", h.member());
        if h.member().is_some_and(|m| m.as_str() == "PropertiesChanged")
            && h.path().is_some_and(|p| p.as_str() == hearth_dbus::OBJECT_PATH)
        {
            saw_queue_depth_change = true;
        }
    }
    // Proof that the snooper was listening: it did get the public, broadcast property change.
    assert!(saw_queue_depth_change, "the snooper should see QueueDepth PropertiesChanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_the_stream_at_once_and_only_the_owner_may_cancel() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let other = bus.connect().await;
    let mut g =
        Generation::start(&conn, chat_request("Write a very long story about the sea.", 900), "long").await.unwrap();
    let path = g.path().clone();
    let mut seen = 0;
    while seen < 3 {
        if let Some(Ok(StreamEvent::Token { .. })) = g.next().await {
            seen += 1;
        }
    }
    // Another connection may not cancel it.
    let foreign = RequestProxy::builder(&other).path(path.clone()).build().await.unwrap();
    let err = foreign.cancel().await.expect_err("foreign Cancel must fail");
    assert_eq!(error_name(&err), "org.hearth.Hearth1.Error.NotAuthorized");
    // Still streaming.
    assert!(matches!(g.next().await, Some(Ok(StreamEvent::Token { .. }))));

    g.cancel().await.expect("owner Cancel");
    let mut after = 0;
    let finished = loop {
        match tokio::time::timeout(Duration::from_secs(5), g.next()).await.expect("Finished within 5 s") {
            Some(Ok(StreamEvent::Token { .. })) => after += 1,
            Some(Ok(StreamEvent::Finished(r))) => break r,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(after <= 3, "{after} tokens arrived after Cancel returned");
    assert_eq!(finished.finish_reason.clone(), "cancelled");
    assert_eq!(finished.error_name.clone().unwrap_or_default(), "org.hearth.Hearth1.Error.Cancelled");

    // The daemon keeps serving, and the queue is empty again.
    let proxy = hearth_tests::hearth(&conn).await;
    let r = proxy.complete(chat_request("Say hello.", 8)).await.expect("Complete after cancel");
    assert!(r.tokens > 0);
    assert_eq!(proxy.queue_depth().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_error_name_and_the_daemon_keeps_serving() {
    let bus = Bus::start();
    let daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth_tests::hearth(&conn).await;
    let huge = "word ".repeat(3000);
    // App text that must reach no log line, whatever the error.
    let canary = "canaryq9z";
    let big_canary = canary.repeat(50_000);
    let base = || chat_request("hi", 8);
    let with = |k: &'static str, v: Variant<'static>| {
        let mut r = base();
        r.insert(k, v);
        r
    };
    let mut no_messages = base();
    no_messages.remove(request_key::MESSAGES);
    let cases: Vec<(&str, HashMap<&'static str, Variant<'static>>, &str)> = vec![
        ("no messages", no_messages, "InvalidArgs"),
        ("empty messages", with(request_key::MESSAGES, messages_value(&[])), "InvalidArgs"),
        ("messages of the wrong type", with(request_key::MESSAGES, Variant::from("hello")), "InvalidArgs"),
        ("max_tokens of the wrong type", with(request_key::MAX_TOKENS, Variant::from("ten")), "InvalidArgs"),
        ("temperature of the wrong type", with(request_key::TEMPERATURE, Variant::from("hot")), "InvalidArgs"),
        ("max_tokens 0", with(request_key::MAX_TOKENS, Variant::from(0u32)), "InvalidArgs"),
        ("absurd max_tokens", with(request_key::MAX_TOKENS, Variant::from(1_000_000_000u32)), "InvalidArgs"),
        ("unknown key", with("bogus", Variant::from(1u32)), "InvalidArgs"),
        ("prompt longer than the context", chat_request(&huge, 8), "ContextLengthExceeded"),
        ("unknown model", with(request_key::MODEL, Variant::from("no-such-model")), "ModelNotFound"),
        (
            "an unknown key that is app text",
            with(Box::leak(big_canary.clone().into_boxed_str()), Variant::from(1u32)),
            "InvalidArgs",
        ),
        ("a model name that is app text", with(request_key::MODEL, Variant::from(big_canary.clone())), "ModelNotFound"),
        ("a role that is app text", with(request_key::MESSAGES, messages_value(&[(canary, "hi")])), "InvalidArgs"),
        ("a route that is app text", with(request_key::ROUTE, Variant::from(big_canary.clone())), "InvalidArgs"),
        ("a priority that is app text", with(request_key::PRIORITY, Variant::from(canary)), "InvalidArgs"),
        (
            "adapters that are app text",
            with(request_key::ADAPTERS, Variant::from(HashMap::from([(canary.to_owned(), Variant::from(1.0))]))),
            "InvalidArgs",
        ),
        (
            "a prompt that is app text and too long",
            chat_request(&format!("{canary} ").repeat(3000), 8),
            "ContextLengthExceeded",
        ),
    ];
    let me = conn.unique_name().unwrap().to_string();
    let mut tokens = Vec::new();
    for (i, (what, request, expected)) in cases.into_iter().enumerate() {
        let expected = format!("org.hearth.Hearth1.Error.{expected}");
        let err = proxy.complete(request.clone()).await.expect_err(what);
        assert_eq!(error_name(&err), expected, "Complete with {what}: {err}");
        assert!(!err.message().is_empty(), "{what}: the error explains itself");
        assert!(err.message().len() <= 512, "{what}: a {}-byte error message", err.message().len());
        let mut request = request;
        let token = format!("bad{i}");
        request.insert(request_key::HANDLE_TOKEN, Variant::from(token.clone()));
        let err = proxy.generate(request).await.expect_err(what);
        assert_eq!(error_name(&err), expected, "Generate with {what}: {err}");
        tokens.push(token);
    }
    // A call with the wrong D-Bus signature altogether is refused by the bus layer.
    let reply = conn
        .call_method(
            Some(hearth_dbus::BUS_NAME),
            hearth_dbus::OBJECT_PATH,
            Some(hearth_dbus::INTERFACE),
            "Complete",
            &("not a dict",),
        )
        .await;
    assert!(reply.is_err(), "wrong signature must fail");
    // Refused Generate calls leave no request objects behind.
    for token in &tokens {
        let path = hearth_dbus::request_path(&me, token).unwrap();
        assert!(hearth_tests::introspect(&conn, path.as_str()).await.is_err(), "leftover request object {path}");
    }
    // The other methods that quote a bad key bound their replies too.
    let big_key: &str = Box::leak(big_canary.clone().into_boxed_str());
    let options = || HashMap::from([(big_key, Variant::from(1u32))]);
    let refusals = [
        ("OpenSession", proxy.open_session(options()).await.expect_err("an unknown session option")),
        ("Seal", proxy.seal(b"hi", options()).await.expect_err("a Seal option")),
    ];
    for (method, err) in refusals {
        assert_eq!(error_name(&err), "org.hearth.Hearth1.Error.InvalidArgs", "{method}: {err}");
        assert!(err.message().len() <= 512, "{method}: a {}-byte error message", err.message().len());
    }
    // And the daemon still answers.
    let r = proxy.complete(chat_request("Say hello.", 8)).await.expect("Complete after bad input");
    assert!(r.tokens > 0);
    assert!(!daemon.log().contains(canary), "app text reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_busy_at_once() {
    let bus = Bus::start();
    let settings = Settings {
        max_sequences: Some(1),
        interactive_sequences: Some(0),
        limits: "queue_capacity = 0".into(),
        ..Settings::default()
    };
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth_tests::hearth(&conn).await;
    // The only sequence slot is taken and nothing may wait.
    let mut g = Generation::start(&conn, chat_request("Write a very long story.", 900), "hog").await.unwrap();
    let started = std::time::Instant::now();
    let err = proxy.complete(chat_request("hi", 8)).await.expect_err("must be Busy");
    assert_eq!(error_name(&err), "org.hearth.Hearth1.Error.Busy");
    assert!(err.message().contains("retry"), "Busy carries a retry hint: {}", err.message());
    assert!(started.elapsed() < Duration::from_secs(2), "Busy comes at once");
    g.cancel().await.unwrap();
    while let Some(ev) = g.next().await {
        if let Ok(StreamEvent::Finished(_)) = ev {
            break;
        }
    }
    proxy.complete(chat_request("hi", 8)).await.expect("served once the slot is free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_stream_cancels_it_and_exits_zero() {
    let bus = Bus::start();
    let mut daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let mut g =
        Generation::start(&conn, chat_request("Write a very long story about mountains.", 900), "term").await.unwrap();
    let blocking_conn = bus.connect().await;
    let blocking = tokio::spawn(async move {
        let proxy = hearth_tests::hearth(&blocking_conn).await;
        proxy.complete(chat_request("Write a very long story about rivers.", 900)).await
    });
    let mut seen = 0;
    while seen < 2 {
        if let Some(Ok(StreamEvent::Token { .. })) = g.next().await {
            seen += 1;
        }
    }
    daemon.terminate();
    let finished = loop {
        match tokio::time::timeout(Duration::from_secs(10), g.next()).await.expect("Finished within 10 s") {
            Some(Ok(StreamEvent::Token { .. })) => {}
            Some(Ok(StreamEvent::Finished(r))) => break r,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(finished.finish_reason.clone(), "cancelled");
    assert_eq!(finished.error_name.clone().unwrap_or_default(), "org.hearth.Hearth1.Error.Cancelled");
    let err = blocking.await.unwrap().expect_err("the blocking Complete is cancelled too");
    assert_eq!(error_name(&err), "org.hearth.Hearth1.Error.Cancelled");
    let status = daemon.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "hearthd exit status {status}");
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
    let name = zbus::names::BusName::try_from(hearth_dbus::BUS_NAME).unwrap();
    assert!(!dbus.name_has_owner(name).await.unwrap(), "the name is released");
}

/// Losing the bus is fatal: hearthd stops decoding for callers who are gone and exits
/// non-zero within a few seconds (so `Restart=on-failure` brings it back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_bus_ends_hearthd_with_a_failure() {
    let mut bus = Bus::start();
    let mut daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let mut g =
        Generation::start(&conn, chat_request("Write a very long story about mountains.", 900), "lost").await.unwrap();
    while !matches!(g.next().await, Some(Ok(StreamEvent::Token { .. }))) {}
    let killed = std::time::Instant::now();
    bus.kill();
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    let took = killed.elapsed();
    assert!(!status.success(), "hearthd exit status {status}:\n{}", daemon.log());
    assert!(took < Duration::from_secs(5), "hearthd took {took:?} to notice");
    assert!(daemon.log().contains("lost the connection to the bus"), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_models_and_properties_describe_the_daemon() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth_tests::hearth(&conn).await;
    assert_eq!(proxy.version().await.unwrap(), env!("CARGO_PKG_VERSION"));
    // Nothing is loaded until a request needs it.
    assert!(proxy.loaded_models().await.unwrap().is_empty());
    assert_eq!(proxy.queue_depth().await.unwrap(), 0);
    let models = proxy.list_models().await.unwrap();
    assert!(!models[0].loaded && !models[0].verified);
    proxy.complete(hearth_tests::chat_request("Hi", 1)).await.unwrap();
    assert_eq!(proxy.loaded_models().await.unwrap(), vec!["smollm2-135m-instruct".to_owned()]);
    let models = proxy.list_models().await.unwrap();
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(m.name, "smollm2-135m-instruct");
    assert_eq!(m.sha256, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");
    assert!(m.loaded);
    assert_eq!(m.context_length, Some(hearth_tests::CONTEXT));
    assert_eq!(m.trained_context, Some(8192));
    assert!(m.verified);
    let backends = proxy.backends().await.unwrap();
    assert!(backends.iter().any(|b| b.kind == "cpu"), "{backends:?}");
    let memory = proxy.memory().await.unwrap();
    let used = memory.used_bytes;
    assert!(used > 50 << 20 && used <= memory.budget_bytes, "{memory:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_with_a_handle_token_is_cancelled_by_its_caller_only() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let other = bus.connect().await;
    let unique = conn.unique_name().expect("unique name").to_string();
    let path = hearth_dbus::request_path(&unique, "c1").expect("request path");

    let mut request = chat_request("Write a very long story about the sea.", 900);
    request.insert(request_key::HANDLE_TOKEN, Variant::from("c1"));
    let proxy = hearth_tests::hearth(&conn).await;
    let running = tokio::spawn(async move { proxy.complete(request).await });

    // The request object appears while Complete runs; another connection may not cancel it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let foreign = RequestProxy::builder(&other).path(path.clone()).build().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let err = foreign.cancel().await.expect_err("foreign Cancel must fail");
        if error_name(&err) == "org.hearth.Hearth1.Error.NotAuthorized" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no request object at {path}: {err}");
        assert!(!running.is_finished(), "Complete ended before it could be cancelled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!running.is_finished(), "Complete ended before it could be cancelled");

    let owner = RequestProxy::builder(&conn).path(path.clone()).build().await.unwrap();
    owner.cancel().await.expect("owner Cancel");
    let cancelled = tokio::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(1), running)
        .await
        .expect("Complete returns within 1 s of Cancel")
        .unwrap();
    let err = result.expect_err("a cancelled Complete is an error");
    assert_eq!(error_name(&err), "org.hearth.Hearth1.Error.Cancelled");
    assert!(cancelled.elapsed() < Duration::from_secs(1));

    // The object went away with the call, and the token may be used again.
    let err = owner.cancel().await.expect_err("no request object after Complete");
    assert_ne!(error_name(&err), "org.hearth.Hearth1.Error.NotAuthorized");
    let proxy = hearth_tests::hearth(&conn).await;
    let mut again = chat_request("Say hello.", 8);
    again.insert(request_key::HANDLE_TOKEN, Variant::from("c1"));
    let r = proxy.complete(again).await.expect("Complete with the token again");
    assert!(r.tokens > 0);
    assert_eq!(proxy.queue_depth().await.unwrap(), 0);
}
