//! Speculative decoding (prompt lookup): decode tok/s through D-Bus of the same request with
//! it on and off, in one run, alternating, on input-heavy tasks (correcting a ~300-token text,
//! extracting JSON from it) and on open-ended chat; the acceptance rate; the outputs compared
//! token by token; and llama-server's own n-gram speculation on the same tasks, matched to
//! Hearth's lookup (3-token n-grams, drafts of up to 12).

use hearth_dbus::request_key as key;
use hearth_tests::{Bus, Daemon, Settings, chat_request};
use zbus::zvariant::Variant;

use super::contention::{Peer, llama_tool};
use super::{ASKERS, DECODE_PROMPT, median, over_dbus_result};

/// A text of about 300 tokens with spelling mistakes in it.
const TEXT: &str = "The lighthouse on the northern cape was bilt in 1871 from granite quarried on the \
island itself. For more then a century a keeper lived in the small stone house at its foot, climbing \
the ninety-two steps every evening to light the lamp and every morning to put it out. The keepers \
kept a log of the weather, the ships that passed, and anything unusual they saw at sea. One entry \
from the winter of 1903 describes a storm so violent that waves broke over the gallery, forty meters \
above the rocks, and the keeper had to relight the lamp three times before dawn. Another, from a calm \
summer night, records a pod of whales passing so close that he could here them breathing. In 1962 the \
light was electrified and the last keeper left the island. Today the lighthouse is run automaticaly \
and checked by a technician twice a year, but the log books are kept in the town museum, were visitors \
can read them in the keepers own handwriting. The stone house has been restored and is open to walkers \
in the summer months, when the ferry runs twice a day from the harbour.";

/// One task's measurement.
pub struct Task {
    pub name: &'static str,
    pub tokens: usize,
    pub on_tok_s: f64,
    pub off_tok_s: f64,
    pub drafted: u32,
    pub accepted: u32,
    /// llama-server's decode tok/s with its n-gram speculation and without, when found.
    pub server_on_tok_s: Option<f64>,
    pub server_off_tok_s: Option<f64>,
    pub server_acceptance: Option<f64>,
}

fn tasks() -> [(&'static str, String, u32); 3] {
    [
        (
            "correct a 300-token text",
            format!("Correct the spelling mistakes in this text. Write out the whole corrected text.\n\n{TEXT}"),
            320,
        ),
        (
            "extract JSON from it",
            format!(
                "Extract the facts of this text as JSON with the keys built, keeper_left, steps and \
                 museum, quoting the text's own words.\n\n{TEXT}"
            ),
            160,
        ),
        ("open-ended chat", DECODE_PROMPT.to_owned(), 200),
    ]
}

/// Runs every task `reps` times each way, alternating which goes first, in a daemon of its
/// own without the prefix cache: the second run of a prompt must not start from the first
/// one's KV (its last prompt token would be computed alone, by another attention kernel
/// than in a whole-prompt prefill, and the outputs could differ for that reason).
pub async fn measure(reps: usize, quick: bool) -> Vec<Task> {
    let bus = Bus::start();
    let settings = Settings { engine: "prefix_cache = false".into(), ..Settings::default() };
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = &bus.connect().await;
    let mut out = Vec::new();
    for (t, (name, prompt, max_tokens)) in tasks().into_iter().enumerate() {
        let max_tokens = if quick { 24 } else { max_tokens };
        let (mut on, mut off, mut drafted, mut accepted, mut tokens) = (vec![], vec![], 0, 0, 0);
        for rep in 0..reps {
            // Its own first words each time, so the prefix cache never serves a repetition.
            let prompt = format!("{} asks: {prompt}", ASKERS[(t * reps + rep) % ASKERS.len()]);
            let request = |speculative: bool| {
                let mut r = chat_request(&prompt, max_tokens);
                r.insert(key::SPECULATIVE, Variant::from(speculative));
                r
            };
            let mut results = Vec::new();
            for k in 0..2 {
                let speculative = (rep + k) % 2 == 0;
                let tag = format!("spec{t}x{rep}{}", if speculative { "on" } else { "off" });
                let (sample, result) = over_dbus_result(conn, request(speculative), &tag).await;
                if speculative {
                    on.push(sample.decode_tps);
                    drafted += result.draft_tokens;
                    accepted += result.draft_accepted;
                } else {
                    off.push(sample.decode_tps);
                }
                tokens = sample.tokens;
                results.push(result.token_ids);
            }
            assert_eq!(results[0], results[1], "{name}: speculative decoding changed the output");
        }
        out.push(Task {
            name,
            tokens,
            on_tok_s: median(on),
            off_tok_s: median(off),
            drafted,
            accepted,
            server_on_tok_s: None,
            server_off_tok_s: None,
            server_acceptance: None,
        });
    }
    if let Some(bin) = llama_tool("llama-server", "HEARTH_LLAMA_SERVER") {
        let matched = [
            "--spec-type",
            "ngram-simple",
            "--spec-ngram-simple-size-n",
            "3",
            "--spec-ngram-simple-size-m",
            "12",
            "--spec-draft-n-max",
            "12",
        ];
        for speculative in [false, true] {
            let Some(peer) = Peer::start(&bin, if speculative { &matched } else { &[] }).await else {
                eprintln!("warning: {} did not start; its speculative columns are left out", bin.display());
                break;
            };
            for (t, (_, prompt, max_tokens)) in tasks().into_iter().enumerate() {
                let max_tokens = if quick { 24 } else { max_tokens };
                let (mut rates, mut drafted, mut accepted) = (vec![], 0, 0);
                for rep in 0..reps {
                    let prompt = format!("{} asks: {prompt}", ASKERS[(t * reps + rep) % ASKERS.len()]);
                    let run = peer.run(&prompt, max_tokens).await;
                    rates.push(run.tok_s);
                    drafted += run.drafted;
                    accepted += run.accepted;
                }
                let task = &mut out[t];
                if speculative {
                    task.server_on_tok_s = Some(median(rates));
                    task.server_acceptance = (drafted > 0).then(|| accepted as f64 / drafted as f64);
                } else {
                    task.server_off_tok_s = Some(median(rates));
                }
            }
        }
    }
    out
}

pub fn json(tasks: &[Task]) -> serde_json::Value {
    tasks
        .iter()
        .map(|t| {
            serde_json::json!({
                "task": t.name, "tokens": t.tokens,
                "dbus_speculative_tok_s": t.on_tok_s, "dbus_plain_tok_s": t.off_tok_s,
                "speedup": t.on_tok_s / t.off_tok_s,
                "draft_tokens": t.drafted, "draft_accepted": t.accepted,
                "llama_server_speculative_tok_s": t.server_on_tok_s, "llama_server_plain_tok_s": t.server_off_tok_s,
                "llama_server_speedup": t.server_on_tok_s.zip(t.server_off_tok_s).map(|(a, b)| a / b),
                "llama_server_acceptance": t.server_acceptance,
            })
        })
        .collect()
}

pub fn print(tasks: &[Task]) {
    println!("speculative decoding (prompt lookup), decode tok/s, the same request on and off:");
    println!(
        "  {:<26} {:>6} {:>9} {:>9} {:>7} {:>9}   {:>14} {:>7} {:>9}",
        "task", "tokens", "on", "off", "speedup", "accepted", "llama-server on", "speedup", "accepted"
    );
    for t in tasks {
        let rate = if t.drafted > 0 { f64::from(t.accepted) / f64::from(t.drafted) } else { 0.0 };
        let server = t.server_on_tok_s.zip(t.server_off_tok_s);
        println!(
            "  {:<26} {:>6} {:>9.1} {:>9.1} {:>7.2} {:>8.0}%   {:>14} {:>7} {:>9}",
            t.name,
            t.tokens,
            t.on_tok_s,
            t.off_tok_s,
            t.on_tok_s / t.off_tok_s,
            rate * 100.0,
            server.map_or("-".into(), |(on, _)| format!("{on:.1}")),
            server.map_or("-".into(), |(on, off)| format!("{:.2}", on / off)),
            t.server_acceptance.map_or("-".into(), |a| format!("{:.0}%", a * 100.0)),
        );
    }
}
