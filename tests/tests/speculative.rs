//! Speculative decoding with the real daemon and model: the output is plain decoding's,
//! token by token, alone and batched, greedy and seeded, with a grammar and with adapters;
//! drafts are taken where the answer repeats its input, and the counts are reported.

use std::collections::HashMap;
use std::time::Duration;

use hearth_dbus::request_key as key;
use hearth_tests::{Bus, Daemon, ModelDir, ResultDict, Settings, chat_request, hearth};
use zbus::Variant;

type Request = HashMap<&'static str, Variant<'static>>;

const TEXT: &str = "The old lighthouse keeper climbed the spiral stairs every evening at dusk. \
    He polished the great lens, trimmed the wick, and watched the ships pass safely by the rocks.";

/// The requests: input-heavy ones (drafts are right often) and open-ended ones.
fn cases() -> Vec<(&'static str, Request)> {
    let mut cases: Vec<(&'static str, Request)> = vec![
        ("repeat", chat_request(&format!("Repeat this text exactly, word for word:\n\n{TEXT}"), 64)),
        (
            "correct",
            chat_request("Fix the spelling: Teh wether is very nise todey and the sun is shinning brightly.", 48),
        ),
        ("quote", chat_request(&format!("Quote the first sentence of this text:\n\n{TEXT}"), 48)),
        ("chat", chat_request("What is the capital of France?", 32)),
        ("haiku", chat_request("Write a haiku about rain.", 32)),
        ("days", chat_request("List the days of the week.", 48)),
    ];
    let mut json =
        chat_request("Extract the name and age as JSON: Alice Smith is 34 years old and lives in Paris.", 48);
    json.insert(
        key::JSON_SCHEMA,
        Variant::from(
            r#"{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"]}"#,
        ),
    );
    cases.push(("json", json));
    let mut seeded = chat_request(&format!("Repeat this text:\n\n{TEXT}"), 48);
    seeded.insert(key::TEMPERATURE, Variant::from(0.7));
    seeded.insert(key::SEED, Variant::from(42u32));
    cases.push(("seeded", seeded));
    for (name, user) in
        [("tuned-repeat", format!("Repeat this text exactly:\n\n{TEXT}")), ("tuned-chat", "Name three colours.".into())]
    {
        let mut r = chat_request(&user, 40);
        r.insert(key::ADAPTERS, Variant::from(HashMap::from([("style".to_owned(), Variant::from(1.0))])));
        cases.push((name, r));
    }
    cases
}

fn speculative(mut r: Request, on: bool) -> Request {
    r.insert(key::SPECULATIVE, Variant::from(on));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_output_is_plain_decodings_token_by_token() {
    let dir = ModelDir::new();
    dir.link_default_model("m.gguf");
    dir.make_lora("style.gguf", &[]);
    let sha = hearth_tests::sha256_file(&dir.path().join("style.gguf"));
    let adapters = format!("[[adapters]]\nname = \"style\"\nfile = \"style.gguf\"\nsha256 = {sha:?}\nscale = 0.0\n");
    dir.manifest(hearth_tests::DEFAULT_MODEL, "m.gguf", None, &adapters);
    let bus = Bus::start();
    let settings = Settings {
        models_dirs: Some(vec![dir.path().to_owned()]),
        max_sequences: Some(12),
        limits: "queue_per_app = 32\nqueue_capacity = 64".into(),
        ..Settings::default()
    };
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let complete = |r: Request| {
        let proxy = proxy.clone();
        async move { proxy.complete(r).await.expect("Complete") }
    };
    let cases = cases();
    let mut plain: Vec<ResultDict> = Vec::new();
    for (name, r) in &cases {
        let off = complete(speculative(r.clone(), false)).await;
        assert_eq!(off.draft_tokens, 0, "{name}: no drafts with speculative off");
        assert!(off.token_ids.len() >= 5, "{name}: a real answer ({:?})", off.text);
        plain.push(off);
    }
    // Alone: the default (on) gives the same tokens.
    let (mut drafted, mut accepted) = (0, 0);
    for ((name, r), off) in cases.iter().zip(&plain) {
        let on = complete(r.clone()).await;
        assert_eq!(on.token_ids, off.token_ids, "{name}: speculative output differs from plain decoding");
        assert_eq!(on.text, off.text, "{name}");
        assert_eq!(on.finish_reason, off.finish_reason, "{name}");
        assert!(on.draft_accepted <= on.draft_tokens, "{name}");
        eprintln!("{name}: {} tokens, {}/{} drafts taken", on.token_ids.len(), on.draft_accepted, on.draft_tokens);
        if name.starts_with("tuned") {
            assert_eq!(on.draft_tokens, 0, "{name}: no drafts under adapters");
        }
        if matches!(*name, "repeat" | "quote") {
            assert!(on.draft_accepted * 3 >= on.token_ids.len() as u32, "{name}: repeated text is drafted right");
        }
        drafted += on.draft_tokens;
        accepted += on.draft_accepted;
    }
    // Batched: every case at once, speculative on and off side by side, twice over. (The
    // adapter cases are traffic here: several sequences under one adapter set in one step
    // round their F32 adapter weights differently from a solo run, speculative or not.)
    for round in 0..2 {
        let all = cases.iter().flat_map(|(_, r)| [speculative(r.clone(), true), speculative(r.clone(), false)]);
        let results = futures_util::future::join_all(all.map(complete)).await;
        let differ: Vec<String> = results
            .iter()
            .enumerate()
            .filter(|(i, r)| !cases[i / 2].0.starts_with("tuned") && r.token_ids != plain[i / 2].token_ids)
            .map(|(i, r)| format!("{} (speculative {}, {} drafts)", cases[i / 2].0, i % 2 == 0, r.draft_tokens))
            .collect();
        assert!(differ.is_empty(), "round {round}: batched output differs from plain decoding's: {differ:?}");
        for (i, r) in results.iter().enumerate() {
            if i % 2 == 0 {
                drafted += r.draft_tokens;
                accepted += r.draft_accepted;
            }
        }
    }
    // (The engine process reports its gauges with its heartbeats.)
    let counted = || {
        let proxy = proxy.clone();
        async move {
            let kv = proxy.kv_cache().await.unwrap();
            ((kv.draft_tokens, kv.draft_accepted) == (drafted, accepted)).then_some(())
        }
    };
    hearth_tests::wait_for(Duration::from_secs(5), "KvCache to count every draft", counted).await;
    assert!(accepted > 0 && accepted < drafted, "drafts were both taken and refused ({accepted}/{drafted})");
    // A value of the wrong type is refused by name; the daemon goes on serving.
    let mut bad = chat_request("hi", 4);
    bad.insert(key::SPECULATIVE, Variant::from("yes"));
    let e = proxy.complete(bad).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    assert!(e.message().contains("speculative must be a boolean"), "{}", e.message());
    assert_eq!(complete(cases[3].1.clone()).await.token_ids, plain[3].token_ids);
}
