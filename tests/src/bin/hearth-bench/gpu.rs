//! The GPU: single-stream decode and prefill through D-Bus with every layer on the first GPU
//! hearthd lists (`engine.gpu_layers = -1`), beside the same daemon binary on the CPU and
//! beside llama.cpp's llama-bench built for the same backend
//! (`tests/tools/build-llama-tools.sh --vulkan`) with every layer offloaded, same model file,
//! threads and flash attention. Runs only where hearthd was built with a GPU feature and
//! lists a GPU: for lavapipe, show it to ggml with `GGML_VK_VISIBLE_DEVICES=0`, which the
//! daemon's engines and llama-bench both inherit.

use std::path::PathBuf;
use std::process::Command;

use hearth_tests::{Bus, Daemon, Settings, hearth, model_path, threads, workspace_root};

use crate::{median, over_dbus};

pub struct GpuRun {
    pub device: String,
    pub description: String,
    pub decode_tps: f64,
    pub prefill_tps: f64,
    pub cpu_decode_tps: f64,
    pub cpu_prefill_tps: f64,
    /// llama-bench's tg and pp on the device (-ngl 99), where a GPU build of it exists.
    pub llama_bench: Option<(f64, f64)>,
    pub prompt_tokens: usize,
}

/// llama-bench built for the GPU backend, or the one `HEARTH_LLAMA_BENCH_GPU` names.
fn gpu_llama_bench() -> Option<PathBuf> {
    std::env::var_os("HEARTH_LLAMA_BENCH_GPU")
        .map(PathBuf::from)
        .or_else(|| Some(workspace_root().join("target/llama-tools-vulkan/bin/llama-bench")))
        .filter(|p| p.is_file())
}

/// llama-bench's (tg, pp) tok/s with every layer on the GPU.
fn llama_bench(tokens: u32, prompt_tokens: usize) -> Option<(f64, f64)> {
    let out = Command::new(gpu_llama_bench()?)
        .arg("-m")
        .arg(model_path())
        .args(["-ngl", "99", "-t", &threads().to_string(), "-fa", "1", "-r", "3", "-o", "json"])
        .args(["-p", &prompt_tokens.to_string(), "-n", &tokens.to_string()])
        .output()
        .ok()?;
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let rate = |generation: bool| {
        runs.as_array()?.iter().find(|r| (r["n_gen"].as_u64().unwrap_or(0) > 0) == generation)?["avg_ts"].as_f64()
    };
    Some((rate(true)?, rate(false)?))
}

/// Median (decode, prefill) tok/s of `reps` runs through the daemon on `bus`.
async fn rates(
    bus: &Bus,
    reps: usize,
    tokens: u32,
    decode_prompt: &str,
    long_prompt: &str,
    tag: &str,
) -> (f64, f64, usize) {
    let conn = bus.connect().await;
    // Load, warm, and (on the GPU) compile the shaders of both shapes.
    over_dbus(&conn, decode_prompt, 8, &format!("{tag}warm")).await;
    over_dbus(&conn, long_prompt, 1, &format!("{tag}warmp")).await;
    let (mut decode, mut prefill, mut prompt_tokens) = (Vec::new(), Vec::new(), 0);
    for i in 0..reps {
        // A different first word each time: no prefix-cache hit.
        let d = over_dbus(&conn, &format!("Run {i}: {decode_prompt}"), tokens, &format!("{tag}d{i}")).await;
        let p = over_dbus(&conn, &format!("Run {i}: {long_prompt}"), 1, &format!("{tag}p{i}")).await;
        decode.push(d.decode_tps);
        prefill.push(p.prefill_tps);
        prompt_tokens = p.prompt_tokens;
    }
    (median(decode), median(prefill), prompt_tokens)
}

/// Runs the section, or says why not (None: no GPU listed).
pub async fn measure(reps: usize, tokens: u32, decode_prompt: &str, long_prompt: &str) -> Option<GpuRun> {
    let bus = Bus::start();
    let offloaded = Settings { engine: "gpu_layers = -1\nhang_timeout_ms = 600000\n".into(), ..Settings::default() };
    let (device, description, decode_tps, prefill_tps, prompt_tokens) = {
        let _daemon = Daemon::start_configured(&bus, &offloaded).await;
        let proxy = hearth(&bus.connect().await).await;
        let gpu = proxy.backends().await.ok()?.into_iter().find(|b| b.kind == "gpu" || b.kind == "igpu")?;
        let (d, p, n) = rates(&bus, reps, tokens, decode_prompt, long_prompt, "g").await;
        (gpu.name, gpu.description, d, p, n)
    };
    let (cpu_decode_tps, cpu_prefill_tps, _) = {
        let _daemon = Daemon::start(&bus).await;
        rates(&bus, reps, tokens, decode_prompt, long_prompt, "c").await
    };
    Some(GpuRun {
        device,
        description,
        decode_tps,
        prefill_tps,
        cpu_decode_tps,
        cpu_prefill_tps,
        llama_bench: llama_bench(tokens, prompt_tokens),
        prompt_tokens,
    })
}

pub fn json(g: &Option<GpuRun>) -> serde_json::Value {
    g.as_ref().map_or(serde_json::Value::Null, |g| {
        serde_json::json!({
            "device": g.device, "description": g.description, "prompt_tokens": g.prompt_tokens,
            "dbus_decode_tok_s": g.decode_tps, "dbus_prefill_tok_s": g.prefill_tps,
            "cpu_dbus_decode_tok_s": g.cpu_decode_tps, "cpu_dbus_prefill_tok_s": g.cpu_prefill_tps,
            "llama_bench_tg_tok_s": g.llama_bench.map(|l| l.0), "llama_bench_pp_tok_s": g.llama_bench.map(|l| l.1),
        })
    })
}

pub fn print(g: &Option<GpuRun>) {
    let Some(g) = g else {
        println!(
            "GPU: none listed (build hearthd with --features vulkan or cuda; lavapipe: GGML_VK_VISIBLE_DEVICES=0)"
        );
        return;
    };
    let peer = g.llama_bench.map_or(
        "llama-bench for the GPU not built (build-llama-tools.sh --vulkan)".to_owned(),
        |(tg, pp)| {
            format!(
                "llama-bench -ngl 99: tg {tg:.1}, pp{} {pp:.1}; D-Bus/llama-bench decode {:.3}, prefill {:.3}",
                g.prompt_tokens,
                g.decode_tps / tg,
                g.prefill_tps / pp
            )
        },
    );
    println!(
        "GPU {} ({}), every layer offloaded: decode {:.1} tok/s, prefill {:.1} tok/s ({} tokens); the CPU: decode {:.1}, prefill {:.1}; {peer}",
        g.device, g.description, g.decode_tps, g.prefill_tps, g.prompt_tokens, g.cpu_decode_tps, g.cpu_prefill_tps
    );
}
