//! The whole run's figures, as a table or as JSON.

use hearth_tests::threads;

use super::{Load, PROFILE, burst, contention, gpu, phone, sessions::Sessions, speculative, vision};

/// Single-stream decode and prefill medians (tok/s).
pub struct Single {
    pub decode_tokens: (usize, usize),
    pub prompt_tokens: usize,
    pub dbus_decode: f64,
    pub direct_decode: f64,
    pub dbus_prefill: f64,
    pub direct_prefill: f64,
    /// hearthd's own decode timing.
    pub engine_decode: f64,
    /// What one decode run cost per generated token, and per token processed (prompt and
    /// generated), mJ, by the energy ledger's source.
    pub energy_mj_per_token: Option<f64>,
    pub energy_mj_per_any_token: Option<f64>,
    pub energy_source: String,
}

pub struct Report {
    pub reps: usize,
    pub streams: usize,
    pub stream_tokens: u32,
    pub single: Single,
    pub load: Load,
    pub contended: Vec<contention::Contended>,
    pub spec: Vec<speculative::Task>,
    pub burst: burst::Burst,
    pub bandwidth: f64,
    pub phones: Vec<phone::PhoneResult>,
    pub sessions: Sessions,
    pub gpu: Option<gpu::GpuRun>,
    pub vision: vision::VisionRun,
}

pub fn json(r: &Report) -> serde_json::Value {
    let (one, load, ses) = (&r.single, &r.load, &r.sessions);
    serde_json::json!({
        "profile": PROFILE, "threads": threads(), "reps": r.reps, "decode_tokens": one.decode_tokens.0,
        "prefill_prompt_tokens": one.prompt_tokens,
        "dbus": { "decode_tok_s": one.dbus_decode, "prefill_tok_s": one.dbus_prefill, "engine_decode_tok_s": one.engine_decode },
        "direct": { "decode_tok_s": one.direct_decode, "prefill_tok_s": one.direct_prefill },
        "energy": { "mj_per_generated_token": one.energy_mj_per_token, "mj_per_token": one.energy_mj_per_any_token, "source": one.energy_source },
        "ratio": { "decode": one.dbus_decode / one.direct_decode, "prefill": one.dbus_prefill / one.direct_prefill },
        "load": {
            "streams": r.streams, "stream_tokens": r.stream_tokens,
            "dbus_aggregate_tok_s": load.aggregate, "static_batch_tok_s": load.static_best, "best_static_batch": load.static_best_b,
            "aggregate_ratio": load.aggregate_ratio,
            "ttft_idle_ms": load.ttft_idle_ms, "ttft_loaded_ms": load.ttft_loaded_ms, "ttft_ratio": load.ttft_loaded_ms / load.ttft_idle_ms,
        },
        "contention": contention::json(&r.contended),
        "speculative": speculative::json(&r.spec),
        "burst": burst::json(&r.burst),
        "memory_read_bandwidth_gb_s": r.bandwidth / 1e9,
        "phone_models": phone::json(&r.phones),
        "gpu": gpu::json(&r.gpu),
        "vision": vision::json(&r.vision),
        "sessions": {
            "turns": ses.turns, "turn_n_prompt_tokens": ses.prompt_tokens,
            "turn_n_session_ms": ses.session_ms, "turn_n_resend_ms": ses.resend_ms, "resend_over_session": ses.resend_ms / ses.session_ms,
            "turn_n_parked_session_ms": ses.parked_ms, "park_ms": ses.park_ms, "restore_ms": ses.restore_ms,
            "parked_state_bytes": ses.parked_bytes,
        },
    })
}

pub fn print(r: &Report) {
    let (one, load, ses) = (&r.single, &r.load, &r.sessions);
    println!(
        "hearth-bench ({PROFILE} build): SmolLM2-135M-Instruct Q4_1, {} threads, greedy, median of {} runs",
        threads(),
        r.reps
    );
    let (bd, fd, bp, fp) = (one.dbus_decode, one.direct_decode, one.dbus_prefill, one.direct_prefill);
    println!("                     {:>12} {:>12} {:>8}", "D-Bus", "direct", "ratio");
    println!("decode  tok/s ({:>3}) {bd:>12.1} {fd:>12.1} {:>8.3}", one.decode_tokens.0, bd / fd);
    println!("prefill tok/s ({:>3}) {bp:>12.1} {fp:>12.1} {:>8.3}", one.prompt_tokens, bp / fp);
    println!("(hearthd's own decode timing: {:.1} tok/s)", one.engine_decode);
    match one.energy_mj_per_token {
        Some(mj) => println!(
            "energy: {mj:.2} mJ per generated token ({:.2} mJ per token with the prompt's), source {}{}",
            one.energy_mj_per_any_token.unwrap_or(0.0),
            one.energy_source,
            if one.energy_source == "model" { " (no RAPL or battery here: the configured power model)" } else { "" }
        ),
        None => println!("energy: not measured (the ledger is off)"),
    }
    speculative::print(&r.spec);
    contention::print(&r.contended);
    phone::print(r.bandwidth, &r.phones);
    gpu::print(&r.gpu);
    vision::print(&r.vision);
    println!(
        "aggregate tok/s, {} streams × {} tokens: D-Bus {:.1}, best static batch ({}) {:.1}, ratio {:.3}",
        r.streams, r.stream_tokens, load.aggregate, load.static_best_b, load.static_best, load.aggregate_ratio
    );
    burst::print(&r.burst);
    println!(
        "interactive TTFT: idle {:.1} ms, under {} background streams {:.1} ms, ratio {:.2}",
        load.ttft_idle_ms,
        r.streams,
        load.ttft_loaded_ms,
        load.ttft_loaded_ms / load.ttft_idle_ms
    );
    println!(
        "session turn {} ({} prompt tokens): session {:.1} ms, re-sent transcript {:.1} ms (ratio {:.2}); parked each \
         turn {:.1} ms (park {:.2} ms, restore {:.2} ms, {} bytes of KV state)",
        ses.turns,
        ses.prompt_tokens,
        ses.session_ms,
        ses.resend_ms,
        ses.resend_ms / ses.session_ms,
        ses.parked_ms,
        ses.park_ms,
        ses.restore_ms,
        ses.parked_bytes
    );
    if one.decode_tokens.0 != one.decode_tokens.1 {
        println!(
            "warning: the two paths generated different token counts ({} vs {})",
            one.decode_tokens.0, one.decode_tokens.1
        );
    }
}
