//! The Vulkan build of the engine on a real Vulkan driver: Mesa's lavapipe, which runs on the
//! CPU (slowly) but is a conformant Vulkan 1.3 implementation, so the whole path runs here:
//! the device listing, every layer offloaded, the device budget and the GPU's sandbox.
//! Built only with `--features vulkan` (scripts/test.sh builds hearthd
//! with it first and shows lavapipe to ggml with GGML_VK_VISIBLE_DEVICES).
#![cfg(feature = "vulkan")]

use std::time::Duration;

use hearth_dbus::Generation;
use hearth_tests::{Bus, Daemon, Settings, chat_request, hearth};

const PROMPTS: [&str; 6] = hearth_tests::SIX_PROMPTS;
const TOKENS: u32 = 40;
/// Tokens of every answer that must agree with the CPU's: a device computing anything but
/// the model parts from it at once.
const AGREE: usize = 3;

/// `layers` (-1: every one) on the first Vulkan device, lavapipe shown to ggml (it lists
/// only real GPUs by default), and `memory` lines. lavapipe compiles each of ggml's shaders
/// to CPU code on first use, which holds up the first steps for a minute or more: the
/// engine's hang limit allows for it.
fn on_gpu(layers: i32, memory: &str) -> Settings {
    Settings {
        engine: format!("gpu_layers = {layers}\nhang_timeout_ms = 600000\n"),
        memory: memory.to_owned(),
        env: vec![("GGML_VK_VISIBLE_DEVICES".into(), "0".into())],
        ..Settings::default()
    }
}

async fn tokens(g: Generation) -> (Vec<i32>, String) {
    let (tokens, result) = hearth_tests::collect(g, Duration::from_secs(300)).await;
    (tokens.into_iter().map(|t| t.1).collect(), result.finish_reason)
}

/// Each prompt alone, one after another.
async fn solo(bus: &Bus) -> Vec<(Vec<i32>, String)> {
    let conn = bus.connect().await;
    let mut out = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        out.push(tokens(Generation::start(&conn, chat_request(p, TOKENS), &format!("s{i}")).await.unwrap()).await);
    }
    out
}

fn agreeing(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The MiB figures llama.cpp logs for the device's buffers ("Vulkan0 model buffer size = ...").
fn logged_mib(log: &str, device: &str, what: &str) -> f64 {
    let key = format!("{device} {what} buffer size =");
    log.lines()
        .filter_map(|l| l.split_once(&key))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

fn maps(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

/// Tokens of each prompt on the CPU and on the GPU, how many agree from the start, and the
/// GPU's rate (tokens per second, prefill and first-use shader compiles included).
struct Compared {
    cpu: Vec<(Vec<i32>, String)>,
    gpu: Vec<(Vec<i32>, String)>,
    agree: Vec<usize>,
    rate: f64,
}

/// Each prompt alone on the CPU (`cpu` settings), then with every layer on the Vulkan
/// device (the same settings, offloaded) in the daemon it returns.
async fn cpu_and_gpu(bus: &Bus, cpu: &Settings) -> (Compared, Daemon) {
    let on_cpu = {
        let _daemon = Daemon::start_configured(bus, cpu).await;
        solo(bus).await
    };
    let offloaded = on_gpu(-1, "");
    let settings = Settings { engine: offloaded.engine, env: offloaded.env, ..cpu.clone() };
    let daemon = Daemon::start_configured(bus, &settings).await;
    let started = std::time::Instant::now();
    let on_device = solo(bus).await;
    let generated: usize = on_device.iter().map(|(t, _)| t.len()).sum();
    let rate = generated as f64 / started.elapsed().as_secs_f64();
    let agree = on_cpu.iter().zip(&on_device).map(|(c, g)| agreeing(&c.0, &g.0)).collect();
    (Compared { cpu: on_cpu, gpu: on_device, agree, rate }, daemon)
}

/// The default (Q4_1) model with every layer on the device: its tokens against the CPU's,
/// the device's listing, memory and sandbox.
///
/// The backends round differently (the CPU's quantized dot products round activations to 8
/// bits, ggml-vulkan's shaders do not), so greedy choices between near-equal tokens part:
/// on lavapipe the answers agree with the CPU's on their first 3 to 40 tokens (the figure is
/// printed).
///
/// Not here yet: batching exactness on the GPU. With 6 requests decoding together on
/// bookworm's lavapipe (Mesa 22.3) the engine dies of a null dereference in a lavapipe
/// thread (not yet diagnosed); it restarts and the requests fail with EngineFailed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_model_on_the_vulkan_device_is_owned_counted_and_sandboxed() {
    let bus = Bus::start();
    let (Compared { cpu, gpu: on_device, agree, rate }, daemon) = cpu_and_gpu(&bus, &Settings::default()).await;
    let equal = cpu.iter().zip(&on_device).filter(|(c, g)| c.0 == g.0).count();
    eprintln!(
        "Q4_1 default model, every layer on lavapipe: {equal} of {} prompts equal to the CPU token for token; \
         agreeing prefixes {agree:?} of {TOKENS}; {rate:.1} tok/s (prefill and first-use shader compiles included)",
        PROMPTS.len()
    );
    for (i, ((c, c_end), (g, g_end))) in cpu.iter().zip(&on_device).enumerate() {
        let needed = AGREE.min(c.len()).min(g.len());
        assert!(
            agree[i] >= needed,
            "prompt {i} ({:?}): the GPU agrees with the CPU on {} tokens, fewer than {needed} \
             (CPU {c_end}: {c:?}; GPU {g_end}: {g:?})",
            PROMPTS[i],
            agree[i]
        );
    }

    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let backends = proxy.backends().await.unwrap();
    let gpu = backends
        .iter()
        .find(|b| b.kind == "gpu" || b.kind == "igpu")
        .unwrap_or_else(|| panic!("no Vulkan device listed (is mesa-vulkan-drivers installed?): {backends:?}"));
    assert!(gpu.name.starts_with("Vulkan") && gpu.owned && gpu.memory_total > 0, "{gpu:?}");

    let models = proxy.list_models().await.unwrap();
    let m = models.iter().find(|m| m.loaded).expect("a loaded model");
    assert_eq!(m.gpu_device.as_deref(), Some(gpu.name.as_str()), "{m:?}");
    assert!(m.layers.is_some_and(|n| n > 1) && m.gpu_layers == m.layers, "every layer offloaded: {m:?}");
    assert_eq!(m.sandbox_seccomp, Some(true));
    assert_eq!(m.sandbox_gpu_access.as_deref(), Some("exec-memory"), "lavapipe compiles shaders to CPU code");
    // The device memory hearthd counted before loading, against what llama.cpp allocated.
    let log = daemon.log();
    let allocated = ["model", "KV", "compute"].iter().map(|what| logged_mib(&log, &gpu.name, what)).sum::<f64>();
    let counted = m.device_bytes.unwrap() as f64 / f64::from(1 << 20);
    assert!(allocated > 0.0, "llama.cpp logged no {} buffers:\n{log}", gpu.name);
    assert!(
        (counted - allocated).abs() <= allocated * 0.05,
        "counted {counted:.1} MiB, llama.cpp allocated {allocated:.1}"
    );
    let gpu_now = proxy.backends().await.unwrap().into_iter().find(|b| b.name == gpu.name).unwrap();
    assert_eq!(gpu_now.used_bytes, m.device_bytes);

    // Only the engine holds the driver: hearthd never enumerated the device.
    let engine = m.engine_pid.expect("engine pid");
    assert!(maps(engine).contains("libvulkan_lvp"), "the engine has not loaded lavapipe");
    assert!(!maps(daemon.pid().as_raw() as u32).contains("libvulkan_lvp"), "hearthd itself loaded the Vulkan driver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_too_big_for_the_device_budget_is_refused_with_the_layers_that_fit() {
    let bus = Bus::start();
    let daemon = Daemon::start_configured(&bus, &on_gpu(-1, "device_budget_mib = 160\n")).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    let e = proxy.complete(chat_request("Hi", 4)).await.expect_err("the model does not fit 160 MiB");
    assert_eq!(e.dbus_name(), "org.hearth.Hearth1.Error.ModelUnavailable", "{e:?}");
    let message = e.message();
    assert!(message.contains("device budget of 160.0 MiB"), "{message}");
    let fits: i32 = message
        .split("gpu_layers = ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no layer count that fits in {message:?}"));
    assert!(fits > 0, "{message}");
    assert!(fits < 31, "the default model has 30 layers and an output layer: {message}");
    // Nothing was loaded: the refusal came before any engine started.
    let models = proxy.list_models().await.unwrap();
    assert!(models.iter().all(|m| !m.loaded), "{models:?}");
    assert!(!daemon.log().contains("model loaded"), "an engine started for a model that does not fit");
}
