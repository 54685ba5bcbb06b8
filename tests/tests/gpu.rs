//! The Vulkan build of the engine on a real Vulkan driver: Mesa's lavapipe, which runs on the
//! CPU (slowly) but is a conformant Vulkan 1.3 implementation, so the whole path runs here:
//! the device listing, every layer offloaded, the device budget and the GPU's sandbox.
//! Built only with `--features vulkan` (scripts/test.sh builds hearthd
//! with it first and shows lavapipe to ggml with GGML_VK_VISIBLE_DEVICES), or with `cuda`
//! on an NVIDIA GPU (scripts/gpu-check.sh).
#![cfg(any(feature = "vulkan", feature = "cuda"))]

use std::time::Duration;

use hearth_dbus::{Generation, StreamEvent};
use hearth_tests::soc::{Soc, SocParams};
use hearth_tests::{Bus, DEFAULT_MODEL, Daemon, ModelDir, Settings, chat_request, hearth};

const PROMPTS: [&str; 6] = hearth_tests::SIX_PROMPTS;
const TOKENS: u32 = 40;
/// Tokens of every answer that must agree with the CPU's: a device computing anything but
/// the model parts from it at once.
const AGREE: usize = 3;
/// Tokens of every answer that must agree with the CPU's when neither backend rounds (F32
/// weights and KV cache, ggml-vulkan's f16 arithmetic off).
const AGREE_UNROUNDED: usize = 32;
/// What the engine's sandbox lets the driver do beyond the CPU's syscalls, and the driver
/// library only the engine maps: lavapipe's, or NVIDIA's.
const DRIVER: (&str, &str) =
    if cfg!(feature = "cuda") { ("nvidia-ioctl", "libcuda.so") } else { ("exec-memory", "libvulkan_lvp") };

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
    let settings = Settings {
        engine: format!("{}{}", cpu.engine, offloaded.engine),
        env: [cpu.env.clone(), offloaded.env].concat(),
        ..cpu.clone()
    };
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
/// Not here: batching on the device (README, "The GPU"). Bookworm's lavapipe (Mesa 22.3)
/// crashes when ggml-vulkan builds a pipeline for a new batch shape while its queue thread
/// runs earlier work; Mesa 25's does not, but there ggml-vulkan's kernel choice follows the
/// batch (mat-vec up to 8 rows, tiled f16 matmul past that), so a request batched with
/// another's prompt is not computed as alone.
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
    assert!(
        (gpu.name.starts_with("Vulkan") || gpu.name.starts_with("CUDA")) && gpu.owned && gpu.memory_total > 0,
        "{gpu:?}"
    );

    let models = proxy.list_models().await.unwrap();
    let m = models.iter().find(|m| m.loaded).expect("a loaded model");
    assert_eq!(m.gpu_device.as_deref(), Some(gpu.name.as_str()), "{m:?}");
    assert!(m.layers.is_some_and(|n| n > 1) && m.gpu_layers == m.layers, "every layer offloaded: {m:?}");
    assert_eq!(m.sandbox_seccomp, Some(true));
    assert_eq!(m.sandbox_gpu_access.as_deref(), Some(DRIVER.0), "the driver's sandbox allowance");
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
    assert!(maps(engine).contains(DRIVER.1), "the engine has not loaded {}", DRIVER.1);
    assert!(!maps(daemon.pid().as_raw() as u32).contains(DRIVER.1), "hearthd itself loaded {}", DRIVER.1);
}

/// The default model's weights dequantized to F32 (tests/tools/dequantize.py, once, in
/// target/gpu-models).
fn f32_model() -> std::path::PathBuf {
    let root = hearth_tests::workspace_root();
    let out = root.join("target/gpu-models/smollm2-135m-instruct.F32.gguf");
    if !out.exists() {
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let python = root.join(".venv/bin/python");
        assert!(python.exists(), "{} is missing: run scripts/setup-deps.sh", python.display());
        let partial = out.with_extension("partial");
        let status = std::process::Command::new(python)
            .arg(root.join("tests/tools/dequantize.py"))
            .arg(hearth_tests::model_path())
            .arg(&partial)
            .status()
            .expect("run dequantize.py");
        assert!(status.success(), "dequantize.py: {status}");
        std::fs::rename(&partial, &out).unwrap();
    }
    out
}

/// Where the backends' numerics are made the same, the device must give the CPU's tokens:
/// the default model's weights in F32, an F32 KV cache, and ggml-vulkan's f16 arithmetic off
/// (GGML_VK_DISABLE_F16; lavapipe offers f16, and ggml-vulkan would round activations and
/// attention to it). Then nothing is rounded differently and only the order of summation
/// differs, so every answer must agree with the CPU's on its first 32 tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrounded_weights_and_cache_give_the_cpus_tokens_on_the_device() {
    let bus = Bus::start();
    let dir = ModelDir::new();
    dir.link_model(&f32_model(), "smollm2-f32.gguf");
    dir.manifest(DEFAULT_MODEL, "smollm2-f32.gguf", None, "");
    let cpu = Settings {
        models_dirs: Some(vec![dir.path().to_owned()]),
        engine: "kv_cache = \"f32\"\n".into(),
        env: vec![("GGML_VK_DISABLE_F16".into(), "1".into())],
        ..Settings::default()
    };
    let (Compared { cpu, gpu: on_device, agree, rate }, _daemon) = cpu_and_gpu(&bus, &cpu).await;
    let equal = cpu.iter().zip(&on_device).filter(|(c, g)| c.0 == g.0).count();
    eprintln!(
        "F32 weights and KV cache, f16 off, every layer on lavapipe: {equal} of {} prompts equal to the CPU \
         token for token; agreeing prefixes {agree:?} of {TOKENS}; {rate:.1} tok/s",
        PROMPTS.len()
    );
    for (i, ((c, c_end), (g, g_end))) in cpu.iter().zip(&on_device).enumerate() {
        let needed = AGREE_UNROUNDED.min(c.len()).min(g.len());
        assert!(
            agree[i] >= needed,
            "prompt {i} ({:?}): unrounded, the GPU agrees with the CPU on {} tokens, fewer than {needed} \
             (CPU {c_end}: {c:?}; GPU {g_end}: {g:?})",
            PROMPTS[i],
            agree[i]
        );
    }
}

/// Tokens one stream of long answers decodes in `window` (one at a time: bookworm's lavapipe
/// does not batch; see above). Every answer must end well.
async fn decoded_in(conn: &zbus::Connection, window: Duration) -> usize {
    let start = std::time::Instant::now();
    let (mut n, mut tokens) = (0, 0);
    while start.elapsed() < window {
        let prompt = "Write a long story about a lighthouse keeper and the sea.";
        let mut g = Generation::start(conn, chat_request(prompt, 200), &format!("w{n}")).await.unwrap();
        n += 1;
        while let Some(ev) = g.next().await {
            match ev.unwrap() {
                StreamEvent::Token { .. } if start.elapsed() < window => tokens += 1,
                StreamEvent::Token { .. } => {
                    let _ = g.cancel().await;
                }
                StreamEvent::Migrated { .. } => {}
                StreamEvent::Finished(r) => {
                    assert!(["stop", "length", "cancelled"].contains(&r.finish_reason.as_str()), "{r:?}");
                    break;
                }
            }
        }
    }
    tokens
}

/// The thermal governor paces the GPU's steps as it does the CPU's: past the trip, the
/// engine with every layer on the device waits between steps (duty cycle), Throttle names
/// the device, and decoding slows to the governor's floor. On lavapipe the device's work is
/// CPU time, so the simulated phone's zone follows it as a real GPU's would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_thermal_governor_paces_the_gpus_steps() {
    let phone = SocParams::at_rest(40.0, 80.0);
    let soc = Soc::new(phone);
    let bus = Bus::start();
    // A floor low enough that pacing shows against lavapipe's few tokens per second.
    let settings =
        Settings { governor: format!("{}min_rate_tps = 0.2\n", soc.governor_settings(100)), ..on_gpu(-1, "") };
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let proxy = hearth(&conn).await;
    // Load, and compile the shaders of the prompt and decode shapes, before timing.
    decoded_in(&conn, Duration::from_secs(3)).await;
    let gpu = proxy.backends().await.unwrap().into_iter().find(|b| b.kind == "gpu" || b.kind == "igpu").unwrap();
    let cool = proxy.throttle().await.unwrap();
    assert_eq!(cool.gpu.as_deref(), Some(gpu.name.as_str()), "{cool:?}");
    assert_eq!(cool.duty, 1.0, "nothing asked of a cool phone: {cool:?}");
    let window = Duration::from_secs(10);
    let unthrottled = decoded_in(&conn, window).await;

    soc.set_temp(phone.passive_trip_c + 3.0);
    let hot = hearth_tests::wait_for(Duration::from_secs(10), "the governor to throttle", || {
        let proxy = proxy.clone();
        async move { proxy.throttle().await.ok().filter(|t| t.duty < 0.5) }
    })
    .await;
    assert_eq!(hot.gpu.as_deref(), Some(gpu.name.as_str()), "{hot:?}");
    let throttled = decoded_in(&conn, window).await;
    eprintln!(
        "lavapipe, every layer offloaded, one stream over {window:?}: {unthrottled} tokens cool, {throttled} past the trip \
         (duty {:.3}, potential {:.1} tok/s)",
        hot.duty, hot.potential_tps
    );
    assert!(unthrottled >= 10, "the device decoded only {unthrottled} tokens in {window:?}");
    assert!(
        (throttled as f64) <= unthrottled as f64 * 0.5,
        "past the trip the GPU engine decoded {throttled} tokens, unthrottled {unthrottled}: its steps were not paced"
    );
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
