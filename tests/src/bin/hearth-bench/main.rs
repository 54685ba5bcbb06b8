//! hearth-bench: single-stream decode and prefill speed through D-Bus (the real hearthd on a
//! private bus, timed by the client) against hearth-ffi directly (same model, threads,
//! context, prompt, greedy), in one run, alternating the two so drift hits both alike.
//! Prints the medians and the ratios. Targets: decode ≥ 0.99, prefill ≥ 0.98 of direct.
//!
//! Under load (scheduler): aggregate tok/s of 8 concurrent streams through D-Bus against the
//! best static batch (1, 2, 4 or 8 sequences decoded in lock-step through hearth-ffi), and an
//! interactive request's time to first token under 8 background streams divided by its idle
//! time to first token. The aggregate and the best batch alternate too (up to 3 times, new
//! prompts each time); the ratio is the median of each pair's. Targets: aggregate ≥ 0.9 of
//! the best static batch, TTFT ratio ≤ 2.
//!
//! Contention: single-stream decode beside 1 and 2 busy processes, through D-Bus, directly
//! and through llama.cpp's llama-server where `tests/tools/build-llama-tools.sh` built one.
//!
//! GPU: decode and prefill with every layer on the GPU hearthd lists, beside its CPU figures
//! and llama-bench on the same device (gpu.rs).
//!
//! Sessions: the latency of turn N of a conversation in a session, against re-sending the
//! whole transcript to Complete, with another app's request between turns (as on a phone,
//! where the per-app prefix cache does not survive other work); and with a single sequence
//! slot, so the session's KV is parked and restored every turn, with the daemon's own
//! park and restore times.

#![forbid(unsafe_code)]

mod burst;
mod contention;
mod gpu;
mod phone;
mod report;
mod sessions;
mod speculative;
mod vision;

use std::time::{Duration, Instant};

use clap::Parser;
use hearth_dbus::{Generation, StreamEvent};
use std::sync::Arc;

use hearth_ffi::{Batch, Context, ContextParams, Sampler, Token};
use hearth_tests::{
    BATCH, Bus, CONTEXT, Daemon, chat_request, direct_run, greedy, reference_model, set_threads, threads, with_priority,
};

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
    /// Concurrent streams of the load measurements.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Tokens per stream in the aggregate measurement.
    #[arg(long, default_value_t = 96)]
    stream_tokens: u32,
    /// Turns of the session conversation.
    #[arg(long, default_value_t = 6)]
    turns: usize,
    /// Leave out the phone-sized models (generated once into target/phone-models, ~4.5 GB).
    #[arg(long)]
    no_phone_models: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Run only the speculative decoding section.
    #[arg(long)]
    speculative_only: bool,
    /// Run only the burst section (concurrent first tokens against llama-server).
    #[arg(long)]
    burst_only: bool,
    /// Run only the contention section (decode beside busy processes).
    #[arg(long)]
    contention_only: bool,
    /// Run only the GPU section (every layer on the GPU hearthd lists, against its CPU).
    #[arg(long)]
    gpu_only: bool,
    /// Only the image section (a vision model of the default model and the tests' projector).
    #[arg(long)]
    vision_only: bool,
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
    prompt_tokens: usize,
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
        prompt_tokens,
        server_decode_tps: 0.0,
        prefill_tps: prompt_tokens as f64 / prefill.as_secs_f64().max(1e-9),
        decode_tps: if tokens > 1 { (tokens - 1) as f64 / decode.as_secs_f64().max(1e-9) } else { 0.0 },
    }
}

/// Plain decoding (speculative decoding off), like the direct path and llama-server's
/// default: the same work per token on every side.
async fn over_dbus(conn: &zbus::Connection, prompt: &str, max_tokens: u32, tag: &str) -> Sample {
    let mut request = chat_request(prompt, max_tokens);
    request.insert(hearth_dbus::request_key::SPECULATIVE, false.into());
    over_dbus_request(conn, request, tag).await
}

type Request = std::collections::HashMap<&'static str, zbus::zvariant::Variant<'static>>;

/// A Generate call's rates, timed by the client.
async fn over_dbus_request(conn: &zbus::Connection, request: Request, tag: &str) -> Sample {
    over_dbus_result(conn, request, tag).await.0
}

/// A Generate call's rates, timed by the client, and its result.
async fn over_dbus_result(conn: &zbus::Connection, request: Request, tag: &str) -> (Sample, hearth_tests::ResultDict) {
    let started = Instant::now();
    let mut g = Generation::start(conn, request, tag).await.expect("Generate");
    let (mut first, mut last, mut n) = (None, started, 0usize);
    let (prompt_tokens, server_decode_us, result) = loop {
        match g.next().await.expect("event").expect("event") {
            StreamEvent::Token { .. } => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                n += 1;
            }
            StreamEvent::Migrated { .. } => {}
            StreamEvent::Finished(r) => break (r.prompt_tokens as usize, r.decode_us, *r),
        }
    };
    let first = first.expect("at least one token");
    let mut sample = rates(prompt_tokens, n, first - started, last - first);
    if n > 1 && server_decode_us > 0 {
        sample.server_decode_tps = (n - 1) as f64 / (server_decode_us as f64 / 1e6);
    }
    (sample, result)
}

fn direct(prompt: &str, max_tokens: u32) -> Sample {
    let run = direct_run(&[("user", prompt)], greedy(), max_tokens as usize);
    rates(run.prompt_tokens, run.tokens.len(), run.prefill, run.decode)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The build profile the bench (and the daemon beside it) runs under: the README's numbers
/// are for release, the build integrators ship.
const PROFILE: &str = if cfg!(debug_assertions) { "dev" } else { "release" };

fn main() {
    if std::env::args().nth(1).as_deref() == Some(contention::SPIN_FLAG) {
        contention::spin();
    }
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(bench());
}

async fn bench() {
    let mut args = Args::parse();
    if args.quick {
        args.reps = 1;
        args.decode_tokens = 16;
        args.streams = 2;
        args.stream_tokens = 8;
        args.turns = 2;
    }
    set_threads(args.threads);
    let bus = Bus::start();
    // The energy ledger reads the machine's own counters (RAPL, a battery) where it has them;
    // the governors still read an empty tree, so the host's sensors never throttle a run.
    let settings = hearth_tests::Settings { energy: "sysfs_root = \"/sys\"\n".into(), ..Default::default() };
    let daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let long_prompt = prefill_prompt();

    // Warm both paths (page cache, allocator, ggml thread pools).
    over_dbus(&conn, DECODE_PROMPT, 8, "warm").await;
    direct(DECODE_PROMPT, 8);
    if args.speculative_only {
        let spec = speculative::measure(args.reps.min(3), args.quick).await;
        if args.json {
            println!("{}", serde_json::json!({ "profile": PROFILE, "speculative": speculative::json(&spec) }));
        } else {
            speculative::print(&spec);
        }
        return;
    }
    if args.burst_only {
        let burst = burst::measure(&conn, args.streams, args.stream_tokens, args.reps.min(3)).await;
        if args.json {
            println!("{}", serde_json::json!({ "profile": PROFILE, "burst": burst::json(&burst) }));
        } else {
            burst::print(&burst);
        }
        return;
    }

    if args.gpu_only {
        let gpu = gpu::measure(args.reps.min(3), args.decode_tokens, DECODE_PROMPT, &long_prompt).await;
        if args.json {
            println!("{}", serde_json::json!({ "profile": PROFILE, "gpu": gpu::json(&gpu) }));
        } else {
            gpu::print(&gpu);
        }
        return;
    }

    if args.vision_only {
        let vision = vision::measure(args.reps.min(3)).await;
        if args.json {
            println!("{}", serde_json::json!({ "profile": PROFILE, "vision": vision::json(&vision) }));
        } else {
            vision::print(&vision);
        }
        return;
    }

    if args.contention_only {
        let contended = contention::measure(&conn, &daemon, args.reps.min(3), args.decode_tokens).await;
        if args.json {
            println!("{}", serde_json::json!({ "profile": PROFILE, "contention": contention::json(&contended) }));
        } else {
            contention::print(&contended);
        }
        return;
    }

    let (mut bus_decode, mut bus_prefill, mut ffi_decode, mut ffi_prefill) = (vec![], vec![], vec![], vec![]);
    let mut server_decode = vec![];
    let mut decode_tokens = (0, 0);
    for i in 0..args.reps {
        // Every repetition gets its own prompts, starting with a different word, so hearthd's
        // prefix cache (same app) never turns a measurement into a cache hit.
        let asker = ASKERS[(i + 8) % ASKERS.len()];
        let decode_prompt = format!("{asker} asks: {DECODE_PROMPT}");
        let long = format!("{asker} asks: {long_prompt}");
        // Alternate which path goes first, so neither always runs on a warmer machine.
        let (d_bus, d_ffi, p_bus, p_ffi);
        if i % 2 == 0 {
            d_bus = over_dbus(&conn, &decode_prompt, args.decode_tokens, &format!("d{i}")).await;
            d_ffi = direct(&decode_prompt, args.decode_tokens);
            p_bus = over_dbus(&conn, &long, 1, &format!("p{i}")).await;
            p_ffi = direct(&long, 1);
        } else {
            d_ffi = direct(&decode_prompt, args.decode_tokens);
            d_bus = over_dbus(&conn, &decode_prompt, args.decode_tokens, &format!("d{i}")).await;
            p_ffi = direct(&long, 1);
            p_bus = over_dbus(&conn, &long, 1, &format!("p{i}")).await;
        }
        decode_tokens = (d_bus.tokens, d_ffi.tokens);
        bus_decode.push(d_bus.decode_tps);
        server_decode.push(d_bus.server_decode_tps);
        ffi_decode.push(d_ffi.decode_tps);
        bus_prefill.push(p_bus.prefill_tps);
        ffi_prefill.push(p_ffi.prefill_tps);
    }
    let (bd, fd, bp, fp) = (median(bus_decode), median(ffi_decode), median(bus_prefill), median(ffi_prefill));
    // Energy per generated token, by the ledger's source, over one more decode run.
    let mut request = chat_request(&format!("Energy asks: {DECODE_PROMPT}"), args.decode_tokens);
    request.insert(hearth_dbus::request_key::SPECULATIVE, false.into());
    let (e_sample, e_result) = over_dbus_result(&conn, request, "energy").await;
    let energy = (
        e_result.energy_mj.map(|mj| mj / (e_sample.tokens + e_sample.prompt_tokens).max(1) as f64),
        e_result.energy_mj.map(|mj| mj / e_sample.tokens.max(1) as f64),
        e_result.energy_source.clone().unwrap_or_else(|| "off".into()),
    );
    let sd = median(server_decode);
    let prompt_tokens = hearth_tests::reference_model()
        .tokenize(
            &hearth_tests::reference_model()
                .apply_chat_template(
                    &[hearth_ffi::ChatMessage { role: "user".into(), content: long_prompt.clone() }],
                    true,
                )
                .expect("template"),
            true,
            true,
        )
        .expect("tokenize")
        .len();
    let spec = speculative::measure(args.reps.min(3), args.quick).await;
    let contended = contention::measure(&conn, &daemon, args.reps.min(3), args.decode_tokens).await;
    let bandwidth = phone::read_bandwidth();
    let phones = if args.no_phone_models {
        Vec::new()
    } else {
        phone::measure(args.quick, args.decode_tokens.min(64), bandwidth).await
    };
    let gpu = gpu::measure(args.reps.min(3), args.decode_tokens, DECODE_PROMPT, &long_prompt).await;
    let vision = vision::measure(args.reps.min(3)).await;
    let load = under_load(&conn, args.streams, args.stream_tokens, args.reps.min(3)).await;
    let burst = burst::measure(&conn, args.streams, args.stream_tokens, args.reps.min(3)).await;
    let sessions = sessions::measure(&conn, args.reps.min(3), args.turns).await;
    let report = report::Report {
        reps: args.reps,
        streams: args.streams,
        stream_tokens: args.stream_tokens,
        single: report::Single {
            decode_tokens,
            prompt_tokens,
            dbus_decode: bd,
            direct_decode: fd,
            dbus_prefill: bp,
            direct_prefill: fp,
            engine_decode: sd,
            energy_mj_per_token: energy.1,
            energy_mj_per_any_token: energy.0,
            energy_source: energy.2,
        },
        load,
        contended,
        spec,
        burst,
        bandwidth,
        phones,
        sessions,
        gpu,
        vision,
    };
    if args.json {
        println!("{}", report::json(&report));
    } else {
        report::print(&report);
    }
    drop(daemon);
}

/// Prompts that keep the model talking (no early end of generation within ~400 tokens).
const STREAM_TOPICS: [&str; 8] =
    ["the ocean", "a lighthouse", "mountains", "a city at night", "a forest", "the moon", "a train", "a library"];

fn stream_prompt(i: usize) -> String {
    format!("Write a long story about {}.", STREAM_TOPICS[i % STREAM_TOPICS.len()])
}

/// The stream prompts of the aggregate measurement's repetition `rep`: each repetition asks
/// in another name, so none gets a prefix-cache hit from the one before.
fn aggregate_prompt(i: usize, rep: usize) -> String {
    format!("{} asks: {}", ASKERS[(ASKERS.len() - 1 - rep) % ASKERS.len()], stream_prompt(i))
}

#[derive(Debug, Clone, Copy)]
struct Load {
    aggregate: f64,
    static_best: f64,
    /// The median of each repetition's aggregate over the static batch run right after it.
    aggregate_ratio: f64,
    static_best_b: usize,
    ttft_idle_ms: f64,
    ttft_loaded_ms: f64,
}

/// First words that make every TTFT prompt differ right after the chat template's opening,
/// so no measurement gets a prefix-cache hit from an earlier one (same app).
const ASKERS: [&str; 16] = [
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj", "Olivia",
    "Peggy", "Rupert", "Sybil",
];

/// Reads `g` to its end: the time from `since` to its first token (ms) and its tokens.
async fn drain(mut g: Generation, since: Instant) -> (Option<f64>, usize) {
    let (mut first, mut n) = (None, 0usize);
    while let Some(ev) = g.next().await {
        match ev.expect("event") {
            StreamEvent::Token { .. } => {
                first.get_or_insert_with(|| since.elapsed().as_secs_f64() * 1e3);
                n += 1;
            }
            StreamEvent::Migrated { .. } => {}
            StreamEvent::Finished(_) => break,
        }
    }
    (first, n)
}

/// Time from the Generate call to the first Token, for an interactive request.
async fn ttft(conn: &zbus::Connection, n: usize) -> f64 {
    let started = Instant::now();
    let prompt = format!("{} asks: what is the capital of France?", ASKERS[n % ASKERS.len()]);
    let g =
        Generation::start(conn, with_priority(&prompt, 4, "interactive"), &format!("ttft{n}")).await.expect("Generate");
    drain(g, started).await.0.expect("a token")
}

/// Aggregate tokens/s through D-Bus: all streams at once, as independent apps would start
/// them; wall time from the first call to the last Finished.
async fn aggregate(conn: &zbus::Connection, streams: usize, tokens: u32, rep: usize) -> f64 {
    let started = Instant::now();
    let gens = futures_util::future::join_all((0..streams).map(|i| async move {
        Generation::start(conn, chat_request(&aggregate_prompt(i, rep), tokens), &format!("agg{rep}x{i}")).await
    }))
    .await
    .into_iter()
    .map(|g| g.expect("Generate"))
    .collect::<Vec<_>>();
    let counts = futures_util::future::join_all(gens.into_iter().map(|g| drain(g, started))).await;
    counts.iter().map(|c| c.1).sum::<usize>() as f64 / started.elapsed().as_secs_f64()
}

async fn under_load(conn: &zbus::Connection, streams: usize, tokens: u32, reps: usize) -> Load {
    // The best static batch through hearth-ffi (groups of b sequences in lock-step), then
    // the aggregate through D-Bus and that batch alternately, so drift hits both alike.
    let (mut best, mut static_best_b) = (0.0, 1);
    for b in [1, 2, 4, 8].into_iter().filter(|&b| b <= streams) {
        let rate = static_batches(streams, b, tokens as usize, 0);
        if rate > best {
            (best, static_best_b) = (rate, b);
        }
    }
    let (mut aggregates, mut statics, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps.max(1) {
        // Each side first in turn.
        let (a, s) = if rep % 2 == 0 {
            let a = aggregate(conn, streams, tokens, rep + 1).await;
            (a, static_batches(streams, static_best_b, tokens as usize, rep + 1))
        } else {
            let s = static_batches(streams, static_best_b, tokens as usize, rep + 1);
            (aggregate(conn, streams, tokens, rep + 1).await, s)
        };
        aggregates.push(a);
        statics.push(s);
        ratios.push(a / s);
    }
    let (aggregate, static_best, aggregate_ratio) = (median(aggregates), median(statics), median(ratios));

    // TTFT of an interactive request, idle and under `streams` background streams.
    let mut idle = Vec::new();
    for r in 0..reps {
        idle.push(ttft(conn, r).await);
    }
    let mut background = Vec::new();
    for i in 0..streams {
        let g = Generation::start(conn, with_priority(&stream_prompt(i), 800, "background"), &format!("bg{i}"))
            .await
            .expect("Generate");
        background.push(g);
    }
    // Let every background stream reach its decode phase.
    for g in &mut background {
        while let Some(ev) = g.next().await {
            if matches!(ev.expect("event"), StreamEvent::Token { .. }) {
                break;
            }
        }
    }
    let mut loaded = Vec::new();
    for r in 0..reps {
        loaded.push(ttft(conn, reps + r).await);
    }
    for g in &background {
        g.cancel().await.expect("cancel");
    }
    drop(background);
    Load {
        aggregate,
        static_best,
        aggregate_ratio,
        static_best_b,
        ttft_idle_ms: median(idle),
        ttft_loaded_ms: median(loaded),
    }
}

/// Decodes `streams` prompts in groups of `b` sequences, each group's prompts prefilled in
/// one batch and then decoded in lock-step for `tokens` steps. Returns generated tokens per second.
fn static_batches(streams: usize, b: usize, tokens: usize, rep: usize) -> f64 {
    let model = reference_model();
    let prompts: Vec<Vec<Token>> = (0..streams)
        .map(|i| {
            let text = model
                .apply_chat_template(
                    &[hearth_ffi::ChatMessage { role: "user".into(), content: aggregate_prompt(i, rep) }],
                    true,
                )
                .expect("template");
            model.tokenize(&text, true, true).expect("tokenize")
        })
        .collect();
    let started = Instant::now();
    let mut generated = 0usize;
    for group in prompts.chunks(b) {
        let params = ContextParams {
            n_ctx: CONTEXT * group.len() as u32,
            n_batch: BATCH,
            n_seq_max: group.len() as u32,
            n_threads: threads(),
            n_threads_batch: threads(),
            flash_attn: Some(true),
            kv_unified: false,
            embeddings: false,
            kv_type: hearth_ffi::KvType::default(),
        };
        let mut ctx = Context::new(Arc::clone(&model), params).expect("context");
        let mut batch = Batch::new(BATCH as usize, 1);
        let mut samplers: Vec<Sampler> = group.iter().map(|_| Sampler::new(&model, greedy())).collect();
        let mut next: Vec<Token> = Vec::with_capacity(group.len());
        // Prefill the group's prompts in one batch (as hearthd does), then sample each's
        // first token.
        batch.clear();
        let mut lasts = Vec::with_capacity(group.len());
        for (s, p) in group.iter().enumerate() {
            for (k, &t) in p.iter().enumerate() {
                let j = batch.push(t, k as i32, &[s as i32], k + 1 == p.len()).expect("push");
                if k + 1 == p.len() {
                    lasts.push(j);
                }
            }
        }
        ctx.decode(&batch).expect("prefill");
        for (s, &last) in lasts.iter().enumerate() {
            next.push(samplers[s].sample(&mut ctx, last).expect("sample"));
            generated += 1;
        }
        // Then one token of every sequence per batch, in lock-step.
        let mut pos: Vec<i32> = group.iter().map(|p| p.len() as i32).collect();
        let mut idx = vec![0; group.len()];
        for _ in 1..tokens {
            batch.clear();
            for (s, &t) in next.iter().enumerate() {
                idx[s] = batch.push(t, pos[s], &[s as i32], true).expect("push");
                pos[s] += 1;
            }
            ctx.decode(&batch).expect("decode");
            for s in 0..group.len() {
                next[s] = samplers[s].sample(&mut ctx, idx[s]).expect("sample");
                generated += 1;
            }
        }
    }
    generated as f64 / started.elapsed().as_secs_f64()
}
