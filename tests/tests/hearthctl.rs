//! hearthctl against the real daemon: status, models, and a streamed generation.

use std::process::Command;

use hearth_tests::{Bus, Daemon, direct_run, greedy, workspace_bin};

fn hearthctl(bus: &Bus, args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("hearthctl"))
        .arg("--bus-address")
        .arg(bus.address())
        .args(args)
        .output()
        .expect("run hearthctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearthctl_status_models_and_generate() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;

    let out = hearthctl(&bus, &["--json", "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Models load on first use.
    assert_eq!(status["loaded_models"], serde_json::json!([]));
    assert_eq!(status["queue_depth"], 0);
    assert!(status["memory"]["budget_bytes"].as_u64().unwrap() > 0, "{status}");
    assert!(status["backends"].as_array().unwrap().iter().any(|b| b["kind"] == "cpu"), "{status}");

    let out = hearthctl(&bus, &["load", "--pin", "smollm2-135m-instruct"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = hearthctl(&bus, &["--json", "models"]);
    let models: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(models[0]["name"], "smollm2-135m-instruct");
    assert_eq!(models[0]["loaded"], true);
    assert_eq!(models[0]["pinned"], true);
    assert_eq!(models[0]["verified"], true);
    assert_eq!(models[0]["capabilities"], serde_json::json!(["chat"]));
    let out = hearthctl(&bus, &["status"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("loaded models: smollm2-135m-instruct") && text.contains("MiB"), "{text}");

    let prompt = "What is the capital of France?";
    let direct = direct_run(&[("user", prompt)], greedy(), 24);
    let out = hearthctl(&bus, &["--json", "generate", "--max-tokens", "24", prompt]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (tokens, finished) = lines.split_at(lines.len() - 1);
    let ids: Vec<i64> = tokens.iter().map(|t| t["token_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, direct.tokens.iter().map(|&t| i64::from(t)).collect::<Vec<_>>());
    assert_eq!(finished[0]["finished"]["text"], direct.text.as_str());

    // Plain output streams the text and ends with a summary on stderr.
    let out = hearthctl(&bus, &["generate", "--max-tokens", "24", prompt]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim_end(), direct.text.trim_end());
    let summary = String::from_utf8(out.stderr).unwrap();
    assert!(summary.contains("tokens") && summary.contains("tok/s"), "{summary}");

    // Errors come out by name, with a failing exit code.
    let out = hearthctl(&bus, &["generate", "--model", "nope", "hi"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.hearth.Hearth1.Error.ModelNotFound"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearthctl_top_shows_each_apps_requests_and_tokens_per_second() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    // A long answer streams while top samples.
    let r = hearth_tests::chat_request("Count from one to five hundred, in words.", 400);
    let mut g = hearth_dbus::Generation::start(&conn, r, "top1").await.unwrap();
    assert!(matches!(g.next().await, Some(Ok(hearth_dbus::StreamEvent::Token { .. }))));
    // The stream is read while top runs: a zbus connection whose signal stream is left
    // unread stops reading its socket once the stream's queue is full, so even the reply
    // to Cancel would never arrive.
    let address = bus.address().to_owned();
    let mut top = tokio::task::spawn_blocking(move || {
        Command::new(workspace_bin("hearthctl"))
            .args(["--bus-address", &address, "--json", "top", "--once", "--interval", "1"])
            .output()
            .unwrap()
    });
    let out = loop {
        tokio::select! {
            out = &mut top => break out.unwrap(),
            ev = g.next() => if ev.is_none() { break (&mut top).await.unwrap() },
        }
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let frame: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let me = hearth_tests::this_app();
    let row = frame["apps"].as_array().unwrap().iter().find(|a| a["app"] == me.as_str()).expect("this app's row");
    assert_eq!(row["running"], 1, "{frame}");
    assert!(row["tokens_per_s"].as_f64().unwrap() > 1.0, "{frame}");
    assert_eq!(frame["queue_by_priority"]["normal"], 1, "{frame}");
    g.cancel().await.unwrap();
    while let Some(ev) = g.next().await {
        if matches!(ev.unwrap(), hearth_dbus::StreamEvent::Finished(_)) {
            break;
        }
    }
    let out = Command::new(workspace_bin("hearthctl"))
        .args(["--bus-address", bus.address(), "top", "--once", "--interval", "0.2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("RUNNING") && text.contains(&me) && text.contains("thermal"), "{text}");
}
