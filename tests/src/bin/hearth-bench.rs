//! hearth-bench: single-stream decode and prefill speed through D-Bus (the real hearthd on a
//! private bus, timed by the client) against hearth-ffi directly (same model, threads,
//! context, prompt, greedy), in one run, alternating the two so drift hits both alike.
//! Prints the medians and the ratios. Targets: decode ≥ 0.99, prefill ≥ 0.98 of direct.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use clap::Parser;
use hearth_dbus::{Generation, StreamEvent, result_key};
use hearth_tests::{Bus, Daemon, chat_request, direct_run, greedy, set_threads, threads};

#[derive(Debug, Parser)]
#[command(about = "Decode and prefill tok/s: hearthd over D-Bus vs hearth-ffi direct")]
struct Args {
    /// Repetitions of each measurement (median reported).
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Tokens to generate in the decode measurement.
    #[arg(long, default_value_t = 200)]
    decode_tokens: u32,
    /// A short smoke run (CI): 1 repetition, 16 tokens; ratios are not meaningful.
    #[arg(long)]
    quick: bool,
    /// Compute threads for both paths.
    #[arg(long, default_value_t = hearth_tests::DEFAULT_THREADS)]
    threads: i32,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

const DECODE_PROMPT: &str = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.";

/// A ~450-token prompt: one prefill batch, long enough that prefill dominates the round trip.
fn prefill_prompt() -> String {
    let sentences = [
        "The phone wakes before its owner does and checks the weather, the calendar and the battery.",
        "On-device models answer in milliseconds, work without a network and keep personal data local.",
        "Thermal limits matter more than raw compute: a warm phone throttles, and a throttled phone is slow.",
        "Memory is shared between the camera, the browser and the model, so every megabyte is negotiated.",
        "The cloud still helps with long documents and large models when the user allows it.",
    ];
    let mut text = String::from("Summarise the following notes in one sentence.\n\n");
    for i in 0..19 {
        text.push_str(sentences[i % sentences.len()]);
        text.push(' ');
    }
    text
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    tokens: usize,
    /// The daemon's own decode rate (from Finished's decode_us), for D-Bus runs.
    server_decode_tps: f64,
    /// Prompt tokens per second (prompt tokens over time to first token).
    prefill_tps: f64,
    /// Generated tokens after the first, per second.
    decode_tps: f64,
}

fn rates(prompt_tokens: usize, tokens: usize, prefill: Duration, decode: Duration) -> Sample {
    Sample {
        tokens,
        server_decode_tps: 0.0,
        prefill_tps: prompt_tokens as f64 / prefill.as_secs_f64().max(1e-9),
        decode_tps: if tokens > 1 { (tokens - 1) as f64 / decode.as_secs_f64().max(1e-9) } else { 0.0 },
    }
}

async fn over_dbus(conn: &zbus::Connection, prompt: &str, max_tokens: u32, tag: &str) -> Sample {
    let started = Instant::now();
    let mut g = Generation::start(conn, chat_request(prompt, max_tokens), tag).await.expect("Generate");
    let (mut first, mut last, mut n) = (None, started, 0usize);
        let (prompt_tokens, server_decode_us) = loop {
        match g.next().await.expect("event").expect("event") {
            StreamEvent::Token { .. } => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                n += 1;
            }
            StreamEvent::Finished(r) => {
                let decode_us = u64::try_from(r.get(result_key::DECODE_US).expect("decode_us")).expect("u64");
                let prompt = u32::try_from(r.get(result_key::PROMPT_TOKENS).expect("prompt_tokens")).expect("u32") as usize;
                break (prompt, decode_us);
            }
        }
    };
    let first = first.expect("at least one token");
    let mut sample = rates(prompt_tokens, n, first - started, last - first);
    if n > 1 && server_decode_us > 0 {
        sample.server_decode_tps = (n - 1) as f64 / (server_decode_us as f64 / 1e6);
    }
    sample
}

fn direct(prompt: &str, max_tokens: u32) -> Sample {
    let run = direct_run(&[("user", prompt)], greedy(), max_tokens as usize);
    rates(run.prompt_tokens, run.tokens.len(), run.prefill, run.decode)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = Args::parse();
    if args.quick {
        args.reps = 1;
        args.decode_tokens = 16;
    }
    set_threads(args.threads);
    let bus = Bus::start();
    let daemon = Daemon::start(&bus).await;
    let conn = bus.connect().await;
    let long_prompt = prefill_prompt();

    // Warm both paths (page cache, allocator, ggml thread pools).
    over_dbus(&conn, DECODE_PROMPT, 8, "warm").await;
    direct(DECODE_PROMPT, 8);

    let (mut bus_decode, mut bus_prefill, mut ffi_decode, mut ffi_prefill) = (vec![], vec![], vec![], vec![]);
    let mut server_decode = vec![];
    let mut decode_tokens = (0, 0);
    for i in 0..args.reps {
        // Alternate which path goes first, so neither always runs on a warmer machine.
        let (d_bus, d_ffi, p_bus, p_ffi);
        if i % 2 == 0 {
            d_bus = over_dbus(&conn, DECODE_PROMPT, args.decode_tokens, &format!("d{i}")).await;
            d_ffi = direct(DECODE_PROMPT, args.decode_tokens);
            p_bus = over_dbus(&conn, &long_prompt, 1, &format!("p{i}")).await;
            p_ffi = direct(&long_prompt, 1);
        } else {
            d_ffi = direct(DECODE_PROMPT, args.decode_tokens);
            d_bus = over_dbus(&conn, DECODE_PROMPT, args.decode_tokens, &format!("d{i}")).await;
            p_ffi = direct(&long_prompt, 1);
            p_bus = over_dbus(&conn, &long_prompt, 1, &format!("p{i}")).await;
        }
        decode_tokens = (d_bus.tokens, d_ffi.tokens);
        bus_decode.push(d_bus.decode_tps);
        server_decode.push(d_bus.server_decode_tps);
        ffi_decode.push(d_ffi.decode_tps);
        bus_prefill.push(p_bus.prefill_tps);
        ffi_prefill.push(p_ffi.prefill_tps);
    }
    let (bd, fd, bp, fp) = (median(bus_decode), median(ffi_decode), median(bus_prefill), median(ffi_prefill));
    let sd = median(server_decode);
    let prompt_tokens = hearth_tests::reference_model()
        .tokenize(&hearth_tests::reference_model().apply_chat_template(&[hearth_ffi::ChatMessage { role: "user".into(), content: long_prompt.clone() }], true).expect("template"), true, true)
        .expect("tokenize")
        .len();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "threads": threads(), "reps": args.reps, "decode_tokens": decode_tokens.0, "prefill_prompt_tokens": prompt_tokens,
                "dbus": { "decode_tok_s": bd, "prefill_tok_s": bp, "engine_decode_tok_s": sd },
                "direct": { "decode_tok_s": fd, "prefill_tok_s": fp },
                "ratio": { "decode": bd / fd, "prefill": bp / fp },
            })
        );
    } else {
        println!("hearth-bench: SmolLM2-135M-Instruct Q4_1, {} threads, greedy, median of {} runs", threads(), args.reps);
        println!("                     {:>12} {:>12} {:>8}", "D-Bus", "direct", "ratio");
        println!("decode  tok/s ({:>3}) {bd:>12.1} {fd:>12.1} {:>8.3}", decode_tokens.0, bd / fd);
        println!("prefill tok/s ({prompt_tokens:>3}) {bp:>12.1} {fp:>12.1} {:>8.3}", bp / fp);
        println!("(hearthd's own decode timing: {sd:.1} tok/s)");
        if decode_tokens.0 != decode_tokens.1 {
            println!("warning: the two paths generated different token counts ({} vs {})", decode_tokens.0, decode_tokens.1);
        }
    }
    drop(daemon);
}
