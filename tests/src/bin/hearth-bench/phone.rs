//! Phone-sized models (0.5B, 1.5B, 3B llama-style, Q4_0 and Q8_0) with seeded random
//! weights, generated once into `target/phone-models` by `tests/tools/make-phone-model.py`:
//! at these sizes decode is bound by memory bandwidth, so the bench measures this machine's
//! read bandwidth itself and reports, per model, single-stream decode through D-Bus,
//! llama-bench's `tg` on the same file and threads, and the roofline fraction
//! (tok/s × bytes of weights ÷ bandwidth). Random weights accept no speculative drafts, so
//! it reports instead what verifying k tokens of one sequence in one step costs against a
//! one-token step: in the bandwidth-bound regime that is the speed-up drafts can reach.
//! Each model's energy per generated token comes from the ledger, with its source.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use hearth_dbus::request_key as key;
use hearth_ffi::{Backend, Batch, Context, ContextParams, Model, ModelParams};
use hearth_tests::{BATCH, Bus, CONTEXT, Daemon, ModelDir, Settings, chat_request, threads, workspace_root};
use zbus::Variant;

use super::{contention::llama_tool, median, over_dbus_request, over_dbus_result};

/// (size, quantization) of the phone models; the largest is left out of `--quick`.
const FULL: [(&str, &str); 5] =
    [("0.5b", "q4_0"), ("0.5b", "q8_0"), ("1.5b", "q4_0"), ("1.5b", "q8_0"), ("3b", "q4_0")];
const QUICK: [(&str, &str); 1] = [("0.5b", "q4_0")];

/// Verification batch sizes reported.
const VERIFY: [usize; 4] = [1, 2, 4, 8];

#[derive(Debug, Clone)]
pub struct PhoneResult {
    pub name: String,
    pub weight_bytes: u64,
    pub dbus_tok_s: f64,
    pub llama_bench_tok_s: Option<f64>,
    /// dbus tok/s × weight bytes ÷ bandwidth.
    pub roofline: f64,
    /// Time of a k-token step of one sequence over a 1-token step, for k in [`VERIFY`].
    pub verify_cost: Vec<(usize, f64)>,
    /// The energy ledger's mJ per generated token (median of the runs), and its source.
    pub energy_mj_per_token: Option<f64>,
    pub energy_source: String,
}

/// The model file for (size, quantization), generated on first use.
fn ensure(size: &str, quant: &str) -> PathBuf {
    let root = workspace_root();
    let dir = root.join("target/phone-models");
    let path = dir.join(format!("random-{size}-{quant}.gguf"));
    if !path.exists() {
        std::fs::create_dir_all(&dir).expect("target/phone-models");
        let partial = path.with_extension("partial");
        let started = Instant::now();
        let status = Command::new(root.join(".venv/bin/python"))
            .arg(root.join("tests/tools/make-phone-model.py"))
            .arg(hearth_tests::model_path())
            .arg(&partial)
            .args(["--size", size, "--type", quant])
            .status()
            .expect("run make-phone-model.py (scripts/setup-deps.sh installs gguf-py)");
        assert!(status.success(), "make-phone-model.py {size} {quant}: {status}");
        std::fs::rename(&partial, &path).expect("rename phone model");
        eprintln!("generated {} in {:.1} s", path.display(), started.elapsed().as_secs_f64());
    }
    path
}

/// This machine's memory read bandwidth in bytes/s: `threads()` threads each summing their
/// part of a 1 GiB buffer (well past every cache), best of 5.
pub fn read_bandwidth() -> f64 {
    const WORDS: usize = (1 << 30) / 8;
    let buf: Vec<u64> = (0..WORDS as u64).collect();
    let n = threads().max(1) as usize;
    let mut best = 0.0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let sums: u64 = std::thread::scope(|s| {
            let parts: Vec<_> = buf
                .chunks(WORDS.div_ceil(n))
                .map(|part| s.spawn(move || part.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            parts.into_iter().map(|h| h.join().expect("reader")).fold(0, u64::wrapping_add)
        });
        std::hint::black_box(sums);
        best = best.max((WORDS * 8) as f64 / started.elapsed().as_secs_f64());
    }
    best
}

/// llama-bench's tg tok/s for `path` at the bench's threads, with flash attention.
fn llama_bench(path: &Path, tokens: u32) -> Option<f64> {
    let bin = llama_tool("llama-bench", "HEARTH_LLAMA_BENCH")?;
    let out = Command::new(bin)
        .arg("-m")
        .arg(path)
        .args(["-t", &threads().to_string(), "-fa", "1", "-p", "0", "-n", &tokens.to_string(), "-r", "3", "-o", "json"])
        .output()
        .ok()?;
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    runs.as_array()?.first()?["avg_ts"].as_f64()
}

/// Median time of a k-token decode step of one sequence over that of a 1-token step, after
/// a 64-token prompt (each step's KV removed again, so every step sees the same cache).
fn verify_cost(model: &Arc<Model>) -> Vec<(usize, f64)> {
    let params = ContextParams {
        n_ctx: CONTEXT,
        n_batch: BATCH,
        n_seq_max: 1,
        n_threads: threads(),
        n_threads_batch: threads(),
        ..ContextParams::default()
    };
    let mut ctx = Context::new(Arc::clone(model), params).expect("context");
    let tokens =
        model.tokenize(&"The quick brown fox jumps over the lazy dog. ".repeat(7), true, false).expect("tokens");
    let prompt = &tokens[..64.min(tokens.len())];
    let mut batch = Batch::new(BATCH as usize, 1);
    for (i, &t) in prompt.iter().enumerate() {
        batch.push(t, i as i32, &[0], false).expect("push");
    }
    ctx.decode(&batch).expect("prefill");
    let at = prompt.len() as i32;
    let mut step = |k: usize| {
        batch.clear();
        for i in 0..k {
            batch.push(prompt[i % prompt.len()], at + i as i32, &[0], true).expect("push");
        }
        let started = Instant::now();
        ctx.decode(&batch).expect("verify step");
        let took = started.elapsed().as_secs_f64();
        assert!(ctx.truncate_sequence(0, at));
        took
    };
    step(1);
    let time = |k: usize, step: &mut dyn FnMut(usize) -> f64| median((0..7).map(|_| step(k)).collect());
    let one = time(1, &mut step);
    VERIFY.iter().map(|&k| (k, time(k, &mut step) / one)).collect()
}

/// Runs every phone model (the smallest only in `quick`) through a daemon of its own.
pub async fn measure(quick: bool, tokens: u32, bandwidth: f64) -> Vec<PhoneResult> {
    let models: Vec<_> = if quick { QUICK.to_vec() } else { FULL.to_vec() };
    let dir = ModelDir::new();
    // The daemon wants its default model in the directory too.
    dir.link_default_model("default.gguf");
    dir.manifest(hearth_tests::DEFAULT_MODEL, "default.gguf", None, "");
    let mut names = Vec::new();
    for &(size, quant) in &models {
        let name = format!("random-{size}-{quant}");
        let file = format!("{name}.gguf");
        let src = ensure(size, quant);
        dir.link_model(&src, &file);
        dir.manifest(&name, &file, None, "");
        names.push((name, src));
    }
    let settings = Settings {
        models_dirs: Some(vec![dir.path().to_owned()]),
        // The ledger reads the machine's own counters (RAPL, a battery) where it has them.
        energy: "sysfs_root = \"/sys\"\n".into(),
        ..Settings::default()
    };
    let bus = Bus::start();
    let _daemon = Daemon::start_configured(&bus, &settings).await;
    let conn = bus.connect().await;
    let mut out = Vec::new();
    for (i, (name, path)) in names.into_iter().enumerate() {
        let request = |n: u32| {
            let mut r = chat_request("Tell me about the sea.", n);
            r.insert(key::MODEL, Variant::from(name.clone()));
            // llama-bench decodes plainly: so does the run it is compared with.
            r.insert(key::SPECULATIVE, Variant::from(false));
            r
        };
        // Load and warm, then measure.
        over_dbus_request(&conn, request(4), &format!("phone{i}warm")).await;
        let (mut rates, mut energy, mut energy_source) = (Vec::new(), Vec::new(), "off".to_owned());
        for rep in 0..3 {
            let (s, result) = over_dbus_result(&conn, request(tokens), &format!("phone{i}x{rep}")).await;
            // A random model that chose an end token would make a rate of a few tokens.
            assert_eq!(s.tokens, tokens as usize, "{name} stopped early: its rate would mean nothing");
            rates.push(s.decode_tps);
            energy.extend(result.energy_mj.map(|mj| mj / s.tokens.max(1) as f64));
            energy_source = result.energy_source.clone().unwrap_or(energy_source);
        }
        let dbus_tok_s = median(rates);
        let energy_mj_per_token = (!energy.is_empty()).then(|| median(energy));
        let model = Arc::new(Model::load(Backend::init(), &path, &ModelParams::default()).expect("load phone model"));
        let weight_bytes = model.size_bytes();
        let verify = verify_cost(&model);
        drop(model);
        out.push(PhoneResult {
            llama_bench_tok_s: llama_bench(&path, tokens),
            name,
            weight_bytes,
            dbus_tok_s,
            roofline: dbus_tok_s * weight_bytes as f64 / bandwidth,
            verify_cost: verify,
            energy_mj_per_token,
            energy_source,
        });
    }
    out
}

pub fn json(phones: &[PhoneResult]) -> serde_json::Value {
    phones
        .iter()
        .map(|p| {
            serde_json::json!({
                "model": p.name, "weight_bytes": p.weight_bytes, "dbus_decode_tok_s": p.dbus_tok_s,
                "llama_bench_tg_tok_s": p.llama_bench_tok_s,
                "dbus_over_llama_bench": p.llama_bench_tok_s.map(|l| p.dbus_tok_s / l),
                "roofline_fraction": p.roofline,
                "energy": { "mj_per_generated_token": p.energy_mj_per_token, "source": p.energy_source },
                "verify_step_cost": p.verify_cost.iter().map(|(k, c)| serde_json::json!({"k": k, "cost_over_one": c})).collect::<Vec<_>>(),
            })
        })
        .collect()
}

pub fn print(bandwidth: f64, phones: &[PhoneResult]) {
    println!("memory read bandwidth ({} threads): {:.1} GB/s", hearth_tests::threads(), bandwidth / 1e9);
    for p in phones {
        let peer = p.llama_bench_tok_s.map_or("llama-bench not built".to_owned(), |l| {
            format!("llama-bench tg {l:.1}, D-Bus/llama-bench {:.3}", p.dbus_tok_s / l)
        });
        let verify: Vec<_> = p.verify_cost.iter().map(|(k, c)| format!("k={k} {c:.2}")).collect();
        let energy = p.energy_mj_per_token.map_or("no energy figure".to_owned(), |mj| {
            format!("{mj:.1} mJ per generated token ({})", p.energy_source)
        });
        println!(
            "{} ({:.2} GB): decode D-Bus {:.1} tok/s, {peer}, roofline {:.0}%, {energy}; a k-token step costs {} one-token steps",
            p.name,
            p.weight_bytes as f64 / 1e9,
            p.dbus_tok_s,
            p.roofline * 100.0,
            verify.join(", ")
        );
    }
}
