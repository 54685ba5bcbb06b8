//! Decode beside busy processes, as on a phone where other apps always run: single-stream
//! decode through D-Bus, through hearth-ffi directly and through llama.cpp's own
//! llama-server (same model file, threads, context and flash attention), with 0, 1 and 2
//! processes spinning on the CPU beside them, the three alternating in each repetition.
//!
//! llama-server's figure is its own decode timing (`timings`: tokens after the first over
//! the generation time), which leaves out its HTTP work; Hearth's D-Bus figure is timed by
//! the client, D-Bus included. llama-server is built with OpenMP (llama.cpp's default), the
//! engine with ggml's own thread pool.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{ASKERS, DECODE_PROMPT, direct, median, over_dbus};
use hearth_tests::{CONTEXT, Daemon, model_path, threads, workspace_root};

/// The flag that turns this binary into a busy process.
pub const SPIN_FLAG: &str = "--spin";

/// Spins on the CPU (a busy app beside the daemon) until killed, or until the bench that
/// started it is gone (killed itself, it could not kill its busy processes).
pub fn spin() -> ! {
    let parent = std::os::unix::process::parent_id();
    let mut x = 0u64;
    loop {
        for _ in 0..10_000_000 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        if std::os::unix::process::parent_id() != parent {
            std::process::exit(0);
        }
    }
}

/// `n` busy processes, killed on drop.
struct Busy(Vec<Child>);

impl Busy {
    fn start(n: usize) -> Self {
        let exe = std::env::current_exe().expect("own path");
        Self((0..n).map(|_| Command::new(&exe).arg(SPIN_FLAG).spawn().expect("busy process")).collect())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// llama-server from `tests/tools/build-llama-tools.sh`, or the one `HEARTH_LLAMA_SERVER` names.
pub fn llama_tool(name: &str, env: &str) -> Option<PathBuf> {
    std::env::var_os(env)
        .map(PathBuf::from)
        .or_else(|| Some(workspace_root().join("target/llama-tools/bin").join(name)))
        .filter(|p| p.is_file())
}

/// A running llama-server on the default model.
pub struct Peer {
    child: Child,
    url: String,
    http: reqwest::Client,
}

/// One greedy request to llama-server: its decode rate and speculative counts.
pub struct PeerRun {
    pub tok_s: f64,
    pub drafted: u64,
    pub accepted: u64,
}

impl Peer {
    /// Starts `bin` with one slot and `extra` arguments (e.g. its speculative mode).
    pub async fn start(bin: &Path, extra: &[&str]) -> Option<Self> {
        Self::start_slots(bin, 1, extra).await
    }

    /// Starts `bin` with `slots` slots of hearthd's context each, and `extra` arguments.
    pub async fn start_slots(bin: &Path, slots: usize, extra: &[&str]) -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let t = threads().to_string();
        // setpriv: it dies with the bench, however the bench ends.
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .args(["-m", model_path().to_str()?, "-t", &t, "-tb", &t, "-fa", "on", "-np", &slots.to_string()])
            .args(["-c", &(CONTEXT as usize * slots).to_string(), "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // A new connection per request: llama-server closes idle keep-alive connections, and a
        // reused one that it closed fails the next request (IncompleteMessage).
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().ok()?;
        let peer = Self { child, url: format!("http://127.0.0.1:{port}"), http };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if peer.http.get(format!("{}/health", peer.url)).send().await.is_ok_and(|r| r.status().is_success()) {
                return Some(peer);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// llama-server's decode tok/s for one greedy chat request.
    pub async fn decode(&self, prompt: &str, max_tokens: u32) -> f64 {
        self.run(prompt, max_tokens).await.tok_s
    }

    /// One greedy chat request.
    pub async fn run(&self, prompt: &str, max_tokens: u32) -> PeerRun {
        let body = serde_json::json!({
            "messages": [{ "role": "user", "content": prompt }],
            "max_tokens": max_tokens, "temperature": 0.0, "cache_prompt": false,
        });
        let r: serde_json::Value = self
            .http
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&body)
            .send()
            .await
            .expect("llama-server request")
            .json()
            .await
            .expect("llama-server answer");
        // Its first token comes from the prompt's step: the generation time covers the
        // other n - 1, as Hearth's client-side rate does.
        let t = &r["timings"];
        let (n, ms) = (t["predicted_n"].as_f64(), t["predicted_ms"].as_f64());
        let (n, ms) = n.zip(ms).expect("llama-server timings");
        PeerRun {
            tok_s: (n - 1.0) / (ms / 1e3),
            drafted: t["draft_n"].as_u64().unwrap_or(0),
            accepted: t["draft_n_accepted"].as_u64().unwrap_or(0),
        }
    }

    /// One greedy chat request, streamed: the time from `since` to its first token (ms) and
    /// how many tokens came.
    pub async fn stream(&self, prompt: String, max_tokens: u32, since: Instant) -> (f64, usize) {
        let body = serde_json::json!({
            "messages": [{ "role": "user", "content": prompt }],
            "max_tokens": max_tokens, "temperature": 0.0, "cache_prompt": false, "stream": true,
            "stream_options": { "include_usage": true },
        });
        let mut r = self
            .http
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&body)
            .send()
            .await
            .expect("llama-server request");
        let (mut first, mut tokens, mut pending) = (None, 0, String::new());
        while let Some(bytes) = r.chunk().await.expect("llama-server stream") {
            pending.push_str(&String::from_utf8_lossy(&bytes));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                let Some(data) = line.trim().strip_prefix("data: ") else { continue };
                let Ok(event) = serde_json::from_str::<serde_json::Value>(data) else { continue };
                if event["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                    first.get_or_insert_with(|| since.elapsed().as_secs_f64() * 1e3);
                }
                if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
                    tokens = n as usize;
                }
            }
        }
        (first.expect("llama-server sent no token"), tokens)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Decode tok/s beside `busy` processes.
#[derive(Debug, Clone, Copy)]
pub struct Contended {
    pub busy: usize,
    pub dbus_tok_s: f64,
    pub direct_tok_s: f64,
    /// llama-server's, when one was found.
    pub llama_server_tok_s: Option<f64>,
    /// The compute threads hearthd's engine had chosen when the level ended, and how many
    /// other counts it tried during the level.
    pub dbus_threads: i32,
    pub dbus_probes: usize,
}

/// The thread count the engine's tuner last chose in `log` (hearthd's, debug level), or
/// `configured` where it chose none.
fn chosen_threads(log: &str, configured: i32) -> i32 {
    log.lines()
        .rev()
        .filter(|l| l.contains("the probed count steps faster"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("threads=")?.parse().ok()))
        .next()
        .unwrap_or(configured)
}

/// Runs the decode measurement beside 0, 1 and 2 busy processes.
pub async fn measure(conn: &zbus::Connection, daemon: &Daemon, reps: usize, tokens: u32) -> Vec<Contended> {
    let peer = match llama_tool("llama-server", "HEARTH_LLAMA_SERVER") {
        Some(bin) => {
            let peer = Peer::start(&bin, &[]).await;
            if peer.is_none() {
                eprintln!("warning: {} did not start; its column is left out", bin.display());
            }
            peer
        }
        None => None,
    };
    let mut out = Vec::new();
    for busy in 0..=2 {
        let log_before = daemon.log().len();
        let _busy = Busy::start(busy);
        let (mut bus, mut ffi, mut srv) = (vec![], vec![], vec![]);
        for rep in 0..reps {
            let prompt = format!("{} asks: {DECODE_PROMPT}", ASKERS[(busy * reps + rep) % ASKERS.len()]);
            // Each path first in turn.
            for k in 0..3 {
                match (rep + k) % 3 {
                    0 => bus.push(over_dbus(conn, &prompt, tokens, &format!("c{busy}x{rep}")).await.decode_tps),
                    1 => ffi.push(direct(&prompt, tokens).decode_tps),
                    _ => {
                        if let Some(p) = &peer {
                            srv.push(p.decode(&prompt, tokens).await);
                        }
                    }
                }
            }
        }
        let log = daemon.log();
        let level = log.get(log_before..).unwrap_or_default();
        let dbus_threads = chosen_threads(level, out.last().map_or(threads(), |c: &Contended| c.dbus_threads));
        let dbus_probes = level.matches("compute threads: probing").count();
        // The engine's thread decisions, on stderr: a slow level is explained by them.
        for line in level.lines().filter(|l| l.contains("compute threads") || l.contains("steps faster")) {
            eprintln!("  [{busy} busy] {line}");
        }
        out.push(Contended {
            busy,
            dbus_tok_s: median(bus),
            direct_tok_s: median(ffi),
            llama_server_tok_s: (!srv.is_empty()).then(|| median(srv)),
            dbus_threads,
            dbus_probes,
        });
    }
    out
}

pub fn json(contended: &[Contended]) -> serde_json::Value {
    contended
        .iter()
        .map(|c| {
            serde_json::json!({
                "busy_processes": c.busy, "dbus_decode_tok_s": c.dbus_tok_s, "direct_decode_tok_s": c.direct_tok_s,
                "llama_server_decode_tok_s": c.llama_server_tok_s, "dbus_threads_chosen": c.dbus_threads,
                "dbus_thread_probes": c.dbus_probes,
                "dbus_over_llama_server": c.llama_server_tok_s.map(|s| c.dbus_tok_s / s),
            })
        })
        .collect()
}

pub fn print(contended: &[Contended]) {
    for c in contended {
        let peer = c.llama_server_tok_s.map_or("llama-server not built".to_owned(), |s| {
            format!("llama-server {s:.1}, D-Bus/llama-server {:.3}", c.dbus_tok_s / s)
        });
        println!(
            "decode beside {} busy processes: D-Bus {:.1} (on {} threads, {} probes), direct {:.1}, {peer}",
            c.busy, c.dbus_tok_s, c.dbus_threads, c.dbus_probes, c.direct_tok_s
        );
    }
}
