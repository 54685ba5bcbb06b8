//! hearth-openai (bridge/) against the real daemon and model, driven by the official openai
//! Python package (installed into the checkout's venv by scripts/setup-deps.sh): started by
//! systemd-socket-activate as its user socket unit would start it, and on a loopback TCP port
//! with its token.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hearth_tests::{Bus, Daemon, hearth, repo_file, workspace_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(20), "{what} did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_package_works_unchanged_through_the_bridge() {
    let python = repo_file(".venv/bin/python");
    let check = Command::new(&python).args(["-c", "import openai, httpx2"]).output().unwrap();
    assert!(check.status.success(), "the openai package is missing: run scripts/setup-deps.sh");
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let dir = tempfile::tempdir().unwrap();
    // Socket activation, as hearth-openai.socket does it: the listener is made first and
    // handed over (LISTEN_FDS) when the first client connects.
    let sock = dir.path().join("hearth-openai.sock");
    let _activated = Kill(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&sock)
            .arg(workspace_bin("hearth-openai"))
            .args(["--bus-address", bus.address()])
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-socket-activate (the systemd package)"),
    );
    wait_for("the activation socket", || sock.exists()).await;
    // The TCP listener, with its token file made on start.
    let port = free_port();
    let token = dir.path().join("run/hearth-openai/token");
    let _tcp = Kill(
        Command::new(workspace_bin("hearth-openai"))
            .args(["--bus-address", bus.address(), "--tcp", &format!("127.0.0.1:{port}")])
            .arg("--token-file")
            .arg(&token)
            .spawn()
            .unwrap(),
    );
    wait_for("the TCP listener", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token).unwrap().permissions().mode() & 0o777, 0o600);

    let out = Command::new(&python)
        .arg(repo_file("tests/tools/openai_bridge_check.py"))
        .arg("--unix")
        .arg(&sock)
        .args(["--tcp", &format!("http://127.0.0.1:{port}")])
        .arg("--token-file")
        .arg(&token)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for check in ["chat", "tools_and_schemas", "completions_embeddings_models", "errors", "tcp"] {
        assert!(stdout.contains(&format!("ok {check}\n")), "{stdout}");
    }

    // A client that goes away mid-stream ends its request in hearthd: no device time is
    // spent on an answer nobody reads.
    let body = r#"{"messages": [{"role": "user", "content": "Count from one to five hundred, in words."}], "max_tokens": 400, "stream": true}"#;
    let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: hearth\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while got.matches("data: ").count() < 4 {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "{got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.starts_with("HTTP/1.1 200") && got.contains("text/event-stream"), "{got}");
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    assert_eq!(proxy.queue_depth().await.unwrap(), 1, "the request runs");
    drop(s);
    let start = Instant::now();
    while proxy.queue_depth().await.unwrap() != 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the request outlived its client");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
