//! The task APIs (Summarize, Rewrite, Proofread, Describe) against the real daemon and model:
//! thin calls over Complete, with the model's per-task LoRA adapter where its manifest
//! declares one.

use std::collections::HashMap;

use hearth_tests::{Bus, Daemon, ModelDir, Settings, hearth, png};
use zbus::Variant;

const TEXT: &str = "The city council met on Tuesday evening. After two hours of debate it approved the new \
                    bicycle lanes on Main Street, which will be built next spring, and it postponed the vote on \
                    the library budget to next month.";
const INVALID: &str = "org.hearth.Hearth1.Error.InvalidArgs";

type Request = HashMap<&'static str, Variant<'static>>;

fn call(pairs: &[(&'static str, Variant<'static>)]) -> Request {
    pairs.iter().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_calls_answer_and_use_the_models_adapter_for_the_task() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.manifest("plain", "m.gguf", None, "");
    dir.make_lora("summarizer.gguf", &[]);
    let sha = hearth_tests::sha256_file(&dir.path().join("summarizer.gguf"));
    let adapter = format!(
        "[[adapters]]\nname = \"summarizer\"\nfile = \"summarizer.gguf\"\nsha256 = {sha:?}\ntask = \"summarize\"\n"
    );
    dir.manifest("tasked", "m.gguf", None, &adapter);
    // Two adapters for one task: the manifest is refused.
    let twice = format!(
        "{adapter}\n[[adapters]]\nname = \"other\"\nfile = \"summarizer.gguf\"\nsha256 = {sha:?}\ntask = \"summarize\"\n"
    );
    dir.manifest("twice", "m.gguf", None, &twice);
    dir.vision_model("seer");
    let bus = Bus::start();
    let settings = Settings {
        models_dirs: Some(vec![dir.path().to_owned()]),
        models: "default = \"plain\"\n".into(),
        max_sequences: Some(2),
        interactive_sequences: Some(1),
        ..Settings::default()
    };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let text = || Variant::from(TEXT.to_owned());

    // Each task answers, as Complete would: on the device for personal text, deterministic.
    let s = proxy.summarize(call(&[("text", text()), ("max_tokens", Variant::from(48u32))])).await.unwrap();
    assert!(!s.text.trim().is_empty() && s.route == "local" && s.model == "plain", "{s:?}");
    let again = proxy.summarize(call(&[("text", text()), ("max_tokens", Variant::from(48u32))])).await.unwrap();
    assert_eq!(again.token_ids, s.token_ids);
    // Options change the prompt, so the answer.
    let bullets = proxy
        .summarize(call(&[
            ("text", text()),
            ("format", Variant::from("bullets")),
            ("max_tokens", Variant::from(48u32)),
        ]))
        .await
        .unwrap();
    assert_ne!(bullets.token_ids, s.token_ids);
    let formal = proxy
        .rewrite(call(&[("text", text()), ("tone", Variant::from("formal")), ("max_tokens", Variant::from(48u32))]))
        .await
        .unwrap();
    let casual = proxy
        .rewrite(call(&[("text", text()), ("tone", Variant::from("casual")), ("max_tokens", Variant::from(48u32))]))
        .await
        .unwrap();
    assert!(!formal.text.is_empty() && formal.token_ids != casual.token_ids);
    let fixed = proxy
        .proofread(call(&[
            ("text", Variant::from("Their going to the libary tomorow.")),
            ("max_tokens", Variant::from(24u32)),
        ]))
        .await
        .unwrap();
    assert!(!fixed.text.trim().is_empty(), "{fixed:?}");
    // A task's prompt tokens are its system prompt's plus the text's: more than the text alone.
    let plain = proxy.complete(hearth_tests::chat_request(TEXT, 4)).await.unwrap();
    assert!(s.prompt_tokens > plain.prompt_tokens);

    // The tasked model runs Summarize with its summarize adapter (scale 1), which changes the
    // answer; its other requests run the adapter at its manifest scale, which for a task
    // adapter is 0 unless set: as the base model.
    let tasked = |r: Request| {
        let mut r = r;
        r.insert("model", Variant::from("tasked"));
        r
    };
    let with_adapter =
        proxy.summarize(tasked(call(&[("text", text()), ("max_tokens", Variant::from(48u32))]))).await.unwrap();
    assert_eq!(with_adapter.model, "tasked");
    assert_ne!(with_adapter.token_ids, s.token_ids, "the adapter must change the summary");
    let rewrite_tasked = proxy
        .rewrite(tasked(call(&[
            ("text", text()),
            ("tone", Variant::from("formal")),
            ("max_tokens", Variant::from(48u32)),
        ])))
        .await
        .unwrap();
    assert_eq!(rewrite_tasked.token_ids, formal.token_ids, "no rewrite adapter: the base model's answer");
    let complete_tasked = proxy.complete(tasked(hearth_tests::chat_request(TEXT, 8))).await.unwrap();
    assert_eq!(complete_tasked.token_ids, proxy.complete(hearth_tests::chat_request(TEXT, 8)).await.unwrap().token_ids);
    // An adapter is device-only: a summarize with the adapter cannot go to the cloud.
    let e = proxy.summarize(tasked(call(&[("text", text()), ("route", Variant::from("cloud"))]))).await.unwrap_err();
    assert_eq!(e.dbus_name(), INVALID, "{e}");
    let e = proxy.summarize(call(&[("text", text()), ("model", Variant::from("twice"))])).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.ModelNotFound", "{e}");
    assert!(daemon.log().contains("two adapters are for the task"), "{}", daemon.log());

    // Describe: an image, on a vision model; a text-only model refuses it.
    let image = png(48, 40, |x, y| [(x * 5) as u8, (y * 6) as u8, 90]);
    let d = proxy
        .describe(call(&[
            ("image", Variant::from(image.clone())),
            ("model", Variant::from("seer")),
            ("max_tokens", Variant::from(12u32)),
        ]))
        .await
        .unwrap();
    assert!(d.image_tokens > 0 && !d.token_ids.is_empty(), "{d:?}");
    let e = proxy.describe(call(&[("image", Variant::from(image))])).await.unwrap_err();
    assert_eq!(e.dbus_name(), INVALID, "{e}");

    // Bad calls: InvalidArgs with the reason, and the daemon goes on.
    for (r, want) in [
        (call(&[]), "exactly one of text or sealed"),
        (call(&[("text", text()), ("tone", Variant::from("angry"))]), "unknown key"),
        (call(&[("text", text()), ("length", Variant::from("epic"))]), "length \"epic\""),
    ] {
        let e = proxy.summarize(r).await.unwrap_err();
        assert_eq!(e.dbus_name(), INVALID);
        assert!(e.message().contains(want), "{want}: {e}");
    }
    let fixed = proxy.proofread(call(&[("text", Variant::from("A test."))])).await.unwrap();
    // hearthctl task gives the same.
    let out = std::process::Command::new(hearth_tests::workspace_bin("hearthctl"))
        .args(["--bus-address", bus.address(), "task", "proofread", "A test."])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n", fixed.text));
}
