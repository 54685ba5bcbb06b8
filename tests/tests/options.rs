//! Request options against the real daemon and model: stop sequences, logprobs, and the
//! repetition, frequency and presence penalties.

use std::collections::HashMap;
use std::time::Duration;

use hearth_dbus::{Generation, request_key as key};
use hearth_tests::{Bus, Daemon, ResultDict, chat_request, collect, hearth};
use zbus::Variant;

const PROMPT: &str = "Write four short sentences about the sea, each on its own line.";

type Request = HashMap<&'static str, Variant<'static>>;

fn with(mut r: Request, k: &'static str, v: Variant<'static>) -> Request {
    r.insert(k, v);
    r
}

/// Streams `r`: the pieces (checked to be numbered 0.. and to add up to the text) and the
/// result.
async fn stream(conn: &zbus::Connection, r: Request, token: &str) -> (Vec<String>, ResultDict) {
    let g = Generation::start(conn, r, token).await.unwrap();
    let (tokens, result) = collect(g, Duration::from_secs(60)).await;
    let indices: Vec<u32> = tokens.iter().map(|t| t.0).collect();
    assert_eq!(indices, (0..tokens.len() as u32).collect::<Vec<_>>(), "one event per token, in order");
    let pieces: Vec<String> = tokens.into_iter().map(|t| t.2).collect();
    assert_eq!(pieces.concat(), result.text, "the streamed pieces add up to the text");
    assert_eq!(result.token_ids.len(), pieces.len());
    (pieces, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sequences_end_the_text_exactly() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let (pieces, base) = stream(&conn, chat_request(PROMPT, 60), "base").await;
    assert!(base.text.len() > 40, "{base:?}");
    // Stops: a whole word in the middle, and one that starts inside a token and ends inside
    // the next (so its start was streamed-looking text that had to be held back).
    let mid = base.text.len() / 2;
    let word = base.text[mid..].split_whitespace().find(|w| w.len() >= 3).expect("a word").to_owned();
    let k = pieces.iter().position(|p| p.len() >= 3).filter(|&k| k + 1 < pieces.len()).expect("a long piece");
    let (a, b) = (&pieces[k], &pieces[k + 1]);
    let straddle = format!("{}{}", &a[a.len() - 2..], &b[..b.len().min(2)]);
    for stop in [word.clone(), straddle.clone(), "\n".to_owned()] {
        let Some(at) = base.text.find(&stop) else { continue };
        let r = with(chat_request(PROMPT, 60), key::STOP, Variant::from(vec![stop.clone()]));
        let (pieces, result) = stream(&conn, r, "stopped").await;
        assert_eq!(result.text, base.text[..at], "stop {stop:?}");
        assert_eq!(result.finish_reason, "stop", "{stop:?}");
        assert!(pieces.iter().all(|p| !p.contains(&stop)), "{stop:?}: {pieces:?}");
        // The same tokens, up to the one that completed the stop.
        assert!(base.token_ids.starts_with(&result.token_ids), "{stop:?}");
        // Complete gives the same.
        let r = with(chat_request(PROMPT, 60), key::STOP, Variant::from(vec![stop.clone()]));
        assert_eq!(hearth(&conn).await.complete(r).await.unwrap().text, result.text);
    }
    // The earliest of several wins, whatever the order; one that never comes changes nothing.
    let first = base.text.find(&word).unwrap();
    let r = with(chat_request(PROMPT, 60), key::STOP, Variant::from(vec!["never-said-xyz".to_owned(), word.clone()]));
    assert_eq!(stream(&conn, r, "several").await.1.text, base.text[..first]);
    let r = with(chat_request(PROMPT, 60), key::STOP, Variant::from(vec!["never-said-xyz".to_owned()]));
    let (_, none) = stream(&conn, r, "none").await;
    assert_eq!((none.text.as_str(), none.finish_reason.as_str()), (base.text.as_str(), base.finish_reason.as_str()));
    // Bad stops are InvalidArgs, and the daemon goes on serving.
    let proxy = hearth(&conn).await;
    for bad in
        [vec![String::new()], vec!["x".repeat(65)], vec!["a".into(), "b".into(), "c".into(), "d".into(), "e".into()]]
    {
        let e = proxy.complete(with(chat_request(PROMPT, 4), key::STOP, Variant::from(bad))).await.unwrap_err();
        assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs", "{e}");
    }
    assert_eq!(proxy.complete(chat_request(PROMPT, 60)).await.unwrap().text, base.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_are_consistent_with_greedy_choices() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let plain = proxy.complete(chat_request(PROMPT, 40)).await.unwrap();
    assert!(plain.logprobs.is_none(), "only when asked");
    for speculative in [true, false] {
        let r = with(chat_request(PROMPT, 40), key::LOGPROBS, Variant::from(true));
        let r = with(r, key::TOP_LOGPROBS, Variant::from(5u32));
        let r = with(r, key::SPECULATIVE, Variant::from(speculative));
        let (pieces, result) = stream(&conn, r, "lp").await;
        assert_eq!(result.token_ids, plain.token_ids, "asking for logprobs changes no choice");
        let lps = result.logprobs.clone().expect("logprobs");
        assert_eq!(lps.len(), result.token_ids.len());
        let mut joined = Vec::new();
        for (i, (id, text, lp, top)) in lps.iter().enumerate() {
            assert_eq!(*id, result.token_ids[i]);
            assert_eq!(top.len(), 5);
            // Greedy took the likeliest token, so it heads the list with its own number.
            assert_eq!(top[0].0, *id, "token {i}: {top:?}");
            assert_eq!(top[0].2, *lp);
            assert!(top.windows(2).all(|w| w[0].2 >= w[1].2), "{top:?}");
            assert!(*lp <= 0.0 && top.iter().all(|t| t.2 <= 0.0 && t.2.is_finite()));
            let mass: f64 = top.iter().map(|t| t.2.exp()).sum();
            assert!(mass <= 1.0 + 1e-4, "{mass}");
            assert!(top.iter().skip(1).all(|t| t.0 != *id), "no token twice");
            joined.push(text.clone());
        }
        // Token texts are the model's pieces; together (where no character was split) the text.
        if pieces.iter().all(|p| !p.is_empty()) {
            assert_eq!(joined.concat(), result.text);
        }
    }
    // logprobs alone: the chosen token only.
    let r = with(chat_request(PROMPT, 5), key::LOGPROBS, Variant::from(true));
    let lps = proxy.complete(r).await.unwrap().logprobs.expect("logprobs");
    assert!(lps.iter().all(|l| l.3.is_empty()), "{lps:?}");
    // Device-only, and bounded.
    let invalid = "org.hearth.Hearth1.Error.InvalidArgs";
    let r = with(with(chat_request(PROMPT, 5), key::LOGPROBS, Variant::from(true)), key::ROUTE, Variant::from("cloud"));
    assert_eq!(proxy.complete(r).await.unwrap_err().dbus_name(), invalid);
    let r = with(
        with(chat_request(PROMPT, 5), key::LOGPROBS, Variant::from(true)),
        key::TOP_LOGPROBS,
        Variant::from(21u32),
    );
    assert_eq!(proxy.complete(r).await.unwrap_err().dbus_name(), invalid);
}

/// How often the most repeated token of `ids` occurs.
fn most_repeated(ids: &[i32]) -> usize {
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(id).or_insert(0usize) += 1;
    }
    counts.into_values().max().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penalties_discourage_repeating_tokens() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let prompt = "Repeat after me: la la la la la la la la la la la la";
    let base = proxy.complete(chat_request(prompt, 48)).await.unwrap();
    let base_most = most_repeated(&base.token_ids);
    assert!(base_most >= 8, "the prompt makes the model repeat itself: {:?}", base.text);
    for (k, x) in [(key::FREQUENCY_PENALTY, 2.0f64), (key::REPETITION_PENALTY, 2.0)] {
        let r = with(chat_request(prompt, 48), k, Variant::from(x));
        let result = proxy.complete(r).await.unwrap();
        let most = most_repeated(&result.token_ids);
        assert!(
            most < base_most,
            "{k} {x}: the most repeated token occurs {most} times, {base_most} without: {:?}",
            result.text
        );
        // Deterministic: the same request, the same answer.
        let again = proxy.complete(with(chat_request(prompt, 48), k, Variant::from(x))).await.unwrap();
        assert_eq!(again.token_ids, result.token_ids, "{k}");
    }
    // A presence penalty lowers every token used once by the same amount: it cannot break a
    // loop this sure of itself, but it makes ordinary text use more different tokens.
    let distinct = |ids: &[i32]| ids.iter().collect::<std::collections::HashSet<_>>().len();
    let plain = proxy.complete(chat_request(PROMPT, 60)).await.unwrap();
    let r = with(chat_request(PROMPT, 60), key::PRESENCE_PENALTY, Variant::from(2.0f64));
    let present = proxy.complete(r).await.unwrap();
    assert!(
        distinct(&present.token_ids) * plain.token_ids.len() > distinct(&plain.token_ids) * present.token_ids.len(),
        "{:?} vs {:?}",
        present.text,
        plain.text
    );
    // Negative frequency and presence penalties encourage repeats; out of range is refused.
    let r = with(chat_request(prompt, 48), key::PRESENCE_PENALTY, Variant::from(-2.0f64));
    assert!(most_repeated(&proxy.complete(r).await.unwrap().token_ids) >= base_most);
    for (k, x) in [(key::FREQUENCY_PENALTY, 2.5f64), (key::PRESENCE_PENALTY, -2.5), (key::REPETITION_PENALTY, 0.0)] {
        let e = proxy.complete(with(chat_request(prompt, 4), k, Variant::from(x))).await.unwrap_err();
        assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs", "{k}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_matches_what_generate_runs() {
    let bus = Bus::start();
    let _daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let count = proxy.count_tokens(chat_request(PROMPT, 60)).await.unwrap();
    let ran = proxy.complete(chat_request(PROMPT, 60)).await.unwrap();
    assert_eq!(count.prompt_tokens, ran.prompt_tokens, "{count:?}");
    assert_eq!(count.model, ran.model);
    assert_eq!(count.image_tokens, 0);
    let models = proxy.list_models().await.unwrap();
    let ctx = models.iter().find(|m| m.name == count.model).and_then(|m| m.context_length).unwrap();
    assert_eq!(count.context_length, ctx);
    assert_eq!(count.remaining, ctx - count.prompt_tokens);
    assert!(count.fits);
    // A tools description is part of the prompt, and counted.
    let tools = r#"[{"type": "function", "function": {"name": "get_time", "description": "The time now",
        "parameters": {"type": "object", "properties": {}}}}]"#;
    let with_tools = with(chat_request(PROMPT, 60), key::TOOLS, Variant::from(tools));
    let counted = proxy.count_tokens(with_tools.clone()).await.unwrap().prompt_tokens;
    assert!(counted > count.prompt_tokens);
    assert_eq!(counted, proxy.complete(with_tools).await.unwrap().prompt_tokens);
    // Too long: counted all the same, and said not to fit; Generate refuses it.
    let long = "word ".repeat(ctx as usize + 100);
    let r = chat_request(&long, 8);
    let c = proxy.count_tokens(r.clone()).await.unwrap();
    assert!(c.prompt_tokens > ctx && !c.fits && c.remaining == 0, "{c:?}");
    assert_eq!(proxy.complete(r).await.unwrap_err().dbus_name(), "org.hearth.Hearth1.Error.ContextLengthExceeded");
    let c = proxy.count_tokens(chat_request(PROMPT, ctx + 1)).await.unwrap();
    assert!(!c.fits, "max_tokens past the context: {c:?}");
    // Checked as Generate checks; an unknown model is ModelNotFound.
    let e = proxy.count_tokens(with(chat_request(PROMPT, 8), "bogus", Variant::from(1u32))).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.InvalidArgs");
    let e = proxy.count_tokens(with(chat_request(PROMPT, 8), key::MODEL, Variant::from("nope"))).await.unwrap_err();
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.ModelNotFound");
    // hearthctl count-tokens takes generate's options.
    let out = std::process::Command::new(hearth_tests::workspace_bin("hearthctl"))
        .args(["--bus-address", bus.address(), "--json", "count-tokens", PROMPT, "--max-tokens", "60"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["prompt_tokens"], count.prompt_tokens, "{json}");
    let out = std::process::Command::new(hearth_tests::workspace_bin("hearthctl"))
        .args(["--bus-address", bus.address(), "availability"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{}\tready", count.model));
}
