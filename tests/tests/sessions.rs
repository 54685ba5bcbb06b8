//! Sessions against the real daemon and model: turns reuse the conversation's KV and answer
//! exactly as a fresh run of the whole transcript; an idle session's KV is parked (sealed, on
//! disk) when its slot is needed and restored with identical output; sessions carry their
//! taint, belong to the connection that opened them, and free everything on Close or when
//! that connection leaves.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use hearth_dbus::{SessionProxy, messages_value, request_key as key};
use hearth_tests::{Bus, Daemon, Settings, apps_dir, apps_setting, direct_run, greedy, hearth, this_app};
use zbus::Connection;
use zbus::{OwnedObjectPath, Variant};

fn turn(user: &str, max_tokens: u32) -> HashMap<&'static str, Variant<'static>> {
    HashMap::from([(key::MESSAGES, messages_value(&[("user", user)])), (key::MAX_TOKENS, Variant::from(max_tokens))])
}

async fn session<'c>(conn: &'c Connection, path: &OwnedObjectPath) -> SessionProxy<'c> {
    SessionProxy::builder(conn)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
}

async fn open(conn: &Connection) -> OwnedObjectPath {
    hearth(conn).await.open_session(HashMap::new()).await.expect("OpenSession")
}

const FIRST: &str = "My name is Ada and I live in Lisbon. Say hello.";
const SECOND: &str = "Where do I live?";
/// A first turn whose KV, parked, is over a MiB (q8_0 KV: ~12 KiB a token).
const LONG_FIRST: &str = "My name is Ada and I live in Lisbon, in an old house near the river. Every morning I \
    walk along the harbour, where ships from all over the world come in and unload their cargo, and the \
    fishermen sell the night's catch on the quay. In the afternoon I work in a small bookshop on a steep \
    street, and in the evening I read by the window while the trams go past. Say hello.";

/// The fresh-run reference for turn 2: the whole transcript through llama.cpp directly.
fn fresh_second_turn(first_answer: &str, max_tokens: usize) -> Vec<i32> {
    fresh_second_turn_after(FIRST, first_answer, max_tokens)
}

fn fresh_second_turn_after(first: &str, first_answer: &str, max_tokens: usize) -> Vec<i32> {
    direct_run(&[("user", first), ("assistant", first_answer), ("user", SECOND)], greedy(), max_tokens).tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_two_reuses_turn_one_and_equals_a_fresh_run_of_the_transcript() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let path = open(&conn).await;
    let s = session(&conn, &path).await;
    assert_eq!(s.tokens().await.unwrap(), 0);
    let r1 = s.complete(turn(FIRST, 24)).await.expect("turn 1");
    let t1 = r1.prompt_tokens + r1.token_ids.clone().len() as u32;
    assert_eq!(s.tokens().await.unwrap(), t1);
    // Turn 2 streams through a request object like Generate.
    let g = hearth_dbus::Generation::start_turn(&conn, &path, turn(SECOND, 24), "turn2").await.expect("turn 2");
    let (_, r2) = hearth_tests::collect(g, Duration::from_secs(60)).await;
    assert_eq!(r2.finish_reason.clone(), r1.finish_reason.clone());
    let cached = r2.cached_tokens;
    assert!(cached >= r1.prompt_tokens, "turn 2 re-used turn 1's KV: cached {cached}");
    assert_eq!(r2.token_ids.clone(), fresh_second_turn(&r1.text.clone(), 24));
    assert!(s.tokens().await.unwrap() > t1);
    assert_eq!(s.model().await.unwrap(), "smollm2-135m-instruct");
    assert_eq!(s.taint().await.unwrap(), "personal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_parked_for_another_request_and_restored_identically() {
    let bus = Bus::start();
    // One sequence slot: any other request needs the session's slot.
    let settings = Settings { max_sequences: Some(1), interactive_sequences: Some(0), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let path = open(&conn).await;
    let s = session(&conn, &path).await;
    let r1 = s.complete(turn(FIRST, 24)).await.expect("turn 1");
    let kv = proxy.kv_cache().await.unwrap();
    assert_eq!((kv.sessions, kv.parked_sessions), (1, 0), "{kv:?}");
    assert!(kv.cached > 0, "the idle session's KV stays resident: {kv:?}");
    // Another conversation takes the only slot: the session's KV is parked, sealed.
    proxy.complete(hearth_tests::chat_request("Count to five.", 8)).await.expect("other request");
    let kv = proxy.kv_cache().await.unwrap();
    assert_eq!(kv.parked_sessions, 1, "{kv:?}");
    let parked: Vec<_> =
        std::fs::read_dir(daemon.state_dir().join("sessions")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(parked.len(), 1, "{parked:?}");
    let bytes = std::fs::read(&parked[0]).unwrap();
    assert!(bytes.len() as u32 > kv.parked_kib.saturating_sub(1) * 1024, "{} bytes", bytes.len());
    assert!(bytes.starts_with(b"HSL1"), "parked KV is a sealed blob");
    // Turn 2 restores it and answers exactly as a fresh run of the transcript.
    let r2 = s.complete(turn(SECOND, 24)).await.expect("turn 2");
    assert!(r2.cached_tokens >= r1.prompt_tokens, "the restored KV was reused: {r2:?}");
    assert_eq!(r2.token_ids.clone(), fresh_second_turn(&r1.text.clone(), 24));
    let kv = proxy.kv_cache().await.unwrap();
    assert_eq!(kv.parked_sessions, 0, "{kv:?}");
    assert_eq!(std::fs::read_dir(daemon.state_dir().join("sessions")).unwrap().count(), 0, "restored files go");
    let log = daemon.log();
    assert!(log.contains("session KV parked") && log.contains("session KV restored"), "{log}");
    // The daemon stops with the session's KV resident: it is dropped, not written to disk.
    let mut daemon = daemon;
    daemon.terminate();
    assert!(daemon.wait_exit(Duration::from_secs(20)).await.success());
    assert_eq!(daemon.log().matches("session KV parked").count(), 1, "{}", daemon.log());
    assert_eq!(std::fs::read_dir(daemon.state_dir().join("sessions")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_kv_keeps_to_its_disk_budget_and_a_dropped_session_still_answers_right() {
    let bus = Bus::start();
    let settings = Settings { max_sequences: Some(1), interactive_sequences: Some(0), ..Settings::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let (a, b) = (open(&conn).await, open(&conn).await);
    let (a, b) = (session(&conn, &a).await, session(&conn, &b).await);
    let r1 = a.complete(turn(LONG_FIRST, 48)).await.expect("A, turn 1");
    b.complete(turn(LONG_FIRST, 48)).await.expect("B, turn 1"); // parks A
    let one = proxy.kv_cache().await.unwrap().parked_kib;
    assert!(one >= 1024, "one parked KV is {one} KiB: too small to size a MiB budget between one and two");
    // A budget that holds one parked KV of this size, not two; put in force with SIGHUP.
    let mib = one.div_ceil(1024);
    daemon.write_config(&Settings { limits: format!("parked_sessions_mib = {mib}\n"), ..settings.clone() });
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    hearth_tests::wait_for(Duration::from_secs(10), "the reload", || async {
        daemon.log().contains("configuration reloaded").then_some(())
    })
    .await;
    // Another request parks B: A's KV, parked longest ago, is dropped for the budget.
    proxy.complete(hearth_tests::chat_request("Count to five.", 8)).await.expect("other request");
    let kv = proxy.kv_cache().await.unwrap();
    assert_eq!((kv.sessions, kv.parked_sessions, kv.parked_dropped), (2, 1, 1), "{kv:?}");
    assert!(kv.parked_kib <= mib as u32 * 1024, "{kv:?}");
    assert_eq!(std::fs::read_dir(daemon.state_dir().join("sessions")).unwrap().count(), 1);
    assert!(daemon.log().contains("dropped for the disk budget"), "{}", daemon.log());
    // A's next turn recomputes its transcript and answers exactly as a fresh run.
    let r2 = a.complete(turn(SECOND, 24)).await.expect("A, turn 2");
    assert!(r2.cached_tokens < r1.prompt_tokens, "{r2:?}");
    assert_eq!(r2.token_ids.clone(), fresh_second_turn_after(LONG_FIRST, &r1.text.clone(), 24));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_saw_local_data_stays_local() {
    // This app may send public data to the cloud (none is configured: such a turn would
    // fail with CloudUnavailable, not PrivacyViolation).
    let apps = apps_dir(&[("me.toml", format!("app = {:?}\ncloud = true\ncloud_scopes = [\"public\"]\n", this_app()))]);
    let bus = Bus::start();
    let _daemon =
        Daemon::start_configured(&bus, &Settings { apps: apps_setting(apps.path()), ..Settings::default() }).await;
    let conn = bus.connect().await;
    let path = open(&conn).await;
    let s = session(&conn, &path).await;
    let local = Variant::from(vec![HashMap::from([
        (key::ROLE.to_owned(), Variant::from("user")),
        (key::CONTENT.to_owned(), Variant::from("My PIN is 4821. Reply OK.")),
        (key::SCOPE.to_owned(), Variant::from("local")),
    ])]);
    let mut first = HashMap::from([(key::MESSAGES, local), (key::MAX_TOKENS, Variant::from(4u32))]);
    first.insert(key::ROUTE, Variant::from("local"));
    s.complete(first).await.expect("turn 1");
    assert_eq!(s.taint().await.unwrap(), "local");
    // A later turn with nothing private of its own still carries the transcript's taint.
    let public = || {
        let part = HashMap::from([
            (key::ROLE.to_owned(), Variant::from("user")),
            (key::CONTENT.to_owned(), Variant::from("What is the capital of France?")),
            (key::SCOPE.to_owned(), Variant::from("public")),
        ]);
        HashMap::from([
            (key::MESSAGES, Variant::from(vec![part])),
            (key::MAX_TOKENS, Variant::from(4u32)),
            (key::ROUTE, Variant::from("cloud")),
        ])
    };
    let err = s.complete(public()).await.expect_err("a tainted session cannot go to the cloud");
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.PrivacyViolation", "{err:?}");
    // The same turn in an untainted session is allowed to leave (and fails only for want of
    // a cloud endpoint).
    let fresh = open(&conn).await;
    let err = session(&conn, &fresh).await.complete(public()).await.expect_err("no cloud configured");
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.CloudUnavailable", "{err:?}");
    // And the session keeps serving on the device.
    s.complete(turn("Say yes.", 4)).await.expect("turn on the device");
}

/// `dbus-send` to the session: another process, so another app to hearthd.
fn other_app(bus: &Bus, path: &str, member: &str, args: &[&str]) -> String {
    let out = Command::new("dbus-send")
        .arg(format!("--bus={}", bus.address()))
        .args(["--print-reply", "--dest=org.hearth.Hearth1", path, member])
        .args(args)
        .output()
        .expect("run dbus-send");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_uses_a_session_and_closing_frees_it() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let path = open(&conn).await;
    let s = session(&conn, &path).await;
    s.complete(turn(FIRST, 8)).await.expect("turn 1");
    // Another app can neither continue, read nor close it.
    let out = other_app(&bus, path.as_str(), "org.hearth.Hearth1.Session.Close", &[]);
    assert!(out.contains("org.hearth.Hearth1.Error.NotAuthorized"), "{out}");
    let out = other_app(
        &bus,
        path.as_str(),
        "org.freedesktop.DBus.Properties.Get",
        &["string:org.hearth.Hearth1.Session", "string:Tokens"],
    );
    assert!(out.contains("org.hearth.Hearth1.Error.NotAuthorized"), "{out}");
    // Nor can another connection of this process.
    let conn2 = bus.connect().await;
    let s2 = session(&conn2, &path).await;
    let err = s2.complete(turn(SECOND, 8)).await.expect_err("not the owner");
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.NotAuthorized");
    let err = hearth_dbus::Error::from(s2.tokens().await.expect_err("not the owner"));
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.NotAuthorized");
    // Bad input is refused with a named error and the session keeps serving.
    let mut other_model = turn(SECOND, 8);
    other_model.insert(key::MODEL, Variant::from("another-model"));
    let err = s.complete(other_model).await.expect_err("model mismatch");
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    let err = proxy.open_session(HashMap::from([("colour", Variant::from("red"))])).await.expect_err("unknown option");
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    let err = proxy
        .open_session(HashMap::from([(key::MODEL, Variant::from("no-such-model"))]))
        .await
        .expect_err("unknown model");
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.ModelNotFound");
    s.complete(turn(SECOND, 8)).await.expect("the owner goes on");
    // Close frees it: no object, no session, no KV left behind.
    s.close().await.unwrap();
    assert!(s.complete(turn(SECOND, 8)).await.is_err(), "closed");
    let kv = proxy.kv_cache().await.unwrap();
    assert_eq!((kv.sessions, kv.parked_sessions), (0, 0), "{kv:?}");
    // A connection that leaves takes its sessions with it.
    let conn3 = bus.connect().await;
    let p3 = open(&conn3).await;
    session(&conn3, &p3).await.complete(turn(FIRST, 4)).await.unwrap();
    assert_eq!(proxy.kv_cache().await.unwrap().sessions, 1);
    drop(conn3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.kv_cache().await.unwrap().sessions != 0 {
        assert!(Instant::now() < deadline, "the session of a closed connection stayed open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_limited_per_app() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let mut paths = Vec::new();
    for _ in 0..8 {
        paths.push(open(&conn).await);
    }
    let err = proxy.open_session(HashMap::new()).await.expect_err("ninth session");
    assert_eq!(err.dbus_name(), "org.hearth.Hearth1.Error.Busy");
    session(&conn, &paths[0]).await.close().await.unwrap();
    let p = open(&conn).await;
    let r = session(&conn, &p).await.complete(turn(FIRST, 4)).await.unwrap();
    assert!(!r.token_ids.clone().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearthctl_chat_talks_in_one_session() {
    use std::io::Write;
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let mut child = Command::new(hearth_tests::workspace_bin("hearthctl"))
        .args(["--bus-address", bus.address(), "--json", "chat", "--max-tokens", "12"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run hearthctl chat");
    child.stdin.take().unwrap().write_all(format!("{FIRST}\n\n{SECOND}\n").as_bytes()).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let finished: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("finished").cloned())
        .collect();
    assert_eq!(finished.len(), 2, "two turns (the empty line is skipped): {stdout}");
    let prompt_1 = finished[0]["prompt_tokens"].as_u64().unwrap();
    assert!(finished[1]["cached_tokens"].as_u64().unwrap() >= prompt_1, "turn 2 re-used turn 1: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_its_model_being_unloaded() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: UnloadModel needs an admin and this test was skipped");
        return;
    }
    let bus = Bus::start();
    let daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let path = open(&conn).await;
    let s = session(&conn, &path).await;
    let r1 = s.complete(turn(FIRST, 24)).await.expect("turn 1");
    // Unloading the model (as under memory pressure) stops its engine: the idle session's
    // KV is parked rather than lost.
    proxy.unload_model("smollm2-135m-instruct").await.expect("unload");
    assert!(proxy.loaded_models().await.unwrap().is_empty());
    assert_eq!(proxy.kv_cache().await.unwrap().parked_sessions, 1);
    let r2 = s.complete(turn(SECOND, 24)).await.expect("turn 2 reloads the model");
    assert!(r2.cached_tokens >= r1.prompt_tokens, "{r2:?}");
    assert_eq!(r2.token_ids.clone(), fresh_second_turn(&r1.text.clone(), 24));
    assert!(daemon.log().contains("session KV restored"));
}

/// GetAll of the session interface at `path`, over `conn`.
async fn get_all(conn: &Connection, path: &OwnedObjectPath) -> Result<HashMap<String, zbus::OwnedVariant>, String> {
    match conn
        .call_method(
            Some("org.hearth.Hearth1"),
            path,
            Some("org.freedesktop.DBus.Properties"),
            "GetAll",
            &("org.hearth.Hearth1.Session",),
        )
        .await
    {
        Ok(reply) => Ok(reply.body().deserialize().expect("a{sv}")),
        Err(e) => Err(hearth_dbus::Error::from(e).dbus_name()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_all_of_a_session_is_its_owners_only() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let path = open(&conn).await;
    session(&conn, &path).await.complete(turn(FIRST, 4)).await.expect("turn 1");
    // Another connection gets NotAuthorized, as from Get, not an empty dictionary.
    let conn2 = bus.connect().await;
    assert_eq!(get_all(&conn2, &path).await.expect_err("not the owner"), "org.hearth.Hearth1.Error.NotAuthorized");
    // And so does another app, for any interface at the node.
    let out = other_app(
        &bus,
        path.as_str(),
        "org.freedesktop.DBus.Properties.GetAll",
        &["string:org.hearth.Hearth1.Session"],
    );
    assert!(out.contains("org.hearth.Hearth1.Error.NotAuthorized"), "{out}");
    // The owner gets every property.
    let all = get_all(&conn, &path).await.expect("the owner's GetAll");
    let mut names: Vec<&str> = all.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["Model", "Taint", "Tokens"], "{all:?}");
    assert!(u32::try_from(&*all["Tokens"]).unwrap() > 0);
    let s = session(&conn, &path).await;
    assert_eq!(s.model().await.unwrap(), String::try_from(all["Model"].try_clone().unwrap()).unwrap());
    assert_eq!(String::try_from(all["Taint"].try_clone().unwrap()).unwrap(), "personal");
    // Get still answers as before, and the node goes away with the session.
    assert!(s.tokens().await.unwrap() > 0);
    s.close().await.unwrap();
    assert!(get_all(&conn, &path).await.is_err(), "closed");
}
