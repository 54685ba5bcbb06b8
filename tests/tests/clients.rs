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
}
