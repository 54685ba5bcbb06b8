//! Client libraries against the real daemon and model: the Python package (clients/python,
//! installed into the checkout's venv by scripts/setup-deps.sh) and its examples.

use std::process::Command;

use hearth_tests::{Bus, Daemon, Settings, apps_dir, apps_setting, process_app, repo_file};

/// The checkout's venv Python, with the client importable from the checkout.
fn python() -> Command {
    let python = repo_file(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup-deps.sh", python.display());
    let check = Command::new(&python).args(["-c", "import hearth, dbus_fast"]).output().unwrap();
    assert!(check.status.success(), "the Python client is not installed: run scripts/setup-deps.sh");
    let mut c = Command::new(python);
    c.current_dir(repo_file("clients/python"));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_streams_and_keeps_every_promise() {
    // A script is named by its interpreter (uid:UID:EXE), which Seal refuses unless an admin
    // opts the id in, as here: the test seals with it.
    let exe = std::fs::canonicalize(repo_file(".venv/bin/python")).unwrap();
    let me = process_app(nix::unistd::geteuid().as_raw(), &exe);
    let apps = apps_dir(&[("python.toml", format!("app = {me:?}\nseal_unsandboxed = true\n"))]);
    let bus = Bus::start();
    let _daemon =
        Daemon::start_configured(&bus, &Settings { apps: apps_setting(apps.path()), ..Settings::default() }).await;
    let out = python().args(["tests/live.py", "--bus-address", bus.address()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for check in [
        "streams_and_completes",
        "embeds_seals_and_counts",
        "tool_round_trip",
        "sessions",
        "typed_errors",
        "cancels_and_ignores_forgeries",
    ] {
        assert!(stdout.contains(&format!("ok {check}")), "{stdout}");
    }
    // The examples, as an app author would run them.
    let out = python()
        .args(["examples/stream.py", "--bus-address", bus.address(), "--max-tokens", "16", "Name a colour."])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("tokens on smollm2-135m-instruct, local]"), "{stdout}");
    let mut chat = python()
        .args(["examples/chat.py", "--bus-address", bus.address()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    chat.stdin.take().unwrap().write_all(b"Hello!\nAnd again?\n").unwrap();
    let out = chat.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(stdout.matches("tokens in the session]").count(), 2, "{stdout}");
    // Last, as it kills hearthd: a generation whose service dies ends with an error.
    let pid = _daemon.pid().as_raw().to_string();
    let out = python().args(["tests/live.py", "--bus-address", bus.address(), "--kill-pid", &pid]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok service_lost"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Rust client's stream ends with an error, not a wait forever, when hearthd dies
/// mid-generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_generation_ends_when_hearthd_dies() {
    let bus = Bus::start();
    let daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let request = hearth_tests::chat_request("Count from one to five hundred, in words.", 400);
    let mut g = hearth_dbus::Generation::start(&conn, request, "lost").await.unwrap();
    let first = g.next().await.unwrap().unwrap();
    assert!(matches!(first, hearth_dbus::StreamEvent::Token { .. }), "{first:?}");
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    let end = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match g.next().await {
                Some(Ok(hearth_dbus::StreamEvent::Token { .. })) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ended");
    match end {
        Some(Err(e)) => assert!(e.to_string().contains("left the bus"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(g.next().await.is_none());
}

/// Every error name, in the Python client's exceptions and the GLib example's error domain.
#[test]
fn the_clients_know_every_error_name() {
    let python = std::fs::read_to_string(repo_file("clients/python/hearth/errors.py")).unwrap();
    let glib = std::fs::read_to_string(repo_file("clients/glib/hearth-error.c")).unwrap();
    for name in hearth_dbus::ERROR_NAMES {
        let short = name.rsplit('.').next().unwrap();
        assert!(python.contains(&format!("class {short}(HearthError)")), "clients/python lacks {name}");
        assert!(glib.contains(&format!("\"{name}\"")), "clients/glib lacks {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_glib_example_builds_from_the_xml_and_streams() {
    let out_dir = tempfile::tempdir().unwrap();
    let built = Command::new(repo_file("clients/glib/build.sh")).arg(out_dir.path()).output().unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    // The generated documentation carries every method, signal, property, argument and
    // error name (gdbus-codegen drops wrapped argument docs and the rest after them).
    let docs = Command::new("python3")
        .arg(repo_file("tests/tools/check-gdbus-docs.py"))
        .arg(repo_file("dbus/data/org.hearth.Hearth1.xml"))
        .arg(out_dir.path())
        .args(hearth_dbus::ERROR_NAMES)
        .output()
        .unwrap();
    assert!(docs.status.success(), "{}", String::from_utf8_lossy(&docs.stdout));

    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let stream = out_dir.path().join("hearth-stream");
    let out = Command::new(&stream)
        .args(["--address", bus.address(), "--max-tokens", "24", "Name three colours."])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let (text, tail) = stdout.rsplit_once("\n[").expect("a summary line");
    assert!(!text.trim().is_empty(), "{stdout}");
    assert!(tail.ends_with("tokens on smollm2-135m-instruct]\n"), "{stdout}");
    assert!(tail.starts_with("stop:") || tail.starts_with("length: 24 tokens"), "{stdout}");
    // The same answer as any other client gets (greedy).
    let conn = bus.connect().await;
    let r = hearth_tests::hearth(&conn)
        .await
        .complete(hearth_tests::chat_request("Name three colours.", 24))
        .await
        .unwrap();
    assert_eq!(text, r.text);
    // A refusal arrives as the HEARTH_ERROR domain's code, with hearthd's message.
    let out = Command::new(&stream).args(["--address", bus.address(), "--max-tokens", "0", "Hi"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("refused (a bad request): org.hearth.Hearth1.Error.InvalidArgs: max_tokens"), "{stderr}");
}
